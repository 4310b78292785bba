r"""LoRA linear layer, the spec.

Forward (Hu et al. 2021, with HF PEFT's dropout placement on the low-rank path only)::

    m   = keep-mask of x with probability 1 - p        (all ones when p == 0)
    x_d = x * m / (1 - p)
    y   = x W^T + b + s * (x_d A^T) B^T

with ``x: (T, in)``, ``W: (out, in)``, ``A: (r, in)``, ``B: (out, r)``, ``b: (out,)``.

Backward, for the incoming gradient ``g = dL/dy: (T, out)``::

    u  = x_d A^T                      (T, r)   the rank-r activation
    gb = g B                          (T, r)
    dB = s * g^T u                    (out, r)
    dA = s * gb^T x_d                 (r, in)
    dx = g W + s * (gb A) * m / (1 - p)
    dW = g^T x                        (only when the frozen weight is trained)
    db = sum_T g
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .common import acc_dtype


def _dropped(x: Tensor, keep: Tensor | None, p: float) -> Tensor:
    if keep is None:
        return x
    return x * keep / (1.0 - p)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float = 1.0,
    bias: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``y = x W^T + b + scale * (dropout(x) A^T) B^T`` accumulated in float32, rounded once.

    ``keep`` is the dropout keep-mask (shape of ``x``) or ``None`` for no dropout.
    Differentiable with plain autograd, so it also serves as the formula that the explicit
    backward below is checked against.
    """
    acc = acc_dtype(x.dtype)
    xf, wf, af, bf = x.to(acc), weight.to(acc), lora_a.to(acc), lora_b.to(acc)
    y = xf @ wf.T + scale * ((_dropped(xf, keep, dropout_p) @ af.T) @ bf.T)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous()


def lora_activation(x: Tensor, lora_a: Tensor, scale: float, keep: Tensor | None, dropout_p: float) -> Tensor:
    """``u = scale * dropout(x) A^T``, shape ``(..., r)``, rounded to the dtype of ``x``: the
    rank-r activation that the registered op returns for its backward to save."""
    acc = acc_dtype(x.dtype)
    return (scale * (_dropped(x.to(acc), keep, dropout_p) @ lora_a.to(acc).T)).to(x.dtype).contiguous()


def lora_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    keep: Tensor | None,
    dropout_p: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dW, dA, dB, db)``; entry i is ``None`` unless ``output_mask[i]``."""
    need_x, need_w, need_a, need_b, need_bias = output_mask
    acc = acc_dtype(x.dtype)
    in_f, out_f = x.shape[-1], grad.shape[-1]
    g = grad.reshape(-1, out_f).to(acc)
    xf = x.reshape(-1, in_f).to(acc)
    kf = None if keep is None else keep.reshape(-1, in_f)
    af, bf = lora_a.to(acc), lora_b.to(acc)
    xd = _dropped(xf, kf, dropout_p)
    gb = g @ bf

    dx = dw = da = db_ = dbias = None
    if need_x:
        dx = g @ weight.to(acc) + scale * _dropped(gb @ af, kf, dropout_p)
        dx = dx.reshape(x.shape).to(x.dtype)
    if need_w:
        dw = (g.T @ xf).to(weight.dtype)
    if need_a:
        da = (scale * (gb.T @ xd)).to(lora_a.dtype)
    if need_b:
        db_ = (scale * (g.T @ (xd @ af.T))).to(lora_b.dtype)
    if need_bias:
        dbias = g.sum(0).to(grad.dtype)
    return dx, dw, da, db_, dbias
