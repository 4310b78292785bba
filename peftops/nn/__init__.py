"""Drop-in ``nn.Module``s and model surgery helpers."""

from ._base import AdapterModule
from .bitfit import BitFitCount, apply_bitfit, bias_parameters
from .bottleneck_adapter import BottleneckAdapter
from .compacter import CompacterAdapter, PHMRule
from .ia3 import IA3Linear, apply_ia3, ia3_layers
from .lora_embedding import LoRAEmbedding
from .lora_linear import LoRAConv1D, LoRALinear
from .multi_bottleneck_adapter import MultiBottleneckAdapter
from .multi_lora_linear import MultiLoRALinear
from .multi_prefix import MultiPrefixBatch, MultiPrefixKV
from .multi_prompt import MultiPromptEmbedding
from .nf4 import LinearNF4, LoRALinearNF4, bits_per_parameter, quantize_model
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
    "BitFitCount",
    "BottleneckAdapter",
    "CompacterAdapter",
    "IA3Linear",
    "LoRAConv1D",
    "LoRAEmbedding",
    "LinearNF4",
    "LoRALinear",
    "LoRALinearNF4",
    "MultiBottleneckAdapter",
    "MultiLoRALinear",
    "MultiPrefixBatch",
    "MultiPrefixKV",
    "MultiPromptEmbedding",
    "PHMRule",
    "ParamCount",
    "PrefixKV",
    "PrefixSelfAttention",
    "PromptEmbedding",
    "add_adapter",
    "apply_bitfit",
    "apply_ia3",
    "apply_lora",
    "bias_parameters",
    "bits_per_parameter",
    "count_trainable",
    "ia3_layers",
    "lora_bias",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "modules_to_save",
    "quantize_model",
    "remove_adapter",
    "set_batch_adapters",
    "unmerge_adapters",
]
