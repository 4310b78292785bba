"""Per-row adapters of every bank kind under a transformers model's ``generate()``.

``generate(model, input_ids, adapter_ids=[...], prefix_ids=[...], bottleneck_ids=[...],
prompt_ids=[...])`` gives row ``i`` of ``input_ids`` its own adapter of each kind given (any
of them, at least one): a LoRA adapter in every :class:`~peftops.nn.MultiLoRALinear`
(``apply_lora(..., capacity=N)``), a prefix (``apply_prefix_tuning(..., capacity=N)``, or an
entry of a ``set_prefix_bank`` bank), a bottleneck adapter at every site
(``apply_adapters(..., capacity=N)``) and a prompt (``apply_prompt_tuning(..., capacity=N)``),
and runs ``model.generate``. Beam search and ``num_return_sequences`` turn each row into ``k``
consecutive rows (``repeat_interleave(k, dim=0)``), so ids set once for ``B`` rows no longer
fit the batch; here every kind's ids are repeated the same way at the moment transformers
expands the inputs.

The expansion is observed rather than predicted: transformers' own
``_expand_inputs_for_generation`` call is wrapped for the duration of the call, and the ids are
repeated by the ``expand_size`` it receives. That size depends on the mode and has changed
across transformers releases (5.x expands every mode by ``max(num_beams,
num_return_sequences)``; older ones expanded sampling by ``num_return_sequences`` and beam
search by ``num_beams``), and an
encoder-decoder model runs its encoder on the ``B`` unexpanded rows before the expansion:
following the call gets each of these right without restating any of them.

Repeating the ids is all each kind needs, because each reads its ids afresh at every forward:
a prefix row's position shift is derived from its id there (by the prefix hook), and a prompt is
put in front of the rows at the first forward, which in a decoder-only model (the only kind
prompt tuning takes) comes after the expansion; the KV cache then holds each row's prompt, and
beam search reorders cache rows only among the beams of one input row, which share its ids.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..nn.multi_lora_linear import AdapterRef, MultiLoRALinear
from ..nn.multi_prompt import MultiPromptEmbedding
from . import adapters as _adapters
from . import prefix_tuning as _prefix
from . import prompt_tuning as _prompt

__all__ = ["generate"]

_EXPAND = "_expand_inputs_for_generation"
# Where the batch size can be read before generation starts, in the order transformers looks
# (then the model's main_input_name: input_features, pixel_values).
_INPUT_KWARGS = ("inputs", "input_ids", "inputs_embeds")
# Marks this module's wrapper, so that a nested call sees it is inside one.
_OURS = "_peftops_generate"
_KINDS = ("adapter_ids", "prefix_ids", "bottleneck_ids", "prompt_ids")


@dataclass
class _Kind:
    """One kind's ids for the call: ``put(k)`` sets them for the rows each repeated ``k`` times,
    ``restore()`` puts back what the bank held before the call."""

    put: Callable[[int], None]
    restore: Callable[[], None]


def generate(
    model: nn.Module,
    input_ids: Tensor | None = None,
    *,
    adapter_ids: Tensor | Sequence[AdapterRef] | None = None,
    prefix_ids: Tensor | Sequence[AdapterRef] | None = None,
    bottleneck_ids: Tensor | Sequence[AdapterRef] | None = None,
    prompt_ids: Tensor | Sequence[AdapterRef] | None = None,
    **generate_kwargs: Any,
) -> Any:
    """``model.generate(input_ids, **generate_kwargs)`` with row ``i`` of ``input_ids`` using, of
    each kind given, its entry ``i``: ``adapter_ids[i]`` in every
    :class:`~peftops.nn.MultiLoRALinear`, prefix ``prefix_ids[i]``, bottleneck adapter
    ``bottleneck_ids[i]`` at every site and prompt ``prompt_ids[i]``. At least one kind must be
    given. A kind left out keeps whatever ids its bank holds; where the bank holds none and its
    forward would refuse to run without them (LoRA, bottleneck and prompt banks, prefix slots;
    not a ``set_prefix_bank`` bank, whose rows then all use the shared prefix), that is a
    ``ValueError`` naming the argument, raised before the first forward.

    Each takes what its setter takes (:func:`~peftops.nn.set_batch_adapters`,
    :func:`~peftops.set_prefix_ids`, :func:`~peftops.set_bottleneck_ids`,
    :func:`~peftops.set_prompt_ids`), one entry per row: adapter names, slot indices, ``None``
    or ``-1`` for none (the base model) where the kind has a none, or a 1-D integer tensor. The
    rows are counted from ``input_ids``, ``inputs``, ``inputs_embeds`` or the model's own main
    input (``model.main_input_name``: ``input_features``, ``pixel_values``). They are checked
    before the first forward (also an encoder's); a bad name or slot, a wrong length, or a kind
    whose bank the model does not have raises a ``ValueError`` (``TypeError`` for a wrong type)
    naming the argument. Every mode that expands the batch (beam search, sampling or beam search
    with ``num_return_sequences``) gets each row's ids repeated with the row. The rows returned
    are transformers' own order: with ``k = num_return_sequences`` (1 by default), row ``i``'s
    sequences are rows ``i * k .. i * k + k - 1``.

    ``prompt_ids`` is also a keyword of some models' own ``generate`` (Whisper's: the prompt's
    token ids). For a model without prompt tuning whose ``generate`` takes a ``prompt_ids``
    parameter, it is passed to ``model.generate`` unchanged and is not a kind here (prompt tuning
    takes decoder-only and sequence-classification models only, none of which has one).

    The ids every bank of a given kind held before the call (the same objects) are put back
    afterwards, also when generation raises. The call is not reentrant: ``generate`` on a model
    already inside it (from a logits processor or stopping criterion, say) raises a
    ``RuntimeError``, as the inner call would repeat and then put back ids the outer one relies on.
    """
    fn = "generate"
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"{fn}: model: expected a transformers model with generate(), got {type(model).__name__}")
    owners = _generation_owners(model)
    if any(getattr(owner.__dict__.get(_EXPAND), _OURS, False) for owner in owners):
        raise RuntimeError(f"{fn}: model: already inside peftops.generate (not reentrant)")
    if prompt_ids is not None and _takes_own_prompt_ids(model):
        generate_kwargs["prompt_ids"] = prompt_ids
        prompt_ids = None
    given = {
        arg: ids
        for arg, ids in zip(_KINDS, (adapter_ids, prefix_ids, bottleneck_ids, prompt_ids), strict=True)
        if ids is not None
    }
    if not given:
        raise TypeError(f"{fn}: expected at least one of {', '.join(_KINDS)} (one entry per row), got none")
    refs = {arg: _refs(fn, arg, ids, model) for arg, ids in given.items()}
    first = next(iter(refs))
    rows = _rows(model, input_ids, generate_kwargs)
    for arg, each in refs.items():
        if rows is not None and rows != len(each):
            raise ValueError(f"{fn}: {arg}: expected one per row of the inputs ({rows} rows), got {len(each)}")
        if len(each) != len(refs[first]):
            raise ValueError(f"{fn}: {arg}: expected one per row, as {first} ({len(refs[first])}), got {len(each)}")
    batch = len(refs[first])
    # Every bank is found before any ids change, so a missing one leaves the model as it was.
    makers = [_MAKERS[arg](fn, model) for arg in refs]
    for arg in _KINDS:
        if arg not in refs:
            _check_held(fn, arg, model)

    kinds: list[_Kind] = []

    def set_ids(repeat: int) -> None:
        for kind in kinds:
            kind.put(repeat)

    patched: list[tuple[nn.Module, Any]] = []
    try:
        # Resolved up front (each setter checks names and slots), so a bad one fails before any token.
        for make, arg in zip(makers, refs, strict=True):
            kinds.append(make(refs[arg]))
        for owner in owners:
            patched.append((owner, owner.__dict__.get(_EXPAND, _ABSENT)))
            setattr(owner, _EXPAND, _expanding(fn, getattr(owner, _EXPAND), first, batch, set_ids))
        set_ids(1)  # what an encoder, and every mode that does not expand, runs on
        run: Any = model.generate  # nn.Module's __getattr__ types it as a Tensor or Module
        if input_ids is None:
            return run(**generate_kwargs)
        return run(input_ids, **generate_kwargs)
    finally:
        for owner, before in reversed(patched):
            if before is _ABSENT:
                delattr(owner, _EXPAND)
            else:
                setattr(owner, _EXPAND, before)
        for kind in reversed(kinds):
            kind.restore()


def _takes_own_prompt_ids(model: nn.Module) -> bool:
    if _prompt._STATE in model.__dict__:
        return False
    try:
        run: Any = model.generate  # nn.Module's __getattr__ types it as a Tensor or Module
        parameters = inspect.signature(run).parameters
    except (TypeError, ValueError):  # no signature to read: nothing says it takes one
        return False
    return "prompt_ids" in parameters


def _check_held(fn: str, arg: str, model: nn.Module) -> None:
    """Refuse a kind left out whose bank holds no ids where its forward would refuse to run:
    that error would name neither this call nor the argument."""
    what = None
    if arg == "adapter_ids":
        if any(isinstance(m, MultiLoRALinear) and m._batch_ids is None for m in model.modules()):
            what = "MultiLoRALinear layers"
    elif arg == "prefix_ids":
        state = model.__dict__.get(_prefix._STATE)
        # A set_prefix_bank model without ids gives every row the shared prefix.
        if state is not None and state.multi and state.ids is None:
            what = "prefix slots"
    elif arg == "bottleneck_ids":
        state = model.__dict__.get(_adapters._STATE)
        if state is not None and state.capacity is not None:
            banks = _renamed(fn, arg, lambda: _adapters._banks(fn, model))
            if any(bank._batch_ids is None for bank in banks):
                what = "bottleneck adapter banks"
    elif _prompt._STATE in model.__dict__:
        bank = getattr(model, _prompt.ATTR, None)
        if isinstance(bank, MultiPromptEmbedding) and bank._batch_ids is None:
            what = "prompt bank"
    if what is not None:
        raise ValueError(f"{fn}: {arg}: expected ids for the model's {what}, got none")


_ABSENT = object()


def _generation_owners(model: nn.Module) -> list[nn.Module]:
    # Looked up on the class: a wrapper such as peft's PeftModel forwards unknown attributes to
    # the model inside, and setting the wrapper's attribute would not reach the one that runs.
    return [m for m in model.modules() if callable(getattr(type(m), _EXPAND, None))]


def _expanding(fn: str, original, arg: str, rows: int, set_ids):
    signature = inspect.signature(original)

    # wraps: whoever reads the patched method's signature (transformers, or a nested call's
    # check) sees the original's, expand_size default included.
    @functools.wraps(original)
    def expand(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        ids = bound.get("input_ids")
        if isinstance(ids, Tensor) and ids.dim() >= 1 and ids.shape[0] != rows:
            raise ValueError(f"{fn}: {arg}: expected one per row of the inputs ({ids.shape[0]} rows), got {rows}")
        default = signature.parameters["expand_size"].default if "expand_size" in signature.parameters else 1
        size = bound.get("expand_size", default)
        set_ids(int(size))
        return original(*args, **kwargs)

    setattr(expand, _OURS, True)
    return expand


def _entries(arg: str, model: nn.Module) -> tuple[str, str | None]:
    """What one row's entry of ``arg`` is, and what ``None`` / ``-1`` means (``None`` where the
    kind refuses it), for the messages of a wrong type."""
    if arg == "prefix_ids":
        state = model.__dict__.get(_prefix._STATE)
        if state is not None and not state.multi:
            return "entry int of the prefix bank", None
        return "prefix name, slot int", "no prefix"
    if arg == "prompt_ids":
        state = model.__dict__.get(_prompt._STATE)
        return "prompt name, slot int", ("no prompt" if getattr(state, "no_prompt_rows", True) else None)
    if arg == "bottleneck_ids":
        return "adapter name, slot int", "no adapter"
    return "adapter name, slot int", "the base model"


def _refs(fn: str, arg: str, ids: object, model: nn.Module) -> list[AdapterRef]:
    if isinstance(ids, Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or not ids.dtype.is_signed:
            none = _entries(arg, model)[1]
            meaning = f" (-1 = {none})" if none is not None else ""
            raise TypeError(f"{fn}: {arg}: expected a signed integer tensor{meaning}, got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{fn}: {arg}: expected one id per row, shape (B,), got shape {tuple(ids.shape)}")
        if ids.numel() == 0:
            raise ValueError(f"{fn}: {arg}: expected one per row of the inputs, got an empty tensor")
        # Set as ints: the banks get tensors of their own, on their own devices, and the
        # caller's tensor is neither kept nor moved.
        return [int(i) for i in ids.tolist()]
    # A single name is a str, itself a sequence: refused rather than read letter by letter.
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        entry, none = _entries(arg, model)
        entry = f"{entry} or None" if none is not None else entry
        raise TypeError(
            f"{fn}: {arg}: expected a list with one {entry} per row, or a 1-D integer tensor, got {type(ids).__name__}"
        )
    if len(ids) == 0:
        raise ValueError(f"{fn}: {arg}: expected one per row of the inputs, got an empty list")
    return list(ids)


def _rows(model: nn.Module, input_ids: object, kwargs: dict) -> int | None:
    names = list(_INPUT_KWARGS)
    main = getattr(model, "main_input_name", None)
    if isinstance(main, str) and main not in names:
        names.append(main)  # an encoder's own input: counted before the encoder runs on it
    for t in [input_ids] + [kwargs.get(k) for k in names]:
        if isinstance(t, Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None  # checked when transformers expands, on the input_ids it expands


def _renamed(fn: str, arg: str, call: Callable[[], Any]) -> Any:
    """``call()``, with a setter's ``"<owner>: <argument>: why"`` error reworded as ``generate``'s
    own, naming ``arg``: the caller passed the ids here, not to the setter."""
    try:
        return call()
    except (ValueError, TypeError) as e:
        message = str(e.args[0]) if e.args else str(e)
        parts = message.split(": ", 2)
        why = parts[2] if len(parts) == 3 else message
        raise (ValueError if isinstance(e, ValueError) else TypeError)(f"{fn}: {arg}: {why}") from None


def _lora(fn: str, model: nn.Module) -> Callable[[list[AdapterRef]], _Kind]:
    arg = "adapter_ids"
    layers = list({id(m): m for m in model.modules() if isinstance(m, MultiLoRALinear)}.values())
    if not layers:
        raise ValueError(
            f"{fn}: {arg}: expected a model with MultiLoRALinear layers (apply_lora(..., capacity=N)), got a "
            f"{type(model).__name__} without them"
        )

    def make(refs: list[AdapterRef]) -> _Kind:
        previous = [(layer, layer._batch_ids) for layer in layers]
        return _slot_kind(previous, [(layer, _resolve(fn, layer, refs)) for layer in layers])

    return make


def _slot_kind(previous: list[tuple[Any, Tensor | None]], resolved: list[tuple[Any, Tensor | None]]) -> _Kind:
    """A kind whose ids ``SlotBank`` modules hold (``set_batch_adapters``): ``resolved`` is each
    holder's ids for the rows, ``previous`` what it held before the call. A tensor several holders
    share (one per device for bottleneck banks) is repeated once for them all."""

    def put(repeat: int) -> None:
        repeated: dict[int, Tensor] = {}
        for holder, ids in resolved:
            assert ids is not None
            if id(ids) not in repeated:
                repeated[id(ids)] = ids if repeat == 1 else ids.repeat_interleave(repeat)
            holder.set_batch_adapters(repeated[id(ids)])

    def restore() -> None:
        for holder, ids in previous:
            holder.set_batch_adapters(ids)

    return _Kind(put, restore)


def _bottleneck(fn: str, model: nn.Module) -> Callable[[list[AdapterRef]], _Kind]:
    arg = "bottleneck_ids"
    banks = _renamed(fn, arg, lambda: _adapters._banks(fn, model))

    def make(refs: list[AdapterRef]) -> _Kind:
        previous = [(bank, bank._batch_ids) for bank in banks]
        try:
            _renamed(fn, arg, lambda: _adapters.set_bottleneck_ids(model, refs))
            resolved = [(bank, bank._batch_ids) for bank in banks]  # one tensor per device
        finally:
            for bank, ids in previous:  # the call's put() sets them; until then, the caller's
                bank.set_batch_adapters(ids)
        return _slot_kind(previous, resolved)

    return make


def _prefix_kind(fn: str, model: nn.Module) -> Callable[[list[AdapterRef]], _Kind]:
    arg = "prefix_ids"
    state = model.__dict__.get(_prefix._STATE)
    if state is None:
        raise ValueError(
            f"{fn}: {arg}: expected a model given prefix slots (apply_prefix_tuning(..., capacity=N)) or a prefix "
            f"bank (set_prefix_bank), got a {type(model).__name__} without prefix tuning"
        )

    def make(refs: list[AdapterRef]) -> _Kind:
        # The prefix hook derives each row's position shift from these ids at every forward, so
        # repeating them repeats the shifts too.
        previous = state.ids
        try:
            _renamed(fn, arg, lambda: _prefix.set_prefix_ids(model, refs))
            resolved = state.ids
        finally:
            state.ids = previous
        assert resolved is not None
        if not state.multi:
            # Every layer of every step indexes the bank with them: moved to its device once here
            # rather than copied there by each layer.
            bank = _prefix._stacked_bank(model)
            assert bank is not None  # set_prefix_ids refuses ids without one
            resolved = resolved.to(bank.device)

        def put(repeat: int) -> None:
            state.ids = resolved if repeat == 1 else resolved.repeat_interleave(repeat)

        def restore() -> None:
            state.ids = previous

        return _Kind(put, restore)

    return make


def _prompt_kind(fn: str, model: nn.Module) -> Callable[[list[AdapterRef]], _Kind]:
    arg = "prompt_ids"
    if _prompt._STATE not in model.__dict__:
        raise ValueError(
            f"{fn}: {arg}: expected a model given a prompt bank (apply_prompt_tuning(..., capacity=N)), got a "
            f"{type(model).__name__} without prompt tuning"
        )
    bank = _renamed(fn, arg, lambda: _prompt._bank(fn, model))

    def make(refs: list[AdapterRef]) -> _Kind:
        previous = bank._batch_ids
        try:
            _renamed(fn, arg, lambda: _prompt.set_prompt_ids(model, refs))
            resolved = bank._batch_ids
        finally:
            bank.set_batch_adapters(previous)
        return _slot_kind([(bank, previous)], [(bank, resolved)])

    return make


_MAKERS: dict[str, Callable[[str, nn.Module], Callable[[list[AdapterRef]], _Kind]]] = {
    "adapter_ids": _lora,
    "prefix_ids": _prefix_kind,
    "bottleneck_ids": _bottleneck,
    "prompt_ids": _prompt_kind,
}


def _resolve(fn: str, layer: MultiLoRALinear, refs: list[AdapterRef]) -> Tensor:
    try:
        return layer.adapter_ids(refs)
    except KeyError as e:
        raise ValueError(f"{fn}: adapter_ids: {e.args[0]}") from None
    except ValueError as e:
        raise ValueError(f"{fn}: adapter_ids: {e}") from None
    except TypeError as e:
        raise TypeError(f"{fn}: adapter_ids: {e}") from None
