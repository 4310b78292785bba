"""Drop-in ``nn.Module``s and model surgery helpers."""

from ._base import AdapterModule
from .adapter import BottleneckAdapter
from .attention import PrefixSelfAttention
from .lora import LoRALinear
from .prefix import PrefixKV, PromptEmbedding
from .surgery import ParamCount, apply_lora, count_trainable, mark_only_adapters_trainable

__all__ = [
    "AdapterModule",
    "BottleneckAdapter",
    "LoRALinear",
    "ParamCount",
    "PrefixKV",
    "PrefixSelfAttention",
    "PromptEmbedding",
    "apply_lora",
    "count_trainable",
    "mark_only_adapters_trainable",
]
