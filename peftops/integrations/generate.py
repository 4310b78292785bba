"""Multi-adapter batches under a transformers model's ``generate()``.

``generate(model, input_ids, adapter_ids=[...])`` gives every :class:`~peftops.nn.MultiLoRALinear`
of ``model`` one adapter per row of ``input_ids`` and runs ``model.generate``. Beam search and
``num_return_sequences`` turn each row into ``k`` consecutive rows
(``repeat_interleave(k, dim=0)``), so ids set once for ``B`` rows no longer fit the batch; here
they are repeated the same way at the moment transformers expands the inputs.

The expansion is observed rather than predicted: transformers' own
``_expand_inputs_for_generation`` call is wrapped for the duration of the call, and the ids are
repeated by the ``expand_size`` it receives. That size depends on the mode and has changed
across transformers releases (5.x expands every mode by ``max(num_beams,
num_return_sequences)``; older ones expanded sampling by ``num_return_sequences`` and beam
search by ``num_beams``), and an
encoder-decoder model runs its encoder on the ``B`` unexpanded rows before the expansion:
following the call gets each of these right without restating any of them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ..nn.multi_lora_linear import AdapterRef, MultiLoRALinear

__all__ = ["generate"]

_EXPAND = "_expand_inputs_for_generation"
# Where the batch size can be read before generation starts, in the order transformers looks.
_INPUT_KWARGS = ("inputs", "input_ids", "inputs_embeds")


def generate(
    model: nn.Module,
    input_ids: Tensor | None = None,
    *,
    adapter_ids: Tensor | Sequence[AdapterRef],
    **generate_kwargs: Any,
) -> Any:
    """``model.generate(input_ids, **generate_kwargs)`` with row ``i`` of ``input_ids`` using
    adapter ``adapter_ids[i]`` in every :class:`~peftops.nn.MultiLoRALinear` of ``model``.

    ``adapter_ids`` holds one entry per row, as :func:`peftops.nn.set_batch_adapters` takes
    them: adapter names, slot indices, ``None`` or ``-1`` for the base model, or a 1-D integer
    tensor (``-1`` for the base model). Every mode that expands the batch (beam search, sampling
    or beam search with ``num_return_sequences``) gets each row's id repeated with the row.
    The rows returned are transformers' own order: row ``i``'s sequences are rows
    ``i * k .. i * k + k - 1``.

    The ids the layers held before the call (:func:`~peftops.nn.set_batch_adapters`) are put back
    afterwards, also when generation raises.
    """
    fn = "generate"
    if not isinstance(model, nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(f"{fn}: model: expected a transformers model with generate(), got {type(model).__name__}")
    layers = list({id(m): m for m in model.modules() if isinstance(m, MultiLoRALinear)}.values())
    if not layers:
        raise ValueError(f"{fn}: model: expected MultiLoRALinear layers (apply_lora(..., capacity=N)), got none")
    refs = _refs(fn, adapter_ids)
    rows = _rows(input_ids, generate_kwargs)
    if rows is not None and rows != len(refs):
        raise ValueError(f"{fn}: adapter_ids: expected one per row of the inputs ({rows} rows), got {len(refs)}")
    # Resolved once per layer and up front, so that a bad name fails before any token is made.
    per_layer = [(layer, _resolve(fn, layer, refs)) for layer in layers]

    def set_ids(repeat: int) -> None:
        for layer, ids in per_layer:
            layer.set_batch_adapters(ids if repeat == 1 else ids.repeat_interleave(repeat))

    previous = [(layer, layer._batch_ids) for layer in layers]
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for owner in _generation_owners(model):
            patched.append((owner, owner.__dict__.get(_EXPAND, _ABSENT)))
            setattr(owner, _EXPAND, _expanding(fn, getattr(owner, _EXPAND), len(refs), set_ids))
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
        for layer, ids in previous:
            layer.set_batch_adapters(ids)


_ABSENT = object()


def _generation_owners(model: nn.Module) -> list[nn.Module]:
    # Looked up on the class: a wrapper such as peft's PeftModel forwards unknown attributes to
    # the model inside, and setting the wrapper's attribute would not reach the one that runs.
    return [m for m in model.modules() if callable(getattr(type(m), _EXPAND, None))]


def _expanding(fn: str, original, rows: int, set_ids):
    signature = inspect.signature(original)

    def expand(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        ids = bound.get("input_ids")
        if isinstance(ids, Tensor) and ids.dim() >= 1 and ids.shape[0] != rows:
            raise ValueError(f"{fn}: adapter_ids: expected one per row of the inputs ({ids.shape[0]} rows), got {rows}")
        default = signature.parameters["expand_size"].default if "expand_size" in signature.parameters else 1
        size = bound.get("expand_size", default)
        set_ids(int(size))
        return original(*args, **kwargs)

    return expand


def _refs(fn: str, adapter_ids: object) -> list[AdapterRef]:
    if isinstance(adapter_ids, Tensor):
        if adapter_ids.dtype.is_floating_point or adapter_ids.dtype.is_complex or not adapter_ids.dtype.is_signed:
            raise TypeError(
                f"{fn}: adapter_ids: expected a signed integer tensor (-1 = base model), got {adapter_ids.dtype}"
            )
        if adapter_ids.dim() != 1:
            raise ValueError(
                f"{fn}: adapter_ids: expected one id per row, shape (B,), got shape {tuple(adapter_ids.shape)}"
            )
        return [int(i) for i in adapter_ids.tolist()]
    # A single name is a str, itself a sequence: refused rather than read letter by letter.
    if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Sequence):
        raise TypeError(
            f"{fn}: adapter_ids: expected a list with one adapter name, slot int or None per row, "
            f"or a 1-D integer tensor, got {type(adapter_ids).__name__}"
        )
    if len(adapter_ids) == 0:
        raise ValueError(f"{fn}: adapter_ids: expected one per row of the inputs, got an empty list")
    return list(adapter_ids)


def _rows(input_ids: object, kwargs: dict) -> int | None:
    candidates = [input_ids] + [kwargs.get(k) for k in _INPUT_KWARGS]
    for t in candidates:
        if isinstance(t, Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None  # checked when transformers expands, on the input_ids it expands


def _resolve(fn: str, layer: MultiLoRALinear, refs: list[AdapterRef]) -> Tensor:
    try:
        return layer.adapter_ids(refs)
    except KeyError as e:
        raise ValueError(f"{fn}: adapter_ids: {e.args[0]}") from None
    except ValueError as e:
        raise ValueError(f"{fn}: adapter_ids: {e}") from None
    except TypeError as e:
        raise TypeError(f"{fn}: adapter_ids: {e}") from None
