r"""DoRA linear layer (weight-decomposed LoRA, Liu et al. 2024), the spec: HF PEFT's
``LoraConfig(use_dora=True)`` on an ``nn.Linear``.

Forward, with ``x: (T, in)``, ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``, magnitude
``m: (out,)``, scale ``s``, dropout keep-mask ``k`` with probability ``1 - p``::

    n   = ||W + s B A||_row                (out,)   a constant: no gradient flows through it
    c   = m / n                            (out,)
    x_d = x * k / (1 - p)                  (x_d = x without dropout)
    u   = x_d A^T                          (T, r)
    y   = x W^T + b + (c - 1) * (x_d W^T) + c * s * u B^T

That is peft's ``DoraLinearVariant.forward``: without dropout (or in eval) it adds
``(c - 1) * base_result + c * s * lora`` to the base layer's output, which is
``y = c * (x W^T + s x A^T B^T) + b``; with dropout active it recomputes the base term on the
dropped input (``base_result = None``), so the magnitude rescales ``x_d W^T`` while the base
layer's own ``x W^T`` stays undropped. Both cases are the one formula above. The norm is
detached as the DoRA paper suggests (section 4.3) and peft does.

Backward, for ``g = dL/dy: (T, out)``, with ``z_d = x_d W^T + s u B^T`` and ``g_c = g * c``::

    dm = sum_T (g * z_d) / n                        (out,)
    dB = s g_c^T u                                  (out, r)
    dA = s (g_c B)^T x_d                            (r, in)
    dx = g W + ((g_c - g) W + s (g_c B) A) * k / (1 - p)
    dW = g^T x + (g_c - g)^T x_d                    (only when the frozen weight is trained)
    db = sum_T g

and ``dm_j = (sum_T g_j * (x_d W^T)_j + s (g^T u)_j . B_j) / n_j``: its low-rank part is the
same ``g^T u`` reduction that ``dB`` is, so a kernel gets dm from dB's reduction plus one
row-dot of ``g`` with the base output.

The norm without forming ``B A`` (:func:`dora_weight_norm`)::

    ||W_j + s B_j A||^2 = ||W_j||^2 + 2 s B_j . (A W_j^T) + s^2 B_j (A A^T) B_j^T

one pass over W for ``W A^T`` (out x r) and an r x r Gram matrix; ``||W_j||^2`` depends on the
frozen base only, so callers cache it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import acc_dtype


def _dropped(x: Tensor, keep: Tensor | None, p: float) -> Tensor:
    if keep is None:
        return x
    return x * keep / (1.0 - p)


def dora_weight_norm_direct(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """``||W + s B A||`` per output row, forming ``B A`` as peft does; float32 (float64 for
    float64 input), detached."""
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        full = weight.to(acc) + scale * (lora_b.to(acc) @ lora_a.to(acc))
        return torch.linalg.vector_norm(full, dim=1)


def weight_sq_norm(weight: Tensor) -> Tensor:
    """``||W_j||^2`` per output row, float32 (float64 for a float64 weight), detached: what
    :func:`dora_weight_norm` takes as ``w_sq`` and callers cache while the weight is unchanged."""
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        w = weight.to(acc)
        return (w * w).sum(1)


def dora_weight_norm(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, w_sq: Tensor | None = None
) -> Tensor:
    """``||W + s B A||`` per output row by the Gram expansion (module docstring), never
    forming ``B A``; float32 (float64 for float64 input), detached. ``w_sq``: the cached
    ``||W_j||^2`` (:func:`weight_sq_norm`), computed here when ``None``."""
    acc = acc_dtype(weight.dtype)
    with torch.no_grad():
        w, a, b = weight.to(acc), lora_a.to(acc), lora_b.to(acc)
        if w_sq is None:
            w_sq = (w * w).sum(1)
        wa = w @ a.T  # (out, r): the one pass over W
        gram = a @ a.T  # (r, r)
        sq = w_sq.to(acc) + (2.0 * scale) * (b * wa).sum(1) + (scale * scale) * ((b @ gram) * b).sum(1)
        # Rounding can take a row whose W + s B A is ~0 slightly below zero.
        return sq.clamp_min(0.0).sqrt()


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    *,
    scale: float,
    bias: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``y = x W^T + b + (c - 1) x_d W^T + c s x_d A^T B^T``, ``c = m / ||W + s B A||_row``
    (detached), accumulated in float32 and rounded once.

    ``keep`` is the dropout keep-mask (shape of ``x``) or ``None`` for no dropout (``p = 0``
    or eval: peft's ``base_result`` path). Differentiable with plain autograd (the norm is
    detached), so it also checks the explicit backward below.
    """
    acc = acc_dtype(x.dtype)
    xf, wf, af, bf, mf = x.to(acc), weight.to(acc), lora_a.to(acc), lora_b.to(acc), magnitude.to(acc)
    c = mf / dora_weight_norm_direct(weight, lora_a, lora_b, scale)
    xd = _dropped(xf, keep, dropout_p)
    y = xf @ wf.T + (c - 1.0) * (xd @ wf.T) + c * (scale * ((xd @ af.T) @ bf.T))
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous()


def dora_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scale: float,
    keep: Tensor | None,
    dropout_p: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dW, dA, dB, dm, db)``; entry i is ``None`` unless ``output_mask[i]``."""
    need_x, need_w, need_a, need_b, need_m, need_bias = output_mask
    acc = acc_dtype(x.dtype)
    in_f, out_f = x.shape[-1], grad.shape[-1]
    g = grad.reshape(-1, out_f).to(acc)
    xf = x.reshape(-1, in_f).to(acc)
    kf = None if keep is None else keep.reshape(-1, in_f)
    wf, af, bf = weight.to(acc), lora_a.to(acc), lora_b.to(acc)
    n = dora_weight_norm_direct(weight, lora_a, lora_b, scale)
    c = magnitude.to(acc) / n
    xd = _dropped(xf, kf, dropout_p)
    u = xd @ af.T
    gc = g * c
    gcb = gc @ bf

    dx = dw = da = db_ = dm = dbias = None
    if need_x:
        dx = g @ wf + _dropped((gc - g) @ wf + scale * (gcb @ af), kf, dropout_p)
        dx = dx.reshape(x.shape).to(x.dtype)
    if need_w:
        dw = (g.T @ xf + (gc - g).T @ xd).to(weight.dtype)
    if need_a:
        da = (scale * (gcb.T @ xd)).to(lora_a.dtype)
    if need_b:
        db_ = (scale * (gc.T @ u)).to(lora_b.dtype)
    if need_m:
        dm = ((g * (xd @ wf.T + scale * (u @ bf.T))).sum(0) / n).to(magnitude.dtype)
    if need_bias:
        dbias = g.sum(0).to(grad.dtype)
    return dx, dw, da, db_, dm, dbias
