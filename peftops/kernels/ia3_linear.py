r"""Triton kernels for ``peftops.ia3_linear``, registered as its ``triton`` backend.

Forward, for ``x: (M, K)``, ``W: (N, K)``, ``l``, ``b: (N,)`` (one kernel, ``_fwd_kernel``)::

    output scaling:  z = x W^T + b,  y = z * l     l applied in the epilogue, on the output
                                                   columns; z also written when the backward
                                                   needs it (the tile is in registers anyway)
    input scaling:   y = (x * l) W^T + b           l applied in the prologue, to each loaded x
                                                   tile (rounded to x's dtype, as peft rounds
                                                   its ``x * l`` before the base layer)

Neither costs a pass over the activations of its own.

Backward, for ``g = dL/dy: (M, N)`` (one kernel, ``_bwd_kernel``, a GEMM over the out features
with column reductions fused in). With ``y_mn = l_n z_mn`` (output scaling)::

    dL/dz = g * l               so   dx = (g * l) W        g's tile scaled as it is loaded
    dl_n  = sum_m g_mn z_mn                                 needs z: the one the forward wrote
    db_n  = sum_m g_mn l_n

The dl and db sums read the same g tiles the dx GEMM loads; the programs of the first column
block of dx add them up, into per-row-block float32 partials. With ``y = x' W^T + b``,
``x' = x * l`` (input scaling), ``dL/dx' = h = g W``::

    dx   = h * l                                            h scaled in the epilogue
    dl_k = sum_m h_mk x_mk                                  h is the GEMM's own tile: the
                                                            epilogue loads x's tile and reduces
    db_n = sum_m g_mn                                       as above, from the loaded g tiles

    dW = (g * l)^T x  or  g^T (x * l),  both  (g^T x) scaled by l on one side: only when the
                                         frozen base is trained (``lowrank.tn``, then the scale)

Partials are summed by PyTorch in a fixed order: deterministic, no atomics. Offsets along the
token dimension are int64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .. import reference
from ..backends import OpImpl, register_impl
from . import block_config
from .common import dot_precision, dtype_reason, empty, on_device
from .lowrank import launch_meta, tile_coords, tn

OP = "ia3_linear"


@triton.jit
def _fwd_kernel(
    X,
    W,
    L,
    BIAS,
    OUT,
    Z,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    stride_zm,
    stride_zn,
    HAS_BIAS: tl.constexpr,
    SCALE_INPUT: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``OUT = (X W^T + BIAS) * L[cols]``, or ``(X * L[ks]) W^T + BIAS`` when ``SCALE_INPUT``;
    ``Z = X W^T + BIAS`` (unscaled) when ``STORE_Z``. Programs in groups of GROUP_M row blocks."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = tile_coords(pid, GROUP_M * blocks_n, blocks_m, GROUP_M)

    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N))[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(X + rows * stride_xm + ks[None, :] * stride_xk, mask=(rows < M) & (ks[None, :] < K), other=0.0)
        if SCALE_INPUT:
            scale = tl.load(L + ks, mask=ks < K, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * scale[None, :]).to(x.dtype)
        w = tl.load(W + cols * stride_wn + ks[:, None] * stride_wk, mask=(ks[:, None] < K) & (cols < N), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    inside = (rows < M) & (cols < N)
    if not SCALE_INPUT:
        if STORE_Z:
            tl.store(Z + rows * stride_zm + cols * stride_zn, acc.to(Z.dtype.element_ty), mask=inside)
        acc = acc * tl.load(L + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(OUT + rows * stride_om + cols * stride_on, acc.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _bwd_kernel(
    G,
    W,
    L,
    X,
    Z,
    DX,
    DL_PART,
    DB_PART,
    M,
    N,
    K,
    stride_gm,
    stride_gn,
    stride_wn,
    stride_wk,
    stride_xm,
    stride_xk,
    stride_zm,
    stride_zn,
    stride_dm,
    stride_dk,
    SCALE_INPUT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    STORE_DX: tl.constexpr,
    NEED_DL: tl.constexpr,
    NEED_DB: tl.constexpr,
    REDUCE_G: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program ``(pid_m, pid_k)``: the ``(BLOCK_M, BLOCK_N)`` tile of ``DX`` at rows ``pid_m``,
    input features ``pid_k``, a loop over the out features in steps of ``BLOCK_K``; the
    programs with ``pid_k == 0`` also write row-block partial sums over the loaded ``G`` tiles
    (``DB_PART``, and ``DL_PART`` for output scaling, both ``(blocks_m, N)``). For input scaling
    every program reduces its own ``G W`` tile against ``X`` into ``DL_PART`` ``(blocks_m, K)``.
    ``COMPUTE_DX`` False: only the reductions over ``G`` run (output scaling, dx not needed)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
    ks = (pid_k * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        g = tl.load(G + rows * stride_gm + ns[None, :] * stride_gn, mask=(rows < M) & (ns[None, :] < N), other=0.0)
        g_raw = g
        if not SCALE_INPUT:
            scale = tl.load(L + ns, mask=ns < N, other=0.0).to(tl.float32)
            # Rounded to g's dtype, as autograd rounds g * l before the base layer's backward.
            g = (g.to(tl.float32) * scale[None, :]).to(g.dtype)
        if REDUCE_G:
            if pid_k == 0:
                if NEED_DB:
                    tl.store(DB_PART + pid_m * N + ns, tl.sum(g.to(tl.float32), axis=0), mask=ns < N)
                if NEED_DL and not SCALE_INPUT:
                    z = tl.load(
                        Z + rows * stride_zm + ns[None, :] * stride_zn, mask=(rows < M) & (ns[None, :] < N), other=0.0
                    )
                    # dl_n = sum_m g_mn z_mn with the unscaled g.
                    part = tl.sum(g_raw.to(tl.float32) * z.to(tl.float32), axis=0)
                    tl.store(DL_PART + pid_m * N + ns, part, mask=ns < N)
        if COMPUTE_DX:
            w = tl.load(W + ns[:, None] * stride_wn + ks * stride_wk, mask=(ns[:, None] < N) & (ks < K), other=0.0)
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
    if COMPUTE_DX:
        inside = (rows < M) & (ks < K)
        if SCALE_INPUT:
            if NEED_DL:
                x = tl.load(X + rows * stride_xm + ks * stride_xk, mask=inside, other=0.0).to(tl.float32)
                tl.store(DL_PART + pid_m * K + ks, tl.sum(acc * x, axis=0)[None, :], mask=ks < K)
            acc = acc * tl.load(L + ks, mask=ks < K, other=0.0).to(tl.float32)
        if STORE_DX:
            tl.store(DX + rows * stride_dm + ks * stride_dk, acc.to(DX.dtype.element_ty), mask=inside)


# -- launchers ------------------------------------------------------------------------------


def _config(device, m, n, k, dtype, cfg):
    return launch_meta(dict(cfg) if cfg else block_config.config(OP, "gemm", device, m, n, k, 0, dtype))


def forward_2d(x, weight, scale, bias, scale_input: bool, store_z: bool, cfg: dict | None = None):
    """``(y, z)`` for 2-D ``x``; ``z`` (output scaling with ``store_z``) else an empty tensor."""
    m, k = x.shape
    n = weight.shape[0]
    y = empty((m, n), dtype=x.dtype, device=x.device)
    keep_z = store_z and not scale_input
    z = empty((m, n), dtype=x.dtype, device=x.device) if keep_z else x.new_empty((0,))
    if m == 0 or n == 0:
        return y, z
    if k == 0:  # (the op refuses this; kept for direct callers)
        raise ValueError(f"{OP}: x: expected at least 1 input feature, got {tuple(x.shape)}")
    meta, opts = _config(x.device, m, n, k, x.dtype, cfg)
    block_config.fit_stages(opts, (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * x.element_size(), x.device)
    grid = (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _fwd_kernel[grid](
        x,
        weight,
        scale,
        bias if bias is not None else y,
        y,
        z if keep_z else y,
        m,
        n,
        k,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        y.stride(0),
        y.stride(1),
        z.stride(0) if keep_z else 0,
        z.stride(1) if keep_z else 0,
        HAS_BIAS=bias is not None,
        SCALE_INPUT=scale_input,
        STORE_Z=keep_z,
        PRECISION=dot_precision(x.dtype),
        **meta,
        **opts,
    )
    return y, z


def backward_2d(g, x, weight, scale, z, scale_input: bool, need_x, need_l, need_b, cfg: dict | None = None):
    """``(dx, dl, db)`` (each None unless asked) for 2-D ``g``, ``x``; dl and db in float32."""
    m, k = x.shape
    n = weight.shape[0]
    compute_dx = need_x or (need_l and scale_input)
    if m == 0 or not (compute_dx or need_l or need_b):
        dx = torch.zeros_like(x) if need_x else None
        dl = torch.zeros(k if scale_input else n, dtype=torch.float32, device=x.device) if need_l else None
        db = torch.zeros(n, dtype=torch.float32, device=x.device) if need_b else None
        return dx, dl, db
    meta, opts = _config(x.device, m, k, n, x.dtype, cfg)
    meta.pop("GROUP_M")
    block_config.fit_stages(opts, (meta["BLOCK_M"] + meta["BLOCK_N"]) * meta["BLOCK_K"] * x.element_size(), x.device)
    blocks_m = triton.cdiv(m, meta["BLOCK_M"])
    dx = empty((m, k), dtype=x.dtype, device=x.device) if need_x else None
    dl_part = empty((blocks_m, k if scale_input else n), dtype=torch.float32, device=x.device) if need_l else None
    db_part = empty((blocks_m, n), dtype=torch.float32, device=x.device) if need_b else None
    grid = (blocks_m, triton.cdiv(k, meta["BLOCK_N"]) if compute_dx else 1)
    zt = z if (need_l and not scale_input) else g
    _bwd_kernel[grid](
        g,
        weight,
        scale,
        x,
        zt,
        dx if dx is not None else g,
        dl_part if dl_part is not None else g,
        db_part if db_part is not None else g,
        m,
        n,
        k,
        g.stride(0),
        g.stride(1),
        weight.stride(0),
        weight.stride(1),
        x.stride(0),
        x.stride(1),
        zt.stride(0),
        zt.stride(1),
        dx.stride(0) if dx is not None else 0,
        dx.stride(1) if dx is not None else 0,
        SCALE_INPUT=scale_input,
        COMPUTE_DX=compute_dx,
        STORE_DX=need_x,
        NEED_DL=need_l,
        NEED_DB=need_b,
        REDUCE_G=need_b or (need_l and not scale_input),
        PRECISION=dot_precision(x.dtype),
        **meta,
        **opts,
    )
    dl = dl_part.sum(0) if dl_part is not None else None
    db = db_part.sum(0) if db_part is not None else None
    return dx, dl, db


# -- the backend ------------------------------------------------------------------------------


def forward(x, weight, ia3_scale, bias, scale_input, save_z):
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    with on_device(x.device):
        y, z = forward_2d(x.reshape(-1, k), weight, ia3_scale, bias, scale_input, save_z)
    return y.reshape(*lead, n), (z.reshape(*lead, n) if z.numel() else z)


def backward(grad, x, weight, ia3_scale, bias, saved_z, scale_input, output_mask: Sequence[bool]):
    need_x, need_w, need_l, need_bias = output_mask
    n, k = weight.shape
    g = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    z2 = saved_z.reshape(-1, n) if saved_z.shape == grad.shape else saved_z
    if output_mask[2] and not scale_input and saved_z.shape != grad.shape:
        # (a direct torch.ops call that did not save z: recompute it)
        z2 = reference.ia3_base_output(x2, weight, bias)
    with on_device(x.device):
        dx, dl, db = backward_2d(g, x2, weight, ia3_scale, z2, scale_input, need_x, need_l, need_bias)
        dw = None
        if need_w:
            gx = tn(g, x2, out_dtype=torch.float32, op=OP)
            lf = ia3_scale.to(torch.float32)
            dw = (gx * (lf[None, :] if scale_input else lf[:, None])).to(weight.dtype)
    return (
        dx.reshape(x.shape) if dx is not None else None,
        dw,
        dl.to(ia3_scale.dtype) if dl is not None else None,
        db.to(grad.dtype) if db is not None else None,
    )


def supports(x, weight, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if weight.numel() >= 2**31:
        return f"the triton kernels take weights under 2**31 elements, got {tuple(weight.shape)}"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
