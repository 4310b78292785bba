"""Helpers for op tests: gradients of a call, backend parametrisation, independent truths."""

from __future__ import annotations

from typing import Callable, Optional

import pytest
import torch
from torch import Tensor

import peftops
from peftops.backends import available_backends, implemented_backends
from peftops.testing import assert_close


def backend_params(op: str) -> list:
    """(device, backend) pairs to test: every backend this process runs on CPU (the triton
    one too under TRITON_INTERPRET=1, once it implements the op), and every implemented
    backend on CUDA (``gpu`` marker)."""
    params = [pytest.param("cpu", b, id=f"cpu-{b}") for b in available_backends(op, "cpu")]
    params += [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in implemented_backends(op)]
    return params


def grads_of(fn: Callable[..., Tensor], inputs: dict[str, Optional[Tensor]], seed: int = 0):
    """``(out, {name: grad})`` for a random (not all-ones) incoming gradient."""
    out = fn(**inputs)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    # allow_unused so that a gradient silently missing shows up as None and fails the comparison.
    grads = torch.autograd.grad(out, list(leaves.values()), g, allow_unused=True) if leaves else ()
    return out, dict(zip(leaves, grads))


def as_float64(inputs: dict[str, Optional[Tensor]]) -> dict[str, Optional[Tensor]]:
    """Leaf float64 copies (floating tensors only) keeping requires_grad."""
    out = {}
    for k, v in inputs.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            out[k] = v.detach().to(torch.float64).requires_grad_(v.requires_grad)
        else:
            out[k] = v
    return out


def assert_matches(op_fn, truth_fn, inputs, dtype, *, what: str) -> None:
    """The op at ``dtype`` against ``truth_fn`` in float64 on the same inputs: forward and every gradient."""
    out, grads = grads_of(op_fn, inputs)
    out_ref, grads_ref = grads_of(truth_fn, as_float64(inputs))
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype=dtype, kind="fwd", name=f"{what} output")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name] is not None, f"{what}: gradient of {name} is None"
        assert grads[name].shape == inputs[name].shape
        assert_close(grads[name], grads_ref[name], dtype=dtype, kind="bwd", name=f"{what} d{name}")


def use(backend: str):
    return peftops.use_backend(backend)
