"""The ``torch`` backend of the bottleneck adapter banks (``peftops::multi_bottleneck_adapter``):
tokens grouped by adapter on the device into single-adapter tiles, batched GEMMs per product
(:func:`peftops.ops.bottleneck_adapter.torch_forward` / ``torch_backward``, next to the op
they serve)."""

from __future__ import annotations

from ..backends import OpImpl, register_impl
from ..ops.bottleneck_adapter import MULTI_OP, torch_backward, torch_forward

register_impl(MULTI_OP, "torch", OpImpl(forward=torch_forward, backward=torch_backward))
