r"""``ia3_linear`` on the framework's GEMMs (the ``torch`` backend).

Output scaling: ``z = addmm(b, x, W^T)`` (saved for dl), ``y = z * l``. Input scaling:
``y = addmm(b, x * l, W^T)``, ``x * l`` rounded to x's dtype, as peft's eager module computes
it. The backward follows the formulas of :mod:`peftops.reference.ia3_linear`, with the GEMMs
in x's dtype (float32 accumulation inside the BLAS) and the reductions in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..backends import OpImpl, register_impl

OP = "ia3_linear"


def forward(x, weight, ia3_scale, bias, scale_input, save_z):
    if scale_input:
        return F.linear(x * ia3_scale, weight, bias), x.new_empty((0,))
    z = F.linear(x, weight, bias)
    return z * ia3_scale, (z if save_z else x.new_empty((0,)))


def backward(grad, x, weight, ia3_scale, bias, saved_z, scale_input, output_mask: Sequence[bool]):
    need_x, need_w, need_l, need_bias = output_mask
    n, k = weight.shape
    g = grad.reshape(-1, n)
    x2 = x.reshape(-1, k)
    dx = dw = dl = db = None
    if scale_input:
        if need_x or need_l:
            h = g @ weight
            if need_x:
                dx = (h * ia3_scale).reshape(x.shape)
            if need_l:
                dl = (h.float() * x2.float()).sum(0).to(ia3_scale.dtype)
        if need_w:
            dw = g.T @ (x2 * ia3_scale)
        if need_bias:
            db = g.sum(0, dtype=torch.float32).to(grad.dtype)
    else:
        gl = g * ia3_scale
        if need_x:
            dx = (gl @ weight).reshape(x.shape)
        if need_l:
            z = saved_z.reshape(-1, n) if saved_z.shape == grad.shape else F.linear(x2, weight, bias)
            dl = (g.float() * z.float()).sum(0).to(ia3_scale.dtype)
        if need_w:
            dw = gl.T @ x2
        if need_bias:
            db = gl.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, dw, dl, db


register_impl(OP, "torch", OpImpl(forward=forward, backward=backward))
