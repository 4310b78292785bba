"""``peftops.ia3_linear``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from . import validate as check
from .dispatch import run_backward, run_forward

OP = "ia3_linear"


# Returns ``(y, z)``: ``z = x W^T + b``, the unscaled output, which the output-scaling backward
# reduces the incoming gradient against (dl = sum_T g * z); recomputing it would cost another
# GEMM as large as the forward's. It is an empty tensor when not asked for (``save_z`` False:
# the vector needs no gradient, or input scaling, whose dl comes from the dx GEMM).
@torch.library.custom_op("peftops::ia3_linear", mutates_args=())
def _ia3_linear(
    x: Tensor,
    weight: Tensor,
    ia3_scale: Tensor,
    bias: Tensor | None,
    scale_input: bool,
    save_z: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(OP, backend, x.device, x, weight, ia3_scale, bias, scale_input, save_z)


@_ia3_linear.register_fake
def _(x, weight, ia3_scale, bias, scale_input, save_z, backend):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape if save_z and not scale_input else (0,))


@torch.library.custom_op(
    "peftops::ia3_linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, Tensor ia3_scale, Tensor? bias, Tensor saved_z, "
    "bool scale_input, bool[] output_mask, str backend) -> (Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _ia3_linear_backward(grad, x, weight, ia3_scale, bias, saved_z, scale_input, output_mask, backend):
    return run_backward(OP, backend, x.device, grad, x, weight, ia3_scale, bias, saved_z, scale_input, output_mask)


@_ia3_linear_backward.register_fake
def _(grad, x, weight, ia3_scale, bias, saved_z, scale_input, output_mask, backend):
    like = (x, weight, ia3_scale, grad.new_empty(grad.shape[-1]))
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=True))


def _setup_context(ctx, inputs, output):
    x, weight, ia3_scale, bias, scale_input, save_z, backend = inputs
    _, saved_z = output
    ctx.save_for_backward(x, weight, ia3_scale, bias, saved_z)
    ctx.scale_input, ctx.backend = scale_input, backend
    ctx.mark_non_differentiable(saved_z)


def _backward(ctx, grad, grad_z):
    x, weight, ia3_scale, bias, saved_z = ctx.saved_tensors
    grads = _ia3_linear_backward(
        grad, x, weight, ia3_scale, bias, saved_z, ctx.scale_input, list(ctx.needs_input_grad[:4]), ctx.backend
    )
    return (*grads, None, None, None)


_ia3_linear.register_autograd(_backward, setup_context=_setup_context)


# -- the reference backend ----------------------------------------------------------------


def _saved(z: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty((0,)) if z is None else z


def reference_forward(x, weight, ia3_scale, bias, scale_input, save_z):
    y = reference.ia3_linear(x, weight, ia3_scale, bias, scale_input)
    z = reference.ia3_base_output(x, weight, bias) if save_z and not scale_input else None
    return y, _saved(z, x)


def reference_backward(grad, x, weight, ia3_scale, bias, saved_z, scale_input, output_mask):
    # The spec recomputes z in float32 rather than read the saved, rounded one.
    return reference.ia3_linear_backward(grad, x, weight, ia3_scale, bias, scale_input, output_mask)


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


# -- the public op ------------------------------------------------------------------------


def ia3_linear(
    x: Tensor,
    weight: Tensor,
    ia3_scale: Tensor,
    bias: Tensor | None = None,
    scale_input: bool = False,
) -> Tensor:
    r"""IA3 linear layer (Liu et al. 2022): a learned vector rescales the output or the input features.

    ``scale_input=False`` (keys, values): ``y = (x W^T + b) * l``, the bias scaled too, as
    HF PEFT's ``IA3`` ``Linear`` computes it. ``scale_input=True`` (peft's
    ``feedforward_modules``, the FFN's down projection): ``y = (x * l) W^T + b``.

    Args:
        x: ``(..., in)`` activations; any leading dims, any strides.
        weight: ``(out, in)`` frozen base weight.
        ia3_scale: the vector ``l``: ``(out,)``, or ``(in,)`` when ``scale_input``.
        bias: ``(out,)`` or ``None``.
        scale_input: scale the input features instead of the output features.

    Returns ``(..., out)`` in the dtype of ``x``. Differentiable w.r.t. every tensor argument.
    """
    if isinstance(x, Tensor):
        x, weight, ia3_scale, bias = check.autocast(x.device.type, x, weight, ia3_scale, bias)
    _validate(x, weight, ia3_scale, bias, scale_input)
    backend = resolve_backend(OP, x.device, (x, weight, ia3_scale, bias, scale_input, False))
    # z is saved only when the vector will get a gradient: a frozen adapter (inference, or a
    # layer whose vector is not trained) costs no extra output.
    save_z = not scale_input and torch.is_grad_enabled() and ia3_scale.requires_grad
    y, _ = _ia3_linear(x, weight, ia3_scale, bias, scale_input, save_z, backend)
    return y


def _validate(x, weight, ia3_scale, bias, scale_input) -> None:
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    check.tensor(OP, "weight", weight, 2)
    check.tensor(OP, "ia3_scale", ia3_scale, 1)
    if bias is not None:
        check.tensor(OP, "bias", bias, 1)
    check.boolean(OP, "scale_input", scale_input)
    check.same_dtype_device(OP, "x", x, (("weight", weight), ("ia3_scale", ia3_scale), ("bias", bias)))
    in_f = x.shape[-1]
    out_f = weight.shape[0]
    if in_f == 0:
        raise ValueError(f"{OP}: x: expected at least 1 input feature, got shape {tuple(x.shape)}")
    check.shape(OP, "weight", weight, (None, in_f), f"(out, in) with in={in_f} from x")
    if scale_input:
        check.shape(OP, "ia3_scale", ia3_scale, (in_f,), f"(in,) with in={in_f} from x (scale_input=True)")
    else:
        check.shape(OP, "ia3_scale", ia3_scale, (out_f,), f"(out,) with out={out_f} from weight (scale_input=False)")
    if bias is not None:
        check.shape(OP, "bias", bias, (out_f,), f"(out,) with out={out_f} from weight")
