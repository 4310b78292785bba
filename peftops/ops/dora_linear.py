"""``peftops.dora_linear``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from ..reference.common import acc_dtype
from . import validate as check
from .dispatch import run_backward, run_forward

OP = "dora_linear"


# Returns ``(y, u, pre, keep, norm)``, every backend alike:
# - ``u = x_d A^T`` (..., r), unscaled, float32 (float64 for float64 x): dB = s (g c)^T u;
# - ``pre = x_d W^T + s u B^T`` (..., out) in x's dtype, the output before the magnitude: dm
#   is ``sum_T g * pre / norm``; saved only when the magnitude will get a gradient
#   (``save_pre``), else empty, since recomputing it costs a GEMM as large as the forward's.
#   A fused backend writes it from the accumulator it scales for y;
# - ``keep``: the dropout keep-mask (x's shape, bool) when dropout_p > 0, else empty;
# - ``norm = ||W + s B A||_row`` (out,), float32: the constant the backward divides by.
@torch.library.custom_op("peftops::dora_linear", mutates_args=())
def _dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    bias: Tensor | None,
    weight_sq: Tensor | None,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    save_pre: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return run_forward(
        OP, backend, x.device, x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre
    )


@_dora_linear.register_fake
def _(x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre, backend):
    lead, out_f, acc = x.shape[:-1], weight.shape[0], acc_dtype(x.dtype)
    return (
        x.new_empty((*lead, out_f)),
        x.new_empty((*lead, lora_a.shape[0]), dtype=acc),
        x.new_empty((*lead, out_f) if save_pre else (0,)),
        x.new_empty(x.shape if dropout_p > 0.0 else (0,), dtype=torch.bool),
        x.new_empty((out_f,), dtype=acc),
    )


@torch.library.custom_op(
    "peftops::dora_linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor magnitude, Tensor lora_u, "
    "Tensor pre, Tensor keep, Tensor norm, float scale, float dropout_p, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _dora_linear_backward(
    grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, scale, dropout_p, output_mask, backend
):
    return run_backward(
        OP, backend, x.device,
        grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, scale, dropout_p, output_mask,
    )  # fmt: skip


@_dora_linear_backward.register_fake
def _(grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, scale, dropout_p, output_mask, backend):
    like = (x, weight, lora_a, lora_b, magnitude, grad.new_empty(grad.shape[-1]))
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=True))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre, backend = inputs
    _, lora_u, pre, keep, norm = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mark_non_differentiable(lora_u, pre, keep, norm)


def _backward(ctx, grad, grad_u, grad_base, grad_keep, grad_norm):
    x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm = ctx.saved_tensors
    grads = _dora_linear_backward(
        grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, ctx.scale, ctx.dropout_p,
        list(ctx.needs_input_grad[:6]), ctx.backend,
    )  # fmt: skip
    # weight_sq is a cache of the frozen weight: no gradient, as the norm it feeds has none.
    return (*grads, None, None, None, None, None, None)


_dora_linear.register_autograd(_backward, setup_context=_setup_context)


class _DoraLinearFunction(torch.autograd.Function):
    """The same backend functions as the registered op, for eager calls: the op's Python
    autograd and dispatch cost host time on every call, as ``lora_linear`` found before
    (measured 2026-11-30 on this 2-core CPU, fwd+bwd at 256 x 256 -> 512, r 8, medians of 300
    interleaved calls: registered op 3.70 ms, this path 3.33 ms, peft's formula 3.48 ms).
    torch.compile keeps seeing the registered op."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre, backend):
        y, lora_u, pre, keep, norm = run_forward(
            OP,
            backend,
            x.device,
            x,
            weight,
            lora_a,
            lora_b,
            magnitude,
            bias,
            weight_sq,
            scale,
            dropout_p,
            seed,
            save_pre,
        )
        ctx.save_for_backward(x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm)
        ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm = ctx.saved_tensors
        grads = run_backward(
            OP, ctx.backend, x.device,
            grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, ctx.scale, ctx.dropout_p,
            list(ctx.needs_input_grad[:6]),
        )  # fmt: skip
        return (*grads, None, None, None, None, None, None)


#: ``eager`` (default): the Function above outside torch.compile; ``op``: always the registered
#: op (what torch.compile sees), for tests that compare the two paths.
EAGER_PATH = {"mode": "eager"}


# -- the reference backend ----------------------------------------------------------------


def _no_mask(x: Tensor) -> Tensor:
    return x.new_empty((0,), dtype=torch.bool)


def reference_forward(x, weight, lora_a, lora_b, magnitude, bias, weight_sq, scale, dropout_p, seed, save_pre):
    keep = None
    if dropout_p > 0.0:
        if seed is None:  # (the public op always draws one; a direct torch.ops call might not)
            raise ValueError(f"{OP}: seed: expected a seed tensor when dropout_p > 0, got None")
        keep = reference.dropout_keep_mask(seed, x.shape, dropout_p, x.device)
    y = reference.dora_linear(
        x, weight, lora_a, lora_b, magnitude, scale=scale, bias=bias, keep=keep, dropout_p=dropout_p
    )
    # The spec recomputes the norm directly; weight_sq is only a cache for faster backends.
    acc = acc_dtype(x.dtype)
    xd = x.to(acc) if keep is None else x.to(acc) * keep / (1.0 - dropout_p)
    u = xd @ lora_a.to(acc).T
    pre = (xd @ weight.to(acc).T + scale * u @ lora_b.to(acc).T).to(x.dtype) if save_pre else x.new_empty((0,))
    norm = reference.dora_weight_norm_direct(weight, lora_a, lora_b, scale)
    return y, u, pre, _no_mask(x) if keep is None else keep, norm


def reference_backward(grad, x, weight, lora_a, lora_b, magnitude, lora_u, pre, keep, norm, scale, dropout_p, mask):
    # The spec recomputes u, the unscaled output and the norm in float32 rather than read them.
    kept = keep if dropout_p > 0.0 else None
    return reference.dora_linear_backward(grad, x, weight, lora_a, lora_b, magnitude, scale, kept, dropout_p, mask)


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


# -- the public op ------------------------------------------------------------------------


def dora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    *,
    scale: float,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_sq_norm: Tensor | None = None,
) -> Tensor:
    r"""DoRA linear layer (Liu et al. 2024), as HF PEFT's ``LoraConfig(use_dora=True)``:

    ``y = x W^T + b + (c - 1) * x_d W^T + c * scale * x_d A^T B^T`` with
    ``c = magnitude / ||W + scale B A||_row`` and ``x_d = dropout(x)``: without dropout (or
    when not ``training``) that is ``c * (x W^T + scale x A^T B^T) + b``. The norm is a
    constant in the backward (no gradient through it), as in peft and the DoRA paper.

    The norm is computed without forming ``B A`` (``||W_j||^2 + 2 s B_j A W_j^T +
    s^2 B_j A A^T B_j^T``); ``weight_sq_norm`` passes a cached ``||W_j||^2``
    (:func:`peftops.reference.weight_sq_norm`), which the frozen base makes reusable.

    Backends: ``reference``; ``torch`` (framework GEMMs, the magnitude applied in one pass);
    ``triton`` (:mod:`peftops.kernels.dora_linear`: the magnitude in the LoRA GEMM's epilogue,
    the unscaled output saved from the same accumulator, and dm, dB and the bias gradient from
    one token reduction over g). ``auto`` picks ``torch`` until the Triton path is measured
    faster on a GPU.

    Args:
        x: ``(..., in)`` activations.
        weight: ``(out, in)`` frozen base weight.
        lora_a: ``(r, in)``; lora_b: ``(out, r)``.
        magnitude: ``(out,)`` the trained magnitude vector ``m``.
        scale: ``alpha / r`` (or ``alpha / sqrt(r)``).
        bias: ``(out,)`` or ``None``.
        dropout_p: dropout on the adapter's input (peft's placement, above), when ``training``.
        training: dropout is applied only when True.
        weight_sq_norm: ``(out,)`` float32 (float64 for float64 x) ``||W_j||^2``, or ``None``
            to compute it. A stale value gives a wrong norm: pass it only for this weight.

    Returns ``(..., out)`` in the dtype of ``x``. Differentiable w.r.t. every tensor argument
    but ``weight_sq_norm``.
    """
    if isinstance(x, Tensor):
        x, weight, lora_a, lora_b, magnitude, bias = check.autocast(
            x.device.type, x, weight, lora_a, lora_b, magnitude, bias
        )
    scale, dropout_p = _validate(x, weight, lora_a, lora_b, magnitude, scale, bias, dropout_p, training, weight_sq_norm)
    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), device=x.device, dtype=torch.int64) if p > 0.0 else None
    args = (x, weight, lora_a, lora_b, magnitude, bias, weight_sq_norm, scale, p, seed)
    backend = resolve_backend(OP, x.device, (*args, False))
    save_pre = torch.is_grad_enabled() and magnitude.requires_grad
    if EAGER_PATH["mode"] == "eager" and not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b, magnitude, bias)
        ):
            return _DoraLinearFunction.apply(*args, save_pre, backend)
        return run_forward(OP, backend, x.device, *args, save_pre)[0]  # nothing to save
    y, _, _, _, _ = _dora_linear(*args, save_pre, backend)
    return y


