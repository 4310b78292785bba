r"""Triton kernels for ``peftops.lora_linear``, registered as its ``triton`` backend.

Forward, for ``x: (M, K)``, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, scale ``s``, dropout
keep-mask ``m`` with probability ``1 - p``::

    u = s * ((x * m) A^T) / (1 - p)          _down_kernel: one narrow pass over x, (M, r)
    y = x W^T + u B^T + b                    _gemm_kernel: the base GEMM; the rank-r term is
                                             one more step of its K loop (the epilogue), so
                                             y is written once and never read back

Backward, for ``g = dL/dy: (M, N)``::

    v  = s * g B                             _down_kernel on g, (M, r)
    dx = g W + (v A) * m / (1 - p)           _gemm_kernel with the mask applied to the
                                             epilogue term only
    dA = v^T (x * m) / (1 - p)               _tn_kernel: a reduction over tokens
    dB = g^T u                               _tn_kernel (u saved by the forward)
    dW = g^T x,  db = sum_m g                only when the frozen base is trained

since ``dL/du = g B``, ``dL/dA = s (g B)^T (x m / (1 - p))`` and ``dL/dB = g^T u``.

Offsets along the token dimension (x, g, y, dx, u) are int64, so activations past 2**31
elements address correctly; weights must stay under 2**31 elements.

Dropout is counter-based: ``keep(i, j) = uniform(philox(seed, (j, i_lo, i_hi, 0))) >= p`` for
token ``i`` and input feature ``j``, with the seed read from a device tensor (so CUDA graphs
replay with whatever seed the tensor holds). The forward and both backward kernels that need
the mask regenerate it from ``(seed, i, j)``: nothing is stored.

Reductions over tokens are split over programs into float32 partial sums that PyTorch adds
in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.random import uint_to_uniform_float

from ..backends import OpImpl, register_impl
from . import _config
from ._common import dot_precision, empty, num_sms, on_device

OP = "lora_linear"


@triton.jit
def _keep(seed, rows, cols, p):
    """Dropout keep-mask for tokens ``rows`` (int64, [BM, 1]) and features ``cols`` ([1, BK])."""
    rows_b = rows + tl.zeros_like(cols).to(tl.int64)
    cols_b = cols.to(tl.int64) + tl.zeros_like(rows)
    c0 = cols_b.to(tl.uint32)
    c1 = (rows_b & 0xFFFFFFFF).to(tl.uint32)
    c2 = (rows_b >> 32).to(tl.uint32)
    r0, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return uint_to_uniform_float(r0) >= p


@triton.jit
def _down_kernel(
    X, W, OUT, SEED,
    M, K, R,
    stride_xm, stride_xk, stride_wk, stride_wr, stride_om, stride_or,
    scale, p,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``OUT[m, r] = scale * sum_k keep(m, k) X[m, k] W[k, r]`` (``keep = 1`` without dropout).

    ``W`` is ``A^T`` (forward) or ``B`` (backward), given by strides. Grid: (row blocks, rank
    blocks). Accumulates in float32, rounds once to OUT's dtype.
    """
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    ranks = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R))[None, :]
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(_keep(seed, rows, ks[None, :], p), x, 0.0)
        w = tl.load(W + ks[:, None] * stride_wk + ranks * stride_wr, mask=(ks[:, None] < K) & (ranks < R), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(OUT + rows * stride_om + ranks * stride_or, (acc * scale).to(OUT.dtype.element_ty), mask=(rows < M) & (ranks < R))


@triton.jit
def _gemm_kernel(
    X, W, U, B, BIAS, OUT, SEED,
    M, N, K, R,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_um, stride_ur, stride_br, stride_bn, stride_om, stride_on,
    epi_scale, p,
    HAS_BIAS: tl.constexpr, EPI_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``OUT = X W + epi_scale * keep * (U B) + BIAS`` with ``keep(m, n)`` the dropout mask when
    ``EPI_DROPOUT`` (the dx of the backward), else 1 (the forward).

    ``X: (M, K)``, ``W: (K, N)``, ``U: (M, R)``, ``B: (R, N)``, all by strides. The rank-R term
    is accumulated after the main K loop from the same output tile, so OUT is written once.
    Programs are ordered in groups of GROUP_M row blocks so that neighbours share W tiles in L2.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_m = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_m
    pid_n = (pid % (GROUP_M * blocks_n)) // group_m

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0)
        w = tl.load(W + ks[:, None] * stride_wk + cols * stride_wn, mask=(ks[:, None] < K) & (cols < N), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)

    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        u = tl.load(U + rows * stride_um + rs[None, :] * stride_ur, mask=(rows < M) & (rs[None, :] < R), other=0.0)
        b = tl.load(B + rs[:, None] * stride_br + cols * stride_bn, mask=(rs[:, None] < R) & (cols < N), other=0.0)
        low = tl.dot(u, b, low, input_precision=PRECISION)
    if EPI_DROPOUT:
        low = tl.where(_keep(tl.load(SEED), rows, cols, p), low, 0.0)
    acc += epi_scale * low
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(OUT + rows * stride_om + cols * stride_on, acc.to(OUT.dtype.element_ty), mask=(rows < M) & (cols < N))


@triton.jit
def _tn_kernel(
    L, RT, OUT, SEED,
    M, P, Q, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rq, stride_os, stride_op, stride_oq,
    scale, p,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """``OUT[s, p, q] = scale * sum_{m in split s} L[m, p] keep(m, q) RT[m, q]`` (float32 partials).

    Grid: (P blocks, Q blocks, splits of the token range). The caller sums the partials over
    ``s`` in a fixed order, which keeps the result deterministic.
    """
    ps = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
    qs = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q))[None, :]
    split = tl.program_id(2)
    m_start = split.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = (m0 + tl.arange(0, BLOCK_M))[:, None]
        in_rows = ms < m_end
        lt = tl.load(L + ms * stride_lm + ps * stride_lp, mask=in_rows & (ps < P), other=0.0)
        rt = tl.load(RT + ms * stride_rm + qs * stride_rq, mask=in_rows & (qs < Q), other=0.0)
        if HAS_DROPOUT:
            rt = tl.where(_keep(seed, ms, qs, p), rt, 0.0)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
    out_p = tl.trans(ps)
    tl.store(OUT + split.to(tl.int64) * stride_os + out_p * stride_op + qs * stride_oq, acc * scale, mask=(out_p < P) & (qs < Q))


