r"""IA3 linear layer (Liu et al. 2022, "T-Few"), the spec.

A learned vector ``l`` rescales either the layer's output features (keys, values:
``scale_input=False``) or its input features (the FFN's down projection, peft's
``feedforward_modules``: ``scale_input=True``). As HF PEFT computes it, the output scaling
applies after the bias::

    scale_input=False:  z = x W^T + b,     y = z * l          l: (out,)
    scale_input=True:   y = (x * l) W^T + b                   l: (in,)

with ``x: (T, in)``, ``W: (out, in)``, ``b: (out,)``.

Backward, for the incoming gradient ``g = dL/dy: (T, out)``.

Output scaling (``y_tj = l_j z_tj``)::

    dl = sum_T g * z                  (out,)   a column reduction of g against z
    dx = (g * l) W                             g's columns scaled before the GEMM
    dW = (g * l)^T x = l[:, None] * (g^T x)
    db = sum_T g * l

Input scaling (``y = x' W^T + b`` with ``x' = x * l``; ``dL/dx' = g W``)::

    h  = g W                          (T, in)  the unscaled input gradient
    dx = h * l
    dl = sum_T h * x                  (in,)    a column reduction of h against x
    dW = g^T (x * l) = (g^T x) * l[None, :]
    db = sum_T g
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .common import acc_dtype


def ia3_linear(
    x: Tensor, weight: Tensor, ia3_scale: Tensor, bias: Tensor | None = None, scale_input: bool = False
) -> Tensor:
    """``(x W^T + b) * l``, or ``(x * l) W^T + b`` when ``scale_input``; float32 accumulation,
    one rounding to the dtype of ``x`` (except that, as peft, the scaled input ``x * l`` is
    rounded to ``x``'s dtype before the product: the GEMM takes operands in that dtype)."""
    acc = acc_dtype(x.dtype)
    xf, wf, lf = x.to(acc), weight.to(acc), ia3_scale.to(acc)
    if scale_input:
        y = (xf * lf).to(x.dtype).to(acc) @ wf.T
        if bias is not None:
            y = y + bias.to(acc)
    else:
        y = xf @ wf.T
        if bias is not None:
            y = y + bias.to(acc)
        y = y * lf
    return y.to(x.dtype).contiguous()


def ia3_base_output(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``z = x W^T + b`` rounded to ``x``'s dtype: what the output-scaling backward reduces
    ``g`` against (peft's autograd saves the same tensor, its base layer's output)."""
    acc = acc_dtype(x.dtype)
    z = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        z = z + bias.to(acc)
    return z.to(x.dtype).contiguous()


def ia3_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    ia3_scale: Tensor,
    bias: Tensor | None,
    scale_input: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dW, dl, db)``; entry i is ``None`` unless ``output_mask[i]``."""
    need_x, need_w, need_l, need_bias = output_mask
    acc = acc_dtype(x.dtype)
    in_f, out_f = weight.shape[1], weight.shape[0]
    g = grad.reshape(-1, out_f).to(acc)
    xf = x.reshape(-1, in_f).to(acc)
    wf, lf = weight.to(acc), ia3_scale.to(acc)
    dx = dw = dl = db = None
    if scale_input:
        h = g @ wf
        if need_x:
            dx = (h * lf).reshape(x.shape).to(x.dtype)
        if need_l:
            dl = (h * xf).sum(0).to(ia3_scale.dtype)
        if need_w:
            dw = ((g.T @ xf) * lf[None, :]).to(weight.dtype)
        if need_bias:
            db = g.sum(0).to(grad.dtype)
    else:
        gl = g * lf
        if need_x:
            dx = (gl @ wf).reshape(x.shape).to(x.dtype)
        if need_l:
            z = xf @ wf.T
            if bias is not None:
                z = z + bias.to(acc)
            dl = (g * z).sum(0).to(ia3_scale.dtype)
        if need_w:
            dw = (gl.T @ xf).to(weight.dtype)
        if need_bias:
            db = gl.sum(0).to(grad.dtype)
    return dx, dw, dl, db
