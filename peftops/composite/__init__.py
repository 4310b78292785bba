"""The ``torch`` backend: each op composed from the framework's own kernels.

The large products go to the GEMMs PyTorch ships (cuBLAS on CUDA, the CPU BLAS elsewhere);
the rank-r terms are narrow passes; every output is written once, by letting the big GEMM
accumulate into an output that the narrow passes pre-filled (``addmm_`` with beta = 1). It
runs wherever torch runs, needs no build step, and on a GPU is by construction no slower than
the ``addmm`` composition users write by hand, which is why ``auto`` falls back to it when a
GPU or shape has no measurement (``kernels/configs/auto.json``).

Implemented: ``lora_linear`` (:mod:`peftops.composite.lora_linear`), ``dora_linear``
(:mod:`peftops.composite.dora_linear`), ``ia3_linear`` (:mod:`peftops.composite.ia3_linear`), ``lora_linear_nf4``
(:mod:`peftops.composite.lora_linear_nf4`), the bottleneck adapter banks
(:mod:`peftops.composite.multi_bottleneck_adapter`).
"""

from ..backends import register_backend

register_backend("torch", lambda device_type: None)

from . import dora_linear, ia3_linear, lora_linear, lora_linear_nf4, multi_bottleneck_adapter  # noqa: E402, F401  (each registers its op; the backend must exist first)