# -- launchers ------------------------------------------------------------------------------

def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _launch_meta(cfg: dict) -> tuple[dict, dict]:
    """Split a config into constexpr block sizes and launch options."""
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    return cfg, opts


def down(x: Tensor, w_kr: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor],
         cfg: Optional[dict] = None) -> Tensor:
    """``scale * dropout(x) @ w_kr`` for ``x: (M, K)``, ``w_kr: (K, R)`` (any strides).

    ``cfg`` forces a block configuration (the tuner's use); by default it is looked up."""
    m, k = x.shape
    r = w_kr.shape[1]
    out = empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg, opts = _launch_meta(dict(cfg) if cfg else _config.config(OP, "down", x.device, m, r, k, r))
    block_r = min(_pow2(r), 128)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, block_r))
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    _down_kernel[grid](
        x, w_kr, out, seed if seed is not None else x,
        m, k, r,
        x.stride(0), x.stride(1), w_kr.stride(0), w_kr.stride(1), out.stride(0), out.stride(1),
        scale * keep_scale, dropout_p,
        HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(x.dtype), BLOCK_R=block_r, **cfg, **opts,
    )
    return out


def gemm(x: Tensor, w_kn: Tensor, u: Tensor, b_rn: Tensor, bias: Optional[Tensor], *,
         epi_scale: float = 1.0, dropout_p: float = 0.0, seed: Optional[Tensor] = None,
         cfg: Optional[dict] = None) -> Tensor:
    """``x @ w_kn + epi_scale * keep * (u @ b_rn) + bias`` (the mask only when ``dropout_p > 0``)."""
    m, k = x.shape
    n = w_kn.shape[1]
    r = u.shape[1]
    out = empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    cfg, opts = _launch_meta(dict(cfg) if cfg else _config.config(OP, "gemm", x.device, m, n, k, r))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](
        x, w_kn, u, b_rn, bias if bias is not None else x, out, seed if seed is not None else x,
        m, n, k, r,
        x.stride(0), x.stride(1), w_kn.stride(0), w_kn.stride(1), u.stride(0), u.stride(1),
        b_rn.stride(0), b_rn.stride(1), out.stride(0), out.stride(1),
        epi_scale, dropout_p,
        HAS_BIAS=bias is not None, EPI_DROPOUT=dropout_p > 0, PRECISION=dot_precision(x.dtype),
        BLOCK_R=min(_pow2(r), 64), **cfg, **opts,
    )
    return out


