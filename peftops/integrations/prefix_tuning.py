"""Prefix tuning on transformers models, computing what peft's ``PrefixTuningConfig`` computes,
with the prefix read in place by :func:`peftops.prefix_attention` instead of living in the KV cache.

:func:`apply_prefix_tuning` keeps one :class:`peftops.nn.PrefixKV` as a submodule of the model
(``model.peftops_prefix``; the base's state_dict keys are unchanged), freezes the base, registers
an attention function ``"peftops_prefix"`` with transformers' ``AttentionInterface`` (and a mask
function under the same name with ``AttentionMaskInterface``) and switches the model to it. Each
attention layer then runs ``prefix_attention(q, k, v, prefix_k, prefix_v)`` on the model's own
projected, RoPE'd queries and keys, with its layer's ``(Hkv, P, D)`` prefix (``module.layer_idx``).

What peft does, and so what this does (peft 0.21, transformers 5):

* peft puts the prefix into the KV cache, so the model numbers the real tokens from
  ``num_virtual_tokens`` on: ``position_ids`` it makes itself are ``past + arange(L) + P``, and
  ``position_ids`` given to it (by the user, or by ``generate()`` from the attention mask) are
  shifted by ``P`` (``PeftModel._adjust_prompt_learning_kwargs``). A forward pre-hook on the
  decoder stack (``model.base_model``) does the same shift; the cache here holds only real tokens.
* every query sees every prefix key; the attention mask (2-D, ``(B, S)``, 1 = attend) masks the
  sequence keys only (peft prepends ones for the prefix); causal masking is bottom-right, as with
  the prefix in the cache.
* the prefix is cast to the model's dtype at use (peft casts it to ``base_model_torch_dtype``);
  it is kept in float32 (float64 for a float64 model), as peft keeps its prompt encoder.

Per-row prefixes of one length: :func:`set_prefix_bank` gives the model a bank (a
``(N, layers, 2, Hkv, P, D)`` tensor, or a list of ``PrefixKV``) and :func:`set_prefix_ids` picks
one entry per batch row; the op then gets ``(B, Hkv, P, D)`` prefixes. ``set_prefix_ids(model,
None)`` goes back to the shared prefix.

Per-row prefixes of their own lengths: ``apply_prefix_tuning(model, P_max, capacity=N)`` gives the
model a :class:`peftops.nn.MultiPrefixKV` (``model.peftops_prefix``, N fixed slots) instead of one
prefix; :func:`add_prefix` / :func:`remove_prefix` fill and free slots without changing a shape,
and :func:`set_prefix_ids` names each row's prefix (or none). Row ``i`` then computes exactly what
a single-prefix model of its prefix's length computes: its positions are shifted by its own
length (gathered on the device from the slots' lengths, no host read), a row without a prefix by
nothing, as the base model.

Static caches (``transformers.StaticCache``) work: their keys are the whole preallocated cache, so
the keys not written yet are masked from the cache's length (a device tensor, no host read).

Limits (each an error naming it, never a silent difference): attention dropout, soft-capping,
attention sinks and position biases; 4-D attention masks; sliding-window layers once
``P + S`` exceeds the window (peft's prefix would slide out of it).

:func:`peft_prefix_state` / :func:`load_peft_prefix` convert to and from peft's checkpoint
(``prompt_embeddings``: ``(P, layers * 2 * Hkv * D)``, per virtual token the layers' keys and
values, head-major, the layout peft's ``get_prompt`` reads). With ``prefix_projection`` peft saves
what the MLP produces, not the MLP, and so does :func:`peft_prefix_state`; a loaded checkpoint is
a plain prefix either way, as in peft's inference mode.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import check_not_wrapped
from ..nn import MultiPrefixKV, PrefixKV
from ..nn._base import positive_int
from ..nn._slots import AdapterRef
from ..nn.multi_prefix import MultiPrefixBatch
from ..nn.surgery import freeze_base
from ..ops.prefix_attention import prefix_attention
from .hf_call import cached_length, call_kwargs
from .peft_format import METADATA_FIELDS

__all__ = [
    "ATTN_IMPLEMENTATION",
    "add_prefix",
    "apply_prefix_tuning",
    "load_peft_prefix",
    "load_prefix_tuning",
    "peft_prefix_state",
    "remove_prefix",
    "remove_prefix_tuning",
    "set_prefix_bank",
    "set_prefix_ids",
]

ATTN_IMPLEMENTATION = "peftops_prefix"
ATTR = "peftops_prefix"
BANK_ATTR = "peftops_prefix_bank"
_STATE = "_peftops_prefix_tuning"
WEIGHTS_KEY = "prompt_embeddings"

_METADATA_FIELDS = METADATA_FIELDS
# Read and checked against the model.
_SHAPE_FIELDS = {"num_virtual_tokens", "token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"}
# Training-time only: a checkpoint holds the prefix they produced (peft saves the MLP's output).
_TRAINING_FIELDS = {"init_weights", "encoder_hidden_size", "prefix_projection"}
_OFF_FIELDS = {"modules_to_save"}


@dataclasses.dataclass
class _State:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_virtual_tokens: int
    previous_attn: str | None
    requires_grad: dict[str, bool]
    handles: list[Any]
    bound: list[nn.Module]
    ids: Tensor | None = None
    # This forward's prefixes, computed once by the pre-hook, outside any layer, so that a
    # checkpointed layer's recomputation runs the same ops as its forward.
    shared: Tensor | None = None
    bank: Tensor | None = None
    # capacity models (a MultiPrefixKV): this forward's slot banks, ids and lengths.
    multi: bool = False
    batch: MultiPrefixBatch | None = None
    # A static cache returns all its preallocated keys: those at or past `past` + the new tokens
    # are not written yet. `past` is the cache's own length tensor (copied), so no host read.
    static: bool = False
    past: int | Tensor = 0


def _transformers():
    try:
        import transformers
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as e:  # pragma: no cover - the hf extra is part of the test extra
        raise ImportError("peftops prefix tuning needs transformers (pip install 'peftops[hf]')") from e
    return transformers, AttentionInterface, AttentionMaskInterface


def _check_model(owner: str, model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    transformers, _, _ = _transformers()
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if (
        not isinstance(model, transformers.PreTrainedModel)
        or not getattr(model, "_supports_attention_backend", False)
        or (callable(can_set) and not can_set())
    ):
        raise TypeError(
            f"{owner}: model: expected a transformers model whose attention runs through the AttentionInterface "
            f"registry, got {type(model).__name__}"
        )
    return model


def _state(owner: str, model: nn.Module) -> _State:
    state = model.__dict__.get(_STATE)
    if state is None:
        raise ValueError(
            f"{owner}: model: expected a model prepared by apply_prefix_tuning, got {type(model).__name__}"
        )
    return state


def _shape(owner: str, model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head dim), read from the config as peft's ``_prepare_prompt_learning_config`` does."""
    config: Any = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not layers or not heads:
        raise ValueError(
            f"{owner}: model: expected num_hidden_layers and num_attention_heads in the config of "
            f"{type(model).__name__}, got {layers} and {heads}"
        )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if hidden else None)
    if not head_dim:
        raise ValueError(f"{owner}: model: expected head_dim or hidden_size in the config, got neither")
    return int(layers), int(kv_heads), int(head_dim)


