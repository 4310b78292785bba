r"""Compacter (Mahabadi et al. 2021), the spec: a bottleneck adapter whose projections are
parameterised hypercomplex multiplication (PHM) layers, as AdapterHub's ``PHMLayer`` computes them.

A PHM layer ``in -> out`` with ``n`` = ``phm_dim`` (dividing both ``in`` and ``out``) has a rule
``A: (n, n, n)`` (the ``A_i``, usually shared by every PHM layer of the model) and per-layer
factors ``L: (n, in/n, k)``, ``R: (n, k, out/n)`` (``k`` = ``phm_rank``), and computes::

    B_i = L_i R_i                        (in/n, out/n), rank <= k
    H   = sum_i A_i kron B_i             (in, out)
    y   = x H + b

The adapter is then the bottleneck adapter of :mod:`peftops.reference.bottleneck_adapter` with
``Wd = H_down^T: (r, d)`` and ``Wu = H_up^T: (d, r)``::

    y = res + s * (act(x Wd^T + bd) Wu^T + bu)

Building ``H`` costs ``O(n * in * out)``, for an adapter's ``d x r`` weights negligible next to the
``T x d x r`` GEMMs, so peftops builds the weights and runs the fused adapter op on them; the
gradients reach ``A``, ``L`` and ``R`` through the (autograd-differentiated) build.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bottleneck_adapter import bottleneck_adapter


def phm_matrix(rule: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``H = sum_i rule[i] kron (left[i] @ right[i])``, shape ``(n * in/n, n * out/n)``: the
    ``x @ H`` weight of one PHM layer (AdapterHub's orientation, not ``nn.Linear``'s)."""
    factors = torch.bmm(left, right)
    return torch.stack([torch.kron(a, b) for a, b in zip(rule.unbind(0), factors.unbind(0), strict=True)]).sum(0)


def compacter_weights(
    rule: Tensor, down_left: Tensor, down_right: Tensor, up_left: Tensor, up_right: Tensor
) -> tuple[Tensor, Tensor]:
    """The adapter's ``(Wd: (r, d), Wu: (d, r))`` in ``nn.Linear``'s orientation, from the
    shared rule and the down (``d -> r``) and up (``r -> d``) PHM factors."""
    return phm_matrix(rule, down_left, down_right).T, phm_matrix(rule, up_left, up_right).T


def compacter_adapter(
    x: Tensor,
    rule: Tensor,
    down_left: Tensor,
    down_right: Tensor,
    down_bias: Tensor | None,
    up_left: Tensor,
    up_right: Tensor,
    up_bias: Tensor | None,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    """``y = res + scale * (act(x Wd^T + bd) Wu^T + bu)`` with ``(Wd, Wu)`` from
    :func:`compacter_weights`; ``residual=None`` is the serial adapter. Plain autograd."""
    wd, wu = compacter_weights(rule, down_left, down_right, up_left, up_right)
    return bottleneck_adapter(x, wd, down_bias, wu, up_bias, activation=activation, scale=scale, residual=residual)
