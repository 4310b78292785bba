"""``peftops.lora_linear_nf4``: LoRA over a 4-bit (NF4 / FP4) base weight stored as bitsandbytes
stores it: validation, backend dispatch, ``torch.library`` registration.

The registered op takes the weight as its storage: ``qweight`` (uint8, two 4-bit codes per byte,
the first element of each pair in the high nibble, the ``(out, in)`` weight flattened row-major),
``absmax`` (float32, one scale per ``blocksize`` consecutive elements of that flat order, the
double quantisation already undone) and ``code`` (the 16 float32 values a 4-bit code stands
for). Element ``f`` of the flat weight is ``code[nibble(f)] * absmax[f // blocksize]``, computed
in float32 and rounded once to x's dtype, as bitsandbytes 0.50's ``matmul_4bit`` (its
``gemm_4bit``) dequantises it, whatever dtype the weight was quantised from.

Backends: ``reference`` and ``torch`` dequantise into a temporary weight, then run
``lora_linear``'s backend of the same name (the backward dequantises again rather than keep
the full-precision weight alive between the passes, as bitsandbytes' ``MatMul4Bit`` does);
``triton`` dequantises W tiles inside the GEMM's load path (:mod:`peftops.kernels.lora_linear_nf4`),
so the full-precision weight is never written.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..backends import OpImpl, implementation, register_impl, resolve_backend
from . import validate as check
from .dispatch import run_backward, run_forward
from .lora_linear import OP as LORA_OP
from .lora_linear import SAVED_MASK, U_DTYPE, _run_backward, _run_forward

OP = "lora_linear_nf4"
#: Backends that run lora_linear's backend of the same name on a dequantised weight.
DEQUANTIZING = ("reference", "torch")
#: Block sizes bitsandbytes' 4-bit quantisation takes.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


# Returns ``(y, u, keep)`` as ``lora_linear`` does (``keep`` empty for backends that regenerate
# the dropout mask from ``seed``).
@torch.library.custom_op("peftops::lora_linear_nf4", mutates_args=())
def _lora_linear_nf4(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    out_features: int,
    blocksize: int,
    weight_dtype: torch.dtype,
    lora_a: Tensor,
    lora_b: Tensor,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return run_forward(
        OP, backend, x.device,
        x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale, dropout_p, seed,
    )  # fmt: skip


@_lora_linear_nf4.register_fake
def _(x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale, dropout_p, seed,
      backend):  # fmt: skip
    # The dequantising backends return what lora_linear's backend of their name returns.
    extras = implementation(LORA_OP, backend).extras if backend in DEQUANTIZING else {}
    saved = extras.get(SAVED_MASK)
    shape, dtype = saved(x, dropout_p) if saved is not None else ((0,), torch.bool)
    u_dtype = extras[U_DTYPE](x) if U_DTYPE in extras else torch.float32
    return (
        x.new_empty((*x.shape[:-1], out_features)),
        x.new_empty((*x.shape[:-1], lora_a.shape[0]), dtype=u_dtype),
        x.new_empty(shape, dtype=dtype),
    )


@torch.library.custom_op(
    "peftops::lora_linear_nf4_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor qweight, Tensor absmax, Tensor code, int out_features, int blocksize, "
    "ScalarType weight_dtype, Tensor lora_a, Tensor lora_b, Tensor lora_u, Tensor keep, float scale, float dropout_p, Tensor? seed, "
    "bool[] output_mask, str backend) -> (Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _lora_linear_nf4_backward(
    grad, x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed,
    output_mask, backend,
):  # fmt: skip
    return run_backward(
        OP, backend, x.device,
        grad, x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, lora_u, keep, scale,
        dropout_p, seed, output_mask,
    )  # fmt: skip


@_lora_linear_nf4_backward.register_fake
def _(grad, x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, lora_u, keep, scale,
      dropout_p, seed, output_mask, backend):  # fmt: skip
    like = (x, lora_a, lora_b, grad.new_empty(grad.shape[-1]))
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=True))


def _setup_context(ctx, inputs, output):
    (x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale, dropout_p, seed,
     backend) = inputs  # fmt: skip
    _, lora_u, keep = output
    ctx.save_for_backward(x, qweight, absmax, code, lora_a, lora_b, lora_u, keep, seed)
    ctx.out_features, ctx.blocksize, ctx.weight_dtype = out_features, blocksize, weight_dtype
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.mark_non_differentiable(lora_u, keep)


def _needs(ctx) -> list[bool]:
    # (x, A, B, bias) of the op's inputs; the quantised weight and its state get no gradient.
    n = ctx.needs_input_grad
    return [n[0], n[7], n[8], n[9]]


def _grads_to_inputs(grads):
    dx, da, db_, dbias = grads
    return dx, None, None, None, None, None, None, da, db_, dbias, None, None, None, None


def _backward(ctx, grad, grad_u, grad_keep):
    x, qweight, absmax, code, lora_a, lora_b, lora_u, keep, seed = ctx.saved_tensors
    grads = _lora_linear_nf4_backward(
        grad, x, qweight, absmax, code, ctx.out_features, ctx.blocksize, ctx.weight_dtype, lora_a, lora_b, lora_u, keep,
        ctx.scale, ctx.dropout_p, seed, _needs(ctx), ctx.backend,
    )  # fmt: skip
    return _grads_to_inputs(grads)


_lora_linear_nf4.register_autograd(_backward, setup_context=_setup_context)


class _LoraLinearNF4Function(torch.autograd.Function):
    """The same backend functions for eager calls, without the registered op's host cost (as
    ``lora_linear``'s eager path); torch.compile keeps seeing the registered op."""

    @staticmethod
    def forward(ctx, x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale,
                dropout_p, seed, backend):  # fmt: skip
        y, lora_u, keep = run_forward(
            OP, backend, x.device,
            x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale, dropout_p,
            seed,
        )  # fmt: skip
        ctx.save_for_backward(x, qweight, absmax, code, lora_a, lora_b, lora_u, keep, seed)
        ctx.out_features, ctx.blocksize, ctx.weight_dtype = out_features, blocksize, weight_dtype
        ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, qweight, absmax, code, lora_a, lora_b, lora_u, keep, seed = ctx.saved_tensors
        grads = run_backward(
            OP, ctx.backend, x.device,
            grad, x, qweight, absmax, code, ctx.out_features, ctx.blocksize, ctx.weight_dtype, lora_a, lora_b, lora_u,
            keep, ctx.scale, ctx.dropout_p, seed, _needs(ctx),
        )  # fmt: skip
        return _grads_to_inputs(grads)


