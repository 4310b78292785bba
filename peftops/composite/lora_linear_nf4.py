"""``lora_linear_nf4`` on the framework's GEMMs (the ``torch`` backend): the 4-bit weight
dequantised into a temporary in x's dtype (bitsandbytes' formula, one float32 value per element
in flight), then ``lora_linear``'s ``torch`` backend on it; the backward dequantises again when
it needs dx, rather than keep the full-precision weight alive between the passes. This is the
"dequantise, then cuBLAS" baseline the Triton kernels are measured against."""

from __future__ import annotations

from ..backends import register_impl
from ..ops.lora_linear_nf4 import OP, on_dequantized_impl

register_impl(OP, "torch", on_dequantized_impl("torch"))
