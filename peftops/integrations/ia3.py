"""IA3 in HF PEFT's checkpoint format: what ``IA3Config`` / ``PeftModel.save_pretrained`` write.

:func:`peft_ia3_state` gives the ``adapter_config.json`` dict and the tensors of
``adapter_model.safetensors`` for a model :func:`peftops.apply_ia3` adapted;
:func:`load_peft_ia3` applies such a config to a base model and loads the tensors.
peft saves each vector as ``base_model.model.<module>.ia3_l`` (the adapter name dropped),
shaped ``(out, 1)``, or ``(1, in)`` for a feedforward layer: :class:`~peftops.nn.IA3Linear`'s
own parameter, so nothing is reshaped.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from ..nn.ia3 import IA3Linear, apply_ia3, ia3_layers
from .peft_format import METADATA_FIELDS, PREFIX, is_off, target_modules_for

__all__ = ["load_peft_ia3", "peft_ia3_state"]

# IA3Config fields this module reads; the rest must hold their "off" value (or are metadata).
_FIELDS = {"target_modules", "feedforward_modules", "exclude_modules", "fan_in_fan_out", "init_ia3_weights"}
_METADATA = METADATA_FIELDS | {"runtime_config"}


def peft_ia3_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config, tensors)`` of ``model``'s IA3 layers in peft's layout (``peft_type: "IA3"``).

    ``feedforward_modules`` is written as a regex over full names (peft matches a list entry
    as a plain suffix, which a short name could over-match), ``target_modules`` as a list.
    """
    owner = "peft_ia3_state"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model: expected an nn.Module, got {type(model).__name__}")
    layers = ia3_layers(model)
    if not layers:
        raise ValueError(f"{owner}: model: expected IA3 layers (apply_ia3), got none")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"{owner}: model: expected unmerged IA3 layers (peft saves vectors), got merged {merged[:3]}")
    all_names = [n for n, _ in model.named_modules()]
    feedforward = sorted(n for n, layer in layers.items() if layer.is_feedforward)
    config: dict[str, Any] = {
        "peft_type": "IA3",
        "target_modules": target_modules_for(list(layers), all_names),
        "feedforward_modules": "|".join(re.escape(n) for n in feedforward) if feedforward else [],
        "exclude_modules": None,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),
        "modules_to_save": None,
        "init_ia3_weights": True,
    }
    tensors: dict[str, Tensor] = {f"{PREFIX}{name}.ia3_l": layer.ia3_l for name, layer in layers.items()}
    return config, tensors


def load_peft_ia3(
    model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor], adapter_name: str = "default"
) -> nn.Module:
    """Apply a peft ``IA3Config`` (as a dict) to ``model`` with :func:`peftops.apply_ia3` and
    load the checkpoint's vectors; returns ``model``.

    Keys are peft's, ``base_model.model.<module>.ia3_l`` (an ``.ia3_l.<adapter_name>`` key, as
    peft holds it in memory, is read too). Every IA3 layer must get its vector and every vector
    must find its layer, else ``ValueError`` naming them.
    """
    owner = "load_peft_ia3"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, dict):
        raise TypeError(f"{owner}: config: expected a dict (adapter_config.json), got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"{owner}: adapter_name: expected a non-empty str, got {adapter_name!r}")
    peft_type = config.get("peft_type")
    if peft_type != "IA3":
        raise ValueError(f"{owner}: config: expected peft_type 'IA3', got {peft_type!r}")
    for key, value in config.items():
        # (init_ia3_weights only chooses the starting vectors, which the checkpoint overwrites)
        if key in _FIELDS or key in _METADATA:
            continue
        if not is_off(value):
            raise ValueError(f"{owner}: config: {key}: peftops does not implement it; expected it off, got {value!r}")
    apply_ia3(
        model,
        target_modules=config.get("target_modules"),
        feedforward_modules=config.get("feedforward_modules"),
        exclude_modules=config.get("exclude_modules"),
    )
    layers = ia3_layers(model)
    wanted = {f"{PREFIX}{name}.ia3_l": layer for name, layer in layers.items()}
    found: dict[str, Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        plain = key.removesuffix(f".{adapter_name}") if key.endswith(f".ia3_l.{adapter_name}") else key
        if plain in wanted:
            found[plain] = value
        else:
            unknown.append(key)
    missing = sorted(set(wanted) - set(found))
    if unknown or missing:
        raise ValueError(
            f"{owner}: tensors: expected one ia3_l per IA3 layer, got unknown keys {unknown[:3]} and missing {missing[:3]}"
        )
    for key, value in found.items():
        layer: IA3Linear = wanted[key]
        if tuple(value.shape) != tuple(layer.ia3_l.shape):
            raise ValueError(
                f"{owner}: tensors: {key}: expected shape {tuple(layer.ia3_l.shape)}, got {tuple(value.shape)}"
            )
        layer.ia3_l.data.copy_(value.to(layer.ia3_l.dtype))
    return model