def tn(left: Tensor, right: Tensor, *, scale: float = 1.0, dropout_p: float = 0.0,
       seed: Optional[Tensor] = None, out_dtype: torch.dtype, cfg: Optional[dict] = None) -> Tensor:
    """``scale * left^T @ dropout(right)`` for ``left: (M, P)``, ``right: (M, Q)``: a reduction
    over the M tokens, split across programs into float32 partials summed in a fixed order."""
    m, p_dim = left.shape
    q_dim = right.shape[1]
    cfg, opts = _launch_meta(dict(cfg) if cfg else _config.config(OP, "tn", left.device, m, p_dim, q_dim, min(p_dim, q_dim)))
    cfg["BLOCK_P"] = min(cfg["BLOCK_P"], _pow2(p_dim))
    cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], _pow2(q_dim))
    tiles = triton.cdiv(p_dim, cfg["BLOCK_P"]) * triton.cdiv(q_dim, cfg["BLOCK_Q"])
    # Enough programs to fill the GPU twice over, but each split keeps >= 4 row blocks of work.
    splits = max(1, min(triton.cdiv(2 * num_sms(left.device), tiles), triton.cdiv(m, 4 * cfg["BLOCK_M"])))
    rows_per_split = triton.cdiv(max(m, 1), splits * cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(max(m, 1), rows_per_split)
    partial = empty((splits, p_dim, q_dim), dtype=torch.float32, device=left.device)
    grid = (triton.cdiv(p_dim, cfg["BLOCK_P"]), triton.cdiv(q_dim, cfg["BLOCK_Q"]), splits)
    _tn_kernel[grid](
        left, right, partial, seed if seed is not None else left,
        m, p_dim, q_dim, rows_per_split,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2),
        scale, dropout_p,
        HAS_DROPOUT=dropout_p > 0, PRECISION=dot_precision(left.dtype), **cfg, **opts,
    )
    return partial.sum(0).to(out_dtype)


# -- the backend ------------------------------------------------------------------------------

def _forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    with on_device(x.device):
        u = down(x2, lora_a.T, scale, dropout_p, seed)
        y = gemm(x2, weight.T, u, lora_b.T, bias)
    return y.reshape(*lead, weight.shape[0]), u.reshape(*lead, lora_a.shape[0])


def _backward(grad, x, weight, lora_a, lora_b, lora_u, scale, dropout_p, seed, output_mask: Sequence[bool]):
    need_x, need_w, need_a, need_b, need_bias = output_mask
    n, k = weight.shape
    g = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = dw = da = db_ = dbias = None
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    with on_device(x.device):
        if need_x or need_a:
            v = down(g, lora_b, scale, 0.0, None)  # s * g B
        if need_x:
            dx = gemm(g, weight, v, lora_a, None, epi_scale=keep_scale, dropout_p=dropout_p, seed=seed).reshape(x.shape)
        if need_a:
            da = tn(v, x2, scale=keep_scale, dropout_p=dropout_p, seed=seed, out_dtype=lora_a.dtype)
        if need_b:
            db_ = tn(g, lora_u.reshape(-1, lora_a.shape[0]), out_dtype=lora_b.dtype)
        if need_w:
            dw = tn(g, x2, out_dtype=weight.dtype)
        if need_bias:
            dbias = g.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, dw, da, db_, dbias


def _supports(x, weight, lora_a, *rest) -> Optional[str]:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"the triton kernels take float32, float16 or bfloat16, got {x.dtype}"
    if lora_a.shape[0] > 256:
        return f"the triton kernels take ranks up to 256, got {lora_a.shape[0]}"
    # Token offsets are int64; weight offsets stay int32, which is what real layers need.
    if weight.numel() >= 2**31:
        return f"the triton kernels take weights under 2**31 elements, got {tuple(weight.shape)}"
    return None


register_impl(OP, "triton", OpImpl(forward=_forward, backward=_backward, supports=_supports))
