"""Drop-in ``nn.Module``s and model surgery helpers."""

from ._base import AdapterModule
from .bottleneck_adapter import BottleneckAdapter
from .lora_linear import LoRALinear
from .multi_lora_linear import MultiLoRALinear
from .prefix import PrefixKV, PromptEmbedding
from .prefix_attention import PrefixSelfAttention
from .surgery import (
    ParamCount,
    add_adapter,
    apply_lora,
    count_trainable,
    mark_only_adapters_trainable,
    merge_adapters,
    remove_adapter,
    set_batch_adapters,
    unmerge_adapters,
)

__all__ = [
    "AdapterModule",
    "BottleneckAdapter",
    "LoRALinear",
    "MultiLoRALinear",
    "ParamCount",
    "PrefixKV",
    "PrefixSelfAttention",
    "PromptEmbedding",
    "add_adapter",
    "apply_lora",
    "count_trainable",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "remove_adapter",
    "set_batch_adapters",
    "unmerge_adapters",
]
