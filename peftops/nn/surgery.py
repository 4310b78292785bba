"""Model surgery: explicit module swaps, no class monkey-patching."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

from torch import nn

from ._base import AdapterModule
from .lora_linear import LoRALinear
from .multi_lora_linear import MultiLoRALinear


class ParamCount(NamedTuple):
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.fraction:.4f}"


def _module(fn: str, model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model: expected an nn.Module, got {type(model).__name__}")


def _matches(name: str, target: str | Iterable[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def apply_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    use_rslora: bool = False,
    capacity: int | None = None,
) -> nn.Module:
    """Replace matching ``nn.Linear`` children by :class:`LoRALinear` in place, freeze every
    other parameter, and return ``model``.

    With ``capacity``, the children become :class:`MultiLoRALinear` layers with ``capacity``
    adapter slots of rank up to ``r`` and no adapter yet: add adapters to every such layer with
    :func:`add_adapter` (``alpha`` and ``use_rslora`` are then given there, per adapter).

    ``target_modules`` is, as in HF PEFT, either a regex matched against the full module
    name, or names matched exactly or as the last dotted components (``"q_proj"`` matches
    ``layers.0.attn.q_proj``). The base weights are shared, not copied.

    A target whose weight other modules of ``model`` also hold (a tied ``lm_head``/embedding,
    a layer also reachable under a name not targeted) is wrapped, and trains as usual; the
    tie is recorded, so that :meth:`LoRALinear.merge` refuses to write the update through it.
    """
    _module("apply_lora", model)
    if not isinstance(target_modules, str):
        if not isinstance(target_modules, Iterable):
            raise TypeError(
                f"apply_lora: target_modules: expected a regex str or a non-empty list of str, got {type(target_modules).__name__}"
            )
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(
                f"apply_lora: target_modules: expected a regex str or a non-empty list of str, got {target_modules!r}"
            )
    # remove_duplicate=False: a module registered under two names (tied) is swapped under both.
    all_modules = list(model.named_modules(remove_duplicate=False))
    inside_lora = {name + "." for name, m in all_modules if isinstance(m, (LoRALinear, MultiLoRALinear))}
    matched = [(name, m) for name, m in all_modules if name and _matches(name, target_modules)]
    if not matched:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"apply_lora: target_modules: expected to match at least one module, got no match for {target_modules!r} "
            f"(nn.Linear modules: {', '.join(linears[:12]) or 'none'}{', ...' if len(linears) > 12 else ''})"
        )
    for name, module in matched:
        if isinstance(module, (LoRALinear, MultiLoRALinear)):
            raise ValueError(f"apply_lora: target_modules: {name!r} already is a {type(module).__name__}")
        if any(name.startswith(p) for p in inside_lora):
            raise ValueError(f"apply_lora: target_modules: {name!r} is part of a LoRALinear, not a base layer")
        if type(module) is not nn.Linear:
            raise TypeError(f"apply_lora: target_modules: {name!r} expected an nn.Linear, got {type(module).__name__}")
    wrapped: dict[int, nn.Module] = {}
    for name, module in matched:
        if id(module) in wrapped:
            pass
        elif capacity is not None:
            wrapped[id(module)] = MultiLoRALinear.from_linear(module, capacity=capacity, r_max=r, dropout=dropout)
        else:
            wrapped[id(module)] = LoRALinear.from_linear(
                module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora
            )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapped[id(module)])
    for _, layer, ties in _lora_layers(model):
        layer._ties = tuple(ties)
    mark_only_adapters_trainable(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every :class:`LoRALinear` of ``model`` not merged yet (:meth:`LoRALinear.merge`)
    and return ``model``.

    Refuses, merging none, when a layer's weight is also held by another module of ``model``
    (a tied ``lm_head``/embedding, a layer also reachable under a name that was not
    targeted): writing ``W + s B A`` into a shared Parameter would change those modules too.
    Ties are looked up now, so ties made after :func:`apply_lora` (``tie_weights``) count.
    """
    layers = _lora_layers(model, "merge_adapters")
    tied = [
        f"'{name + '.' if name else ''}weight' is also {', '.join(repr(t) for t, _, _ in ties)}"
        for name, _, ties in layers
        if ties
    ]
    for _, layer, ties in layers:
        layer._ties = tuple(ties)
    if tied:
        raise ValueError(
            f"merge_adapters: model: expected LoRALinear weights that no other module holds, got tied weights "
            f"({'; '.join(tied)}): merging would write the update into those modules too. Untie them (give the "
            "LoRALinear its own copy of the weight) or keep the adapters unmerged"
        )
    for _, layer, _ in layers:
        if not layer.merged:
            layer.merge()
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Unmerge every merged :class:`LoRALinear` of ``model`` and return ``model``."""
    for _, layer, _ in _lora_layers(model, "unmerge_adapters"):
        if layer.merged:
            layer.unmerge()
    return model


def _lora_layers(model: nn.Module, owner: str | None = None) -> list[tuple[str, LoRALinear, list]]:
    """``(name, layer, ties)`` for each LoRALinear of ``model`` (once, under its first name);
    ``ties``: ``(name, module, attribute)`` of the other modules' parameters that are its weight."""
    if owner is not None:
        _module(owner, model)
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    layers: dict[int, tuple[str, LoRALinear]] = {}
    # remove_duplicate=False: a module or Parameter reachable under a second name is a tie.
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoRALinear):
            layers.setdefault(id(module), (mod_name, module))
        for attr, p in module.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append((f"{mod_name}.{attr}" if mod_name else attr, module, attr))
    if owner is not None and not layers:
        raise ValueError(f"{owner}: model: expected LoRALinear layers (apply_lora), got none")
    out = []
    for name, layer in layers.values():
        # The same LoRALinear under two names is one layer, merged once: not a tie.
        ties = [h for h in holders.get(id(layer.weight), []) if h[1] is not layer]
        out.append((name, layer, ties))
    return out


