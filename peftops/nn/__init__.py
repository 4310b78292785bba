"""Drop-in ``nn.Module``s and model surgery helpers."""

from ._base import AdapterModule
from .bottleneck_adapter import BottleneckAdapter
from .lora_embedding import LoRAEmbedding
from .lora_linear import LoRAConv1D, LoRALinear
from .multi_lora_linear import MultiLoRALinear
from .prefix import PrefixKV, PromptEmbedding
from .prefix_attention import PrefixSelfAttention
from .surgery import (
    LORA_LAYER_TYPES,
    ParamCount,
    add_adapter,
    apply_lora,
    count_trainable,
    lora_bias,
    mark_only_adapters_trainable,
    merge_adapters,
    modules_to_save,
    remove_adapter,
    set_batch_adapters,
    unmerge_adapters,
)

__all__ = [
    "LORA_LAYER_TYPES",
    "AdapterModule",
    "BottleneckAdapter",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LoRALinear",
    "MultiLoRALinear",
    "ParamCount",
    "PrefixKV",
    "PrefixSelfAttention",
    "PromptEmbedding",
    "add_adapter",
    "apply_lora",
    "count_trainable",
    "lora_bias",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "modules_to_save",
    "remove_adapter",
    "set_batch_adapters",
    "unmerge_adapters",
]
