r"""Triton kernels for ``peftops.lora_linear_nf4`` (QLoRA), registered as its ``triton`` backend:
``lora_linear``'s kernels with the base GEMM reading the 4-bit weight and dequantising each W
tile in registers, so the full-precision weight is never written to memory.

Storage (bitsandbytes' layout, :mod:`peftops.ops.lora_linear_nf4`): the ``(N, K)`` weight
flattened row-major, element ``f = n K + k`` in byte ``f // 2`` (high nibble for even ``f``),
worth ``code[nibble] * absmax[f // blocksize]`` in float32, rounded to x's dtype before the
product (as ``dequantize_4bit`` rounds it). Blocks follow the flat order, so with ``K`` not a
multiple of the block size a block straddles two rows: the kernel indexes the scale by the flat
position, never by (row, block-in-row).

Forward (``x: (M, K)``, ``A: (r, K)``, ``B: (N, r)``)::

    u = s * dropout(x) A^T               lowrank._down_kernel, float32 (as lora_linear)
    y = x Wd^T + u B^T + b               _nf4_gemm_kernel, W read as Wd^T: (K, N) logical,
                                         element (k, n) at flat n K + k

Backward (``g: (M, N)``)::

    v  = s g B (+ the packed mask)       lowrank._down_kernel
    dx = g Wd + (v A) * m / (1 - p)      _nf4_gemm_kernel, W read as Wd: (N, K) logical,
                                         element (n, k) at flat n K + k
    dA = v^T (x * m) / (1 - p)           lowrank._tn_kernel
    dB = g^T u, db = sum_T g             lowrank._tn_kernel, db from the same g tiles

with the gradients of ``lora_linear`` (the dequantised weight is a constant: no dW).

The scale lookups are gathers from a float32 vector of ``N K / blocksize`` entries (1 MB at
4096 x 4096 with blocks of 64, which stays in L2), the code lookups from 16 entries (L1). The
4-bit tile is loaded byte-wise: two elements per byte, each byte read by the two lanes that
need it (a coalesced 8-bit load of ``BLOCK / 2`` distinct bytes per row segment).
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
from .lowrank import MAX_RANK, down, down_sums, empty_mask, expand_bits, launch_meta, pow2, tile_coords, tn, tn_sums

OP = "lora_linear_nf4"
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: Decode (a few tokens): the family's 128 x 128 tiles would give a 4096-wide layer 32 programs
#: for 132 SMs, each dequantising its whole column strip alone. Narrow column blocks give one
#: program per SM or so; 16 rows is tl.dot's minimum. Unmeasured (the qlora14 stage times it).
DECODE_MAX_TOKENS = 64
DECODE_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3)


@triton.jit
def _nf4_gemm_kernel(
    X,
    Q,
    ABSMAX,
    CODE,
    U,
    B,
    BIAS,
    OUT,
    MASK,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_fk,
    stride_fn,
    stride_um,
    stride_ur,
    stride_br,
    stride_bn,
    stride_om,
    stride_mm,
    epi_scale,
    BLOCKSIZE: tl.constexpr,
    W_ROUND: tl.constexpr,
    WIDE_LOW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``OUT = X Wd + epi_scale * keep * (U B) + BIAS`` for ``X: (M, K)``, the 4-bit ``Wd``
    read as a ``(K, N)`` matrix whose element ``(k, n)`` sits at flat index ``k * stride_fk +
    n * stride_fn`` of the stored weight, ``U: (M, R)`` float32, ``B: (R, N)`` by strides,
    ``OUT: (M, N)`` row-major. ``keep`` from the packed ``MASK`` when ``EPI_DROPOUT``.
    ``WIDE_LOW``: the rank-r product in float32 (float16 activations). ``W_ROUND``: the dtype
    each dequantised value is rounded to before x's (the quantised weight's own): 0 float32
    (no rounding), 1 float16, 2 bfloat16."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tile_coords(pid, GROUP_M * blocks_n, blocks_m, GROUP_M)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        rs = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(
            U + rows * stride_um + rs[None, :].to(tl.int64) * stride_ur, mask=(rows < M) & (rs[None, :] < R), other=0.0
        )
        b = tl.load(B + rs[:, None] * stride_br + cols * stride_bn, mask=(rs[:, None] < R) & (cols < N), other=0.0)
        if WIDE_LOW:
            # float16: u (float32) can exceed fp16's range where y does not; the rank-r term
            # is a few per cent of the flops, so it runs in float32 rather than rescaled.
            low = tl.dot(u, b.to(tl.float32), low, input_precision="ieee")
        else:
            low = tl.dot(u.to(b.dtype), b, low, input_precision=PRECISION)
    if EPI_DROPOUT:
        bytes_n = (pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8))[None, :]
        bits = tl.load(MASK + rows * stride_mm + bytes_n, mask=(rows < M) & (bytes_n * 8 < N), other=0).to(tl.int32)
        low = tl.where(expand_bits(bits, BLOCK_M, BLOCK_N), low, 0.0)
    acc = epi_scale * low
    col_flat = cols * stride_fn
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            X + rows * stride_xm + ks[None, :].to(tl.int64) * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0
        )
        valid = (ks[:, None] < K) & (cols < N)
        flat = ks[:, None] * stride_fk + col_flat
        byte = tl.load(Q + (flat >> 1), mask=valid, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (flat & 1)) * 4)) & 0xF
        w = tl.load(CODE + nibble) * tl.load(ABSMAX + flat // BLOCKSIZE, mask=valid, other=0.0)
        # Rounded to the weight's own dtype first, then to x's: bitsandbytes' two casts.
        if W_ROUND == 1:
            w = w.to(tl.float16)
        elif W_ROUND == 2:
            w = w.to(tl.bfloat16)
        acc = tl.dot(x, w.to(X.dtype.element_ty), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(OUT + rows * stride_om + cols, acc.to(OUT.dtype.element_ty), mask=(rows < M) & (cols < N))


def nf4_gemm(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    blocksize: int,
    weight_shape: tuple[int, int],
    *,
    weight_dtype: torch.dtype,
    transposed: bool,
    u: Tensor,
    b_rn: Tensor,
    bias: Tensor | None,
    epi_scale: float = 1.0,
    mask: Tensor | None = None,
    cfg: dict | None = None,
) -> Tensor:
    """``x @ W' + epi_scale * keep * (u @ b_rn) + bias`` with ``W'`` the dequantised ``(N_w, K_w)``
    weight transposed (``transposed``: the forward, ``x: (M, K_w)``) or as stored (dx, ``x: (M,
    N_w)``). Returns ``(M, cols)`` in x's dtype, accumulated in float32."""
    n_w, k_w = weight_shape
    m, red = x.shape
    if transposed:  # (K_w, N_w) logical: element (k, n) at n K_w + k
        cols, stride_fk, stride_fn = n_w, 1, k_w
    else:  # (N_w, K_w) logical: element (n, k) at n K_w + k
        cols, stride_fk, stride_fn = k_w, k_w, 1
    if red != (k_w if transposed else n_w):
        raise ValueError(f"nf4_gemm: x: expected {k_w if transposed else n_w} columns, got {red}")
    out = empty((m, cols), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    r = u.shape[1]
    if cfg is None and m <= DECODE_MAX_TOKENS and x.device.type == "cuda":
        cfg = dict(DECODE_CONFIG)
    cfg, opts = launch_meta(
        # Its own configs (the GEMM family defaults until tuned): LoRA's tuned 128 x 256 tiles
        # spill here, where a dequantised W tile sits in registers beside the accumulator.
        dict(cfg) if cfg else block_config.config(OP, "gemm", x.device, m, cols, red, r, x.dtype)
    )
    block_config.fit_stages(opts, (cfg["BLOCK_M"] * x.element_size() + cfg["BLOCK_N"]) * cfg["BLOCK_K"], x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cols, cfg["BLOCK_N"]),)
    _nf4_gemm_kernel[grid](
        x,
        qweight,
        absmax,
        code,
        u,
        b_rn,
        bias.contiguous() if bias is not None else x,
        out,
        mask if mask is not None else out,
        m,
        cols,
        red,
        r,
        x.stride(0),
        x.stride(1),
        stride_fk,
        stride_fn,
        u.stride(0),
        u.stride(1),
        b_rn.stride(0),
        b_rn.stride(1),
        out.stride(0),
        mask.stride(0) if mask is not None else 0,
        epi_scale,
        BLOCKSIZE=blocksize,
        W_ROUND=_ROUND[weight_dtype],
        WIDE_LOW=x.dtype == torch.float16,
        HAS_BIAS=bias is not None,
        EPI_DROPOUT=mask is not None,
        PRECISION=dot_precision(x.dtype),
        BLOCK_R=min(pow2(r), 64),
        **cfg,
        **opts,
    )
    return out


