r"""Triton kernels for ``peftops.bottleneck_adapter``, registered as its ``triton`` backend.

Forward, one kernel (``_forward_kernel``), for ``x: (T, d)``, ``Wd: (r, d)``, ``Wu: (d, r)``::

    h = x Wd^T + bd           a row block's pre-activation, accumulated on chip over d
    a = act(h)                in registers
    y = res + s (a Wu^T + bu) one column block of d at a time, written once

so x is read twice per row block (the second read, for the residual, mostly from L2) and y
written once: the memory floor is one read of x and one write of y. ``h`` (T x r, float32)
is stored for the backward, which then needs no pass over x to recompute it.

Backward, for ``g = dL/dy``::

    da  = s g Wu              lowrank.down over g: (T, r), float32
    dh  = da * act'(h)        T x r, elementwise, float32
    dx  = dh Wd (+ g serial)  _expand_kernel: the forward's second half, rows of dh
    dWu = s g^T act(h)        lowrank.tn: token reductions, float32 partials summed in order
    dWd = dh^T x
    dbu = s g^T 1             column sums of g from dWu's loaded tiles (lowrank.tn_sums), or
                              from the pass computing da when Wu is frozen: no pass of its own
    dbd = dh^T 1              likewise from dWd's reduction

from ``y = res + s (act(h) Wu^T + bu)``, ``h = x Wd^T + bd``: ``dL/da = s g Wu``,
``dL/dh = dL/da * act'(h)``, and each weight's gradient is the token sum of the outer product
of its output's gradient with its input. The rank-r values (``act(h)``, ``da``, ``dh``) stay
float32 up to the products: in fp16 they can overflow where y is finite, so an fp16 product
scales their rows into range first (:mod:`.lowrank`).

Activation derivatives as in :mod:`peftops.reference.bottleneck_adapter`; tanh is written with exp so
that the same code runs under the interpreter and on every Triton version. relu keeps NaN
(``torch.relu`` does, and so does the backward's ``act'``); ``tl.maximum`` would return 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl
from . import block_config
from .common import ACT_CODES, dot_precision, dtype_reason, empty, on_device
from .lowrank import MAX_RANK, down, down_sums, fp16_row_factor, fp16_scaled, pow2, tn, tn_sums

OP = "bottleneck_adapter"


@triton.jit
def _tanh(z):
    return 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0


@triton.jit
def _act(h, ACT: tl.constexpr):
    """relu, gelu (erf), gelu_tanh, silu of a float32 tile; act(0) = 0 for all four, so padded
    rank columns stay zero. NaN stays NaN in all four."""
    if ACT == 0:
        out = tl.where(h < 0.0, 0.0, h)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:  # 0.79788... = sqrt(2 / pi)
        out = 0.5 * h * (1.0 + _tanh(0.7978845608028654 * (h + 0.044715 * h * h * h)))
    else:
        out = h / (1.0 + tl.exp(-h))
    return out


@triton.jit
def _expand(
    a,
    rows,
    W,
    BIAS,
    RES,
    OUT,
    M,
    D,
    R,
    stride_wd,
    stride_wr,
    stride_rm,
    stride_rd,
    stride_om,
    stride_od,
    scale,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    SCALE_A: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """For the row block ``rows`` with rank-r activations ``a`` (BLOCK_M x BLOCK_R, float32):
    ``OUT = RES + scale * (a W^T + BIAS)`` one column block at a time, ``W: (D, R)`` by strides.
    ``a`` is rounded to W's dtype once, its rows scaled into fp16's range first when ``SCALE_A``."""
    rs = tl.arange(0, BLOCK_R)[:, None]
    if SCALE_A:
        f = fp16_row_factor(a, 1)[:, None]
        a = a / f
    a = a.to(W.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)[None, :]
        w = tl.load(W + cols * stride_wd + rs * stride_wr, mask=(rs < R) & (cols < D), other=0.0)
        z = tl.dot(a, w, input_precision=PRECISION)
        if SCALE_A:
            z = z * f
        if HAS_BIAS:
            z += tl.load(BIAS + cols, mask=cols < D, other=0.0).to(tl.float32)
        z = z * scale
        mask = (rows < M) & (cols < D)
        if HAS_RES:
            z += tl.load(RES + rows * stride_rm + cols * stride_rd, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + rows * stride_om + cols * stride_od, z.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    X,
    WD,
    BD,
    WU,
    BU,
    RES,
    Y,
    H,
    M,
    D,
    R,
    stride_xm,
    stride_xd,
    stride_wdr,
    stride_wdd,
    stride_wud,
    stride_wur,
    stride_rm,
    stride_rd,
    stride_ym,
    stride_yd,
    stride_hm,
    stride_hr,
    scale,
    HAS_BD: tl.constexpr,
    HAS_BU: tl.constexpr,
    SCALE_A: tl.constexpr,
    ACT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One row block: ``h = x Wd^T + bd`` over all of d, ``H = h``, then ``Y = res + s (act(h) Wu^T + bu)``
    (``RES`` is x itself for a serial adapter)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    rs = tl.arange(0, BLOCK_R)[None, :]
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ks = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xd, mask=(rows < M) & (ks[None, :] < D), other=0.0)
        wt = tl.load(WD + rs * stride_wdr + ks[:, None] * stride_wdd, mask=(rs < R) & (ks[:, None] < D), other=0.0)
        h = tl.dot(x, wt, h, input_precision=PRECISION)
    if HAS_BD:
        h += tl.load(BD + rs, mask=rs < R, other=0.0).to(tl.float32)
    tl.store(H + rows * stride_hm + rs * stride_hr, h, mask=(rows < M) & (rs < R))
    _expand(
        _act(h, ACT),
        rows,
        WU,
        BU,
        RES,
        Y,
        M,
        D,
        R,
        stride_wud,
        stride_wur,
        stride_rm,
        stride_rd,
        stride_ym,
        stride_yd,
        scale,
        HAS_BU,
        True,
        SCALE_A,
        PRECISION,
        BLOCK_D,
        BLOCK_R,
    )


@triton.jit
def _expand_kernel(
    P,
    W,
    RES,
    OUT,
    M,
    D,
    R,
    stride_pm,
    stride_pr,
    stride_wd,
    stride_wr,
    stride_rm,
    stride_rd,
    stride_om,
    stride_od,
    HAS_RES: tl.constexpr,
    SCALE_A: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``OUT = P W^T (+ RES)`` for ``P: (M, R)`` (float32), ``W: (D, R)``: the backward's dx."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    rs = tl.arange(0, BLOCK_R)[None, :]
    a = tl.load(P + rows * stride_pm + rs * stride_pr, mask=(rows < M) & (rs < R), other=0.0).to(tl.float32)
    _expand(
        a,
        rows,
        W,
        W,
        RES,
        OUT,
        M,
        D,
        R,
        stride_wd,
        stride_wr,
        stride_rm,
        stride_rd,
        stride_om,
        stride_od,
        1.0,
        False,
        HAS_RES,
        SCALE_A,
        PRECISION,
        BLOCK_D,
        BLOCK_R,
    )


def _blocks(
    rank: int, device: torch.device, m: int, d: int, dtype: torch.dtype, cfg: dict | None = None
) -> tuple[int, dict]:
    """``(BLOCK_R, meta)`` for the row kernels; ``cfg`` overrides the lookup (the tuner's candidates)."""
    cfg = dict(cfg) if cfg is not None else block_config.config(OP, "rows", device, m, d, d, rank, dtype)
    block_r = pow2(rank)
    # The whole rank lives in registers: shrink the row block as r grows (~64 x 64 floats).
    block_m = max(16, min(cfg.pop("BLOCK_M"), 4096 // block_r))
    elem = torch.empty((), dtype=dtype).element_size()
    block_config.fit_stages(cfg, (block_m + block_r) * cfg["BLOCK_D"] * elem, device)
    return block_r, dict(BLOCK_M=block_m, **cfg)


def forward(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, *, cfg: dict | None = None):
    lead, d = x.shape[:-1], x.shape[-1]
    rank = down_weight.shape[0]
    x2 = x.reshape(-1, d)
    res2 = residual.reshape(-1, d) if residual is not None else x2
    m = x2.shape[0]
    y = empty((m, d), dtype=x.dtype, device=x.device)
    h = empty((m, rank), dtype=torch.float32, device=x.device)
    if m:
        block_r, cfg = _blocks(rank, x.device, m, d, x.dtype, cfg)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        with on_device(x.device):
            _forward_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
                x2,
                down_weight,
                down_bias.contiguous() if down_bias is not None else x2,
                up_weight,
                up_bias.contiguous() if up_bias is not None else x2,
                res2,
                y,
                h,
                m,
                d,
                rank,
                x2.stride(0),
                x2.stride(1),
                down_weight.stride(0),
                down_weight.stride(1),
                up_weight.stride(0),
                up_weight.stride(1),
                res2.stride(0),
                res2.stride(1),
                y.stride(0),
                y.stride(1),
                h.stride(0),
                h.stride(1),
                scale,
                HAS_BD=down_bias is not None,
                HAS_BU=up_bias is not None,
                SCALE_A=x.dtype == torch.float16,
                ACT=ACT_CODES[activation],
                PRECISION=dot_precision(x.dtype),
                BLOCK_R=block_r,
                num_warps=num_warps,
                num_stages=num_stages,
                **cfg,
            )
    return y.reshape(*lead, d), h.reshape(*lead, rank)


def _expand_rows(p: Tensor, w: Tensor, res: Tensor | None, out_dtype: torch.dtype, cfg: dict | None = None) -> Tensor:
    m, rank = p.shape
    d = w.shape[0]
    out = empty((m, d), dtype=out_dtype, device=p.device)
    if m:
        block_r, cfg = _blocks(rank, p.device, m, d, w.dtype, cfg)
        num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
        r2 = res if res is not None else out
        _expand_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
            p,
            w,
            r2,
            out,
            m,
            d,
            rank,
            p.stride(0),
            p.stride(1),
            w.stride(0),
            w.stride(1),
            r2.stride(0),
            r2.stride(1),
            out.stride(0),
            out.stride(1),
            HAS_RES=res is not None,
            SCALE_A=fp16_scaled(p, w),
            PRECISION=dot_precision(w.dtype),
            BLOCK_R=block_r,
            num_warps=num_warps,
            num_stages=num_stages,
            **cfg,
        )
    return out


def backward(
    grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask: Sequence[bool]
):
    need_x, need_wd, need_bd, need_wu, need_bu = output_mask
    d = x.shape[-1]
    rank = down_weight.shape[0]
    g = grad.reshape(-1, d)
    x2 = x.reshape(-1, d)
    h = hidden.reshape(x2.shape[0], rank)  # not -1: with r = 0 there are no elements to infer it from
    dx = dwd = dbd = dwu = dbu = None
    g_sums = None  # sum_T g in float32, from a pass over g that runs anyway
    with on_device(x.device):
        if need_wu:
            # float32 activations: the reduction rounds them (scaled into range for fp16).
            a = reference.activation(h, activation)
            if need_bu:
                dwu, g_sums = tn_sums(g, a, scale=scale, out_dtype=up_weight.dtype, op=OP)
            else:
                dwu = tn(g, a, scale=scale, out_dtype=up_weight.dtype, op=OP)
        if need_x or need_wd or need_bd:
            # Without dWu, this pass over g carries dbu (a float32 row per row block of g).
            if need_bu and g_sums is None:
                da, g_sums = down_sums(g, up_weight, scale, None, op=OP, out_dtype=torch.float32)
            else:
                da = down(g, up_weight, scale, 0.0, None, op=OP, out_dtype=torch.float32)
            dh = da * reference.activation_grad(h, activation)
            if need_x:
                dx = _expand_rows(dh, down_weight.T, g if serial else None, x.dtype).reshape(x.shape)
            if need_wd and need_bd:
                dwd, dh_sums = tn_sums(dh, x2, out_dtype=down_weight.dtype, op=OP)
                dbd = dh_sums.to(grad.dtype)
            elif need_wd:
                dwd = tn(dh, x2, out_dtype=down_weight.dtype, op=OP)
            elif need_bd:
                dbd = dh.sum(0).to(grad.dtype)  # T x r floats: no product to share the pass with
        if need_bu:
            # Only bu trains and nothing else reads g: the sum is the one pass there is.
            dbu = (scale * (g_sums if g_sums is not None else g.sum(0, dtype=torch.float32))).to(grad.dtype)
    return dx, dwd, dbd, dwu, dbu


def supports(x, down_weight, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if down_weight.shape[0] > MAX_RANK:
        return f"the triton kernels take ranks up to {MAX_RANK}, got {down_weight.shape[0]}"
    if down_weight.numel() >= 2**31:
        return f"the triton kernels take weights under 2**31 elements, got {tuple(down_weight.shape)}"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