def _adapter_dtype(model: nn.Module) -> torch.dtype:
    param = next(model.parameters(), None)
    return torch.float64 if param is not None and param.dtype == torch.float64 else torch.float32


def _stacked_bank(model: nn.Module) -> Tensor | None:
    bank = model.__dict__.get("_peftops_prefix_bank_tensor")
    if bank is not None:
        return bank
    modules = getattr(model, BANK_ATTR, None)
    if modules is None:
        return None
    return torch.stack([p.prefixes() for p in modules])


def _past_length(cache: object) -> int | Tensor:
    """Tokens already in the cache; a static cache's own length tensor, copied (its layers add to
    it in place during the forward), so that a captured decode step reads no host value."""
    if cache is not None and getattr(cache, "is_compileable", False):
        past = cache.get_seq_length()  # type: ignore[attr-defined]
        return past.clone() if isinstance(past, Tensor) else int(past)
    return cached_length(cache)


def _tokens(kw: dict) -> Tensor | None:
    tokens = kw.get("input_ids")
    return kw.get("inputs_embeds") if tokens is None else tokens


def _multi_batch(state: _State, bank: MultiPrefixKV, rows: int) -> tuple[MultiPrefixBatch, Tensor]:
    """This forward's slot banks, ids and lengths, and each row's position shift ``(B,)``: its
    prefix's length, 0 for no prefix (-1, and under capture an unchecked id outside the slots)."""
    owner = "set_prefix_ids"
    ids = state.ids
    if ids is None:
        raise ValueError(
            f"{owner}: ids: expected each row's prefix (set_prefix_ids) for a model with prefix slots "
            f"(apply_prefix_tuning(capacity={bank.capacity})), got none"
        )
    if ids.shape[0] != rows:
        raise ValueError(
            f"{owner}: ids: expected one id per batch row ({rows} rows in this call; generate() with "
            f"num_beams or num_return_sequences > 1 repeats each row: peftops.generate(model, input_ids, "
            f"prefix_ids=...) repeats the ids with it), got {ids.shape[0]}"
        )
    # The caller's tensor as it is now (kept by reference: a replayed graph sees its new values).
    ids = ids.to(bank.prefix.device)
    _check_ids(bank, ids)
    lengths = bank.prefix_lengths
    # Slot `capacity` is a zero length: where ids outside the slots land, as the op reads them.
    padded = torch.cat([lengths, lengths.new_zeros(1)])
    known = (ids >= 0) & (ids < bank.capacity)
    shift = padded[torch.where(known, ids.long(), bank.capacity)]
    layers = [(bank.prefix[i, 0], bank.prefix[i, 1]) for i in range(bank.num_layers)]
    return MultiPrefixBatch(layers, ids, lengths), shift


