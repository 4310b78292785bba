"""Triton kernels, one module per op, each registering itself as the ``triton`` backend of
its op through :func:`peftops.backends.register_impl` when imported.

Implemented: ``lora_linear`` (:mod:`peftops.kernels.lora_linear`), ``bottleneck_adapter``
(:mod:`peftops.kernels.bottleneck_adapter`), ``prefix_attention`` (:mod:`peftops.kernels.prefix_attention`),
``multi_lora_linear`` (:mod:`peftops.kernels.multi_lora_linear`, the segmented path);
shared rank-r building blocks in :mod:`peftops.kernels.lowrank`.

Kernel modules read ``TRITON_INTERPRET`` when they are imported (``triton.jit`` decides at
decoration time), so set it before importing peftops to run the kernels on CPU tensors.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:
    from . import bottleneck_adapter, lora_linear, multi_lora_linear, prefix_attention  # noqa: F401  (each registers the triton backend of its op)
