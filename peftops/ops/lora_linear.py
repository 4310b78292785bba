"""``peftops.lora_linear``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from . import validate as check
from .dispatch import run_backward, run_forward

OP = "lora_linear"


# Returns ``(y, u)`` with ``u = scale * dropout(x) A^T`` of shape (..., r) in the dtype of x:
# the rank-r activation, tiny, saved for the backward (``dB = g^T u``) so that kernels need not
# recompute it with another pass over x.
@torch.library.custom_op("peftops::lora_linear", mutates_args=())
def _lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(OP, backend, x.device, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)


@_lora_linear.register_fake
def _(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((*x.shape[:-1], lora_a.shape[0]))


@torch.library.custom_op(
    "peftops::lora_linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor lora_u, float scale, "
    "float dropout_p, Tensor? seed, bool[] output_mask, str backend) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _lora_linear_backward(grad, x, weight, lora_a, lora_b, lora_u, scale, dropout_p, seed, output_mask, backend):
    return run_backward(
        OP, backend, x.device, grad, x, weight, lora_a, lora_b, lora_u, scale, dropout_p, seed, output_mask
    )


@_lora_linear_backward.register_fake
def _(grad, x, weight, lora_a, lora_b, lora_u, scale, dropout_p, seed, output_mask, backend):
    like = (x, weight, lora_a, lora_b, grad.new_empty(grad.shape[-1]))
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=False))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend = inputs
    _, lora_u = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, lora_u, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mark_non_differentiable(lora_u)


def _backward(ctx, grad, grad_u):
    x, weight, lora_a, lora_b, lora_u, seed = ctx.saved_tensors
    grads = _lora_linear_backward(
        grad,
        x,
        weight,
        lora_a,
        lora_b,
        lora_u,
        ctx.scale,
        ctx.dropout_p,
        seed,
        list(ctx.needs_input_grad[:5]),
        ctx.backend,
    )
    return (*grads, None, None, None, None)


_lora_linear.register_autograd(_backward, setup_context=_setup_context)


# -- the reference backend ----------------------------------------------------------------


def reference_keep_mask(x: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor | None:
    if dropout_p == 0.0:
        return None
    return reference.dropout_keep_mask(seed, x.shape, dropout_p, x.device)


def reference_forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    keep = reference_keep_mask(x, dropout_p, seed)
    y = reference.lora_linear(x, weight, lora_a, lora_b, bias, scale, keep, dropout_p)
    return y, reference.lora_activation(x, lora_a, scale, keep, dropout_p)


def reference_backward(grad, x, weight, lora_a, lora_b, lora_u, scale, dropout_p, seed, output_mask):
    # The spec recomputes the rank-r activation in float32 rather than use the saved lora_u.
    keep = reference_keep_mask(x, dropout_p, seed)
    return reference.lora_linear_backward(grad, x, weight, lora_a, lora_b, scale, keep, dropout_p, output_mask)


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


# -- the public op ------------------------------------------------------------------------


def lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scale: float = 1.0,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""LoRA linear layer: ``y = x W^T + b + scale * dropout(x) A^T B^T``.

    Args:
        x: ``(..., in)`` activations; any leading dims, any strides.
        weight: ``(out, in)`` frozen base weight.
        lora_a: ``(r, in)`` down projection A.
        lora_b: ``(out, r)`` up projection B.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
        bias: ``(out,)`` or ``None``.
        dropout_p: dropout on the low-rank path only (as HF PEFT), active when ``training``.
            The mask is drawn from a seed taken from torch's generator for ``x.device``, so it
            follows ``torch.manual_seed``; the backward regenerates it from the seed.
        training: dropout is applied only when True.

    Returns ``(..., out)`` in the dtype of ``x``. Differentiable w.r.t. every tensor argument.
    """
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    check.tensor(OP, "weight", weight, 2)
    check.tensor(OP, "lora_a", lora_a, 2)
    check.tensor(OP, "lora_b", lora_b, 2)
    if bias is not None:
        check.tensor(OP, "bias", bias, 1)
    scale = check.finite_float(OP, "scale", scale)
    dropout_p = check.probability(OP, "dropout_p", dropout_p)
    training = check.boolean(OP, "training", training)
    x, weight, lora_a, lora_b, bias = check.autocast(x.device.type, x, weight, lora_a, lora_b, bias)
    check.same_dtype_device(OP, "x", x, (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)))
    in_f = x.shape[-1]
    out_f = weight.shape[0]
    check.shape(OP, "weight", weight, (None, in_f), f"(out, in) with in={in_f} from x")
    rank = lora_a.shape[0]
    check.shape(OP, "lora_a", lora_a, (None, in_f), f"(r, in) with in={in_f} from x")
    check.shape(OP, "lora_b", lora_b, (out_f, rank), f"(out, r) with out={out_f} from weight, r={rank} from lora_a")
    if bias is not None:
        check.shape(OP, "bias", bias, (out_f,), f"(out,) with out={out_f} from weight")

    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), device=x.device, dtype=torch.int64) if p > 0.0 else None
    backend = resolve_backend(OP, x.device, (x, weight, lora_a, lora_b, bias, scale, p, seed))
    y, _ = _lora_linear(x, weight, lora_a, lora_b, bias, scale, p, seed, backend)
    return y
