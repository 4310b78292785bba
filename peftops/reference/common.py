"""Helpers shared by the reference implementations."""

from __future__ import annotations

import torch
from torch import Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when the inputs are float64 (for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def up(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def dropout_keep_mask(seed: Tensor, shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """The dropout keep-mask for ``seed``: ``keep = u >= p`` with ``u ~ U[0, 1)`` drawn from a
    generator seeded with ``seed`` (an int64 scalar tensor).

    Forward and backward both call this, so the mask is regenerated, never stored. Kernels
    regenerate their own masks from the same seed with in-kernel Philox; the bits differ
    between backends, the distribution does not.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen, device=device) >= p