#: ``eager`` (default): the Function above outside torch.compile; ``op``: always the registered op.
EAGER_PATH = {"mode": "eager"}


# -- dequantisation, and the backends that run on a dequantised weight ----------------------


def dequantize_blocks(
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    shape: Sequence[int],
    blocksize: int,
    dtype: torch.dtype,
    weight_dtype: torch.dtype | None = None,
) -> Tensor:
    """The ``(out, in)`` weight in ``dtype``: ``code[nibble(f)] * absmax[f // blocksize]`` in
    float32 for each flat index ``f`` (high nibble first), rounded to ``weight_dtype`` (the
    quantised weight's own dtype; default ``dtype``) as bitsandbytes' ``dequantize_4bit``
    rounds it, then cast to ``dtype`` as its ``MatMul4Bit`` casts to the activations'. Memory:
    one float32 value per element, transient."""
    n = math.prod(shape)
    flat = qweight.reshape(-1)
    # Both nibbles of a byte at once: a (256, 2) table of code pairs, indexed by the byte.
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack((code[byte >> 4], code[byte & 15]), 1)
    values = pairs[flat.long()].reshape(-1)[:n]
    full = (n // blocksize) * blocksize
    out = torch.empty(n, dtype=torch.float32, device=qweight.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = values[full:] * absmax[full // blocksize]
    return out.view(*shape).to(weight_dtype or dtype).to(dtype)


def _dequantized(x, qweight, absmax, code, out_features, blocksize, weight_dtype) -> Tensor:
    return dequantize_blocks(qweight, absmax, code, (out_features, x.shape[-1]), blocksize, x.dtype, weight_dtype)


def _on_dequantized(backend: str):
    def forward(x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale,
                dropout_p, seed):  # fmt: skip
        weight = _dequantized(x, qweight, absmax, code, out_features, blocksize, weight_dtype)
        return _run_forward(backend, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)

    def backward(grad, x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, lora_u, keep,
                 scale, dropout_p, seed, output_mask):  # fmt: skip
        need_x, need_a, need_b, need_bias = output_mask
        weight = _dequantized(x, qweight, absmax, code, out_features, blocksize, weight_dtype) if need_x else None
        if weight is None:  # no dx: the weight is not read, so no dequantisation either
            weight = x.new_empty(()).expand(out_features, x.shape[-1])
        dx, _, da, db_, dbias = _run_backward(
            backend, grad, x, weight, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed,
            [need_x, False, need_a, need_b, need_bias],
        )  # fmt: skip
        return dx, da, db_, dbias

    return forward, backward


def on_dequantized_impl(backend: str) -> OpImpl:
    """The implementation that dequantises, then runs ``lora_linear``'s ``backend``."""
    fwd, bwd = _on_dequantized(backend)
    return OpImpl(forward=fwd, backward=bwd)


register_impl(OP, "reference", on_dequantized_impl("reference"))


# -- the public op ------------------------------------------------------------------------


def lora_linear_nf4(
    x: Tensor,
    qweight: Tensor,
    quant_state,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scale: float = 1.0,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""LoRA over a 4-bit base weight: ``lora_linear`` on ``W = dequantize(qweight, quant_state)``,
    ``y = x W^T + b + scale * dropout(x) A^T B^T``, without the full-precision W ever stored.

    Args:
        x: ``(..., in)`` activations (float16, bfloat16 or float32).
        qweight: the packed 4-bit weight, bitsandbytes' layout (``Params4bit.data``): uint8,
            ``ceil(out * in / 2)`` bytes in any shape.
        quant_state: the weight's quantisation state: a bitsandbytes ``QuantState`` or peftops'
            :class:`~peftops.reference.nf4.QuantState4bit` (NF4 or FP4, with or without double
            quantisation; ``shape`` is ``(out, in)``). W is rounded once, to x's dtype, as
            bitsandbytes' 4-bit matmul does (not through the state's ``dtype``).
        lora_a: ``(r, in)``; lora_b: ``(out, r)``; bias: ``(out,)`` or None.
        scale, dropout_p, training: as :func:`peftops.lora_linear`.

    Returns ``(..., out)`` in x's dtype; differentiable w.r.t. x, A, B and the bias.
    """
    state = as_state(quant_state)
    # The double quantisation is undone here, once per call (N K / blocksize float32 values,
    # a few hundred KB): exactly bnb's two roundings, which a kernel might fuse into an FMA.
    absmax = nf4_reference().dequantize_absmax(state)
    out_features, in_features = state.shape
    return lora_linear_nf4_raw(
        x, qweight, absmax, state.code.to(device=absmax.device, dtype=torch.float32), out_features, state.blocksize,
        lora_a, lora_b, scale=scale, bias=bias, dropout_p=dropout_p, training=training, in_features=in_features,
    )  # fmt: skip


def nf4_reference():
    from ..reference import nf4

    return nf4


def as_state(quant_state):
    """A :class:`~peftops.reference.nf4.QuantState4bit` for peftops' state or bitsandbytes'."""
    nf4 = nf4_reference()
    if isinstance(quant_state, nf4.QuantState4bit):
        return quant_state
    if type(quant_state).__name__ == "QuantState" and type(quant_state).__module__.startswith("bitsandbytes"):
        return nf4.state_from_bnb(quant_state)
    raise TypeError(
        f"{OP}: quant_state: expected a peftops QuantState4bit or a bitsandbytes QuantState, "
        f"got {type(quant_state).__name__}"
    )


def lora_linear_nf4_raw(
    x: Tensor,
    qweight: Tensor,
    absmax: Tensor,
    code: Tensor,
    out_features: int,
    blocksize: int,
    lora_a: Tensor,
    lora_b: Tensor,
    *,
    scale: float = 1.0,
    bias: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    weight_dtype: torch.dtype | None = None,
    in_features: int | None = None,
) -> Tensor:
    """:func:`lora_linear_nf4` on the storage tensors the kernels read: ``absmax`` float32 per
    block (double quantisation undone), ``code`` the 16 float32 code values, ``weight_dtype``
    a dtype W is rounded to before the cast to x's (default: x's, one rounding, bitsandbytes
    0.50's; another one reproduces libraries that dequantise to the stored dtype first)."""
    if isinstance(x, Tensor):
        x, lora_a, lora_b, bias = check.autocast(x.device.type, x, lora_a, lora_b, bias)
    scale, dropout_p = _validate(
        x, qweight, absmax, code, out_features, blocksize, lora_a, lora_b, bias, scale, dropout_p, training, in_features
    )
    if weight_dtype is None:
        weight_dtype = x.dtype
    elif weight_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{OP}: weight_dtype: expected float16, bfloat16 or float32, got {weight_dtype}")
    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), device=x.device, dtype=torch.int64) if p > 0.0 else None
    args = (x, qweight, absmax, code, out_features, blocksize, weight_dtype, lora_a, lora_b, bias, scale, p, seed)
    backend = resolve_backend(OP, x.device, args)
    if EAGER_PATH["mode"] == "eager" and not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, lora_a, lora_b, bias)):
            return _LoraLinearNF4Function.apply(*args, backend)
        return run_forward(OP, backend, x.device, *args)[0]
    y, _, _ = _lora_linear_nf4(*args, backend)
    return y


