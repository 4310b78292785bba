"""``peftops.prefix_attention``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from ..reference.prefix_attention import prefix_attention_banks, prefix_attention_banks_backward
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
    prefix_ids: Tensor | None = None,
    prefix_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    return run_forward(
        OP, backend, q.device, q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, prefix_ids, prefix_lengths
    )


@_prefix_attention.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend, prefix_ids=None, prefix_lengths=None):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op(
    "peftops::prefix_attention_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
    "Tensor? key_padding_mask, Tensor out, Tensor lse, bool causal, float scale, bool[] output_mask, str backend, "
    "Tensor? prefix_ids=None, Tensor? prefix_lengths=None) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _prefix_attention_backward(
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
    backend,
    prefix_ids=None,
    prefix_lengths=None,
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
        prefix_ids,
        prefix_lengths,
    )


@_prefix_attention_backward.register_fake
def _(
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
    backend,
    prefix_ids=None,
    prefix_lengths=None,
):
    like = (q, k, v, prefix_k, prefix_v)
    return tuple(t.new_empty(t.shape) if need else None for t, need in zip(like, output_mask, strict=False))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, backend, prefix_ids, prefix_lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, prefix_ids, prefix_lengths)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse, prefix_ids, prefix_lengths = ctx.saved_tensors
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
        prefix_ids,
        prefix_lengths,
    )
    return (*grads, None, None, None, None, None, None)


_prefix_attention.register_autograd(_backward, setup_context=_setup_context)


# The registered op takes (key_padding_mask, causal, scale), the order the kernels' entry
# points use; the spec takes the public op's (causal, key_padding_mask, scale). Keywords keep
# the two from being crossed.
def reference_forward(
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, prefix_ids=None, prefix_lengths=None
):
    if prefix_ids is not None:
        return prefix_attention_banks(
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            prefix_ids,
            prefix_lengths,
            causal=causal,
            key_padding_mask=key_padding_mask,
            scale=scale,
        )
    return reference.prefix_attention(
        q, k, v, prefix_k, prefix_v, causal=causal, key_padding_mask=key_padding_mask, scale=scale
    )


def reference_backward(
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
    prefix_ids=None,
    prefix_lengths=None,
):
    # The spec recomputes the probabilities in float32 instead of trusting the saved
    # (rounded) output; kernels use out and lse as FlashAttention does.
    if prefix_ids is not None:
        return prefix_attention_banks_backward(
            grad_out,
            q,
            k,
            v,
            prefix_k,
            prefix_v,
            prefix_ids,
            prefix_lengths,
            causal=causal,
            key_padding_mask=key_padding_mask,
            scale=scale,
            output_mask=output_mask,
        )
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


def _check_bank_args(prefix_k: Tensor | None, prefix_ids: Tensor | None, prefix_lengths: Tensor | None) -> None:
    """Types of the bank arguments (their shapes need q and k, checked later)."""
    for name, t, dims in (("prefix_ids", prefix_ids, 1), ("prefix_lengths", prefix_lengths, 1)):
        if t is None:
            continue
        check.tensor(OP, name, t, dims, floating=False)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"{OP}: {name}: expected an integer tensor, got {t.dtype}")
    if prefix_ids is not None:
        # -1 (no prefix) does not exist in an unsigned dtype: uint8 would bring it as 255.
        if not prefix_ids.dtype.is_signed:
            raise TypeError(
                f"{OP}: prefix_ids: expected a signed integer dtype (-1 = no prefix), got {prefix_ids.dtype}"
            )
        if prefix_k is None:
            raise ValueError(f"{OP}: prefix_ids: expected None without prefix banks, got a tensor and prefix_k=None")
    elif prefix_lengths is not None:
        raise ValueError(
            f"{OP}: prefix_lengths: expected None without prefix_ids (lengths are per bank slot), got a tensor"
        )


def _check_bank_values(ids: Tensor, lengths: Tensor, num: int, p_max: int) -> bool:
    """Ids in ``[-1, N)`` and lengths in ``[0, P_max]``, in one synchronisation; skipped (returns
    False) while ``torch.compile`` traces or a CUDA graph captures, as multi_lora_linear's."""
    if torch.compiler.is_compiling():
        return False
    if ids.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    bad_ids = (ids < -1) | (ids >= num)
    bad_lengths = (lengths < 0) | (lengths > p_max)
    found_ids, found_lengths = torch.stack([bad_ids.any(), bad_lengths.any()]).tolist()
    if found_ids:
        raise ValueError(
            f"{OP}: prefix_ids: expected slot ids (-1 = no prefix) in [-1, {num - 1}], got {ids[bad_ids][0].item()}"
        )
    if found_lengths:
        raise ValueError(
            f"{OP}: prefix_lengths: expected lengths in [0, {p_max}] (P_max of the bank), got "
            f"{lengths[bad_lengths][0].item()}"
        )
    return True


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
    prefix_ids: Tensor | None = None,
    prefix_lengths: Tensor | None = None,
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
        prefix_ids: ``(B,)`` signed integer, or ``None``. Given, ``prefix_k, prefix_v`` are banks
            ``(N, Hkv, P_max, D)`` of N prefixes in slots and row b uses slot ``prefix_ids[b]``
            (-1: no prefix); values in ``[-1, N)``. ``N = 0`` (an empty bank, every id -1) works.
        prefix_lengths: ``(N,)`` integer in ``[0, P_max]`` (needs ``prefix_ids``; default every
            slot ``P_max``): a row sees only the first ``prefix_lengths[slot]`` keys of its slot.
            The triton kernels stop each row's prefix loop at its length, so a short prefix
            costs its own length, not ``P_max``.

    Returns ``(B, Hq, L, D)``; a query that sees no key gets zeros (not NaN).

    With banks, each slot's gradient is exactly the sum of its rows' prefix gradients: slots no
    row names, and positions past a slot's length, get zeros (and are never read, so inf or
    NaN there changes nothing). Checked values: in eager mode ids and lengths are checked on the
    host (one synchronisation, ``ValueError`` naming the argument). While ``torch.compile``
    traces and during CUDA graph capture nothing can be read back, so nothing is checked and
    every backend gives unchecked values one meaning, never an error or an out-of-bounds
    access: an id outside ``[-1, N)`` means no prefix, like -1; a length is clamped to
    ``[0, P_max]``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(OP, name, t, 4)
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError(
            f"{OP}: prefix_k, prefix_v: expected both tensors or both None, got "
            f"{type(prefix_k).__name__} and {type(prefix_v).__name__}"
        )
    if prefix_k is not None:
        banks = prefix_ids is not None
        check.tensor(OP, "prefix_k", prefix_k, 4 if banks else (3, 4))
        check.tensor(OP, "prefix_v", prefix_v, 4 if banks else (3, 4))
    _check_bank_args(prefix_k, prefix_ids, prefix_lengths)
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
    if prefix_ids is not None and prefix_k is not None and prefix_v is not None:
        check.shape(
            OP,
            "prefix_k",
            prefix_k,
            (None, hkv, None, head_dim),
            f"a bank (N, Hkv, P_max, D) with Hkv={hkv}, D={head_dim} from q and k (prefix_ids given)",
        )
        check.shape(OP, "prefix_v", prefix_v, tuple(prefix_k.shape), "(the shape of prefix_k)")
        num, p_max = prefix_k.shape[0], prefix_k.shape[2]
        for name, given in (("prefix_ids", prefix_ids), ("prefix_lengths", prefix_lengths)):
            if given is not None and given.device != q.device:
                raise ValueError(f"{OP}: {name}: expected device {q.device} (the device of q), got {given.device}")
        check.shape(OP, "prefix_ids", prefix_ids, (batch,), f"(B,) with B={batch} from q")
        if prefix_lengths is None:
            prefix_lengths = torch.full((num,), p_max, dtype=torch.int64, device=q.device)
        check.shape(OP, "prefix_lengths", prefix_lengths, (num,), f"(N,) with N={num} from prefix_k")
        # int64 for every backend: an int8 id compared with N = 200 would wrap.
        prefix_ids = prefix_ids.to(torch.int64).contiguous()
        prefix_lengths = prefix_lengths.to(torch.int64).contiguous()
        if not _check_bank_values(prefix_ids, prefix_lengths, num, p_max):
            # Unchecked: the kernels bound each row's prefix loop by its length alone, so a
            # length above P_max would read past the slot.
            prefix_lengths = prefix_lengths.clamp(0, p_max)
    elif prefix_k is not None and prefix_v is not None:  # both or neither: checked above
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

    args = (q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, prefix_ids, prefix_lengths)
    backend = resolve_backend(OP, q.device, args)
    # The bank arguments come after the backend in the registered ops, so that calls written
    # before banks existed keep their positions.
    out, _ = _prefix_attention(*args[:8], backend, prefix_ids, prefix_lengths)
    return out
