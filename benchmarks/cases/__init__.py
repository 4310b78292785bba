"""The registered ops: one module per op, each with a ``register(registry)`` function."""

from __future__ import annotations

from ..registry import Registry
from . import (
    bottleneck_adapter,
    dora_linear,
    ia3_linear,
    lora_linear,
    lora_linear_nf4,
    multi_bottleneck_adapter,
    multi_lora_linear,
    prefix_attention,
    prefix_attention_banks,
)

MODULES = (
    lora_linear,
    bottleneck_adapter,
    prefix_attention,
    multi_lora_linear,
    ia3_linear,
    dora_linear,
    lora_linear_nf4,
    multi_bottleneck_adapter,
    prefix_attention_banks,
)


def default_registry() -> Registry:
    """A registry holding every peftops op, its cases and its providers."""
    registry = Registry()
    for module in MODULES:
        module.register(registry)
    return registry
