"""Building blocks shared by the rank-r ops (LoRA, bottleneck adapters): the narrow "down"
projection ``scale * dropout(x) @ W`` over a row block, the token reduction ``L^T dropout(R)``
split into float32 partials, and the counter-based dropout mask they regenerate.

Dropout is counter-based: ``keep(i, j) = uniform(philox(seed, (j, i_lo, i_hi, 0))) >= p`` for
token ``i`` and feature ``j``, with the seed read from a device tensor (so CUDA graphs replay
with whatever seed the tensor holds). Token offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.random import uint_to_uniform_float

from . import block_config
from .common import dot_precision, empty, num_sms


@triton.jit
def keep_mask(seed, rows, cols, p):
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
    X,
    W,
    OUT,
    SEED,
    M,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wr,
    stride_om,
    stride_or,
    scale,
    p,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
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
        # int64: x may be a column-major view whose feature stride is the token count.
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep_mask(seed, rows, ks[None, :], p), x, 0.0)
        w = tl.load(W + ks[:, None] * stride_wk + ranks * stride_wr, mask=(ks[:, None] < K) & (ranks < R), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    tl.store(
        OUT + rows * stride_om + ranks * stride_or,
        (acc * scale).to(OUT.dtype.element_ty),
        mask=(rows < M) & (ranks < R),
    )


@triton.jit
def _tn_kernel(
    L,
    RT,
    OUT,
    SEED,
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
    scale,
    p,
    HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``OUT[s, p, q] = scale * sum_{m in split s} L[m, p] keep(m, q) RT[m, q]`` (float32 partials).

    Grid: (P blocks, Q blocks, splits of the token range). The caller sums the partials over
    ``s`` in a fixed order, which keeps the result deterministic.
    """
    # int64: L and RT may be column-major views whose feature strides are the token count.
    ps = (tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)[None, :]
    qs = (tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)[None, :]
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
            rt = tl.where(keep_mask(seed, ms, qs, p), rt, 0.0)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PRECISION)
    out_p = tl.trans(ps)
    tl.store(
        OUT + split.to(tl.int64) * stride_os + out_p * stride_op + qs * stride_oq,
        acc * scale,
        mask=(out_p < P) & (qs < Q),
    )


# -- launchers ------------------------------------------------------------------------------


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(n, 1)))


def launch_meta(cfg: dict) -> tuple[dict, dict]:
    """Split a config into constexpr block sizes and launch options."""
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    return cfg, opts


def down(
    x: Tensor,
    w_kr: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    cfg: dict | None = None,
    op: str = "lora_linear",
) -> Tensor:
    """``scale * dropout(x) @ w_kr`` for ``x: (M, K)``, ``w_kr: (K, R)`` (any strides).

    ``cfg`` forces a block configuration (the tuner's use); by default it is looked up in
    ``op``'s tuned configs."""
    m, k = x.shape
    r = w_kr.shape[1]
    out = empty((m, r), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg, opts = launch_meta(dict(cfg) if cfg else block_config.config(op, "down", x.device, m, r, k, r, x.dtype))
    block_r = min(pow2(r), 128)
    block_config.fit_stages(opts, (cfg["BLOCK_M"] + block_r) * cfg["BLOCK_K"] * x.element_size(), x.device)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(r, block_r))
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout_p > 0 else 1.0
    _down_kernel[grid](
        x,
        w_kr,
        out,
        seed if seed is not None else x,
        m,
        k,
        r,
        x.stride(0),
        x.stride(1),
        w_kr.stride(0),
        w_kr.stride(1),
        out.stride(0),
        out.stride(1),
        scale * keep_scale,
        dropout_p,
        HAS_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(x.dtype),
        BLOCK_R=block_r,
        **cfg,
        **opts,
    )
    return out


def tn(
    left: Tensor,
    right: Tensor,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    seed: Tensor | None = None,
    out_dtype: torch.dtype,
    cfg: dict | None = None,
    op: str = "lora_linear",
) -> Tensor:
    """``scale * left^T @ dropout(right)`` for ``left: (M, P)``, ``right: (M, Q)``: a reduction
    over the M tokens, split across programs into float32 partials summed in a fixed order."""
    m, p_dim = left.shape
    q_dim = right.shape[1]
    cfg, opts = launch_meta(
        dict(cfg) if cfg else block_config.config(op, "tn", left.device, m, p_dim, q_dim, min(p_dim, q_dim), left.dtype)
    )
    cfg["BLOCK_P"] = min(cfg["BLOCK_P"], pow2(p_dim))
    cfg["BLOCK_Q"] = min(cfg["BLOCK_Q"], pow2(q_dim))
    block_config.fit_stages(opts, cfg["BLOCK_M"] * (cfg["BLOCK_P"] + cfg["BLOCK_Q"]) * left.element_size(), left.device)
    tiles = triton.cdiv(p_dim, cfg["BLOCK_P"]) * triton.cdiv(q_dim, cfg["BLOCK_Q"])
    # Enough programs to fill the GPU twice over, but each split keeps >= 4 row blocks of work.
    splits = max(1, min(triton.cdiv(2 * num_sms(left.device), tiles), triton.cdiv(m, 4 * cfg["BLOCK_M"])))
    rows_per_split = triton.cdiv(max(m, 1), splits * cfg["BLOCK_M"]) * cfg["BLOCK_M"]
    splits = triton.cdiv(max(m, 1), rows_per_split)
    partial = empty((splits, p_dim, q_dim), dtype=torch.float32, device=left.device)
    grid = (triton.cdiv(p_dim, cfg["BLOCK_P"]), triton.cdiv(q_dim, cfg["BLOCK_Q"]), splits)
    _tn_kernel[grid](
        left,
        right,
        partial,
        seed if seed is not None else left,
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
        scale,
        dropout_p,
        HAS_DROPOUT=dropout_p > 0,
        PRECISION=dot_precision(left.dtype),
        **cfg,
        **opts,
    )
    return partial.sum(0).to(out_dtype)
