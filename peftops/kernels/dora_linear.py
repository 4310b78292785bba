r"""Triton kernels for ``peftops.dora_linear`` (DoRA), registered as its ``triton`` backend: the
LoRA kernels (:mod:`.lora_linear`, :mod:`.lowrank`) with DoRA's magnitude in the GEMM's
epilogue and its gradient in dB's token reduction.

Forward, for ``x: (M, K)``, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, magnitude ``m``,
scale ``s``::

    n = ||W + s B A||_row          the Gram expansion (framework GEMMs: one (N, r) product over W
                                   and an r x r Gram, ``||W_j||^2`` cached by the caller), float32
    c = m / n                      (N,), float32
    u = x A^T                      _down_kernel, float32, unscaled (the op's contract)
    z = x W^T + s u B^T            _gemm_kernel (TMA kernel on Hopper): LoRA's GEMM, whose
    y = c * z + b                  epilogue applies c and b, so y is written once; z is stored
                                   from the same accumulator when the magnitude trains

Backward, for ``g = dL/dy``. The norm is a constant (peft detaches it, as the DoRA paper
proposes), so with ``g_c = g * c``: ``dL/dz = g_c``; ``dL/dm_j = sum_t g_tj z_tj / n_j``;
``z = x W^T + s (x A^T) B^T`` gives ``dL/dB = s g_c^T u = s c * (g^T u)``, ``dL/du = s g_c B =
v``, ``dL/dA = v^T x``, ``dL/dx = g_c W + v A`` and ``dL/dW = g_c^T x``::

    P = g^T u, sum_T g z, sum_T g  _tn_kernel: one pass over g (and z); dB = s c P, dm = . / n,
                                   db, all from the same loaded g tiles
    v = s g (c B)                  _down_kernel over g, c folded into B's rows ((N, r), free)
    dx = g_c W + v A               LoRA's GEMM on g_c, formed once (one elementwise pass over g:
                                   the TMA kernel reads its operands straight into shared
                                   memory, where a per-column scale cannot be applied)
    dA = v^T x                     _tn_kernel
    dW = g_c^T x                   _tn_kernel, only when the base trains

Dropout (peft's placement: the magnitude rescales the base term on the dropped input ``x_d = x
* k / (1 - p)``): ``y = x W^T + (c - 1) x_d W^T + c s u B^T + b = c z_d + b + (x - x_d) W^T``
with ``z_d = x_d W^T + s u B^T``, ``u = x_d A^T``. The fused GEMM computes ``c z_d + b`` and
saves ``z_d``; the second GEMM over ``x - x_d`` accumulates into y in place (the framework's
addmm). Backward: ``dx = g W + k / (1 - p) * ((g_c - g) W + v A)``, the bracket from the fused
GEMM, ``g W`` accumulated into it by addmm; ``dA = v^T x_d``. Two big GEMMs each way, as
peft's autograd runs, instead of three. The keep-mask is drawn from torch's generator and
returned for the backward to save, as the torch backend does; the op's ``seed`` is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends import OpImpl, register_impl
from ..composite.dora_linear import dora_weight_norm
from .common import dtype_reason, on_device
from .lora_linear import gemm, gemm_col_scaled
from .lowrank import MAX_RANK, down, down_sums, tn, tn_dot_sums, tn_sums

OP = "dora_linear"


def _scale_vector(magnitude: Tensor, norm: Tensor) -> Tensor:
    # float32 (the op's norm is float32 for every dtype the kernels take): the epilogue
    # multiplies the float32 accumulator by it, so rounding c to 16 bits would only lose bits.
    return (magnitude.to(torch.float32) / norm).contiguous()


def forward(x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre):
    lead, k = x.shape[:-1], x.shape[-1]
    n_out = weight.shape[0]
    x2 = x.reshape(-1, k)
    with torch.no_grad():
        norm = dora_weight_norm(weight, lora_a, lora_b, scale, weight_sq)
    c = _scale_vector(magnitude, norm)
    dropout = dropout_p > 0.0
    with on_device(x.device):
        if dropout:
            keep = torch.rand(x2.shape, device=x.device, dtype=torch.float32) >= dropout_p
            xd = x2 * keep * (1.0 / (1.0 - dropout_p))
            u = down(xd, lora_a.T, 1.0, 0.0, None, out_dtype=torch.float32)
            y, z = gemm_col_scaled(xd, weight.T, u, lora_b.T, bias, c, epi_scale=scale, save_pre=True)
            y.addmm_(x2 - xd, weight.T)
        else:
            keep = x.new_empty((0,), dtype=torch.bool)
            u = down(x2, lora_a.T, 1.0, 0.0, None, out_dtype=torch.float32)
            y, z = gemm_col_scaled(x2, weight.T, u, lora_b.T, bias, c, epi_scale=scale, save_pre=save_pre)
    pre = z.reshape(*lead, n_out) if save_pre and z is not None else x.new_empty((0,))
    return (
        y.reshape(*lead, n_out),
        u.reshape(*lead, lora_a.shape[0]),
        pre,
        keep.reshape(x.shape) if dropout else keep,
        norm,
    )


def backward(grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, scale, dropout_p,
             output_mask: Sequence[bool]):  # fmt: skip
    need_x, need_w, need_a, need_b, need_m, need_bias = output_mask
    n_out, k = weight.shape
    rank = lora_a.shape[0]
    g = grad.reshape(-1, n_out)
    x2 = x.reshape(-1, k)
    u = lora_u.reshape(-1, rank)
    dropout = dropout_p > 0.0
    xd = x2 * keep.reshape(-1, k) * (1.0 / (1.0 - dropout_p)) if dropout else x2
    c = _scale_vector(magnitude, norm)
    dx = dw = da = db_ = dm = dbias = None
    sums = None  # sum_T g in float32, from whichever pass over g below reduces over tokens
    with on_device(x.device):
        if need_b or need_m:
            if need_m:
                z = pre.reshape(-1, n_out) if pre.numel() else gemm(xd, weight.T, u, lora_b.T, None, epi_scale=scale)
                p_gu, sums, dots = tn_dot_sums(g, u, z, col_sums=need_bias, out_dtype=torch.float32)
                dm = (dots / norm).to(magnitude.dtype)
            elif need_bias:
                p_gu, sums = tn_sums(g, u, out_dtype=torch.float32)
            else:
                p_gu = tn(g, u, out_dtype=torch.float32)
            if need_b:
                db_ = (p_gu * (scale * c)[:, None]).to(lora_b.dtype)
        if need_x or need_a:
            cb = (lora_b.to(torch.float32) * c[:, None]).to(lora_b.dtype)
            if need_bias and sums is None:
                v, sums = down_sums(g, cb, scale, None, out_dtype=torch.float32)
            else:
                v = down(g, cb, scale, 0.0, None, out_dtype=torch.float32)
            if need_x:
                if dropout:
                    # k / (1 - p) * ((g_c - g) W + v A), then + g W accumulated in place.
                    gm = (g * (c - 1.0)).to(g.dtype)
                    dx = gemm(gm, weight, v, lora_a, None).mul_(keep.reshape(-1, k)).mul_(1.0 / (1.0 - dropout_p))
                    dx = dx.addmm_(g, weight)
                else:
                    dx = gemm((g * c).to(g.dtype), weight, v, lora_a, None)
                dx = dx.reshape(x.shape)
            if need_a:
                da = tn(v, xd, out_dtype=lora_a.dtype)
        if need_w:
            gc = (g * c).to(g.dtype)
            dw = tn(gc, xd, out_dtype=weight.dtype)
            if dropout:
                dw += tn(g, x2 - xd, out_dtype=weight.dtype)
        if need_bias:
            # Only the bias and the base weight train: no pass over g carries the sum.
            dbias = (sums if sums is not None else g.sum(0, dtype=torch.float32)).to(grad.dtype)
    return dx, dw, da, db_, dm, dbias


def supports(x, weight, lora_a, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if lora_a.shape[0] > MAX_RANK:
        return f"the triton kernels take ranks up to {MAX_RANK}, got {lora_a.shape[0]}"
    if weight.numel() >= 2**31:
        return f"the triton kernels take weights under 2**31 elements, got {tuple(weight.shape)}"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