def _check_ids(bank: MultiPrefixKV, ids: Tensor) -> None:
    """Eager only (one read-back): ids in [-1, capacity) naming slots in use. While compiling or
    capturing nothing is read back, and an id outside the slots or naming a free slot (length 0)
    means no prefix."""
    if torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    out = (ids < -1) | (ids >= bank.capacity)
    free = (ids >= 0) & ~out & ~bank.in_use[ids.long().clamp(0, bank.capacity - 1)]
    found_out, found_free = torch.stack([out.any(), free.any()]).tolist()
    if found_out or found_free:
        bad = int(ids[out if found_out else free][0])
        used = sorted(bank.adapters.values())
        why = f"outside [-1, {bank.capacity})" if found_out else "a free slot"
        raise ValueError(f"set_prefix_ids: ids: expected slots in use {used} or -1 (no prefix), got {bad}, {why}")


def _decoder_pre_hook(owner_model: nn.Module):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        state = owner_model.__dict__.get(_STATE)
        if state is None:
            return None
        kw = call_kwargs(module, args, kwargs)
        cache = kw.get("cache", kw.get("past_key_values"))
        state.static = cache is not None and getattr(cache, "is_compileable", False)
        tokens = _tokens(kw)
        if tokens is None:
            return None  # the model's own error says what is missing
        shift: int | Tensor = state.num_virtual_tokens
        if state.multi:
            state.batch, row_shift = _multi_batch(state, getattr(owner_model, ATTR), tokens.shape[0])
            shift = row_shift.unsqueeze(1)  # (B, 1): each row by its own prefix's length
        else:
            state.shared = getattr(owner_model, ATTR).prefixes()
            state.bank = _stacked_bank(owner_model) if state.ids is not None else None
        position_ids = kw.get("position_ids")
        past = _past_length(cache) if (position_ids is None or state.static) else 0
        state.past = past
        if position_ids is None:
            position_ids = (torch.arange(tokens.shape[1], device=tokens.device) + past).unsqueeze(0)
        # peft's prefix sits in the cache, in front of every real token. Where the new tokens go in
        # the cache stays as it is: this cache holds the real tokens only.
        kw["position_ids"] = position_ids + shift
        return (), kw

    return hook


def _layer_prefix(state: _State, module: nn.Module, layer: int, batch: int) -> tuple[Tensor, Tensor]:
    if state.ids is None:
        allp = (
            state.shared
            if state.shared is not None
            else getattr(module.__dict__["_peftops_prefix_owner"], ATTR).prefixes()
        )
        return allp[layer, 0], allp[layer, 1]
    bank = state.bank
    if bank is None:
        bank = _stacked_bank(module.__dict__["_peftops_prefix_owner"])
    assert bank is not None  # set_prefix_ids refuses ids without a bank
    if state.ids.shape[0] != batch:
        raise ValueError(
            f"set_prefix_ids: ids: expected one id per batch row ({batch} rows in this call; generate() with "
            f"num_beams or num_return_sequences > 1 repeats each row: peftops.generate(model, input_ids, "
            f"prefix_ids=...) repeats the ids with it), got {state.ids.shape[0]}"
        )
    rows = bank.index_select(0, state.ids.to(bank.device))[:, layer]  # (B, 2, Hkv, P, D)
    return rows[:, 0], rows[:, 1]