def _validate(x, qweight, absmax, code, out_f, blocksize, lora_a, lora_b, bias, scale, dropout_p, training, in_f):
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{OP}: x: expected float16, bfloat16 or float32, got {x.dtype}")
    check.tensor(OP, "qweight", qweight, floating=False)
    if qweight.dtype != torch.uint8:
        raise TypeError(f"{OP}: qweight: expected uint8 (two 4-bit codes per byte), got {qweight.dtype}")
    check.tensor(OP, "absmax", absmax, 1)
    if absmax.dtype != torch.float32:
        raise TypeError(f"{OP}: absmax: expected float32 block scales, got {absmax.dtype}")
    check.tensor(OP, "code", code, 1)
    if code.dtype != torch.float32 or code.shape != (16,):
        raise ValueError(f"{OP}: code: expected 16 float32 code values, got {tuple(code.shape)} {code.dtype}")
    check.tensor(OP, "lora_a", lora_a, 2)
    check.tensor(OP, "lora_b", lora_b, 2)
    if bias is not None:
        check.tensor(OP, "bias", bias, 1)
    scale = check.finite_float(OP, "scale", scale)
    dropout_p = check.probability(OP, "dropout_p", dropout_p)
    check.boolean(OP, "training", training)
    check.same_dtype_device(OP, "x", x, (("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)))
    for name, t in (("qweight", qweight), ("absmax", absmax), ("code", code)):
        if t.device != x.device:
            raise ValueError(f"{OP}: {name}: expected device {x.device} (the device of x), got {t.device}")
    k = x.shape[-1]
    if in_f is not None and in_f != k:
        raise ValueError(f"{OP}: x: expected {in_f} input features (quant_state's shape), got {k}")
    if type(out_f) is not int or out_f < 1:
        raise ValueError(f"{OP}: out_features: expected a positive int, got {out_f!r}")
    if k == 0:
        raise ValueError(f"{OP}: x: expected at least 1 input feature, got shape {tuple(x.shape)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{OP}: blocksize: expected one of {BLOCKSIZES}, got {blocksize!r}")
    n = out_f * k
    if qweight.numel() != (n + 1) // 2:
        raise ValueError(
            f"{OP}: qweight: expected {(n + 1) // 2} bytes for a ({out_f}, {k}) weight, got {qweight.numel()}"
        )
    blocks = -(-n // blocksize)
    if absmax.shape != (blocks,):
        raise ValueError(
            f"{OP}: absmax: expected ({blocks},) scales for {n} elements in blocks of {blocksize}, "
            f"got {tuple(absmax.shape)}"
        )
    rank = lora_a.shape[0]
    if rank == 0:
        raise ValueError(f"{OP}: lora_a: expected rank r >= 1 rows, got shape {tuple(lora_a.shape)}")
    check.shape(OP, "lora_a", lora_a, (None, k), f"(r, in) with in={k} from x")
    check.shape(OP, "lora_b", lora_b, (out_f, rank), f"(out, r) with out={out_f}, r={rank} from lora_a")
    if bias is not None:
        check.shape(OP, "bias", bias, (out_f,), f"(out,) with out={out_f}")
    return scale, dropout_p
