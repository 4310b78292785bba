"""What every Triton launcher shares: output allocation, dot precision, device context, the
dtypes the kernels take and the activation codes they switch on. Nothing here imports triton,
so the ``cuda`` backend (:mod:`peftops.cuda_ext`) reads the same tables."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..reference import ACTIVATIONS

#: Tests set this to fill every kernel output with NaN before launch, so an element a kernel
#: forgot to write shows up instead of passing as stale memory.
POISON_ENV = "PEFTOPS_POISON_OUTPUTS"


#: What the Triton kernels (and the CUDA C++ kernels) take; float64 is the reference's alone.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: The bottleneck adapter's activation as its kernels switch on it (Triton's ``_act``): its
#: position in the spec's list, so a new activation is appended there, never inserted.
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter: the one reader of TRITON_INTERPRET."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dtype_reason(dtype: torch.dtype, who_takes: str, allowed: tuple[torch.dtype, ...] = KERNEL_DTYPES) -> str | None:
    """For a backend's ``supports``: None if ``dtype`` is ``allowed``, else the reason, as
    ``"{who_takes} float32, float16 or bfloat16, got torch.float64"``."""
    if dtype in allowed:
        return None
    names = [str(d).removeprefix("torch.") for d in allowed]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"{who_takes} {listed}, got {dtype}"


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
