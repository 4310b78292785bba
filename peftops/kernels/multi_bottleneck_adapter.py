r"""Triton kernels for per-row bottleneck adapter banks (``peftops.bottleneck_adapter`` with
``adapter_ids``, the op ``multi_bottleneck_adapter``), registered as its ``triton`` backend.

The tokens are grouped by adapter as the multi-LoRA kernels group them (the same tile table,
:func:`peftops.kernels.multi_lora_linear._tiles`, built on the device: no host
synchronisation): a stable sort of the ids cut into tiles of at most BLOCK_M tokens that never
straddle two adapters, the tokens without an adapter one more group; every kernel reads and
writes tokens through the permutation, in the caller's order, nothing copied. For a tile of
adapter ``a`` (``M_a`` its rank mask; loads past the slot's rank are masked, so a rank-r slot
moves rank-r bytes)::

    _seg_down_kernel   h_t  = (x_t Wd_a^T) * M_a                 (T, r_max) float32; then + bd_a
    _bank_up_kernel    y_t  = res_t + s (act(h_t) Wu_a^T + bu_a)  y written once; y_t = res_t
                                                                  for a token without adapter
backward::

    _seg_down_kernel   da_t = s (g_t Wu_a) * M_a
                       dh_t = da_t * act'(h_t)                    elementwise, T x r_max
    _bank_up_kernel    dx_t = dh_t Wd_a (+ g_t serial)
    _seg_tn_kernel     dWu_a = s sum_{t in a} g_t^T act(h_t)      one program per (adapter,
                       dWd_a = sum_{t in a} dh_t^T x_t            block): tokens in order, no
                       dbu_a, dbd_a: the column sums of the       atomics; absent adapters
                       same loaded tiles                          get zeros, their weights unread

The rank-r values stay float32 up to the products, where they are rounded to the input dtype
(in float16 without the single adapter kernels' scaling into range: a bank's activations
beyond 65504 overflow there). Block sizes are the single adapter's row kernels' (untuned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .. import reference
from ..backends import OpImpl, register_impl
from ..reference.multi_lora_linear import rank_mask, token_groups
from .bottleneck_adapter import _act, _blocks, _expand
from .common import ACT_CODES, dot_precision, dtype_reason, empty, on_device
from .lowrank import fp16_scaled, pow2
from .multi_lora_linear import _seg_down_kernel, _seg_tn_kernel, _tile_rows, _tiles

OP = "multi_bottleneck_adapter"
#: Each kernel holds a token's whole rank-r row in one register tile (BLOCK_R = pow2(r_max)).
MAX_RANK = 128


@triton.jit
def _bank_up_kernel(
    P,
    W,
    BIAS,
    RES,
    OUT,
    RANKS,
    TILE_SEG,
    TILE_START,
    SEG_START,
    SEG_COUNT,
    PERM,
    M,
    D,
    R,
    N_ADAPTERS,
    stride_pm,
    stride_pr,
    stride_wa,
    stride_wd,
    stride_wr,
    stride_ba,
    stride_rm,
    stride_rd,
    stride_om,
    stride_od,
    scale,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_RANKS: tl.constexpr,
    SCALE_A: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``OUT_t = RES_t + scale * (act(P_t) W_a^T + BIAS_a)`` for the tile's tokens, ``W_a: (D, R)``
    of the tile's adapter by strides (``ACT < 0``: no activation); ``OUT_t = RES_t`` (or 0
    without ``RES``) for the tokens without an adapter."""
    seg, tok, in_tile = _tile_rows(TILE_SEG, TILE_START, SEG_START, SEG_COUNT, PERM, N_ADAPTERS, BLOCK_M)
    # Rows that are not the tile's point past the last token: _expand masks them by rows < M.
    rows = tl.where(in_tile, tok, M)
    if seg < N_ADAPTERS:
        a = seg.to(tl.int64)
        rank = R
        if HAS_RANKS:
            rank = tl.minimum(tl.load(RANKS + a).to(tl.int32), R)
        rs = tl.arange(0, BLOCK_R)[None, :]
        p = tl.load(P + rows * stride_pm + rs * stride_pr, mask=(rows < M) & (rs < rank), other=0.0).to(tl.float32)
        if ACT >= 0:
            p = _act(p, ACT)
        _expand(
            p,
            rows,
            W + a * stride_wa,
            BIAS + a * stride_ba,
            RES,
            OUT,
            M,
            D,
            rank,
            stride_wd,
            stride_wr,
            stride_rm,
            stride_rd,
            stride_om,
            stride_od,
            scale,
            HAS_BIAS,
            HAS_RES,
            SCALE_A,
            PRECISION,
            BLOCK_D,
            BLOCK_R,
        )
    elif seg == N_ADAPTERS:
        for d0 in range(0, D, BLOCK_D):
            cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)[None, :]
            mask = (rows < M) & (cols < D)
            if HAS_RES:
                v = tl.load(RES + rows * stride_rm + cols * stride_rd, mask=mask, other=0.0)
            else:
                v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            tl.store(OUT + rows * stride_om + cols * stride_od, v.to(OUT.dtype.element_ty), mask=mask)