def mark_only_adapters_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter, then unfreeze those of peftops adapter modules
    (``LoRALinear``'s A and B but not its base weight, adapters, prefixes, prompts)."""
    _module("mark_only_adapters_trainable", model)
    adapters = [m for m in model.modules() if isinstance(m, AdapterModule)]
    if not adapters:
        raise ValueError("mark_only_adapters_trainable: model: expected at least one peftops adapter module, got none")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in adapters:
        for t in m.adapter_parameters():
            t.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> ParamCount:
    """``(trainable, total)`` parameter counts; shared parameters count once."""
    _module("count_trainable", model)
    seen = {id(p): p for p in model.parameters()}
    return ParamCount(
        trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
        total=sum(p.numel() for p in seen.values()),
    )


def add_adapter(model: nn.Module, name: str, r: int, alpha: float, *, use_rslora: bool = False) -> nn.Module:
    """Add adapter ``name`` to every :class:`MultiLoRALinear` of ``model`` (all get the same slot
    index, since they fill their slots in the same order) and return ``model``."""
    layers = _multi_layers("add_adapter", model)
    slots = {layer.add_adapter(name, r, alpha, use_rslora=use_rslora) for layer in layers}
    if len(slots) != 1:
        raise RuntimeError(
            f"add_adapter: the layers put {name!r} in different slots {sorted(slots)}: "
            "add and remove adapters through the model, not layer by layer"
        )
    return model


def remove_adapter(model: nn.Module, name: str) -> nn.Module:
    for layer in _multi_layers("remove_adapter", model):
        layer.remove_adapter(name)
    return model


def set_batch_adapters(model: nn.Module, ids) -> nn.Module:
    """Every :class:`MultiLoRALinear` of ``model`` uses ``ids`` (names, slots, None, or a tensor)
    for the following batches' rows."""
    for layer in _multi_layers("set_batch_adapters", model):
        layer.set_batch_adapters(ids)
    return model


def _multi_layers(owner: str, model: nn.Module) -> list:
    _module(owner, model)
    layers = list({id(m): m for m in model.modules() if isinstance(m, MultiLoRALinear)}.values())
    if not layers:
        raise ValueError(f"{owner}: model: expected MultiLoRALinear layers (apply_lora(..., capacity=N)), got none")
    return layers
