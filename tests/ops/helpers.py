"""Helpers for op tests: gradients of a call, backend parametrisation, independent truths."""

from __future__ import annotations

from collections.abc import Callable

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


def grads_of(fn: Callable[..., Tensor], inputs: dict[str, Tensor | None], seed: int = 0):
    """``(out, {name: grad})`` for a random (not all-ones) incoming gradient."""
    out = fn(**inputs)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad}
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    # allow_unused so that a gradient silently missing shows up as None and fails the comparison.
    grads = torch.autograd.grad(out, list(leaves.values()), g, allow_unused=True) if leaves else ()
    return out, dict(zip(leaves, grads, strict=False))


def as_float64(inputs: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
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


def check_graph_replay(
    fn: Callable[..., Tensor], inputs: dict[str, Tensor | None], fresh: dict[str, Tensor | None]
) -> None:
    """Capture ``fn``'s forward and the gradients of every input requiring grad in one CUDA graph, copy ``fresh``
    into the captured inputs, replay, and require bitwise equality with an eager call on
    ``fresh``: no host synchronisation, no allocation-dependent launch arguments, nothing read
    on the host.

    The captured leaves are new tensors: a leaf that already fed an autograd graph still alive
    elsewhere keeps its AccumulateGrad node on the stream it was made on (the legacy default
    stream), and the engine's wait on that stream would break the capture (torch >= 2.11).
    """
    wrt = [k for k, v in inputs.items() if isinstance(v, Tensor) and v.requires_grad]
    static = {k: None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    out0 = fn(**static)
    g_out = torch.randn(out0.shape, device=out0.device, dtype=torch.float32).to(out0.dtype)
    del out0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile and warm up outside the capture
            torch.autograd.grad(fn(**static), [static[k] for k in wrt], g_out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn(**static)
        grads = torch.autograd.grad(y, [static[k] for k in wrt], g_out)
    with torch.no_grad():
        for k, v in static.items():
            if v is not None:
                v.copy_(fresh[k])
    graph.replay()
    want_y = fn(**fresh)
    want = torch.autograd.grad(want_y, [fresh[k] for k in wrt], g_out)
    torch.cuda.synchronize()
    assert torch.equal(y, want_y)
    for name, got, exp in zip(wrt, grads, want, strict=False):
        assert torch.equal(got, exp), name
