r"""Triton kernels for ``peftops.multi_lora_linear`` (segmented), registered as its ``triton`` backend.

Tokens are grouped by adapter without moving them: a stable sort of the ids gives a
permutation, and the sorted order is cut into *tiles* of at most BLOCK_M tokens that never
straddle two adapters (the base-only tokens, id -1, form one more group). Every kernel reads
and writes tokens through the permutation (gathered rows, each contiguous in memory), so x, y
and the gradients stay in the caller's order and nothing is copied. The tile table is built
on the device from the ids (sort, scatter-add, cumsum, searchsorted) with a fixed upper bound on
the number of tiles, ``cdiv(T, BLOCK_M) + N + 1``: no host synchronisation, CUDA graphs work.

For a tile of adapter ``a`` with tokens ``t`` (``M_a`` its rank mask, ``s_a`` its scale)::

    _seg_down_kernel   u_t  = s_a * (x_d,t A_a^T) * M_a            the rank-r activation, (T, r_max)
    _seg_gemm_kernel   y_t  = x_t W^T + u_t B_a^T + b              one GEMM; the tile's single
                                                                   adapter makes the rank-r term
                                                                   one more dot, y written once
backward::
    _seg_down_kernel   v_t  = s_a * (g_t B_a) * M_a
    _seg_gemm_kernel   dx_t = g_t W + keep_t * (v_t A_a) / (1 - p)
    _seg_tn_kernel     dA_a = sum_{t in a} v_t^T x_d,t              one program per (adapter,
                       dB_a = sum_{t in a} g_t^T u_t                output block) walks its
                                                                   tokens in order: no atomics,
                                                                   absent adapters get zeros
    dW = g^T x (the dense reduction of :mod:`.lowrank`), db = sum_t g

Dropout is the counter-based mask of :mod:`.lowrank`, keyed by the token's own index, so
forward and backward regenerate the same mask.

That is the segmented path (prefill and training: long runs of one adapter). A decode batch,
a few tokens per adapter, would run it with near-empty tiles, each re-reading all of W. The
*gathered* forward reads W once and each token's adapter once instead::

    y          = x W^T + b                                  the framework's GEMM (cuBLAS)
    _gather_down_kernel  u_t = s_a * (x_d,t A_a[:r_a]^T)    one program per token, A_a's
                                                            first r_a rows only (masked
                                                            loads past the slot's rank move
                                                            no memory): a rank-8 adapter in
                                                            a rank-64 slot costs rank 8
    _gather_up_kernel    y_t += u_t B_a[:, :r_a]^T          one program per (token, column
                                                            block), adding into y

Both run on CUDA cores (one token is a matrix-vector product), bound by the adapters' bytes.
Its u is the segmented path's, bit for bit up to summation order, so the backward (always
the segmented kernels) does not care which forward ran. :data:`FORWARD_PATH` picks the path:
``auto`` takes the gathered one up to :data:`GATHER_MAX_TOKENS` tokens (a shape rule, no
host sync; provisional until measured on a GPU: ``STAGES=multi15`` in
``benchmarks/gpu_session.sh`` times both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import OpImpl, register_impl
from . import block_config
from .common import dot_precision, dtype_reason, empty, on_device
from .lowrank import keep_mask, pow2, tn, tn_sums

OP = "multi_lora_linear"
#: The largest r_max this family takes: its kernels hold a token's whole rank-r activation in
#: one register tile (BLOCK_R = pow2(r_max)).
MAX_RANK = 128
#: ``forward``: ``auto``, ``segmented`` or ``gathered`` (tests and benchmarks force one).
FORWARD_PATH = {"forward": "auto"}
#: ``auto`` runs the gathered forward up to this many tokens. Unmeasured: by bytes, a token's
#: adapter costs r (K + N) elements gathered against K N / BLOCK_M of W per segmented tile row,
#: so the gathered path reads less at decode sizes; 256 keeps it to decode and short batches.
GATHER_MAX_TOKENS = 256
#: Output columns per program of the gathered up kernel: 128 on a GPU; 64 under the CPU
#: interpreter, where programs run one at a time and smaller blocks keep the tests' shapes quick.
GATHER_UP_BLOCK_N = {"cuda": 128, "cpu": 64}


def launch_config(x: Tensor, weight: Tensor, lora_a: Tensor, cfg: dict | None) -> dict:
    """The segmented kernels' shared config (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, warps,
    stages): ``cfg`` if given (a tuner's candidate), else the ``seg`` lookup of
    :mod:`.block_config`, keyed by the forward's ``(tokens, out, in, r_max)`` in both directions."""
    if cfg:
        cfg = dict(cfg)
    else:
        t, (out_f, in_f), r_max = x.shape[0], weight.shape, lora_a.shape[1]
        cfg = block_config.config(OP, "seg", x.device, t, out_f, in_f, r_max, x.dtype)
    # The GEMM's x and W tiles are the largest per pipeline stage of the three kernels.
    block_config.fit_stages(cfg, (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * x.element_size(), x.device)
    return cfg


def _tiles(ids: Tensor, num_adapters: int, block_m: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """``(perm, seg_start, seg_count, tile_seg, tile_start, max_tiles)``.

    ``perm`` sorts the tokens by group (adapter, then base-only as group N); group g occupies
    sorted positions ``[seg_start[g], seg_start[g] + seg_count[g])``. Tile i covers sorted
    positions ``[tile_start[i], min(tile_start[i] + block_m, end of its group))`` of group
    ``tile_seg[i]``; tiles past the last have ``tile_seg = N + 1`` and do nothing.
    """
    n = num_adapters
    t = ids.numel()
    group = torch.where((ids >= 0) & (ids < n), ids, torch.full_like(ids, n)).to(torch.int64)
    perm = torch.argsort(group, stable=True)
    # scatter_add into a fixed size, not bincount: bincount sizes its output from max(group),
    # a device-to-host read that would break CUDA graph capture.
    count = torch.zeros(n + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, group, torch.ones_like(group))
    start = torch.cumsum(count, 0) - count
    per = (count + block_m - 1) // block_m
    tile_end = torch.cumsum(per, 0)
    max_tiles = (t + block_m - 1) // block_m + n + 1
    idx = torch.arange(max_tiles, device=ids.device)
    seg = torch.searchsorted(tile_end, idx, right=True)  # n + 1 past the last tile
    seg_c = seg.clamp(max=n)
    tile_start = start[seg_c] + (idx - (tile_end[seg_c] - per[seg_c])) * block_m
    return perm, start, count, seg.to(torch.int32), tile_start, max_tiles


@triton.jit
def _tile_rows(TILE_SEG, TILE_START, SEG_START, SEG_COUNT, PERM, N_ADAPTERS, BLOCK_M: tl.constexpr):
    """``(seg, tok, in_tile)`` of this program's tile: its group (``N_ADAPTERS`` for the
    base-only tokens, more for a tile past the last), the caller-order token index of each row
    (int64, [BLOCK_M, 1]) and which rows exist."""
    tile = tl.program_id(0)
    seg = tl.load(TILE_SEG + tile)
    valid = seg <= N_ADAPTERS
    seg_c = tl.minimum(seg, N_ADAPTERS)  # (an integer index: the kernels clamp no float value)
    first = tl.load(TILE_START + tile)
    end = tl.load(SEG_START + seg_c) + tl.load(SEG_COUNT + seg_c)
    end = tl.where(valid, end, first)  # a tile past the last has no rows
    pos = first + tl.arange(0, BLOCK_M)
    live = pos < end
    tok = tl.load(PERM + pos, mask=live, other=0).to(tl.int64)[:, None]
    return seg, tok, live[:, None]


@triton.jit
def _seg_down_kernel(
    X,
    W,
    SCALES,
    RANKS,
    OUT,
    SEED,
    TILE_SEG,
    TILE_START,
    SEG_START,
    SEG_COUNT,
    PERM,
    K,
    R,
    N_ADAPTERS,
    stride_xm,
    stride_xk,
    stride_wa,
    stride_wk,
    stride_wr,
    stride_om,
    stride_or,
    p,
    HAS_RANKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``OUT[t, r] = s_a * M_a[r] * sum_k keep(t, k) X[t, k] W_a[k, r]`` for the tile's tokens; 0
    for base-only tokens. ``W_a`` is ``A_a^T`` (forward) or ``B_a`` (backward), by strides."""
    seg, tok, in_tile = _tile_rows(TILE_SEG, TILE_START, SEG_START, SEG_COUNT, PERM, N_ADAPTERS, BLOCK_M)
    if seg <= N_ADAPTERS:
        rs = tl.arange(0, BLOCK_R)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if seg < N_ADAPTERS:
            a = seg.to(tl.int64)
            rank = R
            if HAS_RANKS:
                rank = tl.load(RANKS + a).to(tl.int32)
            if HAS_DROPOUT:
                seed = tl.load(SEED)
            for k0 in range(0, K, BLOCK_K):
                ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)[None, :]
                x = tl.load(X + tok * stride_xm + ks * stride_xk, mask=in_tile & (ks < K), other=0.0)
                if HAS_DROPOUT:
                    x = tl.where(keep_mask(seed, tok, ks, p), x, 0.0)
                kt = tl.trans(ks)
                w = tl.load(
                    W + a * stride_wa + kt * stride_wk + rs * stride_wr,
                    mask=(kt < K) & (rs < rank) & (rs < R),
                    other=0.0,
                )
                acc = tl.dot(x, w, acc, input_precision=PRECISION)
            acc = acc * tl.load(SCALES + a).to(tl.float32)
        tl.store(OUT + tok * stride_om + rs * stride_or, acc.to(OUT.dtype.element_ty), mask=in_tile & (rs < R))


@triton.jit
def _seg_gemm_kernel(
    X,
    W,
    U,
    E,
    BIAS,
    OUT,
    SEED,
    TILE_SEG,
    TILE_START,
    SEG_START,
    SEG_COUNT,
    PERM,
    N,
    K,
    R,
    N_ADAPTERS,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_um,
    stride_ur,
    stride_ea,
    stride_er,
    stride_en,
    stride_om,
    stride_on,
    epi_scale,
    p,
    HAS_BIAS: tl.constexpr,
    EPI_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``OUT[t] = X[t] W + epi_scale * keep(t, n) * (U[t] E_a) + BIAS`` for the tile's tokens,
    with ``E_a`` the tile's adapter's ``(R, N)`` matrix by strides (no term for base-only
    tokens). U is already zero past each adapter's rank."""
    seg, tok, in_tile = _tile_rows(TILE_SEG, TILE_START, SEG_START, SEG_COUNT, PERM, N_ADAPTERS, BLOCK_M)
    if seg <= N_ADAPTERS:
        cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if seg < N_ADAPTERS:
            a = seg.to(tl.int64)
            rs = tl.arange(0, BLOCK_R)
            u = tl.load(U + tok * stride_um + rs[None, :] * stride_ur, mask=in_tile & (rs[None, :] < R), other=0.0)
            e = tl.load(
                E + a * stride_ea + rs[:, None] * stride_er + cols * stride_en,
                mask=(rs[:, None] < R) & (cols < N),
                other=0.0,
            )
            low = tl.dot(u, e, input_precision=PRECISION) * epi_scale
            if EPI_DROPOUT:
                low = tl.where(keep_mask(tl.load(SEED), tok, cols, p), low, 0.0)
            acc += low
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                X + tok * stride_xm + ks[None, :].to(tl.int64) * stride_xk, mask=in_tile & (ks[None, :] < K), other=0.0
            )
            w = tl.load(W + ks[:, None] * stride_wk + cols * stride_wn, mask=(ks[:, None] < K) & (cols < N), other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(OUT + tok * stride_om + cols * stride_on, acc.to(OUT.dtype.element_ty), mask=in_tile & (cols < N))


@triton.jit
def _seg_tn_kernel(
    L,
    RT,
    OUT,
    SEED,
    SEG_START,
    SEG_COUNT,
    PERM,
    SUMS,
    N_ADAPTERS,
    P,
    Q,
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    stride_oa,
    stride_op,
    stride_oq,
    stride_sa,
    scale,
    p,
    HAS_DROPOUT: tl.constexpr,
    COL_SUMS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``OUT[a, p, q] = scale * sum_{t of adapter a} L[t, p] keep(t, q) RT[t, q]``, the tokens in
    sorted order, one program per (adapter, P block, Q block): deterministic, no atomics.

    ``COL_SUMS``: also ``SUMS[a, p] = sum_{t of group a} L[t, p]`` (float32, unscaled) from the
    same L tiles, written by the first Q block, for every group including the base-only tokens
    (group ``N_ADAPTERS``, launched as one more program row that only sums): dB's pass over g
    carries the bias gradient."""
    a = tl.program_id(0).to(tl.int64)
    is_adapter = a < N_ADAPTERS
    ps = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[None, :]
    qs = (tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)[None, :]
    first = tl.load(SEG_START + a)
    end = first + tl.load(SEG_COUNT + a)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    if COL_SUMS:
        col_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(first, end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        rows = (pos < end)[:, None]
        tok = tl.load(PERM + pos, mask=pos < end, other=0).to(tl.int64)[:, None]
        lt = tl.load(L + tok * stride_lm + ps * stride_lp, mask=rows & (ps < P), other=0.0)
        if COL_SUMS:
            col_sum += tl.sum(lt.to(tl.float32), axis=0)
        # (Without COL_SUMS every program is an adapter's; with it, the base-only row only sums.)
        if is_adapter:
            rt = tl.load(RT + tok * stride_rm + qs * stride_rq, mask=rows & (qs < Q), other=0.0)
            if HAS_DROPOUT:
                rt = tl.where(keep_mask(seed, tok, qs, p), rt, 0.0)
            acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
    if is_adapter:
        out_p = tl.trans(ps)
        tl.store(
            OUT + a * stride_oa + out_p * stride_op + qs * stride_oq,
            (acc * scale).to(OUT.dtype.element_ty),
            mask=(out_p < P) & (qs < Q),
        )
    if COL_SUMS:
        if tl.program_id(2) == 0:
            sum_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
            tl.store(SUMS + a * stride_sa + sum_p, col_sum, mask=sum_p < P)


@triton.jit
def _gather_down_kernel(
    X,
    A,
    SCALES,
    RANKS,
    IDS,
    SEED,
    U,
    K,
    R,
    N_ADAPTERS,
    stride_xm,
    stride_xk,
    stride_aa,
    stride_ar,
    stride_ak,
    stride_um,
    p,
    HAS_RANKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``U[t, :] = s_a * (keep(t) * X[t]) A_a[:r_a]^T`` for token ``t`` of adapter ``a = IDS[t]``
    (zeros past ``r_a`` and for ids outside ``[0, N_ADAPTERS)``), float32 accumulation."""
    t = tl.program_id(0).to(tl.int64)
    a = tl.load(IDS + t).to(tl.int64)
    valid = (a >= 0) & (a < N_ADAPTERS)
    a = tl.where(valid, a, 0)
    rank = R
    if HAS_RANKS:
        rank = tl.load(RANKS + a, mask=valid, other=0).to(tl.int32)
    rank = tl.where(valid, rank, 0)  # an invalid id loads no row of A
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
        row = t + tl.zeros((1, 1), dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)[None, :]
        x = tl.load(X + t * stride_xm + ks * stride_xk, mask=ks < K, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            # The segmented path's mask, keyed by (seed, token, feature): the backward's.
            x = tl.where(keep_mask(seed, row, ks, p), x, 0.0)
        w = tl.load(
            A + a * stride_aa + rs[:, None] * stride_ar + ks * stride_ak,
            mask=(rs[:, None] < rank) & (ks < K),
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * x, axis=1)
    acc = acc * tl.load(SCALES + a, mask=valid, other=0.0).to(tl.float32)
    tl.store(U + t * stride_um + rs, acc.to(U.dtype.element_ty), mask=rs < R)


@triton.jit
def _gather_up_kernel(
    U,
    B,
    RANKS,
    IDS,
    Y,
    N,
    R,
    N_ADAPTERS,
    stride_um,
    stride_ba,
    stride_bn,
    stride_br,
    stride_ym,
    HAS_RANKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``Y[t, cols] += U[t, :r_a] B_a[cols, :r_a]^T`` for token ``t`` of adapter ``a = IDS[t]``;
    rows with an id outside ``[0, N_ADAPTERS)`` are left as they are."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    a = tl.load(IDS + t).to(tl.int64)
    if (a >= 0) & (a < N_ADAPTERS):
        rank = R
        if HAS_RANKS:
            rank = tl.load(RANKS + a).to(tl.int32)
        rs = tl.arange(0, BLOCK_R)
        u = tl.load(U + t * stride_um + rs, mask=rs < rank, other=0.0).to(tl.float32)
        b = tl.load(
            B + a * stride_ba + cols[:, None].to(tl.int64) * stride_bn + rs[None, :] * stride_br,
            mask=(cols[:, None] < N) & (rs[None, :] < rank),
            other=0.0,
        ).to(tl.float32)
        low = tl.sum(b * u[None, :], axis=1)
        y_ptr = Y + t * stride_ym + cols
        y = tl.load(y_ptr, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(y_ptr, (y + low).to(Y.dtype.element_ty), mask=cols < N)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _down(x, w, w_strides, scales, ranks, seed, dropout_p, tiles, r_max, cfg):
    """Rank-r activations (T, r_max) of every token: ``u`` (w = A^T per adapter) or ``v`` (w = B)."""
    perm, start, count, tile_seg, tile_start, max_tiles = tiles
    t, k = x.shape
    out = empty((t, r_max), dtype=x.dtype, device=x.device)
    _seg_down_kernel[(max_tiles,)](
        x,
        w,
        scales,
        ranks if ranks is not None else scales,
        out,
        seed if seed is not None else scales,
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
        dropout_p,
        HAS_RANKS=ranks is not None,
        HAS_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=pow2(r_max),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _gemm(x, w_kn, u, e, e_strides, bias, seed, dropout_p, epi_scale, tiles, n_out, cfg):
    perm, start, count, tile_seg, tile_start, max_tiles = tiles
    t, k = x.shape
    out = empty((t, n_out), dtype=x.dtype, device=x.device)
    _seg_gemm_kernel[(max_tiles, triton.cdiv(n_out, cfg["BLOCK_N"]))](
        x,
        w_kn,
        u,
        e,
        bias if bias is not None else x,
        out,
        seed if seed is not None else x,
        tile_seg,
        tile_start,
        start,
        count,
        perm,
        n_out,
        k,
        u.shape[1],
        e.shape[0],
        x.stride(0),
        x.stride(1),
        w_kn.stride(0),
        w_kn.stride(1),
        u.stride(0),
        u.stride(1),
        *e_strides,
        out.stride(0),
        out.stride(1),
        epi_scale,
        dropout_p,
        HAS_BIAS=bias is not None,
        EPI_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        BLOCK_R=pow2(u.shape[1]),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def _seg_tn(left, right, n_adapters, seed, dropout_p, scale, tiles, out_dtype, cfg, col_sums=False):
    """Per-adapter ``scale * left^T keep(right)``, ``(n_adapters, P, Q)``; with ``col_sums`` also
    ``sum_t left[t, :]`` over every token (adapters' and base-only), float32, from the same pass."""
    perm, start, count, *_ = tiles
    t, p_dim = left.shape
    q_dim = right.shape[1]
    block_p, block_q = min(64, pow2(p_dim)), min(64, pow2(q_dim))
    out = empty((n_adapters, p_dim, q_dim), dtype=out_dtype, device=left.device)
    groups = n_adapters + 1 if col_sums else n_adapters
    sums = empty((groups, p_dim), dtype=torch.float32, device=left.device) if col_sums else None
    _seg_tn_kernel[(groups, triton.cdiv(p_dim, block_p), triton.cdiv(q_dim, block_q))](
        left,
        right,
        out,
        seed if seed is not None else left,
        start,
        count,
        perm,
        sums if sums is not None else out,
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
        sums.stride(0) if sums is not None else 0,
        scale,
        dropout_p,
        HAS_DROPOUT=dropout_p > 0,
        COL_SUMS=col_sums,
        PRECISION=dot_precision(left.dtype),
        BLOCK_P=block_p,
        BLOCK_Q=block_q,
        BLOCK_M=cfg["BLOCK_M"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if sums is None:
        return out
    return out, sums.sum(0)


def _gathered_forward(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed):
    t, k = x.shape
    n, r_max, _ = lora_a.shape
    out_f = weight.shape[0]
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    # The base GEMM on the framework's BLAS: one read of W whatever the number of adapters.
    y = torch.nn.functional.linear(x, weight, bias).contiguous()
    u = empty((t, r_max), dtype=x.dtype, device=x.device)
    block_r = pow2(r_max)
    s32 = scales.float() * keep_scale
    ids = adapter_ids.contiguous()
    with on_device(x.device):
        _gather_down_kernel[(t,)](
            x, lora_a, s32, ranks if ranks is not None else s32, ids, seed if seed is not None else s32, u,
            k, r_max, n, x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
            u.stride(0), dropout_p,
            HAS_RANKS=ranks is not None, HAS_DROPOUT=dropout_p > 0, BLOCK_K=min(128, pow2(k)), BLOCK_R=block_r,
        )  # fmt: skip
        block_n = GATHER_UP_BLOCK_N["cuda" if x.device.type == "cuda" else "cpu"]
        _gather_up_kernel[(t, triton.cdiv(out_f, block_n))](
            u, lora_b, ranks if ranks is not None else s32, ids, y, out_f, r_max, n,
            u.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), y.stride(0),
            HAS_RANKS=ranks is not None, BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip
    return y, u


def forward(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed, *, cfg: dict | None = None):
    """``(y, u)``; ``cfg`` forces the segmented kernels' block configuration."""
    t, out_f, (n, r_max, _) = x.shape[0], weight.shape[0], lora_a.shape
    if t == 0:
        return empty((0, out_f), dtype=x.dtype, device=x.device), empty((0, r_max), dtype=x.dtype, device=x.device)
    path = FORWARD_PATH["forward"]
    if path not in ("auto", "segmented", "gathered"):
        raise ValueError(f"{OP}: FORWARD_PATH: expected 'auto', 'segmented' or 'gathered', got {path!r}")
    if path == "gathered" or (path == "auto" and cfg is None and t <= GATHER_MAX_TOKENS):
        return _gathered_forward(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed)
    cfg = launch_config(x, weight, lora_a, cfg)
    with on_device(x.device):
        tiles = _tiles(adapter_ids, n, cfg["BLOCK_M"])
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
        # u = s_a * keep * x A_a^T / (1 - p): the 1 / (1 - p) is folded into the scales.
        u = _down(
            x,
            lora_a,
            (lora_a.stride(0), lora_a.stride(2), lora_a.stride(1)),
            scales.float() * keep_scale,
            ranks,
            seed,
            dropout_p,
            tiles,
            r_max,
            cfg,
        )
        y = _gemm(
            x,
            weight.T,
            u,
            lora_b,
            (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)),
            bias,
            None,
            0.0,
            1.0,
            tiles,
            out_f,
            cfg,
        )
    return y, u


def backward(
    grad,
    x,
    weight,
    lora_a,
    lora_b,
    adapter_ids,
    scales,
    ranks,
    lora_u,
    dropout_p,
    seed,
    output_mask: Sequence[bool],
    *,
    cfg: dict | None = None,
):
    """``(dx, dW, dA, dB, dbias)``, None where ``output_mask`` says so; ``cfg`` as in :func:`forward`."""
    need_x, need_w, need_a, need_b, need_bias = output_mask
    t, (n, r_max, in_f) = x.shape[0], lora_a.shape
    dx = dw = da = db = dbias = None
    with on_device(x.device):
        if t == 0:
            zeros = lambda like: torch.zeros_like(like)  # noqa: E731
            return (
                zeros(x) if need_x else None,
                zeros(weight) if need_w else None,
                zeros(lora_a) if need_a else None,
                zeros(lora_b) if need_b else None,
                grad.new_zeros(grad.shape[-1]) if need_bias else None,
            )
        cfg = launch_config(x, weight, lora_a, cfg)
        tiles = _tiles(adapter_ids, n, cfg["BLOCK_M"])
        keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
        if need_x or need_a:
            v = _down(
                grad,
                lora_b,
                (lora_b.stride(0), lora_b.stride(1), lora_b.stride(2)),
                scales.float(),
                ranks,
                None,
                0.0,
                tiles,
                r_max,
                cfg,
            )
        if need_x:
            dx = _gemm(
                grad,
                weight,
                v,
                lora_a,
                (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)),
                None,
                seed,
                dropout_p,
                keep_scale,
                tiles,
                in_f,
                cfg,
            )
        if need_a:
            da = _seg_tn(v, x, n, seed, dropout_p, keep_scale, tiles, lora_a.dtype, cfg)
        # The bias gradient rides on dB's pass over g (every group's column sums), else dW's;
        # only when neither trains is it a pass of its own.
        sums = None
        if need_b:
            if need_bias:
                db, sums = _seg_tn(grad, lora_u, n, None, 0.0, 1.0, tiles, lora_b.dtype, cfg, col_sums=True)
            else:
                db = _seg_tn(grad, lora_u, n, None, 0.0, 1.0, tiles, lora_b.dtype, cfg)
        if need_w:
            if need_bias and sums is None:
                dw, sums = tn_sums(grad, x, out_dtype=weight.dtype)
            else:
                dw = tn(grad, x, out_dtype=weight.dtype)
        if need_bias:
            dbias = (sums if sums is not None else grad.sum(0, dtype=torch.float32)).to(grad.dtype)
    return dx, dw, da, db, dbias


def supports(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if lora_a.shape[1] > MAX_RANK:
        return f"the triton kernels take r_max up to {MAX_RANK}, got {lora_a.shape[1]}"
    if max(weight.numel(), lora_a.numel(), lora_b.numel()) >= 2**31:
        return "the triton kernels take weights and stacked adapters under 2**31 elements"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
