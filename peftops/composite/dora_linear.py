r"""``dora_linear`` on the framework's GEMMs (the ``torch`` backend).

Forward, for ``x: (T, K)``, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, magnitude ``m``,
scale ``s``, dropout keep-mask ``k``::

    n    = sqrt(||W_j||^2 + 2 s B_j.(W A^T)_j + s^2 B_j (A A^T) B_j^T)   one (N, r) GEMM over W,
                                                  an r x r Gram; ||W_j||^2 cached by the caller
    c    = m / n                                  (N,), in x's dtype, as peft rounds it
    u    = x_d A^T                                narrow GEMM, (T, r)
    z    = x_d W^T + s u B^T                      the big GEMM accumulating into the narrow one;
                                                  saved as ``pre`` when the magnitude trains
    y    = c * z + b                              no dropout: the magnitude in one pass (addcmul)
    y    = x W^T + (c * z - x_d W^T + b)          dropout: peft's base term on the dropped x,
                                                  the undropped base GEMM accumulating into it

Backward, for ``g = dL/dy``, ``g_c = g * c``::

    P    = g^T u                                  (N, r), float32 accumulation
    dB   = s * c * P                              (N, r)
    dm   = sum_T g * z / n                        z saved by the forward (the op's ``pre``;
                                                  recomputed if not saved)
    v    = s g_c B                                (T, r)
    dx   = g_c W + v A                            no dropout: one big GEMM into the narrow one
    dx   = g W + ((g_c - g) W + v A) * k / (1-p)  dropout: two big GEMMs, as peft's autograd
    dA   = v^T x_d
    dW   = g_c^T x (no dropout), g^T x + (g_c - g)^T x_d (dropout)
    db   = sum_T g

The GEMMs run in x's dtype (float32 accumulation inside the BLAS); ``u`` is handed to the op
in float32 (the op's contract) and the reductions for dm run in float32. The dropout mask is
drawn from torch's generator for ``x.device`` and returned for the backward to save; the op's
``seed`` is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends import OpImpl, register_impl
from ..ops.dora_linear import OP
from ..reference.common import acc_dtype


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, w_sq: Tensor | None) -> Tensor:
    """The row norm by the Gram expansion, float32: ``W A^T`` in the weight's dtype (one GEMM
    over W with float32 accumulation), the rest on (N, r) and (r, r) tensors."""
    acc = acc_dtype(weight.dtype)
    if w_sq is None:
        w_sq = weight.pow(2).sum(1, dtype=acc)
    wa = torch.mm(weight, lora_a.t()).to(acc)
    a32, b32 = lora_a.to(acc), lora_b.to(acc)
    gram = torch.mm(a32, a32.t())
    sq = w_sq + (2.0 * scale) * (b32 * wa).sum(1) + (scale * scale) * (torch.mm(b32, gram) * b32).sum(1)
    return sq.clamp_min_(0.0).sqrt_()


def forward(x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre):
    lead, k = x.shape[:-1], x.shape[-1]
    n_out = weight.shape[0]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    with torch.no_grad():
        norm = dora_weight_norm(weight, lora_a, lora_b, scale, weight_sq)
    c = (magnitude.to(norm.dtype) / norm).to(x.dtype)
    dropout = dropout_p > 0.0
    if dropout:
        keep = torch.rand(x2.shape, device=x.device, dtype=torch.float32) >= dropout_p
        xd = x2 * keep * (1.0 / (1.0 - dropout_p))
    else:
        keep, xd = x.new_empty((0,), dtype=torch.bool), x2
    u = torch.mm(xd, lora_a.t())
    if dropout:
        base_d = torch.mm(xd, weight.t())
        z = torch.addmm(base_d, u, lora_b.t(), alpha=scale)
        t = torch.addcmul(base_d.neg_(), z, c)  # base_d is this call's own: negated in place
        if bias is not None:
            t.add_(bias)
        y = t.addmm_(x2, weight.t())
    else:
        z = torch.mm(u, lora_b.t()).addmm_(xd, weight.t(), beta=scale)
        if save_pre:
            y = torch.addcmul(bias, z, c) if bias is not None else z * c
        else:  # z is not kept: scale it in place
            y = torch.addcmul(bias, z, c) if bias is not None else z.mul_(c)
    u_out = u.to(acc_dtype(x.dtype))
    pre = z.reshape(*lead, n_out) if save_pre else x.new_empty((0,))
    return (
        y.reshape(*lead, n_out),
        u_out.reshape(*lead, u.shape[-1]),
        pre,
        keep.reshape(x.shape) if dropout else keep,
        norm,
    )


def backward(grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, scale, dropout_p,
             output_mask: Sequence[bool]):  # fmt: skip
    need_x, need_w, need_a, need_b, need_m, need_bias = output_mask
    n_out, k = weight.shape
    g = grad.reshape(-1, n_out)
    x2 = x.reshape(-1, k)
    dropout = dropout_p > 0.0
    kf = keep.reshape(-1, k)  # (0, k) without dropout, and unused
    xd = x2 * kf * (1.0 / (1.0 - dropout_p)) if dropout else x2
    c = (magnitude.to(norm.dtype) / norm).to(x.dtype)
    gc = g * c
    u = lora_u.reshape(-1, lora_u.shape[-1])

    dx = dw = da = db_ = dm = dbias = None
    if need_b:
        p_gu = torch.mm(g.t(), u.to(g.dtype)).to(norm.dtype)
        db_ = (p_gu * (scale * c.to(norm.dtype))[:, None]).to(lora_b.dtype)
    if need_m:
        z = (
            pre.reshape(-1, n_out)
            if pre.numel()
            else torch.mm(u.to(xd.dtype), lora_b.t()).addmm_(xd, weight.t(), beta=scale)
        )
        dm = ((g.to(norm.dtype) * z.to(norm.dtype)).sum(0) / norm).to(magnitude.dtype)
    if need_x or need_a:
        v = torch.mm(gc, lora_b).mul_(scale)
        if need_x:
            if dropout:
                inner = torch.mm(v, lora_a).addmm_(gc - g, weight)
                dx = inner.mul_(kf).mul_(1.0 / (1.0 - dropout_p)).addmm_(g, weight)
            else:
                dx = torch.mm(v, lora_a).addmm_(gc, weight)
            dx = dx.reshape(x.shape)
        if need_a:
            da = torch.mm(v.t(), xd)
    if need_w:
        dw = torch.mm(g.t(), x2).addmm_((gc - g).t(), xd) if dropout else torch.mm(gc.t(), x2)
    if need_bias:
        dbias = g.sum(0, dtype=acc_dtype(grad.dtype)).to(grad.dtype)
    return dx, dw, da, db_, dm, dbias


register_impl(OP, "torch", OpImpl(forward=forward, backward=backward))
