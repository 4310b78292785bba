"""Triton kernels, one module per op, each registering itself as the ``triton`` backend of
its op through :func:`peftops.backends.register_impl` when imported.

No kernel lands here before its issue (LoRA, bottleneck adapter, prefix attention); until
then ``auto`` resolves to the reference backend and asking for ``triton`` by name raises
:class:`peftops.backends.BackendUnavailableError`.

Kernel modules read ``TRITON_INTERPRET`` when they are imported (``triton.jit`` decides at
decoration time), so set it before the first peftops kernel import to run on CPU tensors.
"""
