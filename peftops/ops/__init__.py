"""Public functional ops. Each module validates arguments, picks a backend and calls the op
registered with ``torch.library`` (schema, fake implementation, autograd)."""

from .adapter import bottleneck_adapter
from .attention import prefix_attention
from .lora import lora_linear
from .multi_lora import multi_lora_linear

__all__ = ["bottleneck_adapter", "lora_linear", "multi_lora_linear", "prefix_attention"]
