"""``peftops.lora_linear``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, implementation, register_impl, register_shape_class, resolve_backend
from . import validate as check
from .dispatch import call

OP = "lora_linear"


# Returns ``(y, u, keep)``: ``u`` the rank-r activation ``scale * dropout(x) A^T`` of shape
# (..., r), tiny, saved for the backward (``dB = g^T u``) so that kernels need not recompute it
# with another pass over x; float32 (float64 for float64 x), since rounded to float16 it can
# overflow where y does not, unless the backend says otherwise (``U_DTYPE``; each backend's
# backward is the only reader of its own u). ``keep``: what the backend saves of its dropout
# mask (an empty tensor for backends that regenerate the mask from ``seed`` in the backward).
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
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_forward(backend, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)


@_lora_linear.register_fake
def _(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
    extras = implementation(OP, backend).extras
    shape, dtype = extras[SAVED_MASK](x, dropout_p) if SAVED_MASK in extras else ((0,), torch.bool)
    u_dtype = extras[U_DTYPE](x) if U_DTYPE in extras else _acc_dtype(x)
    return (
        x.new_empty((*x.shape[:-1], weight.shape[0])),
        x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=u_dtype),
        x.new_empty(shape, dtype=dtype),
    )


@torch.library.custom_op(
    "peftops::lora_linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor lora_u, Tensor keep, "
    "float scale, float dropout_p, Tensor? seed, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _lora_linear_backward(grad, x, weight, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed, output_mask, backend):
    return _run_backward(backend, grad, x, weight, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed, output_mask)


@_lora_linear_backward.register_fake
def _(grad, x, weight, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed, output_mask, backend):
    like = (x, weight, lora_a, lora_b, grad.new_empty(grad.shape[-1]))
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=True))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend = inputs
    _, lora_u, keep = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, lora_u, keep, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mark_non_differentiable(lora_u, keep)


def _backward(ctx, grad, grad_u, grad_keep):
    x, weight, lora_a, lora_b, lora_u, keep, seed = ctx.saved_tensors
    grads = _lora_linear_backward(
        grad, x, weight, lora_a, lora_b, lora_u, keep, ctx.scale, ctx.dropout_p, seed,
        list(ctx.needs_input_grad[:5]), ctx.backend,
    )  # fmt: skip
    return (*grads, None, None, None, None)


_lora_linear.register_autograd(_backward, setup_context=_setup_context)


# -- the eager path -------------------------------------------------------------------------
# The registered op is what torch.compile traces; eagerly, its custom_op autograd wrapper and
# the backward op's schema handling cost ~90 us of host time per training step on a slow CPU
# (more than the GPU work at 512 tokens). This Function runs the same backend functions with
# the same saved tensors, so both paths compute the same thing (tests/ops run both).


class _LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
        y, lora_u, keep = _run_forward(backend, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)
        ctx.save_for_backward(x, weight, lora_a, lora_b, lora_u, keep, seed)
        ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, lora_u, keep, seed = ctx.saved_tensors
        grads = _run_backward(
            ctx.backend, grad, x, weight, lora_a, lora_b, lora_u, keep, ctx.scale, ctx.dropout_p, seed,
            list(ctx.needs_input_grad[:5]),
        )  # fmt: skip
        return (*grads, None, None, None, None)


#: ``eager`` (default): the Function above outside torch.compile; ``op``: always the registered
#: op (what torch.compile sees), for tests that compare the two paths.
EAGER_PATH = {"mode": "eager"}

#: ``OpImpl.extras`` key: ``(x, dropout_p) -> (shape, dtype)`` of the mask a backend's forward
#: returns as its third output for its backward; backends without it return ``(y, u)`` only.
SAVED_MASK = "saved_mask"


#: ``OpImpl.extras`` key: ``x -> dtype`` of the ``u`` a backend returns, if not :func:`_acc_dtype`.
U_DTYPE = "lora_u_dtype"


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# The empty "no mask saved" output, one per device: allocating it on every call costs host time.
_NO_MASK: dict[torch.device, Tensor] = {}


def no_mask(device: torch.device) -> Tensor:
    mask = _NO_MASK.get(device)
    if mask is None:
        mask = _NO_MASK[device] = torch.empty((0,), dtype=torch.bool, device=device)
    return mask


def _run_forward(backend, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    impl = implementation(OP, backend)
    out = call(impl.forward, x.device, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)
    if SAVED_MASK in impl.extras:
        return out
    y, lora_u = out
    return y, lora_u, no_mask(x.device)


def _run_backward(backend, grad, x, weight, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed, output_mask):
    impl = implementation(OP, backend)
    saved = (
        (grad, x, weight, lora_a, lora_b, lora_u, keep)
        if SAVED_MASK in impl.extras
        else (grad, x, weight, lora_a, lora_b, lora_u)
    )
    return call(impl.backward, x.device, *saved, scale, dropout_p, seed, output_mask)


# -- the reference backend ----------------------------------------------------------------


def reference_keep_mask(x: Tensor, dropout_p: float, seed: Tensor | None) -> Tensor | None:
    if dropout_p == 0.0:
        return None
    if seed is None:  # (the public op always draws one; a direct torch.ops call might not)
        raise ValueError(f"{OP}: seed: expected a seed tensor when dropout_p > 0, got None")
    return reference.dropout_keep_mask(seed, x.shape, dropout_p, x.device)


def reference_forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    keep = reference_keep_mask(x, dropout_p, seed)
    y = reference.lora_linear(x, weight, lora_a, lora_b, scale=scale, bias=bias, keep=keep, dropout_p=dropout_p)
    return y, reference.lora_activation(x, lora_a, scale, keep, dropout_p).to(_acc_dtype(x))


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
            The mask follows ``torch.manual_seed``: backends that regenerate it draw a seed from
            torch's generator for ``x.device``; the ``torch`` backend draws the mask itself from
            that generator and saves it for the backward.
        training: dropout is applied only when True.

    Returns ``(..., out)`` in the dtype of ``x``. Differentiable w.r.t. every tensor argument.
    Raises ``ValueError`` for r = 0 or no input features (nothing to adapt; a model without an
    adapter on a layer keeps its ``nn.Linear``).
    """
    if isinstance(x, Tensor):
        x, weight, lora_a, lora_b, bias = check.autocast(x.device.type, x, weight, lora_a, lora_b, bias)
    if not _well_formed(x, weight, lora_a, lora_b, bias, scale, dropout_p, training):
        scale, dropout_p = _explain(x, weight, lora_a, lora_b, bias, scale, dropout_p, training)
    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), device=x.device, dtype=torch.int64) if p > 0.0 else None
    backend = resolve_backend(OP, x.device, (x, weight, lora_a, lora_b, bias, scale, p, seed))
    if EAGER_PATH["mode"] == "eager" and not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and (
            x.requires_grad
            or weight.requires_grad
            or lora_a.requires_grad
            or lora_b.requires_grad
            or (bias is not None and bias.requires_grad)
        ):
            return _LoraLinearFunction.apply(x, weight, lora_a, lora_b, bias, scale, p, seed, backend)
        return _run_forward(backend, x, weight, lora_a, lora_b, bias, scale, p, seed)[0]  # nothing to save
    y, _, _ = _lora_linear(x, weight, lora_a, lora_b, bias, scale, p, seed, backend)
    return y


