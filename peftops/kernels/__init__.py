"""The ``triton`` backend: Triton kernels, one module per op, each registering its
implementation through :func:`peftops.backends.register_impl` when imported.

Implemented: ``lora_linear`` (:mod:`peftops.kernels.lora_linear`), ``bottleneck_adapter``
(:mod:`peftops.kernels.bottleneck_adapter`), ``prefix_attention``
(:mod:`peftops.kernels.prefix_attention`), ``multi_lora_linear``
(:mod:`peftops.kernels.multi_lora_linear`, the segmented path), ``dora_linear``
(:mod:`peftops.kernels.dora_linear`), ``ia3_linear`` (:mod:`peftops.kernels.ia3_linear`),
``lora_linear_nf4`` (:mod:`peftops.kernels.lora_linear_nf4`), the bottleneck adapter banks
(:mod:`peftops.kernels.multi_bottleneck_adapter`); shared rank-r building blocks
in :mod:`peftops.kernels.lowrank`, launch configurations in :mod:`peftops.kernels.block_config`.

Kernel modules read ``TRITON_INTERPRET`` when they are imported (``triton.jit`` decides at
decoration time), so set it before importing peftops to run the kernels on CPU tensors.
"""

import importlib.util
from collections.abc import Iterator

import torch

from ..backends import register_backend
from .common import interpreting

_INSTALLED = importlib.util.find_spec("triton") is not None


def _status(device_type: str) -> str | None:
    if not _INSTALLED:
        return "the triton package is not installed"
    if device_type == "cuda" or (device_type == "cpu" and interpreting()):
        return None
    return (
        f"triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
        f"peftops kernels are imported; got a {device_type} tensor"
    )


def _tensors(args) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def _interpreter_bf16(args) -> str | None:
    if any(t.dtype == torch.bfloat16 for t in _tensors(args)):
        return (
            "Triton's interpreter (TRITON_INTERPRET=1) computes bfloat16 dot products wrongly, so "
            "bfloat16 runs only on a GPU without the interpreter; got a bfloat16 tensor (use float32 "
            "or float16 here, or another backend)"
        )
    return None


def _call_check(device_type: str):
    # Only the interpreter has the limit (it also runs CUDA tensors, copied to the host); compiled
    # kernels pay for no per-call check.
    return _interpreter_bf16 if interpreting() else None


register_backend("triton", _status, call_check=_call_check)

if _INSTALLED:
    from . import (  # noqa: F401  (each registers its op)
        bottleneck_adapter,
        dora_linear,
        ia3_linear,
        lora_linear,
        lora_linear_nf4,
        multi_bottleneck_adapter,
        multi_lora_linear,
        prefix_attention,
    )
