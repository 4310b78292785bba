"""Public functional ops. Each module validates arguments, picks a backend and calls the op
registered with ``torch.library`` (schema, fake implementation, autograd)."""

from .bottleneck_adapter import bottleneck_adapter
from .dora_linear import dora_linear
from .ia3_linear import ia3_linear
from .lora_linear import lora_linear
from .lora_linear_nf4 import lora_linear_nf4
from .multi_lora_linear import multi_lora_linear
from .prefix_attention import prefix_attention

__all__ = [
    "bottleneck_adapter",
    "dora_linear",
    "ia3_linear",
    "lora_linear",
    "lora_linear_nf4",
    "multi_lora_linear",
    "prefix_attention",
]
