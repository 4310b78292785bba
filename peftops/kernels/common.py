"""What every Triton launcher shares: output allocation, dot precision, device context."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

#: Tests set this to fill every kernel output with NaN before launch, so an element a kernel
#: forgot to write shows up instead of passing as stale memory.
POISON_ENV = "PEFTOPS_POISON_OUTPUTS"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def empty(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if os.environ.get(POISON_ENV, "0") == "1":
        # Integer outputs (packed dropout masks) get all bits set: a byte never written then
        # reads as "keep everything", which the keep-rate tests see.
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: float32 inputs use TF32 only where PyTorch's own matmuls
    may (``torch.backends.cuda.matmul.allow_tf32``), so peftops is never less exact than the
    ``F.linear`` it replaces; 16-bit inputs are exact products either way."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"  # (16-bit products are exact; some backends reject "tf32" for them)


@contextlib.contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Launch on the tensors' GPU (and so on that GPU's current stream), not the default one."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield
    else:
        yield


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        from .block_config import device_info  # (block_config imports this module)

        return device_info(device).sms  # cached per device: a properties query costs host time per launch
    return 1
