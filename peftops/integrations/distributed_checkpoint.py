"""Sharded adapter checkpoints with ``torch.distributed.checkpoint`` (DCP).

``save_sharded_adapter(model, dir)`` writes the adapter state of ``model`` (what
:func:`peftops.save_adapter` saves: LoRA/DoRA layers, ``MultiLoRALinear`` banks with their slot
names, ranks and scales, adapters, prefix/prompt modules, the ``bias`` mode's biases and
``modules_to_save``), and optionally an optimizer's state for those parameters, as a DCP
checkpoint: under FSDP2 each rank writes its own shards, nothing is gathered, and the frozen base
is never read. ``load_sharded_adapter(model, dir)`` reads it back into a model built the same way
on any number of ranks (DCP reshards: saved on 2 ranks, loaded on 1, and back), or in a plain
process without a process group.

Both are collective when a process group is initialised: every rank calls them.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..nn import surgery
from ..nn._base import AdapterModule
from .checkpoint import _adapter_kinds, _check_model

__all__ = ["adapter_state_keys", "load_sharded_adapter", "save_sharded_adapter"]

# Top-level keys of the checkpoint: DCP flattens nested dicts, so a model key is "model.<fqn>"
# and an optimizer key "optim.state.<fqn>.exp_avg" / "optim.param_groups.<fqn>.lr".
_MODEL, _OPTIM = "model", "optim"
# The optimizer state flattened to one key per (parameter, field): the saved and the expected
# keys can then be compared one by one, and DCP reshards each entry like a model tensor.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
# The model's state is a subset of its keys (the adapters'); the rest stays as it is.
_PARTIAL = StateDictOptions(strict=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The module DDP wraps (its state-dict keys are the model's own, without ``module.``);
    FSDP2 shards a module in place and keeps its names, so it is returned as it is."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def reshard(model: nn.Module) -> nn.Module:
    """Put every FSDP2 module of ``model`` back in its sharded state and return ``model``.

    After a forward without backward (evaluation, ``torch.no_grad()``) FSDP2 may leave the root
    module's parameters gathered, registered as plain tensors in place of the sharded
    Parameters the optimizer holds; the state dicts must see the sharded ones.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # no FSDP2 in this build (torch.distributed unavailable)
        return model
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def adapter_state_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of ``model``'s adapter state, in state-dict order: the adapter
    parameters of every peftops adapter module, their buffers and extra state (a bank's slot
    names, ranks, scales) but not the base layer's, the biases ``apply_lora``'s ``bias`` mode
    trains, and the whole state of each of its ``modules_to_save``."""
    return _adapter_keys("adapter_state_keys", model)


def _adapter_keys(owner: str, model: nn.Module) -> list[str]:
    _check_model(owner, model)
    model = unwrap(model)
    if not _adapter_kinds(model):
        raise ValueError(f"{owner}: model: expected peftops adapter layers (apply_lora, ...), got none")
    lora_types = surgery.LORA_LAYER_TYPES
    from ..nn import IA3Linear

    adapter_params: set[int] = set()
    extra: set[str] = set()
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, AdapterModule):
            continue
        adapter_params.update(id(p) for p in module.adapter_parameters())
        prefix = f"{name}." if name else ""
        params = {f"{prefix}{k}" for k, _ in module.named_parameters(remove_duplicate=False)}
        for key in module.state_dict(prefix=prefix, keep_vars=True):
            if key in params:
                continue
            # LoRA and IA3 layers hold their base layer's buffers (4-bit weights): base state.
            # Their extra state, and every buffer of the other adapter modules, is the adapter's.
            if (
                key.endswith("._extra_state")
                or key == "_extra_state"
                or not isinstance(module, (*lora_types, IA3Linear))
            ):
                extra.add(key)
    bias = surgery.lora_bias(model)
    lora_biases: set[int] = set()
    if bias == "lora_only":
        lora_biases = {id(m.bias) for m in model.modules() if isinstance(m, lora_types) and m.bias is not None}
    to_save = tuple(f"{s}." for s in surgery.modules_to_save(model))
    keys = []
    for key, value in model.state_dict(keep_vars=True).items():
        is_bias = key == "bias" or key.endswith(".bias")
        if (
            id(value) in adapter_params
            or key in extra
            or key.startswith(to_save)
            or (bias == "all" and is_bias)
            or (bias == "lora_only" and is_bias and id(value) in lora_biases)
        ):
            keys.append(key)
    return keys


def _model_state(model: nn.Module, keys: list[str]) -> dict[str, Any]:
    # Under FSDP2 these are the DTensor shards each rank holds: nothing is communicated.
    full = get_model_state_dict(model)
    # DCP would flatten a dict of extra state (a bank's slot names) into one key per entry,
    # which differ between two banks holding different adapters; in a tuple it is one object.
    return {k: full[k] if isinstance(full[k], Tensor) else (full[k],) for k in keys if k in full}


def _unwrap_objects(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, Tensor) else v[0] for k, v in state.items()}


@contextlib.contextmanager
def _quiet_dcp():
    # DCP warns that it assumes one process when there is no process group: documented here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*single process")
        # It also warns that it overwrites a checkpoint when asked to (overwrite=True).
        warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in .*, overwriting")
        yield


def _optimizer_state(owner: str, model: nn.Module, optimizer: object, keys: list[str]) -> dict[str, Any]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{owner}: optimizer: expected a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    wanted = set(keys)
    outside = [
        names.get(id(p), "<a parameter outside the model>")
        for group in optimizer.param_groups
        for p in group["params"]
        if names.get(id(p)) not in wanted
    ]
    if outside:
        raise ValueError(
            f"{owner}: optimizer: expected only the model's adapter parameters, got also "
            f"{', '.join(outside[:4])}{', ...' if len(outside) > 4 else ''}"
        )
    # For an optimizer that has not stepped yet this creates its state (a step with zero
    # gradients and lr 0), so there are tensors for DCP to load into.
    return get_optimizer_state_dict(model, optimizer, options=_OPTIM_OPTIONS)


def save_sharded_adapter(
    model: nn.Module, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """Write ``model``'s adapter state (:func:`adapter_state_keys`), and ``optimizer``'s state
    if given, to the directory ``path`` with ``torch.distributed.checkpoint``.

    Collective under a process group (every rank calls it; under FSDP2 each writes its own
    shards); without one, the process writes everything. ``model`` may be a plain module,
    FSDP2-sharded (``fully_shard``) or wrapped in ``DistributedDataParallel``. ``optimizer``
    must hold adapter parameters only (the frozen base has no optimizer state).
    """
    owner = "save_sharded_adapter"
    _check_model(owner, model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path: expected a str or os.PathLike, got {type(path).__name__}")
    module = reshard(unwrap(model))
    keys = _adapter_keys(owner, module)
    state: dict[str, Any] = {_MODEL: _model_state(module, keys)}
    if optimizer is not None:
        state[_OPTIM] = _optimizer_state(owner, module, optimizer, keys)
    with _quiet_dcp():
        # Saving again to the same directory replaces the checkpoint, as save_adapter does.
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, overwrite=True))


def _saved_keys(owner: str, path: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path: expected a str or os.PathLike, got {type(path).__name__}")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise ValueError(f"{owner}: path: expected a directory written by save_sharded_adapter, got {str(path)!r}")
    return dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)


def _listed(keys: list[str]) -> str:
    return f"{', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''} ({len(keys)} in all)"


def _check_keys(owner: str, what: str, top: str, expected: dict[str, Any], saved: dict[str, Any]) -> None:
    mine = {k[len(top) + 1 :]: v for k, v in saved.items() if k.startswith(top + ".")}
    missing = [k for k in expected if k not in mine]
    stray = [k for k in mine if k not in expected]
    problems = []
    if missing:
        problems.append(f"the checkpoint lacks the model's {what} {_listed(missing)}")
    if stray:
        problems.append(f"it holds {what} the model has no place for: {_listed(stray)}")
    if problems:
        raise ValueError(
            f"{owner}: path: expected the {what} of a model (and optimizer) built as the saved one was; "
            + "; ".join(problems)
        )
    wrong = []
    for k, v in expected.items():
        size = getattr(mine[k], "size", None)
        if isinstance(v, Tensor) and isinstance(size, torch.Size) and size != v.shape:
            wrong.append(f"{k}: {tuple(size)} vs the model's {tuple(v.shape)}")
    if wrong:
        raise ValueError(f"{owner}: path: expected {what} shaped as the model's, got {'; '.join(wrong[:4])}")


def load_sharded_adapter(
    model: nn.Module, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None
) -> nn.Module:
    """Read a :func:`save_sharded_adapter` checkpoint into ``model`` (and ``optimizer``'s state
    if given) and return ``model``.

    ``model`` is built as the saved one was (same adapters, same names), on any number of ranks
    and sharded or not: DCP reads each rank's part of every tensor whatever the saving world
    size. Collective under a process group. Raises ``ValueError`` naming the keys when the
    checkpoint lacks part of the model's adapter state or holds state the model has no place
    for, or when it holds no optimizer state and ``optimizer`` is given.
    """
    owner = "load_sharded_adapter"
    _check_model(owner, model)
    saved = _saved_keys(owner, path)
    module = reshard(unwrap(model))
    keys = _adapter_keys(owner, module)
    model_state = _model_state(module, keys)
    _check_keys(owner, "adapter state", _MODEL, model_state, saved)
    state: dict[str, Any] = {_MODEL: model_state}
    if optimizer is not None:
        optim_state = _optimizer_state(owner, module, optimizer, keys)
        if not any(k.startswith(_OPTIM + ".") for k in saved):
            raise ValueError(f"{owner}: optimizer: the checkpoint at {str(path)!r} holds no optimizer state")
        _check_keys(owner, "optimizer state", _OPTIM, optim_state, saved)
        state[_OPTIM] = optim_state
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=path)
    set_model_state_dict(module, _unwrap_objects(state[_MODEL]), options=_PARTIAL)
    if optimizer is not None:
        set_optimizer_state_dict(module, optimizer, state[_OPTIM], options=_OPTIM_OPTIONS)
    return model
