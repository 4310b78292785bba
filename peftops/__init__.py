"""peftops: fused kernels for parameter-efficient fine-tuning.

Functional ops: :func:`lora_linear`, :func:`dora_linear`, :func:`ia3_linear`,
:func:`lora_linear_nf4` (QLoRA), :func:`multi_lora_linear`, :func:`bottleneck_adapter`,
:func:`prefix_attention`.
Hugging Face workflow: :func:`accelerate`, :func:`save_adapter` / :func:`load_adapter`,
:func:`merge_and_unload`, :func:`apply_prefix_tuning`, :func:`apply_prompt_tuning`,
:func:`apply_adapters`, :func:`generate`.
Modules and model surgery: :mod:`peftops.nn`. Backends: :func:`use_backend`.
"""

# Each backend package registers itself when imported; this order is the order in which
# peftops.backends lists them: the spec first, then the framework composite, then kernels.
# ruff: noqa: I001
from . import backends, reference
from .ops import (  # the reference backend
    bottleneck_adapter,
    dora_linear,
    ia3_linear,
    lora_linear,
    lora_linear_nf4,
    multi_lora_linear,
    prefix_attention,
)
from . import composite, kernels, cuda_ext  # noqa: F401  (the torch, triton and cuda backends)
from . import nn
from .backends import BackendUnavailableError, available_backends, get_backend, use_backend
from .integrations.adapters import (
    add_bottleneck,
    apply_adapters,
    remove_adapters,
    remove_bottleneck,
    set_bottleneck_ids,
)
from .integrations.checkpoint import load_adapter, merge_and_unload, save_adapter
from .integrations.distributed_checkpoint import load_sharded_adapter, save_sharded_adapter
from .integrations.generate import generate
from .integrations.peft import accelerate, restore  # peft itself is imported on first use
from .integrations.prefix_tuning import (
    add_prefix,
    apply_prefix_tuning,
    remove_prefix,
    remove_prefix_tuning,
    set_prefix_bank,
    set_prefix_ids,
)
from .integrations.prompt_tuning import (
    add_prompt,
    apply_prompt_tuning,
    remove_prompt,
    remove_prompt_tuning,
    set_prompt_ids,
)
from .nn import (
    quantize_model,
    apply_bitfit,
    apply_ia3,
    apply_lora,
    count_trainable,
    mark_only_adapters_trainable,
    merge_adapters,
    unmerge_adapters,
)

__version__ = "0.1.0"

__all__ = [
    "accelerate",
    "apply_adapters",
    "apply_bitfit",
    "apply_ia3",
    "apply_lora",
    "apply_prefix_tuning",
    "add_bottleneck",
    "add_prefix",
    "add_prompt",
    "apply_prompt_tuning",
    "load_sharded_adapter",
    "remove_bottleneck",
    "remove_prefix",
    "remove_prompt",
    "save_sharded_adapter",
    "set_bottleneck_ids",
    "set_prompt_ids",
    "available_backends",
    "backends",
    "BackendUnavailableError",
    "bottleneck_adapter",
    "count_trainable",
    "dora_linear",
    "generate",
    "get_backend",
    "ia3_linear",
    "load_adapter",
    "lora_linear",
    "lora_linear_nf4",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "merge_and_unload",
    "multi_lora_linear",
    "nn",
    "prefix_attention",
    "quantize_model",
    "reference",
    "remove_adapters",
    "remove_prefix_tuning",
    "remove_prompt_tuning",
    "restore",
    "save_adapter",
    "set_prefix_bank",
    "set_prefix_ids",
    "unmerge_adapters",
    "use_backend",
]