def _config(x, r_max):
    block_r, cfg = _blocks(r_max, x.device, x.shape[0], x.shape[1], x.dtype)
    return block_r, cfg


def _down(x, w, w_strides, scales, ranks, tiles, r_max, cfg):
    """``out_t = s_a * (x_t W_a) * M_a`` in float32, ``(T, r_max)``; zeros for the tokens without an adapter."""
    perm, start, count, tile_seg, tile_start, max_tiles = tiles
    t, k = x.shape
    out = empty((t, r_max), dtype=torch.float32, device=x.device)
    _seg_down_kernel[(max_tiles,)](
        x,
        w,
        scales,
        ranks if ranks is not None else scales,
        out,
        scales,
        tile_seg,
        tile_start,
        start,
        count,
        perm,
        k,
        r_max,
        scales.shape[0],
        x.stride(0),
        x.stride(1),
        *w_strides,
        out.stride(0),
        out.stride(1),
        0.0,
        HAS_RANKS=ranks is not None,
        HAS_DROPOUT=False,
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_D"],
        BLOCK_R=pow2(r_max),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _up(p, w, w_strides, d, bias, res, ranks, activation, scale, tiles, out_dtype, cfg, *, scale_a):
    """``out_t = res_t + scale * (act(p_t) W_a^T + bias_a)``, ``W_a: (d, r)`` by ``w_strides``
    (adapter, d, r); ``res_t`` (or 0) for the tokens without an adapter."""
    perm, start, count, tile_seg, tile_start, max_tiles = tiles
    t, r_max = p.shape
    out = empty((t, d), dtype=out_dtype, device=p.device)
    _bank_up_kernel[(max_tiles,)](
        p,
        w,
        bias if bias is not None else p,
        res if res is not None else out,
        out,
        ranks if ranks is not None else p,
        tile_seg,
        tile_start,
        start,
        count,
        perm,
        t,
        d,
        r_max,
        w.shape[0],
        p.stride(0),
        p.stride(1),
        *w_strides,
        bias.stride(0) if bias is not None else 0,
        res.stride(0) if res is not None else 0,
        res.stride(1) if res is not None else 0,
        out.stride(0),
        out.stride(1),
        scale,
        ACT=ACT_CODES[activation] if activation is not None else -1,
        HAS_BIAS=bias is not None,
        HAS_RES=res is not None,
        HAS_RANKS=ranks is not None,
        SCALE_A=scale_a,
        PRECISION=dot_precision(w.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_D=cfg["BLOCK_D"],
        BLOCK_R=pow2(r_max),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _seg_tn(left, right, n_adapters, scale, tiles, out_dtype, cfg, *, col_sums):
    """Per-adapter ``scale * left^T right``, ``(N, P, Q)``, and with ``col_sums`` also each
    adapter's ``sum_t left[t, :]`` (float32, unscaled, ``(N, P)``) from the same loaded tiles."""
    perm, start, count, *_ = tiles
    p_dim, q_dim = left.shape[1], right.shape[1]
    block_p, block_q = min(64, pow2(p_dim)), min(64, pow2(q_dim))
    out = empty((n_adapters, p_dim, q_dim), dtype=out_dtype, device=left.device)
    sums = empty((n_adapters, p_dim), dtype=torch.float32, device=left.device) if col_sums else out
    _seg_tn_kernel[(n_adapters, triton.cdiv(p_dim, block_p), triton.cdiv(q_dim, block_q))](
        left,
        right,
        out,
        left,
        start,
        count,
        perm,
        sums,
        n_adapters,
        p_dim,
        q_dim,
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        sums.stride(0) if col_sums else 0,
        scale,
        0.0,
        HAS_DROPOUT=False,
        COL_SUMS=col_sums,
        PRECISION=dot_precision(left.dtype),
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_M=cfg["BLOCK_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return (out, sums) if col_sums else (out, None)


def _bias_rows(down_bias, adapter_ids, ranks, r_max):
    """Each token's ``bd_a`` cut to its rank by selection (an inf in the padding stays out);
    zeros for the tokens without an adapter. T x r_max, float32."""
    num = down_bias.shape[0]
    mask = rank_mask(ranks, num, r_max, down_bias.device)
    has, group = token_groups(adapter_ids, num)
    bd = torch.where(mask, down_bias.float(), 0.0)
    return torch.cat([bd, bd.new_zeros((1, r_max))])[group]


def forward(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale):
    t, d = x.shape
    num, r_max, _ = down_weight.shape
    res = x if residual is None else residual
    if num == 0 or t == 0:
        return res.clone(memory_format=torch.contiguous_format), torch.zeros((t, r_max), device=x.device)
    _, cfg = _config(x, r_max)
    with on_device(x.device):
        tiles = _tiles(adapter_ids, num, cfg["BLOCK_M"])
        ones = torch.ones(num, dtype=torch.float32, device=x.device)
        wd_strides = (down_weight.stride(0), down_weight.stride(2), down_weight.stride(1))
        h = _down(x, down_weight, wd_strides, ones, ranks, tiles, r_max, cfg)
        if down_bias is not None:
            h = h + _bias_rows(down_bias, adapter_ids, ranks, r_max)
        wu_strides = (up_weight.stride(0), up_weight.stride(1), up_weight.stride(2))
        y = _up(
            h, up_weight, wu_strides, d, up_bias, res, ranks, activation, scale, tiles, x.dtype, cfg,
            scale_a=x.dtype == torch.float16,
        )  # fmt: skip
    return y, h


def backward(
    grad,
    x,
    down_weight,
    down_bias,
    up_weight,
    adapter_ids,
    ranks,
    hidden,
    activation,
    scale,
    serial,
    output_mask: Sequence[bool],
):
    need_x, need_wd, need_bd, need_wu, need_bu = output_mask
    t, d = x.shape
    num, r_max, _ = down_weight.shape
    dx = dwd = dbd = dwu = dbu = None
    if num == 0 or t == 0:
        zeros = (
            down_weight.new_zeros(down_weight.shape),
            down_weight.new_zeros((num, r_max)),
            up_weight.new_zeros(up_weight.shape),
            up_weight.new_zeros((num, d)),
        )
        dwd, dbd, dwu, dbu = (z if need else None for z, need in zip(zeros, output_mask[1:], strict=True))
        return (grad.clone() if serial else torch.zeros_like(x)) if need_x else None, dwd, dbd, dwu, dbu
    _, cfg = _config(x, r_max)
    with on_device(x.device):
        tiles = _tiles(adapter_ids, num, cfg["BLOCK_M"])
        if need_wu or need_bu:
            # dbu rides on dWu's pass over g; alone, on a one-column product of its own.
            right = reference.activation(hidden, activation).to(x.dtype) if need_wu else grad.new_zeros((t, 1))
            dwu, g_sums = _seg_tn(grad, right, num, scale, tiles, up_weight.dtype, cfg, col_sums=need_bu)
            if need_bu:
                dbu = (scale * g_sums).to(grad.dtype)
            if not need_wu:
                dwu = None
        if need_x or need_wd or need_bd:
            scales = torch.full((num,), scale, dtype=torch.float32, device=x.device)
            wu_strides = (up_weight.stride(0), up_weight.stride(1), up_weight.stride(2))
            da = _down(grad, up_weight, wu_strides, scales, ranks, tiles, r_max, cfg)
            dh = da * reference.activation_grad(hidden, activation)
            if need_x:
                wd_strides = (down_weight.stride(0), down_weight.stride(2), down_weight.stride(1))
                dx = _up(
                    dh, down_weight, wd_strides, d, None, grad if serial else None, ranks, None, 1.0, tiles, x.dtype,
                    cfg, scale_a=fp16_scaled(dh, down_weight),
                )  # fmt: skip
            if need_wd or need_bd:
                right = x if need_wd else x.new_zeros((t, 1))
                dwd, dh_sums = _seg_tn(dh.to(x.dtype), right, num, 1.0, tiles, down_weight.dtype, cfg, col_sums=need_bd)
                if need_bd:
                    dbd = dh_sums.to(grad.dtype)
                if not need_wd:
                    dwd = None
    return dx, dwd, dbd, dwu, dbu


def supports(x, down_weight, down_bias, up_weight, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if down_weight.shape[1] > MAX_RANK:
        return f"the triton kernels take r_max up to {MAX_RANK}, got {down_weight.shape[1]}"
    if max(down_weight.numel(), up_weight.numel()) >= 2**31:
        return "the triton kernels take stacked adapters under 2**31 elements"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