def _attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: ``(B, H, L, D)`` queries, ``(B, Hkv, S, D)`` keys and values in,
    ``(B, L, H, D)`` out."""
    owner = "apply_prefix_tuning"
    model = module.__dict__.get("_peftops_prefix_owner")
    state = model.__dict__.get(_STATE) if model is not None else None
    if state is None:
        raise RuntimeError(
            f"{owner}: {type(module).__name__}: attention implementation {ATTN_IMPLEMENTATION!r} is set, but this "
            "module belongs to no model prepared by apply_prefix_tuning"
        )
    if dropout:
        raise ValueError(f"{owner}: attention dropout: expected 0 (prefix_attention has none), got {dropout}")
    for name in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{owner}: {name}: expected None (prefix_attention does not apply it), got a value")
    layer = getattr(module, "layer_idx", None)
    if not isinstance(layer, int) or not 0 <= layer < state.num_layers:
        raise ValueError(
            f"{owner}: {type(module).__name__}.layer_idx: expected an int in [0, {state.num_layers}), got {layer!r}"
        )
    batch, seq = query.shape[0], key.shape[2]
    window = kwargs.get("sliding_window")
    if window is not None and state.num_virtual_tokens + seq > window:
        raise ValueError(
            f"{owner}: sliding_window: expected num_virtual_tokens + keys <= the window ({window}) of layer {layer}, "
            f"got {state.num_virtual_tokens} + {seq} (peft's prefix would slide out of the window)"
        )
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"{owner}: attention_mask: expected a 2-D (B, S) padding mask, got shape {tuple(attention_mask.shape)}"
            )
        if attention_mask.shape != (batch, seq):
            raise ValueError(
                f"{owner}: attention_mask: expected shape ({batch}, {seq}) (batch, keys of layer {layer}), got "
                f"{tuple(attention_mask.shape)}"
            )
        key_padding_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if state.static:
        key, value, key_padding_mask = _written_keys(state, query.shape[2], key, value, key_padding_mask)
    banks: dict[str, Tensor] = {}
    if state.multi:
        if state.batch is None:
            raise RuntimeError(f"{owner}: layer {layer} ran without the decoder's pre-hook (no prefix ids)")
        prefix_k, prefix_v = state.batch.layers[layer]
        banks = {"prefix_ids": state.batch.prefix_ids, "prefix_lengths": state.batch.prefix_lengths}
    else:
        prefix_k, prefix_v = _layer_prefix(state, module, layer, batch)
    out = prefix_attention(
        query,
        key,
        value,
        prefix_k.to(query.dtype),
        prefix_v.to(query.dtype),
        causal=bool(causal),
        key_padding_mask=key_padding_mask,
        scale=scaling,
        **banks,
    )
    return out.transpose(1, 2).contiguous(), None


def _written_keys(
    state: _State, new: int, key: Tensor, value: Tensor, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """A static cache's keys are all its slots, the first ``past + new`` written: mask the rest.
    With several new tokens the op's bottom-right causal alignment needs the written keys last,
    so the slots are rotated by ``past + new`` (a gather by device indices, no host read)."""
    batch, seq = key.shape[0], key.shape[2]
    slots = torch.arange(seq, device=key.device)
    written = state.past + new
    mask = (slots < written).expand(batch, seq)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask
    if new > 1:
        order = (slots + written) % seq
        key, value, mask = key.index_select(2, order), value.index_select(2, order), mask.index_select(1, order)
    return key, value, mask


def _mask(*args: Any, kv_length: int, attention_mask: Tensor | None = None, **kwargs: Any) -> Tensor | None:
    """transformers mask function: the 2-D padding mask of the keys (the op does causality itself)."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-1] < kv_length:
        # A static cache's keys are all its slots: those past the mask are not written yet.
        attention_mask = torch.nn.functional.pad(attention_mask, (0, kv_length - attention_mask.shape[-1]))
    return attention_mask[:, -kv_length:]


def _register() -> None:
    _, attention, masks = _transformers()
    attention.register(ATTN_IMPLEMENTATION, _attention_forward)
    masks.register(ATTN_IMPLEMENTATION, _mask)


def _set_attn(model: Any, name: str) -> None:
    model.set_attn_implementation(name)


