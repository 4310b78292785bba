"""``peftops.bottleneck_adapter``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from ..reference import ACTIVATIONS
from . import validate as check
from .dispatch import run_backward, run_forward

OP = "bottleneck_adapter"


# Returns ``(y, h)`` with ``h = x Wd^T + bd`` the pre-activation, shape (..., r), in float32
# (float64 for float64 inputs): T x r, tiny next to x, saved so that the backward needs no
# extra pass over x to recompute it.
@torch.library.custom_op("peftops::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    residual: Tensor | None,
    activation: str,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(
        OP, backend, x.device, x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale
    )


@_bottleneck_adapter.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], down_weight.shape[0]), dtype=acc)


@torch.library.custom_op(
    "peftops::bottleneck_adapter_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor hidden, "
    "str activation, float scale, bool serial, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _bottleneck_adapter_backward(
    grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask, backend
):
    return run_backward(
        OP,
        backend,
        x.device,
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        hidden,
        activation,
        scale,
        serial,
        output_mask,
    )


@_bottleneck_adapter_backward.register_fake
def _(grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask, backend):
    rank, d = down_weight.shape
    shapes = ((x, x.shape), (down_weight, (rank, d)), (down_weight, (rank,)), (up_weight, (d, rank)), (up_weight, (d,)))
    return tuple(t.new_empty(s) if need else None for (t, s), need in zip(shapes, output_mask, strict=False))


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, backend = inputs
    _, hidden = output
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, hidden)
    ctx.activation, ctx.scale, ctx.backend, ctx.serial = activation, scale, backend, residual is None
    ctx.mark_non_differentiable(hidden)


def _backward(ctx, grad, grad_hidden):
    x, down_weight, down_bias, up_weight, hidden = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dwd, dbd, dwu, dbu = _bottleneck_adapter_backward(
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        hidden,
        ctx.activation,
        ctx.scale,
        ctx.serial,
        list(need[:5]),
        ctx.backend,
    )
    # The parallel form's residual enters y with coefficient 1.
    dres = grad if need[5] else None
    return dx, dwd, dbd, dwu, dbu, dres, None, None, None


_bottleneck_adapter.register_autograd(_backward, setup_context=_setup_context)


# The registered op takes (residual, activation, scale), the order the kernels' entry points
# use; the spec takes the public op's. Keywords keep the two from being crossed.
def reference_forward(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale):
    y = reference.bottleneck_adapter(
        x, down_weight, down_bias, up_weight, up_bias, activation=activation, scale=scale, residual=residual
    )
    return y, reference.adapter_hidden(x, down_weight, down_bias)


def reference_backward(grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask):
    # The spec recomputes the pre-activation from x rather than use the saved one.
    return reference.bottleneck_adapter_backward(
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        activation=activation,
        scale=scale,
        serial=serial,
        output_mask=output_mask,
    )


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


def bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
) -> Tensor:
    r"""Bottleneck adapter: ``y = residual + scale * (act(x Wd^T + bd) Wu^T + bu)``.

    Args:
        x: ``(..., d)`` adapter input.
        down_weight: ``(r, d)``; down_bias: ``(r,)`` or ``None``.
        up_weight: ``(d, r)``; up_bias: ``(d,)`` or ``None``.
        activation: ``relu``, ``gelu`` (erf), ``gelu_tanh`` or ``silu``.
        scale: multiplies the adapter branch.
        residual: ``None`` for a serial adapter (Houlsby/Pfeiffer: ``residual = x``), or a
            tensor of the shape of ``x`` for a parallel adapter (He et al. 2022).

    ``d`` and ``r`` must be at least 1; the batch dims may be empty.
    """
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    check.tensor(OP, "down_weight", down_weight, 2)
    check.tensor(OP, "up_weight", up_weight, 2)
    for name, t in (("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None:
            check.tensor(OP, name, t, 1)
    if residual is not None:
        check.tensor(OP, "residual", residual)
    if not isinstance(activation, str):
        raise TypeError(f"{OP}: activation: expected a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    scale = check.finite_float(OP, "scale", scale)
    x, down_weight, down_bias, up_weight, up_bias, residual = check.autocast(
        x.device.type, x, down_weight, down_bias, up_weight, up_bias, residual
    )
    check.same_dtype_device(
        OP,
        "x",
        x,
        (
            ("down_weight", down_weight),
            ("down_bias", down_bias),
            ("up_weight", up_weight),
            ("up_bias", up_bias),
            ("residual", residual),
        ),
    )
    d = x.shape[-1]
    rank = down_weight.shape[0]
    if d == 0:
        raise ValueError(f"{OP}: x: expected a feature dim d >= 1, got shape {tuple(x.shape)}")
    check.shape(OP, "down_weight", down_weight, (None, d), f"(r, d) with d={d} from x")
    # r = 0 would be the identity, but the kernels' rank-r blocks cannot be empty: refused here,
    # before any backend runs, rather than failing in one backend's backward.
    if rank == 0:
        raise ValueError(f"{OP}: down_weight: expected a bottleneck width r >= 1, got shape {tuple(down_weight.shape)}")
    check.shape(OP, "up_weight", up_weight, (d, rank), f"(d, r) with d={d} from x, r={rank} from down_weight")
    if down_bias is not None:
        check.shape(OP, "down_bias", down_bias, (rank,), f"(r,) with r={rank} from down_weight")
    if up_bias is not None:
        check.shape(OP, "up_bias", up_bias, (d,), f"(d,) with d={d} from x")
    if residual is not None:
        check.shape(OP, "residual", residual, tuple(x.shape), "(the shape of x)")

    backend = resolve_backend(
        OP, x.device, (x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale)
    )
    y, _ = _bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, backend)
    return y
