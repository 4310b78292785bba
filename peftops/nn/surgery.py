"""Model surgery: explicit module swaps, no class monkey-patching."""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Union

from torch import nn

from ._base import AdapterModule
from .lora import LoRALinear


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


def _matches(name: str, target: Union[str, Iterable[str]]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def apply_lora(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    *,
    use_rslora: bool = False,
) -> nn.Module:
    """Replace matching ``nn.Linear`` children by :class:`LoRALinear` in place, freeze every
    other parameter, and return ``model``.

    ``target_modules`` is, as in HF PEFT, either a regex matched against the full module
    name, or names matched exactly or as the last dotted components (``"q_proj"`` matches
    ``layers.0.attn.q_proj``). The base weights are shared, not copied.
    """
    _module("apply_lora", model)
    if not isinstance(target_modules, str):
        if not isinstance(target_modules, Iterable):
            raise TypeError(
                f"apply_lora: target_modules: expected a regex str or a non-empty list of str, got {type(target_modules).__name__}"
            )
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise TypeError(f"apply_lora: target_modules: expected a regex str or a non-empty list of str, got {target_modules!r}")
    # remove_duplicate=False: a module registered under two names (tied) is swapped under both.
    all_modules = list(model.named_modules(remove_duplicate=False))
    inside_lora = {name + "." for name, m in all_modules if isinstance(m, LoRALinear)}
    matched = [(name, m) for name, m in all_modules if name and _matches(name, target_modules)]
    if not matched:
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"apply_lora: target_modules: expected to match at least one module, got no match for {target_modules!r} "
            f"(nn.Linear modules: {', '.join(linears[:12]) or 'none'}{', ...' if len(linears) > 12 else ''})"
        )
    for name, module in matched:
        if isinstance(module, LoRALinear):
            raise ValueError(f"apply_lora: target_modules: {name!r} already is a LoRALinear")
        if any(name.startswith(p) for p in inside_lora):
            raise ValueError(f"apply_lora: target_modules: {name!r} is part of a LoRALinear, not a base layer")
        if type(module) is not nn.Linear:
            raise TypeError(f"apply_lora: target_modules: {name!r} expected an nn.Linear, got {type(module).__name__}")
    wrapped: dict[int, LoRALinear] = {}
    for name, module in matched:
        if id(module) not in wrapped:
            wrapped[id(module)] = LoRALinear.from_linear(module, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrapped[id(module)])
    mark_only_adapters_trainable(model)
    return model


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
        for p in m.adapter_parameters():
            p.requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> ParamCount:
    """``(trainable, total)`` parameter counts; shared parameters count once."""
    _module("count_trainable", model)
    seen = {id(p): p for p in model.parameters()}
    return ParamCount(
        trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
        total=sum(p.numel() for p in seen.values()),
    )
