"""Triton kernels, one module per op, each registering itself as the ``triton`` backend of
its op through :func:`peftops.backends.register_impl` when imported.

Implemented: ``lora_linear`` (:mod:`peftops.kernels.lora`). Ops without kernels yet run on
the reference backend under ``auto``; naming ``triton`` for them raises
:class:`peftops.backends.BackendUnavailableError`.

Kernel modules read ``TRITON_INTERPRET`` when they are imported (``triton.jit`` decides at
decoration time), so set it before importing peftops to run the kernels on CPU tensors.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:
    from . import lora  # noqa: F401  (registers the triton backend of lora_linear)
