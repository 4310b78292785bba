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

Per-row adapter banks, ``N`` adapters in slots with one adapter (or none) per token:
:func:`multi_bottleneck_adapter` and its backward, spelled out above them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import acc_dtype
from .multi_lora_linear import _sum_per_adapter, rank_mask, token_groups

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


# -- per-row adapter banks ----------------------------------------------------------------
#
# ``N`` adapters stacked in fixed-capacity slots, ``Wd: (N, r_max, d)``, ``bd: (N, r_max)``,
# ``Wu: (N, d, r_max)``, ``bu: (N, d)``, per-slot ranks ``r: (N,)`` (adapter ``a`` uses its first
# ``r_a`` rank slots; the rest is padding that neither computes nor receives gradient), one
# shared activation and scale, and one adapter id per token ``id_t`` (``-1``: no adapter)::
#
#     M_a  = [j < r_a]                                   (r_max,) rank mask of adapter a
#     h_t  = (x_t Wd_a^T + bd_a) * M_a                   0 when id_t = -1
#     y_t  = res_t + s * (act(h_t) Wu_a^T + bu_a)        y_t = res_t when id_t = -1
#
# Backward, for ``g_t = dL/dy_t`` and the tokens of adapter a::
#
#     dz_t  = s g_t
#     dWu_a = sum_t dz_t^T act(h_t),    dbu_a = sum_t dz_t
#     dh_t  = (dz_t Wu_a) * act'(h_t) * M_a
#     dWd_a = sum_t dh_t^T x_t,         dbd_a = sum_t dh_t
#     dx_t  = dh_t Wd_a  (+ g_t for the serial form; only that for id_t = -1)
#
# so each adapter's gradient is the one the single-adapter op gives it on its own tokens with
# its weights cut to rank r_a, and a slot no token names gets zeros. act(0) = 0 for every
# activation here, so the masked h is also what the padding would give, but the mask is a
# selection: an inf or NaN in a slot's padding, in a slot no token names, or in the input of a
# token without an adapter (for the adapter's gradients) reaches nothing. An id outside
# ``[-1, N)`` (the op refuses those in eager mode only) means no adapter, as -1 does.


def _gather(t: Tensor | None, group: Tensor, shape: tuple[int, ...], acc: torch.dtype) -> Tensor:
    """``t[group]`` with an all-zero slot ``N`` appended, so that the tokens without an adapter
    gather zeros (``t=None``, an absent bias, gathers zeros everywhere)."""
    if t is None:
        return torch.zeros((group.shape[0], *shape), dtype=acc, device=group.device)
    return torch.cat([t.to(acc), t.new_zeros((1, *shape), dtype=acc)])[group]


def _bank_parts(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, acc):
    """Per token: its own adapter's ``(Wd, bd, Wu, bu)`` with the rank padding zeroed by
    selection, its rank mask, ``has`` and ``group``."""
    n, r_max, d = down_weight.shape
    mask = rank_mask(ranks, n, r_max, x.device)
    has, group = token_groups(adapter_ids, n)
    m_t = torch.cat([mask, mask.new_zeros((1, r_max))])[group] & has[:, None]  # (T, r_max)
    wd = _gather(torch.where(mask[:, :, None], down_weight.to(acc), 0.0), group, (r_max, d), acc)
    wu = _gather(torch.where(mask[:, None, :], up_weight.to(acc), 0.0), group, (d, r_max), acc)
    bd = _gather(None if down_bias is None else torch.where(mask, down_bias.to(acc), 0.0), group, (r_max,), acc)
    bu = _gather(up_bias, group, (d,), acc)
    return wd, bd, wu, bu, m_t, has, group


def _bank_hidden(xf, wd, bd, m_t, has):
    # The input of a token without an adapter is not read (its inf must not become NaN here).
    xa = torch.where(has[:, None], xf, 0.0)
    return torch.where(m_t, torch.einsum("td,trd->tr", xa, wd) + bd, 0.0)


def multi_bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    adapter_ids: Tensor,
    ranks: Tensor | None = None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(y, h)`` for ``x: (T, d)`` and ``adapter_ids: (T,)``; ``h: (T, r_max)`` the masked
    pre-activation in the accumulation dtype (zero for tokens without an adapter), float32
    accumulation and one rounding of y.

    Readable, not fast: every token gathers its own adapter (``T x r_max x d`` floats).
    Differentiable with plain autograd (the explicit backward below is checked against it)."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    wd, bd, wu, bu, m_t, has, _ = _bank_parts(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, acc)
    h = _bank_hidden(xf, wd, bd, m_t, has)
    z = torch.einsum("tr,tdr->td", torch.where(m_t, _apply(h, activation), 0.0), wu) + bu
    res = xf if residual is None else residual.to(acc)
    y = torch.where(has[:, None], res + scale * z, res)
    return y.to(x.dtype).contiguous(), h.contiguous()


def multi_bottleneck_adapter_backward(
    grad: Tensor,
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    adapter_ids: Tensor,
    ranks: Tensor | None,
    activation: str,
    scale: float,
    serial: bool,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dWd, dbd, dWu, dbu)`` of the bank comment above, entry i ``None``
    unless ``output_mask[i]``. The pre-activation is recomputed from x."""
    need_x, need_wd, need_bd, need_wu, need_bu = output_mask
    acc = acc_dtype(x.dtype)
    n = down_weight.shape[0]
    xf = x.to(acc)
    wd, bd, wu, _, m_t, has, group = _bank_parts(x, down_weight, down_bias, up_weight, None, adapter_ids, ranks, acc)
    h = _bank_hidden(xf, wd, bd, m_t, has)
    g = grad.to(acc)
    dz = torch.where(has[:, None], scale * g, 0.0)  # a token without an adapter reaches none
    dx = dwd = dbd = dwu = dbu = None
    if need_wu:
        a = torch.where(m_t, _apply(h, activation), 0.0)
        dwu = _sum_per_adapter(dz[:, :, None] * a[:, None, :], group, n).to(up_weight.dtype)
    if need_bu:
        dbu = _sum_per_adapter(dz, group, n).to(grad.dtype)
    if need_x or need_wd or need_bd:
        dh = torch.where(m_t, torch.einsum("td,tdr->tr", dz, wu) * activation_grad(h, activation), 0.0)
        if need_x:
            dx = torch.einsum("tr,trd->td", dh, wd)
            if serial:
                dx = dx + g
            dx = dx.to(x.dtype)
        if need_wd:
            xa = torch.where(has[:, None], xf, 0.0)
            dwd = _sum_per_adapter(dh[:, :, None] * xa[:, None, :], group, n).to(down_weight.dtype)
        if need_bd:
            dbd = _sum_per_adapter(dh, group, n).to(grad.dtype)
    return dx, dwd, dbd, dwu, dbu
