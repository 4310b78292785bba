"""The mathematical spec of every peftops op: readable PyTorch, float32 accumulation.

Each function here is the definition its kernels are tested against, and together they are
the ``reference`` backend (the CPU implementation). Forward functions are differentiable
with plain autograd; the ``*_backward`` functions write the gradient out explicitly so that
kernel authors have a formula to match (and tests check it against autograd).
"""

from .bottleneck_adapter import (
    ACTIVATIONS,
    activation,
    activation_grad,
    adapter_hidden,
    bottleneck_adapter,
    bottleneck_adapter_backward,
)
from .common import dropout_keep_mask
from .compacter import compacter_adapter, compacter_weights, phm_matrix
from .dora_linear import dora_linear, dora_linear_backward, dora_weight_norm, dora_weight_norm_direct, weight_sq_norm
from .ia3_linear import ia3_base_output, ia3_linear, ia3_linear_backward
from .lora_linear import lora_activation, lora_linear, lora_linear_backward
from .multi_lora_linear import multi_lora_linear, multi_lora_linear_backward
from .nf4 import (
    FP4_CODE,
    NF4_CODE,
    QuantState4bit,
    dequantize_4bit,
    dequantize_absmax,
    dequantize_fp4,
    dequantize_nf4,
    dynamic_map,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
    state_from_bnb,
    state_from_dict,
    state_to_bnb,
    state_to_dict,
)
from .prefix_attention import (
    default_scale,
    prefix_attention,
    prefix_attention_backward,
    prefix_attention_banks,
    prefix_attention_banks_backward,
    visible_mask,
)

__all__ = [
    "ACTIVATIONS",
    "FP4_CODE",
    "NF4_CODE",
    "QuantState4bit",
    "activation",
    "activation_grad",
    "adapter_hidden",
    "bottleneck_adapter",
    "bottleneck_adapter_backward",
    "compacter_adapter",
    "compacter_weights",
    "default_scale",
    "dropout_keep_mask",
    "dora_linear",
    "dora_linear_backward",
    "dora_weight_norm",
    "dora_weight_norm_direct",
    "dequantize_4bit",
    "dequantize_absmax",
    "dequantize_fp4",
    "dequantize_nf4",
    "dynamic_map",
    "weight_sq_norm",
    "ia3_base_output",
    "ia3_linear",
    "ia3_linear_backward",
    "lora_activation",
    "lora_linear",
    "lora_linear_backward",
    "multi_lora_linear",
    "multi_lora_linear_backward",
    "phm_matrix",
    "prefix_attention",
    "prefix_attention_backward",
    "prefix_attention_banks",
    "prefix_attention_banks_backward",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
    "state_from_bnb",
    "state_from_dict",
    "state_to_bnb",
    "state_to_dict",
    "visible_mask",
]
