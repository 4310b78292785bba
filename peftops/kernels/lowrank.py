r"""Building blocks shared by the rank-r ops (LoRA, bottleneck adapters): the narrow "down"
projection ``scale * dropout(x) @ W`` over a row block, the token reduction ``L^T dropout(R)``
split into float32 partials, and the dropout keep-mask. Both passes can also return the column
sums of their token-major operand (``down_sums``, ``tn_sums``) from the tiles they load anyway:
a bias gradient ``g^T 1`` without a pass over g of its own.

Dropout mask (LoRA). Counter-based, keyed by a seed read from a device tensor (so CUDA graphs
replay with whatever seed the tensor holds) and by token ``i`` and feature ``j``::

    (w0, w1, w2, w3) = philox(seed, (j // 8, i_lo, i_hi, 0))     four uint32 words per byte
    h_b  = 16-bit half b of those words (b = j % 8: w0 low, w0 high, w1 low, ..., w3 high)
    keep(i, j) = h_b >= t,   t = round(p * 2**16)

so one Philox call yields a whole byte of the mask, and the keep rate is ``1 - t / 2**16``,
within ``2**-17`` of ``1 - p``. The packed layout is ``(tokens, ceil(in / 8))`` uint8,
row-major: bit ``j % 8`` of byte ``[i, j // 8]`` is ``keep(i, j)`` (bits past ``in`` in the last
byte are drawn and never read). The forward's down pass draws the bits in registers and
applies them to its x tile; the backward draws the packed mask once, in the launch of its
first kernel (``down`` over g with ``mask_out``), and the dx epilogue and the dA reduction read
those bits. Both draw from the same stream, so the backward's mask is the forward's.

Wide intermediates (fp16 overflow). The rank-r intermediates (``u = s x A^T``, ``v = s g B``,
the adapter's hidden activation) may be float32 while the other operand is 16-bit: they are
kept in float32 because in fp16 they can overflow where the final result is finite. A
16-bit tensor-core product then needs them rounded: for bfloat16 that is a plain cast (float32's
range); for float16, every row (or reduced column) of the tile is first divided by
``max(1, amax / FP16_SAFE)`` (``2**14``), rounded, and the product multiplied back (``fp16_factor``). When no
value exceeds ``2**14`` the factor is exactly 1 and the result is bitwise that of the plain cast.

Token offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.random import uint_to_uniform_float

from . import block_config
from .block_config import num_sms
from .common import dot_precision, empty

#: The largest rank the rank-r family takes: LoRA's GEMMs (pointer and TMA) and the bottleneck
#: adapter's row kernels, which hold a row block's whole rank on chip (BLOCK_R = pow2(r)); the
#: largest rank their tests cover (tests/kernels).
MAX_RANK = 256
#: Mask features per byte, and the resolution of the keep threshold.
MASK_BITS = 8
MASK_LEVELS = 1 << 16
#: Largest magnitude a float32 value keeps when rounded to fp16 for a product (fp16's max is
#: 65504; the margin keeps the rounded value finite).
FP16_SAFE = tl.constexpr(16384.0)


@triton.jit
def tile_coords(tile, tiles_in_group, blocks_m, GROUP_M: tl.constexpr):
    """Row and column block of linear tile ``tile``, GROUP_M row blocks to a group so that
    programs running at the same time share W tiles in L2."""
    first_m = (tile // tiles_in_group) * GROUP_M
    group_m = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (tile % tiles_in_group) % group_m
    pid_n = (tile % tiles_in_group) // group_m
    return pid_m, pid_n


@triton.jit
def keep_mask(seed, rows, cols, p):
    """Dropout keep-mask for tokens ``rows`` (int64, [BM, 1]) and features ``cols`` ([1, BK]),
    one Philox call per element (multi-LoRA's mask; LoRA's is the packed one below)."""
    rows_b = rows + tl.zeros_like(cols).to(tl.int64)
    cols_b = cols.to(tl.int64) + tl.zeros_like(rows)
    c0 = cols_b.to(tl.uint32)
    c1 = (rows_b & 0xFFFFFFFF).to(tl.uint32)
    c2 = (rows_b >> 32).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return uint_to_uniform_float(r0) >= p


@triton.jit
def _two_bits(w, threshold):
    return ((w & 0xFFFF).to(tl.int32) >= threshold).to(tl.int32) | (
        ((w >> 16).to(tl.int32) >= threshold).to(tl.int32) << 1
    )


@triton.jit
def mask_bytes(seed, rows, byte_cols, threshold):
    """Packed keep bits (int32 tile, 8 bits used) for tokens ``rows`` (int64, [BM, 1]) and byte
    columns ``byte_cols`` ([1, BC]): bit ``b`` of ``[i, c]`` is ``keep(i, 8 c + b)``."""
    rows_b = rows + tl.zeros_like(byte_cols).to(tl.int64)
    c0 = (byte_cols.to(tl.int64) + tl.zeros_like(rows)).to(tl.uint32)
    c1 = (rows_b & 0xFFFFFFFF).to(tl.uint32)
    c2 = (rows_b >> 32).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, c0 * 0)
    return (
        _two_bits(w0, threshold)
        | (_two_bits(w1, threshold) << 2)
        | (_two_bits(w2, threshold) << 4)
        | (_two_bits(w3, threshold) << 6)
    )


@triton.jit
def expand_bits(bits, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BM, BK // 8]`` packed bytes to the ``[BM, BK]`` keep-mask they hold."""
    wide = tl.reshape(tl.broadcast_to(bits[:, :, None], (BLOCK_M, BLOCK_K // 8, 8)), (BLOCK_M, BLOCK_K))
    return ((wide >> (tl.arange(0, BLOCK_K) % 8)[None, :]) & 1) != 0


@triton.jit
def load_keep(MASK, rows, cols, stride_mm, valid):
    """Keep-mask ``[rows, cols]`` read from the packed ``MASK`` (``(tokens, ceil(in / 8))`` uint8)."""
    byte = tl.load(MASK + rows * stride_mm + (cols >> 3), mask=valid, other=0).to(tl.int32)
    return ((byte >> (cols & 7).to(tl.int32)) & 1) != 0


@triton.jit
def fp16_factor(amax):
    """``max(1, amax / FP16_SAFE)`` (1 for inf or NaN: dividing would turn inf into NaN; such
    rows are non-finite either way, and NaN propagates through the value itself)."""
    return tl.where((amax > FP16_SAFE) & (amax < 3.0e38), amax / FP16_SAFE, 1.0)


@triton.jit
def fp16_row_factor(t, AXIS: tl.constexpr):
    """:func:`fp16_factor` of a float32 tile's largest magnitude along ``AXIS``."""
    return fp16_factor(tl.max(tl.abs(t), axis=AXIS))


@triton.jit
def _down_kernel(
    X,
    W,
    OUT,
    SEED,
    MASK,
    SUMS,
    M,
    K,
    R,
    MASK_COLS,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wr,
    stride_om,
    stride_or,
    stride_mm,
    stride_sb,
    scale,
    threshold,
    HAS_DROPOUT: tl.constexpr,
    WRITE_MASK: tl.constexpr,
    COL_SUMS: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``OUT[m, r] = scale * sum_k keep(m, k) X[m, k] W[k, r]`` (``keep = 1`` without dropout).

    ``W`` is ``A^T`` (forward) or ``B`` (backward), given by strides. Grid: (row blocks, rank
    blocks). Accumulates in float32, rounds once to OUT's dtype (float32 for the LoRA
    intermediates). With ``WRITE_MASK`` (the backward's pass over g, which applies no mask),
    the first rank block also writes its rows of the packed keep-mask over ``MASK_COLS`` bytes,
    so the mask costs no launch of its own. With ``COL_SUMS``, the first rank block also writes
    ``SUMS[row block, k] = sum_{m in the block} X[m, k]`` (float32, before dropout) from the x
    tiles it loads anyway: a partial per row block, which the caller adds up in a fixed order.
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    ranks = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R))[None, :]
    if HAS_DROPOUT or WRITE_MASK:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # int64: x may be a column-major view whose feature stride is the token count.
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0)
        if COL_SUMS:
            # Each k tile is its own slice of the sums, so nothing is carried across iterations.
            if tl.program_id(1) == 0:
                tl.store(
                    SUMS + tl.program_id(0).to(tl.int64) * stride_sb + ks,
                    tl.sum(x.to(tl.float32), axis=0),
                    mask=ks < K,
                )
        if HAS_DROPOUT:
            bits = mask_bytes(seed, rows, (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :], threshold)
            x = tl.where(expand_bits(bits, BLOCK_M, BLOCK_K), x, 0.0)
        w = tl.load(W + ks[:, None] * stride_wk + ranks * stride_wr, mask=(ks[:, None] < K) & (ranks < R), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(
        OUT + rows * stride_om + ranks * stride_or,
        (acc * scale).to(OUT.dtype.element_ty),
        mask=(rows < M) & (ranks < R),
    )
    if WRITE_MASK:
        if tl.program_id(1) == 0:
            for c0 in range(0, MASK_COLS, BLOCK_C):
                cs = (c0 + tl.arange(0, BLOCK_C))[None, :]
                tl.store(
                    MASK + rows * stride_mm + cs,
                    mask_bytes(seed, rows, cs, threshold).to(tl.uint8),
                    mask=(rows < M) & (cs < MASK_COLS),
                )


@triton.jit
def _tn_kernel(
    L,
    RT,
    OUT,
    MASK,
    SUMS,
    Z,
    DSUMS,
    M,
    P,
    Q,
    rows_per_split,
    stride_lm,
    stride_lp,
    stride_rm,
    stride_rq,
    stride_os,
    stride_op,
    stride_oq,
    stride_mm,
    stride_ss,
    stride_zm,
    scale,
    HAS_DROPOUT: tl.constexpr,
    COL_SUMS: tl.constexpr,
    DOT_SUMS: tl.constexpr,
    SCALE_L: tl.constexpr,
    SCALE_R: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``OUT[s, p, q] = scale * sum_{m in split s} L[m, p] keep(m, q) RT[m, q]`` (float32 partials),
    ``keep`` read from the packed ``MASK`` when ``HAS_DROPOUT``.

    Grid: (P blocks, Q blocks, splits of the token range). The caller sums the partials over
    ``s`` in a fixed order, which keeps the result deterministic. An operand in float32 with a
    16-bit other is rounded to the other's dtype for the product; with ``SCALE_L``/``SCALE_R``
    (fp16) its columns are scaled into fp16's range per token block first (the scale of
    column ``p`` factors out of the sum over ``m``).

    ``COL_SUMS``: also ``SUMS[s, p] = sum_{m in split s} L[m, p]`` (float32, unscaled), what a
    column of ones appended to RT would give (before ``scale``), from the L tiles the product loads anyway (a bias
    gradient beside its weight's). Only the first Q block stores them: each (P block, split)
    has one writer, so no atomics.

    ``DOT_SUMS``: also ``DSUMS[s, p] = sum_{m in split s} L[m, p] Z[m, p]`` (float32), ``Z`` of
    L's shape (row stride ``stride_zm``, unit column stride): DoRA's dm, ``sum_T g * z``, from
    the g tiles dB's product loads, at the cost of reading z once.
    """
    # int64: L and RT may be column-major views whose feature strides are the token count.
    ps = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[None, :]
    qs = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)[None, :]
    split = tl.program_id(2)
    m_start = split.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    if COL_SUMS:
        col_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    if DOT_SUMS:
        dot_sum = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = (m0 + tl.arange(0, BLOCK_M))[:, None]
        in_rows = ms < m_end
        lt = tl.load(L + ms * stride_lm + ps * stride_lp, mask=in_rows & (ps < P), other=0.0)
        rt = tl.load(RT + ms * stride_rm + qs * stride_rq, mask=in_rows & (qs < Q), other=0.0)
        if COL_SUMS:
            col_sum += tl.sum(lt.to(tl.float32), axis=0)
        if DOT_SUMS:
            zt = tl.load(Z + ms * stride_zm + ps, mask=in_rows & (ps < P), other=0.0)
            dot_sum += tl.sum(lt.to(tl.float32) * zt.to(tl.float32), axis=0)
        if HAS_DROPOUT:
            rt = tl.where(load_keep(MASK, ms, qs, stride_mm, in_rows & (qs < Q)), rt, 0.0)
        if SCALE_L:
            f = fp16_row_factor(lt, 0)
            acc += tl.dot(tl.trans((lt / f[None, :]).to(rt.dtype)), rt, input_precision=PRECISION) * f[:, None]
        elif SCALE_R:
            f = fp16_row_factor(rt, 0)[None, :]
            acc += tl.dot(tl.trans(lt), (rt / f).to(lt.dtype), input_precision=PRECISION) * f
        elif L.dtype.element_ty == tl.float32:
            acc = tl.dot(tl.trans(lt.to(rt.dtype)), rt, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(tl.trans(lt), rt.to(lt.dtype), acc, input_precision=PRECISION)
    out_p = tl.trans(ps)
    tl.store(
        OUT + split.to(tl.int64) * stride_os + out_p * stride_op + qs * stride_oq,
        acc * scale,
        mask=(out_p < P) & (qs < Q),
    )
    if COL_SUMS:
        if tl.program_id(1) == 0:
            sum_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
            tl.store(SUMS + split.to(tl.int64) * stride_ss + sum_p, col_sum, mask=sum_p < P)
    if DOT_SUMS:
        if tl.program_id(1) == 0:
            sum_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
            tl.store(DSUMS + split.to(tl.int64) * stride_ss + sum_p, dot_sum, mask=sum_p < P)


# -- launchers ------------------------------------------------------------------------------


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def launch_meta(cfg: dict) -> tuple[dict, dict]:
    """Split a config into constexpr block sizes and launch options."""
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    return cfg, opts


def mask_threshold(dropout_p: float) -> int:
    """The 16-bit keep threshold ``t`` for rate ``p``: keep iff a uniform 16-bit draw is >= t."""
    return min(MASK_LEVELS, round(dropout_p * MASK_LEVELS))


def empty_mask(tokens: int, features: int, device: torch.device) -> Tensor:
    """Storage for a packed keep-mask: ``(tokens, ceil(features / 8))`` uint8."""
    return empty((tokens, triton.cdiv(features, MASK_BITS)), dtype=torch.uint8, device=device)


def fp16_scaled(wide: Tensor, other: Tensor) -> bool:
    """Whether a float32 operand meets a float16 one in a product (and needs scaling into range)."""
    return wide.dtype == torch.float32 and other.dtype == torch.float16


def down(
    x: Tensor,
    w_kr: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    cfg: dict | None = None,
    op: str = "lora_linear",
    *,
    out_dtype: torch.dtype | None = None,
    mask_out: Tensor | None = None,
    mask_p: float = 0.0,
) -> Tensor:
    """``scale * dropout(x) @ w_kr`` for ``x: (M, K)``, ``w_kr: (K, R)`` (any strides), in
    ``out_dtype`` (x's by default; float32 for the rank-r intermediates, which may exceed fp16).

    ``mask_out`` (packed, from :func:`empty_mask`, no dropout on x itself): also draw the
    rate-``mask_p`` keep-mask for ``seed`` into it, in the same launch (the LoRA backward's first
    kernel). ``cfg`` forces a block configuration (the tuner's use); by default it is looked up
    in ``op``'s tuned configs."""
    out, _ = _down(x, w_kr, scale, dropout_p, seed, cfg, op, out_dtype, mask_out, mask_p, False)
    return out


def down_sums(
    x: Tensor,
    w_kr: Tensor,
    scale: float,
    seed: Tensor | None,
    cfg: dict | None = None,
    op: str = "lora_linear",
    *,
    out_dtype: torch.dtype | None = None,
    mask_out: Tensor | None = None,
    mask_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """:func:`down` without dropout on x, and the column sums of x, ``sum_m x[m, :]`` (float32,
    not scaled), from the same launch: the first rank block adds up each x tile it loads into
    one float32 row per row block, summed here in a fixed order. That is ``(M / BLOCK_M) * K``
    floats written and read back instead of a pass over x (a bias gradient where the pass over
    g is the backward's only one that reads all of g)."""
    out, sums = _down(x, w_kr, scale, 0.0, seed, cfg, op, out_dtype, mask_out, mask_p, True)
    assert sums is not None
    return out, sums


def _down(
    x: Tensor,
    w_kr: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    cfg: dict | None,
    op: str,
    out_dtype: torch.dtype | None,
    mask_out: Tensor | None,
    mask_p: float,
    col_sums: bool,
) -> tuple[Tensor, Tensor | None]:
    m, k = x.shape
    r = w_kr.shape[1]
    out = empty((m, r), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out, torch.zeros(k, dtype=torch.float32, device=x.device) if col_sums else None
    if r == 0 and mask_out is None and not col_sums:
        return out, None
    if mask_out is not None and (dropout_p > 0 or seed is None or mask_out.shape[0] != m):
        raise ValueError(f"down: mask_out needs a seed, no dropout on x and {m} rows, got {tuple(mask_out.shape)}")
    cfg, opts = launch_meta(dict(cfg) if cfg else block_config.config(op, "down", x.device, m, r, k, r, x.dtype))
    if cfg["BLOCK_K"] % MASK_BITS:
        raise ValueError(f"down: BLOCK_K must be a multiple of {MASK_BITS} (the mask's byte), got {cfg['BLOCK_K']}")
    block_r = min(pow2(r), 128)
    block_config.fit_stages(opts, (cfg["BLOCK_M"] + block_r) * cfg["BLOCK_K"] * x.element_size(), x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), max(1, triton.cdiv(r, block_r)))
    sums = empty((grid[0], k), dtype=torch.float32, device=x.device) if col_sums else None
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    mask_p = dropout_p if dropout_p > 0 else mask_p
    _down_kernel[grid](
        x,
        w_kr,
        out,
        seed if seed is not None else x,
        mask_out if mask_out is not None else out,
        sums if sums is not None else out,
        m,
        k,
        r,
        mask_out.shape[1] if mask_out is not None else 0,
        x.stride(0),
        x.stride(1),
        w_kr.stride(0),
        w_kr.stride(1),
        out.stride(0),
        out.stride(1),
        mask_out.stride(0) if mask_out is not None else 0,
        sums.stride(0) if sums is not None else 0,
        scale * keep_scale,
        mask_threshold(mask_p),
        HAS_DROPOUT=dropout_p > 0,
        WRITE_MASK=mask_out is not None,
        COL_SUMS=col_sums,
        PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
        BLOCK_C=16,
        **cfg,
        **opts,
    )
    return out, sums.sum(0) if sums is not None else None


def tn(
    left: Tensor,
    right: Tensor,
    *,
    scale: float = 1.0,
    mask: Tensor | None = None,
    out_dtype: torch.dtype,
    cfg: dict | None = None,
    op: str = "lora_linear",
) -> Tensor:
    """``scale * left^T @ (keep * right)`` for ``left: (M, P)``, ``right: (M, Q)``: a reduction
    over the M tokens, split across programs into float32 partials summed in a fixed order.

    ``mask``: the packed keep-mask of ``right`` (:func:`empty_mask` layout), or None. One
    operand may be float32 and the other 16-bit (the rank-r intermediates)."""
    return _tn(left, right, scale, mask, out_dtype, cfg, op, False)[0]


def tn_sums(
    left: Tensor,
    right: Tensor,
    *,
    scale: float = 1.0,
    mask: Tensor | None = None,
    out_dtype: torch.dtype,
    cfg: dict | None = None,
    op: str = "lora_linear",
) -> tuple[Tensor, Tensor]:
    """:func:`tn` and the column sums of ``left`` over the tokens, ``sum_m left[m, :]`` (float32,
    not scaled, no mask), from the same launch and the same loaded tiles: a weight's gradient
    and its bias's in one pass over the output gradient."""
    out, sums, _ = _tn(left, right, scale, mask, out_dtype, cfg, op, True)
    assert sums is not None
    return out, sums


def tn_dot_sums(
    left: Tensor,
    right: Tensor,
    weight: Tensor,
    *,
    col_sums: bool,
    out_dtype: torch.dtype,
    cfg: dict | None = None,
    op: str = "lora_linear",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`tn` (no mask, unscaled), with ``sum_m left[m, :] * weight[m, :]`` (float32) and,
    with ``col_sums``, ``sum_m left[m, :]``, from the same launch: DoRA's ``g^T u`` (dB), its
    ``sum_T g * z`` (dm) and its bias gradient in one pass over g. ``weight``: left's shape,
    unit column stride."""
    if weight.shape != left.shape or (weight.numel() and weight.stride(1) != 1):
        raise ValueError(
            f"tn_dot_sums: weight: expected shape {tuple(left.shape)} with unit column stride, "
            f"got {tuple(weight.shape)} strides {weight.stride()}"
        )
    out, sums, dots = _tn(left, right, 1.0, None, out_dtype, cfg, op, col_sums, weight)
    assert dots is not None
    return out, sums, dots


def _tn(
    left: Tensor,
    right: Tensor,
    scale: float,
    mask: Tensor | None,
    out_dtype: torch.dtype,
    cfg: dict | None,
    op: str,
    col_sums: bool,
    weight: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    m, p_dim = left.shape
    q_dim = right.shape[1]
    if m == 0 or p_dim == 0 or q_dim == 0:  # an empty sum, or nothing to sum into
        out = torch.zeros((p_dim, q_dim), dtype=out_dtype, device=left.device)
        # q = 0 (rank 0): no product to share the pass with.
        sums = left.sum(0, dtype=torch.float32) if col_sums else None
        dots = (left.float() * weight.float()).sum(0) if weight is not None else None
        return out, sums, dots
    narrow = left if left.element_size() <= right.element_size() else right
    cfg, opts = launch_meta(
        dict(cfg)
        if cfg
        else block_config.config(op, "tn", left.device, m, p_dim, q_dim, min(p_dim, q_dim), narrow.dtype)
    )
    cfg["BLOCK_P"] = min(cfg["BLOCK_P"], pow2(p_dim))
    cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], pow2(q_dim))
    block_config.fit_stages(
        opts,
        cfg["BLOCK_M"] * (cfg["BLOCK_P"] * left.element_size() + cfg["BLOCK_Q"] * right.element_size()),
        left.device,
    )
    tiles = triton.cdiv(p_dim, cfg["BLOCK_P"]) * triton.cdiv(q_dim, cfg["BLOCK_Q"])
    # Enough programs to fill the GPU twice over, but each split keeps >= 4 row blocks of work.
    splits = max(1, min(triton.cdiv(2 * num_sms(left.device), tiles), triton.cdiv(m, 4 * cfg["BLOCK_M"])))
    rows_per_split = triton.cdiv(m, splits * cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(m, rows_per_split)
    partial = empty((splits, p_dim, q_dim), dtype=torch.float32, device=left.device)
    sums = empty((splits, p_dim), dtype=torch.float32, device=left.device) if col_sums else None
    dots = empty((splits, p_dim), dtype=torch.float32, device=left.device) if weight is not None else None
    grid = (triton.cdiv(p_dim, cfg["BLOCK_P"]), triton.cdiv(q_dim, cfg["BLOCK_Q"]), splits)
    _tn_kernel[grid](
        left,
        right,
        partial,
        mask if mask is not None else partial,
        sums if sums is not None else partial,
        weight if weight is not None else partial,
        dots if dots is not None else partial,
        m,
        p_dim,
        q_dim,
        rows_per_split,
        left.stride(0),
        left.stride(1),
        right.stride(0),
        right.stride(1),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        mask.stride(0) if mask is not None else 0,
        sums.stride(0) if sums is not None else (dots.stride(0) if dots is not None else 0),
        weight.stride(0) if weight is not None else 0,
        scale,
        HAS_DROPOUT=mask is not None,
        COL_SUMS=col_sums,
        DOT_SUMS=weight is not None,
        SCALE_L=fp16_scaled(left, right),
        SCALE_R=fp16_scaled(right, left),
        PRECISION=dot_precision(narrow.dtype),
        **cfg,
        **opts,
    )
    return (
        partial.sum(0).to(out_dtype),
        sums.sum(0) if sums is not None else None,
        dots.sum(0) if dots is not None else None,
    )