def _well_formed(x, weight, lora_a, lora_b, bias, scale, dropout_p, training) -> bool:
    """Every check of :func:`_explain` at once, in plain attribute reads: the common case costs
    a couple of microseconds of host time; only a failure pays for the detailed messages."""
    if not (
        isinstance(x, Tensor)
        and isinstance(weight, Tensor)
        and isinstance(lora_a, Tensor)
        and isinstance(lora_b, Tensor)
        and (bias is None or isinstance(bias, Tensor))
        and type(scale) is float
        and -math.inf < scale < math.inf
        and type(dropout_p) is float
        and 0.0 <= dropout_p < 1.0
        and type(training) is bool
    ):
        return False
    dtype, device = x.dtype, x.device
    xs, ws, as_, bs = x.shape, weight.shape, lora_a.shape, lora_b.shape
    return (
        dtype.is_floating_point
        and len(xs) >= 1
        and len(ws) == 2
        and len(as_) == 2
        and len(bs) == 2
        and xs[-1] > 0
        and as_[0] > 0
        and ws[1] == xs[-1]
        and as_[1] == xs[-1]
        and bs[0] == ws[0]
        and bs[1] == as_[0]
        and weight.dtype == dtype
        and lora_a.dtype == dtype
        and lora_b.dtype == dtype
        and weight.device == device
        and lora_a.device == device
        and lora_b.device == device
        and (bias is None or (bias.shape == ws[:1] and bias.dtype == dtype and bias.device == device))
    )


def _explain(x, weight, lora_a, lora_b, bias, scale, dropout_p, training) -> tuple[float, float]:
    """The argument checks one by one: raises the first failure's ``TypeError``/``ValueError``,
    else returns ``scale`` and ``dropout_p`` as floats (an int scale, a numpy float, a
    symbolic float under torch.compile are fine; the fast check takes plain floats only)."""
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    check.tensor(OP, "weight", weight, 2)
    check.tensor(OP, "lora_a", lora_a, 2)
    check.tensor(OP, "lora_b", lora_b, 2)
    if bias is not None:
        check.tensor(OP, "bias", bias, 1)
    scale = check.finite_float(OP, "scale", scale)
    dropout_p = check.probability(OP, "dropout_p", dropout_p)
    check.boolean(OP, "training", training)
    check.same_dtype_device(OP, "x", x, (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)))
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
    if bias is not None:
        check.shape(OP, "bias", bias, (out_f,), f"(out,) with out={out_f} from weight")
    return scale, dropout_p


def _shape_class(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed) -> tuple[int, bool, int]:
    """What ``auto.json`` entries for lora_linear are keyed by: tokens, dropout, rank."""
    return x.numel() // x.shape[-1], dropout_p > 0.0, lora_a.shape[0]


register_shape_class(OP, ("tokens", "dropout", "rank"), _shape_class)
