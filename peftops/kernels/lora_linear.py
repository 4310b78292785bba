r"""Triton kernels for ``peftops.lora_linear``, registered as its ``triton`` backend.

Forward, for ``x: (M, K)``, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, scale ``s``, dropout
keep-mask ``m`` with probability ``1 - p``::

    u = s * ((x * m) A^T) / (1 - p)          _down_kernel: one narrow pass over x, (M, r),
                                             float32; the mask bits drawn in registers
    y = x W^T + u B^T + b                    _gemm_kernel: the base GEMM; the rank-r term is
                                             one more step of its K loop (the epilogue), so
                                             y is written once and never read back

Backward, for ``g = dL/dy: (M, N)``::

    v  = s * g B                             _down_kernel on g, (M, r), float32; the same
                                             launch draws the packed mask m, (M, K / 8) bytes
    dx = g W + (v A) * m / (1 - p)           _gemm_kernel with the mask bits applied to the
                                             epilogue term only
    dA = v^T (x * m) / (1 - p)               _tn_kernel: a reduction over tokens, mask bits read
    dB = g^T u,  db = g^T 1                  _tn_kernel (u saved by the forward); db, when the
                                             bias trains, from the same loaded g tiles (column
                                             sums, float32): no pass of its own over g
    dW = g^T x                               only when the frozen base is trained; carries db
                                             when dB is not trained; with neither, the v pass
                                             (_down_kernel on g) carries it

since ``y = x W^T + u B^T + b`` with ``u = s (x m / (1 - p)) A^T``: ``dL/dB = g^T u`` and
``dL/du = g B``; then ``dL/dA = s (dL/du)^T (x m / (1 - p)) = v^T (x m) / (1 - p)`` and the
low-rank part of ``dL/dx`` is ``s (dL/du) A`` masked: ``(v A) m / (1 - p)``.

The rank-r intermediates u and v stay float32 inside the kernels: rounded to fp16 they can
overflow where y is finite (see :mod:`.lowrank` for how they meet 16-bit operands). The op
saves u in x's dtype (what its schema declares), so dB still reads a rounded u.

Offsets along the token dimension (x, g, y, dx, u, the mask) are int64, so activations past
2**31 elements address correctly; weights must stay under 2**31 elements.

Dropout (:mod:`.lowrank`): counter-based, keyed by seed, token and input feature, one Philox
call per 8 features. The forward applies the bits it draws; the backward draws the packed
mask once and both of its consumers read it, so the forward's mask is the backward's and
nothing is stored between them.

Reductions over tokens are split over programs into float32 partial sums that PyTorch adds
in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import OpImpl, register_impl
from . import block_config, lora_linear_tma
from .common import dot_precision, dtype_reason, empty, on_device
from .lowrank import (
    MAX_RANK,
    down,
    down_sums,
    empty_mask,
    expand_bits,
    fp16_factor,
    fp16_scaled,
    launch_meta,
    pow2,
    tile_coords,
    tn,
    tn_sums,
)

OP = "lora_linear"


@triton.jit
def _gemm_kernel(
    X,
    W,
    U,
    B,
    BIAS,
    OUT,
    MASK,
    COL,
    PRE,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_um,
    stride_ur,
    stride_br,
    stride_bn,
    stride_om,
    stride_on,
    stride_mm,
    stride_pm,
    epi_scale,
    HAS_BIAS: tl.constexpr,
    EPI_DROPOUT: tl.constexpr,
    COL_SCALE: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    SCALE_U: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``OUT = X W + epi_scale * keep * (U B) + BIAS`` with ``keep(m, n)`` the dropout mask read
    from the packed ``MASK`` when ``EPI_DROPOUT`` (the dx of the backward), else 1 (the forward).

    ``X: (M, K)``, ``W: (K, N)``, ``U: (M, R)`` (float32, or X's dtype), ``B: (R, N)``, all by
    strides. ``COL_SCALE`` (DoRA's magnitude): ``OUT = COL * (X W + epi_scale * U B) + BIAS``
    with ``COL: (N,)`` float32, and ``SAVE_PRE`` also writes the unscaled ``X W + epi_scale *
    U B`` to ``PRE`` (row-major, row stride ``stride_pm``), what dm reduces against g; ``SCALE_U``: U's rows are scaled into fp16's range before rounding. The rank-R term
    is accumulated after the main K loop from the same output tile, so OUT is written once.
    Programs are ordered in groups of GROUP_M row blocks so that neighbours share W tiles in L2.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tile_coords(pid, GROUP_M * blocks_n, blocks_m, GROUP_M)

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    # The rank-r term first, as the accumulator's starting value: its loop is not pipelined
    # (num_stages=1), so it costs no shared-memory buffers on top of the main loop's.
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALE_U:
        # One factor per row over all ranks, applied once after the loop: a factor per rank
        # block would need a second (BLOCK_M, BLOCK_N) accumulator, and registers spill.
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            rs = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(
                U + rows * stride_um + rs[None, :].to(tl.int64) * stride_ur,
                mask=(rows < M) & (rs[None, :] < R),
                other=0.0,
            )
            # (NaN is dropped from the max, and propagates through u itself.)
            amax = tl.maximum(amax, tl.max(tl.abs(u), axis=1))
        f = fp16_factor(amax)[:, None]
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rs = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(
            U + rows * stride_um + rs[None, :].to(tl.int64) * stride_ur, mask=(rows < M) & (rs[None, :] < R), other=0.0
        )
        b = tl.load(B + rs[:, None] * stride_br + cols * stride_bn, mask=(rs[:, None] < R) & (cols < N), other=0.0)
        if SCALE_U:
            u = u / f
        low = tl.dot(u.to(b.dtype), b, low, input_precision=PRECISION)
    if SCALE_U:
        low = low * f
    if EPI_DROPOUT:
        # One byte per 8 columns, expanded in registers: a (BLOCK_M, BLOCK_N) gather of bytes
        # would hold a register per element beside the accumulator.
        bytes_n = (pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8))[None, :]
        bits = tl.load(MASK + rows * stride_mm + bytes_n, mask=(rows < M) & (bytes_n * 8 < N), other=0).to(tl.int32)
        low = tl.where(expand_bits(bits, BLOCK_M, BLOCK_N), low, 0.0)
    acc = epi_scale * low
    for k0 in range(0, K, BLOCK_K):
        # int64: x may be a column-major view whose feature stride is the token count.
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(W + ks[:, None] * stride_wk + cols * stride_wn, mask=(ks[:, None] < K) & (cols < N), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if SAVE_PRE:
        tl.store(PRE + rows * stride_pm + cols, acc.to(PRE.dtype.element_ty), mask=(rows < M) & (cols < N))
    if COL_SCALE:
        acc = acc * tl.load(COL + cols, mask=cols < N, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(OUT + rows * stride_om + cols * stride_on, acc.to(OUT.dtype.element_ty), mask=(rows < M) & (cols < N))


# -- launchers ------------------------------------------------------------------------------


def gemm(
    x: Tensor,
    w_kn: Tensor,
    u: Tensor,
    b_rn: Tensor,
    bias: Tensor | None,
    *,
    epi_scale: float = 1.0,
    mask: Tensor | None = None,
    cfg: dict | None = None,
) -> Tensor:
    """``x @ w_kn + epi_scale * keep * (u @ b_rn) + bias``, ``keep`` from the packed ``mask``
    (``lowrank.empty_mask`` layout over the output's columns) when given. ``u`` may be float32."""
    return _gemm(x, w_kn, u, b_rn, bias, epi_scale, mask, None, False, cfg)[0]


def gemm_col_scaled(
    x: Tensor,
    w_kn: Tensor,
    u: Tensor,
    b_rn: Tensor,
    bias: Tensor | None,
    col_scale: Tensor,
    *,
    epi_scale: float = 1.0,
    save_pre: bool = False,
    cfg: dict | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``(col_scale * z + bias, z if save_pre)`` with ``z = x @ w_kn + epi_scale * (u @ b_rn)``,
    ``col_scale: (N,)`` float32: DoRA's magnitude applied in the epilogue, and the unscaled
    output its dm reduction reads written from the same accumulator (no pass of its own)."""
    if col_scale.shape != (w_kn.shape[1],) or col_scale.dtype != torch.float32:
        raise ValueError(
            f"gemm_col_scaled: col_scale: expected ({w_kn.shape[1]},) float32, "
            f"got {tuple(col_scale.shape)} {col_scale.dtype}"
        )
    return _gemm(x, w_kn, u, b_rn, bias, epi_scale, None, col_scale.contiguous(), save_pre, cfg)


def _gemm(x, w_kn, u, b_rn, bias, epi_scale, mask, col_scale, save_pre, cfg) -> tuple[Tensor, Tensor | None]:
    m, k = x.shape
    n = w_kn.shape[1]
    r = u.shape[1]
    if mask is None and cfg is None and m > 0 and n > 0:
        # Hopper: the TMA persistent kernel where its operands allow (lora_linear_tma.supports_tma);
        # the forward passes weight.T (row-major weight read transposed), dx passes weight.
        trans_w = w_kn.stride(1) != 1
        w = w_kn.T if trans_w else w_kn
        if lora_linear_tma.supports_tma(x, w, u, b_rn, bias, trans_w=trans_w) is None:
            return lora_linear_tma.gemm_tma_pre(
                x, w, u, b_rn, bias, epi_scale=epi_scale, trans_w=trans_w, col_scale=col_scale, save_pre=save_pre
            )
    out = empty((m, n), dtype=x.dtype, device=x.device)
    pre = empty((m, n), dtype=x.dtype, device=x.device) if save_pre else None
    if m == 0 or n == 0:
        return out, pre
    cfg, opts = launch_meta(dict(cfg) if cfg else block_config.config(OP, "gemm", x.device, m, n, k, r, x.dtype))
    block_config.fit_stages(opts, (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * x.element_size(), x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        x,
        w_kn,
        u,
        b_rn,
        bias.contiguous() if bias is not None else x,
        out,
        mask if mask is not None else out,
        col_scale if col_scale is not None else out,
        pre if pre is not None else out,
        m,
        n,
        k,
        r,
        x.stride(0),
        x.stride(1),
        w_kn.stride(0),
        w_kn.stride(1),
        u.stride(0),
        u.stride(1),
        b_rn.stride(0),
        b_rn.stride(1),
        out.stride(0),
        out.stride(1),
        mask.stride(0) if mask is not None else 0,
        pre.stride(0) if pre is not None else 0,
        epi_scale,
        HAS_BIAS=bias is not None,
        EPI_DROPOUT=mask is not None,
        COL_SCALE=col_scale is not None,
        SAVE_PRE=pre is not None,
        SCALE_U=fp16_scaled(u, b_rn),
        PRECISION=dot_precision(x.dtype),
        BLOCK_R=min(pow2(r), 64),
        **cfg,
        **opts,
    )
    return out, pre


# -- the backend ------------------------------------------------------------------------------


def forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    with on_device(x.device):
        u = down(x2, lora_a.T, scale, dropout_p, seed, out_dtype=torch.float32)
        y = gemm(x2, weight.T, u, lora_b.T, bias)
    # u stays float32 (the op saves it for dB): rounded to fp16 it can overflow where y does not.
    return y.reshape(*lead, weight.shape[0]), u.reshape(*lead, lora_a.shape[0])


def backward(grad, x, weight, lora_a, lora_b, lora_u, scale, dropout_p, seed, output_mask: Sequence[bool]):
    need_x, need_w, need_a, need_b, need_bias = output_mask
    n, k = weight.shape
    rank = lora_a.shape[0]
    g = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = dw = da = db_ = dbias = None
    sums = None  # sum_m g[m, :] in float32, from whichever pass over g below reduces over tokens
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    # The bias gradient rides on a pass over g that runs anyway, the cheapest first: dB's token
    # reduction (a float32 row per split), else dW's, else the pass computing v (a float32 row
    # per row block of g written and read back: 1/32 of g's bytes each way at 16 bits and 64-row
    # blocks). Pure BitFit (A, B, W frozen) has only the last.
    sums_in_b = need_bias and need_b
    sums_in_w = need_bias and not need_b and need_w
    sums_in_v = need_bias and not need_b and not need_w
    with on_device(x.device):
        if need_x or need_a:
            # s * g B in float32, and in the same launch the packed dropout mask that dx and dA read.
            mask = empty_mask(g.shape[0], k, g.device) if dropout_p > 0 else None
            if sums_in_v:
                v, sums = down_sums(g, lora_b, scale, seed, out_dtype=torch.float32, mask_out=mask, mask_p=dropout_p)
            else:
                v = down(g, lora_b, scale, 0.0, seed, out_dtype=torch.float32, mask_out=mask, mask_p=dropout_p)
        if need_x:
            dx = gemm(g, weight, v, lora_a, None, epi_scale=keep_scale, mask=mask).reshape(x.shape)
        if need_a:
            da = tn(v, x2, scale=keep_scale, mask=mask, out_dtype=lora_a.dtype)
        if need_b:
            u = lora_u.reshape(g.shape[0], rank)
            if sums_in_b:
                db_, sums = tn_sums(g, u, out_dtype=lora_b.dtype)
            else:
                db_ = tn(g, u, out_dtype=lora_b.dtype)
        if need_w:
            if sums_in_w:
                dw, sums = tn_sums(g, x2, out_dtype=weight.dtype)
            else:
                dw = tn(g, x2, out_dtype=weight.dtype)
        if need_bias:
            # Only the bias trains and nothing else reads g: the sum is the one pass there is.
            dbias = (sums if sums is not None else g.sum(0, dtype=torch.float32)).to(grad.dtype)
    return dx, dw, da, db_, dbias


def supports(x, weight, lora_a, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if lora_a.shape[0] > MAX_RANK:
        return f"the triton kernels take ranks up to {MAX_RANK}, got {lora_a.shape[0]}"
    # Token offsets are int64; weight offsets stay int32, which is what real layers need.
    if weight.numel() >= 2**31:
        return f"the triton kernels take weights under 2**31 elements, got {tuple(weight.shape)}"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