def _validate(x, weight, lora_a, lora_b, magnitude, scale, bias, dropout_p, training, weight_sq) -> tuple[float, float]:
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    check.tensor(OP, "weight", weight, 2)
    check.tensor(OP, "lora_a", lora_a, 2)
    check.tensor(OP, "lora_b", lora_b, 2)
    check.tensor(OP, "magnitude", magnitude, 1)
    if bias is not None:
        check.tensor(OP, "bias", bias, 1)
    if weight_sq is not None:
        check.tensor(OP, "weight_sq_norm", weight_sq, 1)
    scale = check.finite_float(OP, "scale", scale)
    dropout_p = check.probability(OP, "dropout_p", dropout_p)
    check.boolean(OP, "training", training)
    check.same_dtype_device(
        OP, "x", x,
        (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("magnitude", magnitude), ("bias", bias)),
    )  # fmt: skip
    in_f = x.shape[-1]
    out_f = weight.shape[0]
    if in_f == 0:
        raise ValueError(f"{OP}: x: expected at least 1 input feature, got shape {tuple(x.shape)}")
    check.shape(OP, "weight", weight, (None, in_f), f"(out, in) with in={in_f} from x")
    rank = lora_a.shape[0]
    if rank == 0:
        raise ValueError(f"{OP}: lora_a: expected rank r >= 1 rows, got shape {tuple(lora_a.shape)}")
    check.shape(OP, "lora_a", lora_a, (None, in_f), f"(r, in) with in={in_f} from x")
    check.shape(OP, "lora_b", lora_b, (out_f, rank), f"(out, r) with out={out_f} from weight, r={rank} from lora_a")
    check.shape(OP, "magnitude", magnitude, (out_f,), f"(out,) with out={out_f} from weight")
    if bias is not None:
        check.shape(OP, "bias", bias, (out_f,), f"(out,) with out={out_f} from weight")
    if weight_sq is not None:
        acc = acc_dtype(x.dtype)
        if weight_sq.dtype != acc:
            raise TypeError(f"{OP}: weight_sq_norm: expected dtype {acc} (accumulation dtype), got {weight_sq.dtype}")
        if weight_sq.device != x.device:
            raise ValueError(
                f"{OP}: weight_sq_norm: expected device {x.device} (the device of x), got {weight_sq.device}"
            )
        check.shape(OP, "weight_sq_norm", weight_sq, (out_f,), f"(out,) with out={out_f} from weight")
    return scale, dropout_p
