"""``peftops.prefix_attention``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from . import validate as check
from .dispatch import run_backward, run_forward

OP = "prefix_attention"


@torch.library.custom_op("peftops::prefix_attention", mutates_args=())
def _prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    key_padding_mask: Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(OP, backend, q.device, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)


@_prefix_attention.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op(
    "peftops::prefix_attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
    "Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float scale, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _prefix_attention_backward(
    grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, output_mask, backend
):
    return run_backward(
        OP,
        backend,
        q.device,
        grad_out,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        key_padding_mask,
        out,
        lse,
        causal,
        scale,
        output_mask,
    )


@_prefix_attention_backward.register_fake
def _(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, output_mask, backend):
    like = (q, k, v, prefix_k, prefix_v)
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=False))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse = ctx.saved_tensors
    grads = _prefix_attention_backward(
        grad_out,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        key_padding_mask,
        out,
        lse,
        ctx.causal,
        ctx.scale,
        list(ctx.needs_input_grad[:5]),
        ctx.backend,
    )
    return (*grads, None, None, None, None)


_prefix_attention.register_autograd(_backward, setup_context=_setup_context)


# The registered op takes (key_padding_mask, causal, scale), the order the kernels' entry
# points use; the spec takes the public op's (causal, key_padding_mask, scale). Keywords keep
# the two from being crossed.
def reference_forward(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale):
    return reference.prefix_attention(
        q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask, scale=scale
    )


def reference_backward(grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, causal, scale, output_mask):
    # The spec recomputes the probabilities in float32 instead of trusting the saved
    # (rounded) output; kernels use out and lse as FlashAttention does.
    return reference.prefix_attention_backward(
        grad_out,
        q,
        k,
        v,
        prefix_k,
        prefix_v,
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        output_mask=output_mask,
    )


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    *,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    r"""Attention over ``[prefix ; sequence]`` keys, with bottom-right causal alignment.

    Args:
        q: ``(B, Hq, L, D)``.
        k, v: ``(B, Hkv, S, D)`` with ``Hq % Hkv == 0`` (grouped-query attention).
        prefix_k, prefix_v: ``(Hkv, P, D)`` shared by the batch, ``(B, Hkv, P, D)`` per row,
            or both ``None``. Every query sees every prefix key.
        causal: query ``i`` sees sequence key ``j`` iff ``j <= i + (S - L)``.
        key_padding_mask: ``(B, S)`` bool, True = attend (masks sequence keys only).
        scale: defaults to ``1 / sqrt(D)``.

    Returns ``(B, Hq, L, D)``; a query that sees no key gets zeros (not NaN).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(OP, name, t, 4)
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError(
            f"{OP}: prefix_k, prefix_v: expected both tensors or both None, got "
            f"{type(prefix_k).__name__} and {type(prefix_v).__name__}"
        )
    if prefix_k is not None:
        check.tensor(OP, "prefix_k", prefix_k, (3, 4))
        check.tensor(OP, "prefix_v", prefix_v, (3, 4))
    if key_padding_mask is not None:
        check.tensor(OP, "key_padding_mask", key_padding_mask, 2, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(
                f"{OP}: key_padding_mask: expected dtype torch.bool (True = attend), got {key_padding_mask.dtype}"
            )
    causal = check.boolean(OP, "causal", causal)
    q, k, v, prefix_k, prefix_v = check.autocast(q.device.type, q, k, v, prefix_k, prefix_v)
    check.same_dtype_device(OP, "q", q, (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)))
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        raise ValueError(
            f"{OP}: key_padding_mask: expected device {q.device} (the device of q), got {key_padding_mask.device}"
        )

    batch, hq, _, head_dim = q.shape
    hkv, seq_len = k.shape[1], k.shape[2]
    check.shape(OP, "k", k, (batch, None, None, head_dim), f"(B, Hkv, S, D) with B={batch}, D={head_dim} from q")
    check.shape(OP, "v", v, tuple(k.shape), "(the shape of k)")
    if head_dim == 0:
        raise ValueError(f"{OP}: q: expected a head dim D >= 1, got shape {tuple(q.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{OP}: k: expected a number of heads Hkv that divides Hq={hq} (grouped-query attention), got Hkv={hkv}"
        )
    if prefix_k is not None and prefix_v is not None:  # both or neither: checked above
        lead = (hkv,) if prefix_k.dim() == 3 else (batch, hkv)
        check.shape(
            OP,
            "prefix_k",
            prefix_k,
            (*lead, None, head_dim),
            f"(Hkv, P, D) or (B, Hkv, P, D) with B={batch}, Hkv={hkv}, D={head_dim} from q and k",
        )
        check.shape(OP, "prefix_v", prefix_v, tuple(prefix_k.shape), "(the shape of prefix_k)")
    if key_padding_mask is not None:
        check.shape(OP, "key_padding_mask", key_padding_mask, (batch, seq_len), f"(B, S) with B={batch}, S={seq_len}")
    scale = reference.default_scale(head_dim) if scale is None else check.finite_float(OP, "scale", scale)

    args = (q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale)
    backend = resolve_backend(OP, q.device, args)
    out, _ = _prefix_attention(*args, backend)
    return out