def apply_prefix_tuning(
    model: nn.Module, num_virtual_tokens: int, reparam_hidden: int | None = None, *, capacity: int | None = None
) -> nn.Module:
    """Add a trainable prefix of ``num_virtual_tokens`` keys and values to every attention layer of
    the transformers ``model`` (in place), freeze everything else, and return ``model``.

    ``reparam_hidden``: train the prefix through peft's ``prefix_projection`` MLP of that width
    (``PrefixKV(reparam_hidden=...)``). The prefix is ``model.peftops_prefix``.

    ``capacity``: instead of one prefix, ``capacity`` slots for prefixes of up to
    ``num_virtual_tokens`` keys each (``model.peftops_prefix`` is then a
    :class:`peftops.nn.MultiPrefixKV`, empty): :func:`add_prefix` fills one, :func:`set_prefix_ids`
    names each row's. Not with ``reparam_hidden``.

    Raises ``TypeError`` for a model whose attention does not go through transformers'
    ``AttentionInterface``.
    """
    owner = "apply_prefix_tuning"
    check_not_wrapped(owner, model)
    _check_model(owner, model)
    positive_int(owner, "num_virtual_tokens", num_virtual_tokens)
    if reparam_hidden is not None:
        positive_int(owner, "reparam_hidden", reparam_hidden)
    if capacity is not None:
        positive_int(owner, "capacity", capacity)
        if reparam_hidden is not None:
            raise ValueError(
                f"{owner}: reparam_hidden: expected None with capacity (prefix slots are plain prefixes), got "
                f"{reparam_hidden}"
            )
    if _STATE in model.__dict__ or hasattr(model, ATTR):
        raise ValueError(f"{owner}: model: expected a model without prefix tuning, got one that has it already")
    layers, kv_heads, head_dim = _shape(owner, model)
    param = next(model.parameters(), None)
    if capacity is not None:
        slots = MultiPrefixKV(
            layers,
            kv_heads,
            capacity,
            num_virtual_tokens,
            head_dim,
            device=param.device if param is not None else None,
            dtype=_adapter_dtype(model),
        )
        _install(model, slots, (layers, kv_heads, head_dim))
        return model
    prefix = PrefixKV(
        layers,
        kv_heads,
        num_virtual_tokens,  # PrefixKV checks it and names the argument
        head_dim,
        reparam_hidden,
        device=param.device if param is not None else None,
        dtype=_adapter_dtype(model),
    )
    _install(model, prefix, (layers, kv_heads, head_dim))
    return model


def _install(model: nn.Module, prefix: PrefixKV | MultiPrefixKV, shape: tuple[int, int, int]) -> None:
    _register()
    layers, kv_heads, head_dim = shape
    previous = getattr(model.config, "_attn_implementation", None)
    multi = isinstance(prefix, MultiPrefixKV)
    state = _State(
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        num_virtual_tokens=prefix.prefix_len_max if isinstance(prefix, MultiPrefixKV) else prefix.prefix_len,
        previous_attn=previous,
        requires_grad={n: q.requires_grad for n, q in model.named_parameters()},
        handles=[],
        bound=[],
        multi=multi,
    )
    freeze_base(model)  # adapters added by an earlier apply_* keep training
    model.add_module(ATTR, prefix)
    for q in prefix.parameters():
        q.requires_grad_(True)
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            # A plain attribute (not a submodule): the attention function finds its model through it.
            module.__dict__["_peftops_prefix_owner"] = model
            state.bound.append(module)
    decoder = getattr(model, "base_model", model)
    state.handles.append(decoder.register_forward_pre_hook(_decoder_pre_hook(model), with_kwargs=True, prepend=True))
    model.__dict__[_STATE] = state
    _set_attn(model, ATTN_IMPLEMENTATION)


