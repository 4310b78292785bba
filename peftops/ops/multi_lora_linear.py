"""``peftops.multi_lora_linear``: validation, backend dispatch, ``torch.library`` registration.

One frozen layer, ``N`` LoRA adapters in fixed-capacity slots, one batch: each token (or each
row of a ``(B, L, in)`` batch) names its adapter. Backends: ``reference`` and ``triton``
(:mod:`peftops.kernels.multi_lora_linear`, the segmented path).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference as spec
from ..backends import OpImpl, register_impl, resolve_backend
from . import validate as check
from .dispatch import run_backward, run_forward
from .lora_linear import reference_keep_mask  # the same per-token mask as lora_linear's reference

OP = "multi_lora_linear"


# Works on 2-D ``x: (T, in)`` with per-token ids; the public function flattens and expands.
# Returns ``(y, u)``, ``u: (T, r_max)`` the rank-r activations (saved for dB, not differentiable).
@torch.library.custom_op("peftops::multi_lora_linear", mutates_args=())
def _multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_ids: Tensor,
    scales: Tensor,
    bias: Tensor | None,
    ranks: Tensor | None,
    dropout_p: float,
    seed: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(
        OP, backend, x.device, x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed
    )


@_multi_lora_linear.register_fake
def _(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_a.shape[1]))


@torch.library.custom_op(
    "peftops::multi_lora_linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor adapter_ids, Tensor scales, "
    "Tensor? ranks, Tensor lora_u, float dropout_p, Tensor? seed, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _multi_lora_linear_backward(
    grad, x, weight, lora_a, lora_b, adapter_ids, scales, ranks, lora_u, dropout_p, seed, output_mask, backend
):
    return run_backward(
        OP,
        backend,
        x.device,
        grad,
        x,
        weight,
        lora_a,
        lora_b,
        adapter_ids,
        scales,
        ranks,
        lora_u,
        dropout_p,
        seed,
        output_mask,
    )


@_multi_lora_linear_backward.register_fake
def _(grad, x, weight, lora_a, lora_b, adapter_ids, scales, ranks, lora_u, dropout_p, seed, output_mask, backend):
    like = (x, weight, lora_a, lora_b, grad.new_empty(grad.shape[-1]))
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=False))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed, backend = inputs
    _, lora_u = output
    ctx.save_for_backward(x, weight, lora_a, lora_b, adapter_ids, scales, ranks, lora_u, seed)
    ctx.dropout_p, ctx.backend = dropout_p, backend
    ctx.mark_non_differentiable(lora_u)


def _backward(ctx, grad, grad_u):
    x, weight, lora_a, lora_b, adapter_ids, scales, ranks, lora_u, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = _multi_lora_linear_backward(
        grad,
        x,
        weight,
        lora_a,
        lora_b,
        adapter_ids,
        scales,
        ranks,
        lora_u,
        ctx.dropout_p,
        seed,
        [need[0], need[1], need[2], need[3], need[6]],
        ctx.backend,
    )
    dx, dw, da, db, dbias = grads
    return dx, dw, da, db, None, None, dbias, None, None, None, None


_multi_lora_linear.register_autograd(_backward, setup_context=_setup_context)


# -- the reference backend ----------------------------------------------------------------


def reference_forward(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed):
    return spec.multi_lora_linear(
        x,
        weight,
        lora_a,
        lora_b,
        adapter_ids,
        scales,
        bias=bias,
        ranks=ranks,
        keep=reference_keep_mask(x, dropout_p, seed),
        dropout_p=dropout_p,
    )


def reference_backward(
    grad, x, weight, lora_a, lora_b, adapter_ids, scales, ranks, lora_u, dropout_p, seed, output_mask
):
    # The spec recomputes the rank-r activation in float32 rather than use the saved lora_u.
    return spec.multi_lora_linear_backward(
        grad,
        x,
        weight,
        lora_a,
        lora_b,
        adapter_ids,
        scales,
        ranks=ranks,
        keep=reference_keep_mask(x, dropout_p, seed),
        dropout_p=dropout_p,
        output_mask=output_mask,
    )


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


# -- the public op ------------------------------------------------------------------------


def _check_values(ids: Tensor, num: int, scales: Tensor, ranks: Tensor | None, r_max: int) -> bool:
    """The checks that read values back to the host: ids in ``[-1, N)``, finite scales, ranks in
    ``[1, r_max]``, all in one synchronisation (int64 comparisons: an int8 id must not wrap).

    Skipped while ``torch.compile`` traces (a data-dependent branch would break the graph) and
    during CUDA graph capture (reading a value back would invalidate the capture): the op's
    docstring says what unchecked values do. Returns whether the values were checked."""
    if torch.compiler.is_compiling():
        return False
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    ids = ids.to(torch.int64)
    bad = [("adapter_ids", ids, (ids < -1) | (ids >= num)), ("scales", scales, ~torch.isfinite(scales))]
    if ranks is not None:
        ranks = ranks.to(torch.int64)
        bad.append(("ranks", ranks, (ranks < 1) | (ranks > r_max)))
    found = torch.stack([b.any() for _, _, b in bad]).tolist()
    for (name, t, b), failed in zip(bad, found, strict=True):
        if not failed:
            continue
        first = t[b][0].item()
        if name == "adapter_ids":
            raise ValueError(
                f"{OP}: adapter_ids: expected adapter ids (-1 = base layer only) in [-1, {num - 1}], got {first}"
            )
        if name == "scales":
            raise ValueError(f"{OP}: scales: expected finite values, got {first} at index {int(b.nonzero()[0, 0])}")
        raise ValueError(f"{OP}: ranks: expected ranks in [1, {r_max}], got {first}")
    return True


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_ids: Tensor,
    *,
    scales: Tensor,
    bias: Tensor | None = None,
    ranks: Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> Tensor:
    r"""A LoRA layer whose tokens each use their own adapter (the spec:
    :mod:`peftops.reference.multi_lora_linear`).

    ``y_t = x_t W^T + b + s_a * dropout(x_t) A_a[:r_a]^T B_a[:, :r_a]^T`` with ``a = adapter_ids``
    of token t; ``a = -1`` means the base layer only.

    Args:
        x: ``(T, in)``, or ``(B, L, in)`` (any leading dims).
        weight: ``(out, in)`` frozen base weight. bias: ``(out,)`` or ``None``.
        lora_a: ``(N, r_max, in)`` the adapters' A, stacked in slots.
        lora_b: ``(N, out, r_max)`` the adapters' B.
        adapter_ids: a signed integer dtype (int8 to int64; unsigned ones are refused, they
            cannot hold -1), one id per token (``x.shape[:-1]``) or one per row of the first
            dimension (``(B,)`` for ``x: (B, L, in)``); values in ``[-1, N)``.
        scales: ``(N,)`` float, finite, each adapter's ``alpha / r``; constants (no gradient).
        ranks: ``(N,)`` integer in ``[1, r_max]`` or ``None`` (every adapter uses ``r_max``): an
            adapter uses its first ``ranks[a]`` slots; the rest neither compute nor learn.
        dropout_p, training: LoRA dropout on the low-rank path, as :func:`peftops.lora_linear`.

    ``in`` and ``r_max`` must be at least 1; ``N = 0`` (no slots, every id -1) and ``T = 0`` work.

    Returns ``(..., out)`` in the dtype of x. Differentiable w.r.t. x, weight, lora_a, lora_b
    and bias; every adapter gets exactly the gradient its own tokens give it, absent adapters
    get zeros. A base-only token reads no slot: inf or NaN in a slot no token uses changes nothing.

    Checked values: in eager mode, ids, scales and ranks are checked on the host (one
    synchronisation; ``ValueError`` naming the argument). While ``torch.compile`` traces and
    during CUDA graph capture nothing can be read back, so nothing is checked, and every
    backend (reference and triton alike) then gives unchecked values one defined meaning,
    never an error or an out-of-bounds access: an id outside ``[-1, N)`` (``>= N`` or
    ``< -1``) means the base layer only, like -1; a rank above ``r_max`` means ``r_max`` and
    one below 1 means no low-rank term; a non-finite scale is used as given.
    """
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 2)
    check.tensor(OP, "weight", weight, 2)
    check.tensor(OP, "lora_a", lora_a, 3)
    check.tensor(OP, "lora_b", lora_b, 3)
    check.tensor(OP, "adapter_ids", adapter_ids, floating=False)
    check.tensor(OP, "scales", scales, 1)
    if bias is not None:
        check.tensor(OP, "bias", bias, 1)
    if ranks is not None:
        check.tensor(OP, "ranks", ranks, 1, floating=False)
    for name, t in (("adapter_ids", adapter_ids), ("ranks", ranks)):
        if t is not None and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{OP}: {name}: expected an integer tensor, got {t.dtype}")
    # -1 (base layer only) does not exist in an unsigned dtype: uint8 would bring it as 255.
    if not adapter_ids.dtype.is_signed:
        raise TypeError(
            f"{OP}: adapter_ids: expected a signed integer dtype (-1 = base layer only), got {adapter_ids.dtype}"
        )
    if scales.requires_grad:
        raise ValueError(f"{OP}: scales: expected a constant tensor (requires_grad=False), got one that requires grad")
    dropout_p = check.probability(OP, "dropout_p", dropout_p)
    training = check.boolean(OP, "training", training)
    x, weight, lora_a, lora_b, bias = check.autocast(x.device.type, x, weight, lora_a, lora_b, bias)
    check.same_dtype_device(OP, "x", x, (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)))
    for name, t in (("adapter_ids", adapter_ids), ("scales", scales), ("ranks", ranks)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP}: {name}: expected device {x.device} (the device of x), got {t.device}")

    in_f, out_f = x.shape[-1], weight.shape[0]
    num, r_max = lora_a.shape[0], lora_a.shape[1]
    check.shape(OP, "weight", weight, (None, in_f), f"(out, in) with in={in_f} from x")
    check.shape(OP, "lora_a", lora_a, (None, None, in_f), f"(N, r_max, in) with in={in_f} from x")
    # Empty feature or rank dims would leave the kernels' blocks nothing to reduce over: refused
    # here, for every backend, rather than failing in one of them.
    if in_f == 0:
        raise ValueError(f"{OP}: x: expected in_features >= 1 (the last dim), got shape {tuple(x.shape)}")
    if r_max == 0:
        raise ValueError(
            f"{OP}: lora_a: expected r_max >= 1 (dim 1 of (N, r_max, in)), got shape {tuple(lora_a.shape)}"
        )
    check.shape(
        OP,
        "lora_b",
        lora_b,
        (num, out_f, r_max),
        f"(N, out, r_max) with N={num}, r_max={r_max} from lora_a, out={out_f} from weight",
    )
    check.shape(OP, "scales", scales, (num,), f"(N,) with N={num} from lora_a")
    if bias is not None:
        check.shape(OP, "bias", bias, (out_f,), f"(out,) with out={out_f} from weight")
    if ranks is not None:
        check.shape(OP, "ranks", ranks, (num,), f"(N,) with N={num} from lora_a")
    lead = x.shape[:-1]
    if tuple(adapter_ids.shape) == tuple(lead):
        ids = adapter_ids.reshape(-1)
    elif x.dim() >= 3 and tuple(adapter_ids.shape) == tuple(lead[:1]):
        ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
    else:
        raise ValueError(
            f"{OP}: adapter_ids: expected shape {tuple(lead)} (one per token) or "
            f"{tuple(lead[:1])} (one per row, for x with 3+ dims), got {tuple(adapter_ids.shape)}"
        )
    if not _check_values(ids, num, scales, ranks, r_max) and ranks is not None:
        # Unchecked ranks, clamped on the device: the triton kernels mask the rank slots they
        # load by the rank alone, so a rank above r_max would read past the adapter's slice.
        ranks = ranks.clamp(0, r_max)

    x2 = x.reshape(-1, in_f)
    # int64 for every backend: ids compared with N in a narrower dtype would wrap (int8 and N = 200).
    ids = ids.to(torch.int64).contiguous()
    p = dropout_p if training else 0.0
    seed = torch.randint(0, 2**62, (), device=x.device, dtype=torch.int64) if p > 0.0 else None
    args = (x2, weight, lora_a, lora_b, ids, scales, bias, ranks, p, seed)
    backend = resolve_backend(OP, x.device, args)
    y, _ = _multi_lora_linear(*args, backend)
    return y.reshape(*lead, out_f)
