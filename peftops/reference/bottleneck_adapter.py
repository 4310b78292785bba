r"""Bottleneck adapter, the spec (Houlsby et al. 2019; Pfeiffer et al. 2020; parallel form
He et al. 2022).

Forward, with ``x: (T, d)``, ``Wd: (r, d)``, ``bd: (r,)``, ``Wu: (d, r)``, ``bu: (d,)``::

    h = x Wd^T + bd                  (T, r)   pre-activation
    a = act(h)
    z = a Wu^T + bu                  (T, d)
    y = res + s * z                  res = x (serial) or the given residual (parallel)

Backward, for ``g = dL/dy``::

    dz  = s * g
    dWu = dz^T a,          dbu = sum_T dz
    dh  = (dz Wu) * act'(h)
    dWd = dh^T x,          dbd = sum_T dh
    dx  = dh Wd  (+ g for the serial form, through the residual)
    dres = g               (parallel form)

Activation derivatives (``Phi``/``phi`` the standard normal cdf/pdf, ``sigma`` the logistic)::

    relu      act'(h) = [h > 0]
    gelu      act'(h) = Phi(h) + h * phi(h)
    gelu_tanh act'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) c (1 + 3 k h^2),
              t = tanh(c (h + k h^3)), c = sqrt(2/pi), k = 0.044715
    silu      act'(h) = sigma(h) (1 + h (1 - sigma(h)))
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import acc_dtype

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


def activation(h: Tensor, name: str) -> Tensor:
    if name == "relu":
        return torch.relu(h)
    if name == "gelu":
        return F.gelu(h)
    if name == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if name == "silu":
        return F.silu(h)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def activation_grad(h: Tensor, name: str) -> Tensor:
    """``act'(h)`` written out (not autograd), so that kernels have a formula to match."""
    if name == "relu":
        return (h > 0).to(h.dtype)
    if name == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)
        return cdf + h * pdf
    if name == "gelu_tanh":
        t = torch.tanh(_SQRT_2_OVER_PI * (h + _GELU_K * h**3))
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_K * h * h)
    if name == "silu":
        sig = torch.sigmoid(h)
        return sig * (1.0 + h * (1.0 - sig))
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


# The op functions below name their activation argument ``activation``, as the public op does,
# which hides the function of that name inside them.
_apply = activation


def _hidden(xf: Tensor, down_weight: Tensor, down_bias: Tensor | None, acc: torch.dtype) -> Tensor:
    h = xf @ down_weight.to(acc).T
    if down_bias is not None:
        h = h + down_bias.to(acc)
    return h


def adapter_hidden(x: Tensor, down_weight: Tensor, down_bias: Tensor | None) -> Tensor:
    """The pre-activation ``h = x Wd^T + bd``, shape ``(..., r)``, kept in the accumulation
    dtype: what the registered op returns for its backward to save."""
    acc = acc_dtype(x.dtype)
    return _hidden(x.to(acc), down_weight, down_bias, acc).contiguous()


def bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """``y = res + scale * (act(x Wd^T + bd) Wu^T + bu)``, float32 accumulation, one rounding.

    The arguments of :func:`peftops.bottleneck_adapter`, in its order. ``residual=None`` is the
    serial adapter (``res = x``). Differentiable with plain autograd.
    """
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    z = _apply(_hidden(xf, down_weight, down_bias, acc), activation) @ up_weight.to(acc).T
    if up_bias is not None:
        z = z + up_bias.to(acc)
    res = xf if residual is None else residual.to(acc)
    # Contiguous whatever the layout of x: the registered op promises a dense row-major output.
    return (res + scale * z).to(x.dtype).contiguous()


def bottleneck_adapter_backward(
    grad: Tensor,
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    activation: str,
    scale: float,
    serial: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dWd, dbd, dWu, dbu)``, entry i ``None`` unless ``output_mask[i]``.

    The pre-activation is recomputed from ``x`` (a T x r GEMM): the spec stores nothing.
    ``d(residual)`` of the parallel form is ``grad`` itself and needs no computation.
    """
    need_x, need_wd, need_bd, need_wu, need_bu = output_mask
    acc = acc_dtype(x.dtype)
    d = x.shape[-1]
    xf = x.reshape(-1, d).to(acc)
    g = grad.reshape(-1, d).to(acc)
    h = _hidden(xf, down_weight, down_bias, acc)
    dz = scale * g
    dx = dwd = dbd = dwu = dbu = None
    if need_wu:
        dwu = (dz.T @ _apply(h, activation)).to(up_weight.dtype)
    if need_bu:
        dbu = dz.sum(0).to(grad.dtype)
    if need_x or need_wd or need_bd:
        dh = (dz @ up_weight.to(acc)) * activation_grad(h, activation)
        if need_x:
            dx = dh @ down_weight.to(acc)
            if serial:
                dx = dx + g
            dx = dx.reshape(x.shape).to(x.dtype)
        if need_wd:
            dwd = (dh.T @ xf).to(down_weight.dtype)
        if need_bd:
            dbd = dh.sum(0).to(grad.dtype)
    return dx, dwd, dbd, dwu, dbu