# -- the backend ------------------------------------------------------------------------------


def forward(x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale, dropout_p,
            seed):  # fmt: skip
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    shape = (out_features, k)
    q = qweight.reshape(-1)
    with on_device(x.device):
        u = down(x2, lora_a.T, scale, dropout_p, seed, out_dtype=torch.float32)
        y = nf4_gemm(
            x2, q, absmax, code, blocksize, shape, weight_dtype=weight_dtype, transposed=True, u=u, b_rn=lora_b.T,
            bias=bias,
        )  # fmt: skip
    keep = torch.empty((0,), dtype=torch.bool, device=x.device)
    return y.reshape(*lead, out_features), u.reshape(*lead, lora_a.shape[0]), keep


def backward(grad, x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, lora_u, keep, scale,
             dropout_p, seed, output_mask: Sequence[bool]):  # fmt: skip
    need_x, need_a, need_b, need_bias = output_mask
    k = x.shape[-1]
    rank = lora_a.shape[0]
    g = grad.reshape(-1, out_features)
    x2 = x.reshape(-1, k)
    dx = da = db_ = dbias = None
    sums = None
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    with on_device(x.device):
        if need_x or need_a:
            mask = empty_mask(g.shape[0], k, g.device) if dropout_p > 0 else None
            if need_bias and not need_b:
                v, sums = down_sums(g, lora_b, scale, seed, out_dtype=torch.float32, mask_out=mask, mask_p=dropout_p)
            else:
                v = down(g, lora_b, scale, 0.0, seed, out_dtype=torch.float32, mask_out=mask, mask_p=dropout_p)
        if need_x:
            dx = nf4_gemm(
                g, qweight.reshape(-1), absmax, code, blocksize, (out_features, k), weight_dtype=weight_dtype,
                transposed=False,
                u=v, b_rn=lora_a, bias=None, epi_scale=keep_scale, mask=mask,
            ).reshape(x.shape)  # fmt: skip
        if need_a:
            da = tn(v, x2, scale=keep_scale, mask=mask, out_dtype=lora_a.dtype)
        if need_b:
            u = lora_u.reshape(g.shape[0], rank)
            if need_bias:
                db_, sums = tn_sums(g, u, out_dtype=lora_b.dtype)
            else:
                db_ = tn(g, u, out_dtype=lora_b.dtype)
        if need_bias:
            # Only the bias trains: the sum is the one pass over g there is.
            dbias = (sums if sums is not None else g.sum(0, dtype=torch.float32)).to(grad.dtype)
    return dx, da, db_, dbias


def supports(x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if lora_a.shape[0] > MAX_RANK:
        return f"the triton kernels take ranks up to {MAX_RANK}, got {lora_a.shape[0]}"
    if out_features * x.shape[-1] >= 2**31:
        return f"the triton kernels take weights under 2**31 elements, got ({out_features}, {x.shape[-1]})"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