def remove_prefix_tuning(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_prefix_tuning`: drop the prefix (and bank), the hook and the attention
    function, and restore the base's ``requires_grad`` flags. Returns ``model``."""
    state = _state("remove_prefix_tuning", model)
    for handle in state.handles:
        handle.remove()
    for module in state.bound:
        module.__dict__.pop("_peftops_prefix_owner", None)
    for name in (ATTR, BANK_ATTR):
        if hasattr(model, name):
            delattr(model, name)
    model.__dict__.pop("_peftops_prefix_bank_tensor", None)
    del model.__dict__[_STATE]
    _set_attn(model, state.previous_attn or "sdpa")
    for name, q in model.named_parameters():
        q.requires_grad_(state.requires_grad.get(name, q.requires_grad))
    return model


# -- per-row prefixes --------------------------------------------------------------------------------


def set_prefix_bank(model: nn.Module, bank: Tensor | Sequence[PrefixKV] | None) -> nn.Module:
    """Give ``model`` (prepared by :func:`apply_prefix_tuning`) ``N`` prefixes to choose from per row:
    a ``(N, layers, 2, Hkv, P, D)`` tensor (kept by reference, so a tensor that requires grad trains)
    or a list of ``PrefixKV`` (registered as ``model.peftops_prefix_bank``), all of the model's
    shape and the same ``P``. ``None`` removes the bank and the ids. Returns ``model``."""
    owner = "set_prefix_bank"
    if bank is not None and not isinstance(bank, Tensor):
        check_not_wrapped(owner, model)  # a list registers its PrefixKVs' parameters on the model
    state = _state(owner, model)
    if state.multi:
        raise ValueError(
            f"{owner}: model: expected a model with one shared prefix, got one with prefix slots (capacity): "
            "add_prefix fills them"
        )
    model.__dict__.pop("_peftops_prefix_bank_tensor", None)
    if hasattr(model, BANK_ATTR):
        delattr(model, BANK_ATTR)
    state.ids = None
    if bank is None:
        return model
    want = (state.num_layers, 2, state.num_kv_heads, None, state.head_dim)
    if isinstance(bank, Tensor):
        if (
            bank.dim() != 6
            or bank.shape[0] < 1
            or any(w is not None and w != g for w, g in zip(want, bank.shape[1:], strict=True))
        ):
            raise ValueError(
                f"{owner}: bank: expected shape (N, {state.num_layers}, 2, {state.num_kv_heads}, P, "
                f"{state.head_dim}), got {tuple(bank.shape)}"
            )
        if not bank.is_floating_point():
            raise TypeError(f"{owner}: bank: expected a floating tensor, got {bank.dtype}")
        model.__dict__["_peftops_prefix_bank_tensor"] = bank
        return model
    if isinstance(bank, (str, bytes)) or not isinstance(bank, Sequence) or len(bank) == 0:
        raise TypeError(
            f"{owner}: bank: expected a 6-D tensor or a non-empty list of PrefixKV, got {type(bank).__name__}"
        )
    lengths = set()
    for i, p in enumerate(bank):
        if not isinstance(p, PrefixKV):
            raise TypeError(f"{owner}: bank[{i}]: expected a PrefixKV, got {type(p).__name__}")
        got = (p.num_layers, 2, p.num_kv_heads, None, p.head_dim)
        if got != want:
            raise ValueError(
                f"{owner}: bank[{i}]: expected a PrefixKV with num_layers={state.num_layers}, "
                f"num_kv_heads={state.num_kv_heads}, head_dim={state.head_dim}, got {p.num_layers}, "
                f"{p.num_kv_heads}, {p.head_dim}"
            )
        lengths.add(p.prefix_len)
    if len(lengths) > 1:
        raise ValueError(f"{owner}: bank: expected one prefix_len for every PrefixKV, got {sorted(lengths)}")
    model.add_module(BANK_ATTR, nn.ModuleList(bank))
    return model


def set_prefix_ids(model: nn.Module, ids: Tensor | Sequence[AdapterRef] | None) -> nn.Module:
    """Choose, for each batch row of the next calls, an entry of the bank (:func:`set_prefix_bank`):
    ``ids`` ``(B,)`` ints in ``[0, N)``. ``None``: every row uses the shared ``model.peftops_prefix``
    again. Returns ``model``.

    For a model with prefix slots (``apply_prefix_tuning(..., capacity=)``): ``ids`` is a list of
    prefix names, slot ints or ``None`` (no prefix), or a ``(B,)`` signed integer tensor (-1: no
    prefix), kept by reference: change it in place (``ids.copy_(...)``) and the next call, or a
    replayed CUDA graph, uses the new values. ``None`` clears the ids. Tensor values are checked
    at each eager call (``ValueError`` for an id outside ``[-1, capacity)`` or naming a free slot);
    see :class:`peftops.nn.MultiPrefixKV` for what capture and compilation do instead."""
    owner = "set_prefix_ids"
    state = _state(owner, model)
    if state.multi:
        state.ids = None if ids is None else _slot_ids(owner, getattr(model, ATTR), ids)
        return model
    if ids is None:
        state.ids = None
        return model
    bank = _stacked_bank(model)
    if bank is None:
        raise ValueError(f"{owner}: model: expected a bank of prefixes (set_prefix_bank) to choose from, got none")
    if not isinstance(ids, Tensor):
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"{owner}: ids: expected a 1-D integer tensor or a list of ints, got {type(ids).__name__}")
        if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"{owner}: ids: expected ints, got {[type(i).__name__ for i in ids]}")
        ids = torch.tensor(list(ids), dtype=torch.long)
    if ids.dtype in (torch.bool,) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"{owner}: ids: expected an integer tensor, got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] < 1:
        raise ValueError(f"{owner}: ids: expected shape (B,) with B >= 1, got {tuple(ids.shape)}")
    n = bank.shape[0]
    if bool(((ids < 0) | (ids >= n)).any()):
        raise ValueError(f"{owner}: ids: expected values in [0, {n}) (the bank's entries), got {ids.tolist()}")
    if bank.shape[4] != state.num_virtual_tokens:
        # Positions are shifted by the prefix length, which must then be the same for every row.
        raise ValueError(
            f"{owner}: bank: expected prefix_len {state.num_virtual_tokens} (the model's num_virtual_tokens), "
            f"got {bank.shape[4]}"
        )
    state.ids = ids.to(torch.long)
    return model


def _slot_ids(owner: str, bank: MultiPrefixKV, ids: Tensor | Sequence[AdapterRef]) -> Tensor:
    if isinstance(ids, Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex() or not ids.dtype.is_signed:
            raise TypeError(f"{owner}: ids: expected a signed integer tensor (-1 = no prefix), got {ids.dtype}")
        if ids.dim() != 1 or ids.shape[0] < 1:
            raise ValueError(f"{owner}: ids: expected shape (B,) with B >= 1, got {tuple(ids.shape)}")
        _check_ids(bank, ids.to(bank.prefix.device))
        return ids
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) == 0:
        raise TypeError(
            f"{owner}: ids: expected a 1-D integer tensor or a non-empty list of prefix names, slot ints or None, "
            f"got {type(ids).__name__}"
        )
    for ref in ids:
        if isinstance(ref, int) and not isinstance(ref, bool) and not -1 <= ref < bank.capacity:
            raise ValueError(f"{owner}: ids: expected slot ints in [-1, {bank.capacity}), got {ref}")
        if isinstance(ref, str) and ref not in bank.adapters:
            raise ValueError(f"{owner}: ids: expected prefix names {sorted(bank.adapters)}, got {ref!r}")
    try:
        return bank.adapter_ids(list(ids))
    except ValueError as e:  # a free slot
        raise ValueError(f"{owner}: ids: {e}") from None
    except TypeError as e:
        raise TypeError(f"{owner}: ids: {e}") from None


def _slots(owner: str, model: nn.Module) -> MultiPrefixKV:
    state = _state(owner, model)
    if not state.multi:
        raise ValueError(
            f"{owner}: model: expected a model with prefix slots (apply_prefix_tuning(..., capacity=N)), got one with "
            "one shared prefix"
        )
    return getattr(model, ATTR)


def add_prefix(model: nn.Module, name: str, prefix_len: int | None = None) -> int:
    """Put a fresh trainable prefix of ``prefix_len`` keys (default: the model's
    ``num_virtual_tokens``, the longest) in the first free slot of ``model`` (prepared by
    ``apply_prefix_tuning(..., capacity=N)``); returns the slot. No shape changes: the same
    Parameter holds every slot."""
    bank = _slots("add_prefix", model)
    return bank.add_adapter(name, bank.prefix_len_max if prefix_len is None else prefix_len)


def remove_prefix(model: nn.Module, name: str) -> None:
    """Free ``name``'s slot (zeroed, length 0). Ids naming it afterwards raise in eager calls."""
    bank = _slots("remove_prefix", model)
    if name not in bank.adapters:
        raise ValueError(f"remove_prefix: name: expected one of {sorted(bank.adapters)}, got {name!r}")
    bank.remove_adapter(name)


# -- peft checkpoints --------------------------------------------------------------------------------


def peft_prefix_state(model: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """``(config, tensors)`` of the model's shared prefix in peft's ``PREFIX_TUNING`` format, for
    :func:`peftops.save_adapter` (which adds ``task_type``, ``base_model_name_or_path`` and
    ``inference_mode``)."""
    owner = "peft_prefix_state"
    state = _state(owner, model)
    if state.multi:
        raise ValueError(
            f"{owner}: model: expected a model with one shared prefix (peft's format holds one), got one with "
            "prefix slots (capacity)"
        )
    prefix: PrefixKV = getattr(model, ATTR)
    p, layers, hkv, d = prefix.prefix_len, prefix.num_layers, prefix.num_kv_heads, prefix.head_dim
    with torch.no_grad():
        # (layers, 2, Hkv, P, D) -> (P, layers * 2 * Hkv * D): the inverse of peft's get_prompt view.
        flat = prefix.prefixes().permute(3, 0, 1, 2, 4).reshape(p, layers * 2 * hkv * d)
    config = {
        "peft_type": "PREFIX_TUNING",
        "auto_mapping": None,
        "revision": None,
        "num_virtual_tokens": state.num_virtual_tokens,
        "token_dim": hkv * d,
        "num_transformer_submodules": 1,
        "num_attention_heads": hkv,
        "num_layers": layers,
        "modules_to_save": None,
        "init_weights": None,
        "encoder_hidden_size": prefix.reparam_hidden if prefix.reparam_hidden is not None else hkv * d,
        "prefix_projection": prefix.reparam_hidden is not None,
    }
    return config, {WEIGHTS_KEY: flat.detach().clone()}


def _field_error(owner: str, field: str, expected: object, got: object) -> ValueError:
    return ValueError(f"{owner}: {field}: expected {expected}, got {got!r}")


def load_peft_prefix(model: nn.Module, config: dict, state_dict: dict[str, Tensor], adapter_name: str = "default"):
    """Load a peft ``PREFIX_TUNING`` checkpoint (``adapter_config.json`` as a dict, the tensors as a
    dict) into the transformers ``model``: applies :func:`apply_prefix_tuning` if the model has no
    prefix yet, then copies the prefix. Returns ``model``.

    Raises ``ValueError`` naming a config field peftops does not honour or that does not fit the
    model, or a tensor that is missing, extra or misshapen."""
    owner = "load_peft_prefix"
    if not isinstance(config, dict):
        raise TypeError(f"{owner}: config: expected a dict, got {type(config).__name__}")
    if not isinstance(state_dict, dict):
        raise TypeError(f"{owner}: state_dict: expected a dict of tensors, got {type(state_dict).__name__}")
    if adapter_name != "default":
        raise ValueError(
            f"{owner}: adapter_name: expected 'default' (peft's prefix tuning has one adapter per model), got "
            f"{adapter_name!r}"
        )
    _check_model(owner, model)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise _field_error(owner, "peft_type", "'PREFIX_TUNING'", config.get("peft_type"))
    known = _METADATA_FIELDS | _SHAPE_FIELDS | _TRAINING_FIELDS | _OFF_FIELDS
    unknown = sorted(k for k in config if k not in known)
    if unknown:
        raise ValueError(f"{owner}: config: expected only fields peftops honours, got {', '.join(unknown)}")
    for key in _OFF_FIELDS:
        if config.get(key):
            raise _field_error(owner, key, "None (peftops loads the prefix only)", config[key])
    if config.get("num_transformer_submodules") not in (None, 1):
        raise _field_error(
            owner, "num_transformer_submodules", "1 (decoder-only models)", config["num_transformer_submodules"]
        )
    layers, hkv, d = _shape(owner, model)
    p = config.get("num_virtual_tokens")
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise _field_error(owner, "num_virtual_tokens", "an int >= 1", p)
    for key, want in (("num_layers", layers), ("num_attention_heads", hkv), ("token_dim", hkv * d)):
        if config.get(key) is not None and config[key] != want:
            raise _field_error(owner, key, f"{want} (from {type(model).__name__}'s config)", config[key])
    extra = sorted(k for k in state_dict if k != WEIGHTS_KEY)
    if extra or WEIGHTS_KEY not in state_dict:
        raise ValueError(
            f"{owner}: state_dict: expected exactly one tensor {WEIGHTS_KEY!r}, got "
            f"{', '.join(sorted(state_dict)) or 'none'}"
        )
    weight = state_dict[WEIGHTS_KEY]
    if not isinstance(weight, Tensor) or tuple(weight.shape) != (p, layers * 2 * hkv * d):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{owner}: {WEIGHTS_KEY}: expected shape ({p}, {layers * 2 * hkv * d}), got {got}")

    if _STATE not in model.__dict__:
        apply_prefix_tuning(model, p)
    prefix = getattr(model, ATTR)
    if not isinstance(prefix, PrefixKV):
        raise ValueError(
            f"{owner}: model: expected no prefix or a plain prefix of {p} tokens (the checkpoint's), got prefix "
            "slots (capacity)"
        )
    if prefix.prefix_len != p or prefix.reparam_hidden is not None:
        raise ValueError(
            f"{owner}: model: expected no prefix or a plain prefix of {p} tokens (the checkpoint's), got "
            f"prefix_len={prefix.prefix_len}, reparam_hidden={prefix.reparam_hidden}"
        )
    value = weight.reshape(p, layers, 2, hkv, d).permute(1, 2, 3, 0, 4)
    with torch.no_grad():
        prefix.prefix.copy_(value)
    return model


def load_prefix_tuning(model: nn.Module, path: str) -> nn.Module:
    """Load the peft prefix-tuning adapter directory ``path`` (``adapter_config.json`` and
    ``adapter_model.safetensors``) into ``model``; see :func:`load_peft_prefix`."""
    import json
    import os

    owner = "load_prefix_tuning"
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path: expected a str or os.PathLike, got {type(path).__name__}")
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{owner}: path: expected a directory holding adapter_config.json, got {str(path)!r}")
    with open(config_file) as f:
        config = json.load(f)
    weights = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        tensors = load_file(weights)
    else:
        tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    return load_peft_prefix(model, config, tensors)
