"""Backend selection and the seam the triton and cuda backends plug into."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import peftops
from peftops import backends
from peftops.backends import BackendUnavailableError, OpImpl
from peftops.testing import assert_close

from .strategies import LoraCase

# The module, which the function of the same name shadows in the peftops.ops namespace.
lora_ops = importlib.import_module("peftops.ops.lora_linear")

CASE = LoraCase(lead=(3,), in_f=20, out_f=11, rank=4, bias=True, scale=0.5, layout="contiguous", seed=0)


def call(t):
    return peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], bias=t["bias"], scale=0.5)


def test_unknown_backend_name_is_rejected():
    with pytest.raises(
        ValueError,
        match=r"use_backend\(name\): expected one of 'auto', 'reference', 'torch', 'triton', 'cuda', got 'fast'",
    ):
        with peftops.use_backend("fast"):
            pass
    with pytest.raises(TypeError, match=r"use_backend\(name\): expected a backend name \(str\), got int"):
        with peftops.use_backend(1):
            pass


def test_use_backend_nests_and_restores():
    assert peftops.get_backend() == os.environ.get("PEFTOPS_BACKEND", "auto")
    with peftops.use_backend("reference"):
        assert peftops.get_backend() == "reference"
        with peftops.use_backend("auto"):
            assert peftops.get_backend() == "auto"
        assert peftops.get_backend() == "reference"
    assert peftops.get_backend() == os.environ.get("PEFTOPS_BACKEND", "auto")


def test_auto_on_cpu_is_the_torch_composite_where_there_is_one_else_the_reference():
    # Never the interpreter, which exists for testing.
    assert backends.resolve_backend("lora_linear", torch.device("cpu"), (), "auto") == "torch"
    for op in ("bottleneck_adapter", "prefix_attention", "multi_lora_linear"):
        assert backends.resolve_backend(op, torch.device("cpu"), (), "auto") == "reference"


@contextlib.contextmanager
def swapped_impl(op: str, backend: str, impl):
    """Replace (or, with ``impl=None``, remove) a backend's implementation for the block."""
    saved = backends._IMPLS.get(op, {}).get(backend)
    backends.unregister_impl(op, backend)
    if impl is not None:
        backends.register_impl(op, backend, impl)
    try:
        yield
    finally:
        backends.unregister_impl(op, backend)
        if saved is not None:
            backends.register_impl(op, backend, saved)


def test_naming_a_backend_without_an_implementation_raises_instead_of_falling_back():
    t = CASE.inputs(torch.float32, "cpu")
    with swapped_impl("lora_linear", "triton", None), peftops.use_backend("triton"):
        with pytest.raises(
            BackendUnavailableError,
            match=r"lora_linear: backend 'triton' was requested but cannot run this call: it has no implementation",
        ):
            call(t)


def test_cuda_backend_needs_cuda_tensors():
    t = CASE.inputs(torch.float32, "cpu")
    with peftops.use_backend("cuda"):
        with pytest.raises(BackendUnavailableError, match=r"backend 'cuda'.*needs CUDA tensors, got a cpu tensor"):
            call(t)


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )


def test_environment_variable_selects_the_backend():
    code = (
        "import torch, peftops; print(peftops.get_backend());"
        "peftops.lora_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(1, 3), torch.randn(4, 1))"
    )
    ok = _run_python(code, PEFTOPS_BACKEND="reference")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "reference"
    bad = _run_python(code, PEFTOPS_BACKEND="fastest")
    assert bad.returncode != 0
    assert (
        "ValueError: environment variable PEFTOPS_BACKEND: expected one of" in bad.stderr and "'fastest'" in bad.stderr
    )
    gpu_only = _run_python(code, PEFTOPS_BACKEND="cuda")
    assert gpu_only.returncode != 0 and "BackendUnavailableError" in gpu_only.stderr


@pytest.mark.parametrize("interpret,expected", [("1", None), ("0", "TRITON_INTERPRET=1")])
def test_triton_runs_on_cpu_only_under_the_interpreter(interpret, expected):
    code = "from peftops.backends import backend_status; print(backend_status('triton', 'cpu'))"
    out = _run_python(code, TRITON_INTERPRET=interpret)
    assert out.returncode == 0, out.stderr
    assert (out.stdout.strip() == "None") if expected is None else (expected in out.stdout)


def test_triton_refuses_bfloat16_under_the_interpreter_instead_of_computing_garbage():
    """The interpreter's bf16 tl.dot is wrong (errors of ~1e10 were returned before this check);
    naming the backend must raise before any launch, and float16 must still run."""
    t = CASE.inputs(torch.bfloat16, "cpu", requires_grad=False)
    with peftops.use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match=r"interpreter \(TRITON_INTERPRET=1\) computes bfloat16"):
            call(t)
        assert "triton" in peftops.available_backends("lora_linear", "cpu")  # the limit is per call
        half = CASE.inputs(torch.float16, "cpu", requires_grad=False)
        got = call(half)
    with peftops.use_backend("reference"):
        assert_close(got, call(half))
    # Without the interpreter no per-call check runs at all, on any device type.
    code = "from peftops import backends;print([backends._BACKENDS['triton'].call_check(d) for d in ('cuda', 'cpu')])"
    out = _run_python(code, TRITON_INTERPRET="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[None, None]"


def test_a_per_call_check_does_not_recompile_compiled_code():
    """The per-call check's table fills lazily; compiled code must not guard on it."""
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=backend)
    t = CASE.inputs(torch.float32, "cpu", requires_grad=False)
    with peftops.use_backend("reference"):
        compiled(t)
        backends._CALL_CHECKS[("unrelated", "meta")] = None  # a new key, as a new device type adds
        try:
            compiled(t)
        finally:
            backends._CALL_CHECKS.pop(("unrelated", "meta"))
    assert counts["frames"] == 1


# -- the seam, exercised with a real Triton kernel under the interpreter ------------------------


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def _triton_copy(t: torch.Tensor) -> torch.Tensor:
    src = t.contiguous()
    dst = torch.full_like(src, float("nan"))  # poisoned: an unwritten element shows
    _copy_kernel[(triton.cdiv(src.numel(), 64),)](src, dst, src.numel(), BLOCK=64)
    return dst


@pytest.fixture
def fake_triton_lora():
    """A stand-in for the ``triton`` implementation of lora_linear: the spec's math, with the
    output passed through a real Triton kernel, counting its calls (the real kernels are
    restored afterwards)."""
    calls = {"forward": 0, "backward": 0}

    def forward(*args):
        calls["forward"] += 1
        y, lora_u = lora_ops.reference_forward(*args)
        return _triton_copy(y), lora_u

    def backward(*args):
        calls["backward"] += 1
        return lora_ops.reference_backward(*args)

    def supports(x, *rest):
        return "float16 is not supported by this stand-in" if x.dtype == torch.float16 else None

    with swapped_impl("lora_linear", "triton", OpImpl(forward=forward, backward=backward, supports=supports)):
        yield calls


def test_registered_triton_backend_runs_on_cpu_and_backward_follows_forward(fake_triton_lora):
    assert "triton" in peftops.available_backends("lora_linear", "cpu")
    t = CASE.inputs(torch.float32, "cpu")
    with peftops.use_backend("triton"):
        y = call(t)
    assert fake_triton_lora == {"forward": 1, "backward": 0}
    y.square().sum().backward()  # outside the block: the backward still runs where the forward ran
    assert fake_triton_lora == {"forward": 1, "backward": 1}
    want = CASE.inputs(torch.float32, "cpu")
    with peftops.use_backend("reference"):
        call(want).square().sum().backward()
    assert_close(y, call(want))
    for name in ("x", "lora_a", "lora_b", "bias"):
        assert_close(t[name].grad, want[name].grad, kind="bwd", name=name)
    # auto never picks the interpreter on CPU
    call(t)
    assert fake_triton_lora["forward"] == 1


def test_unsupported_inputs_explain_why(fake_triton_lora):
    t = CASE.inputs(torch.float16, "cpu")
    with peftops.use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match="float16 is not supported by this stand-in"):
            call(t)


def test_compiled_code_follows_the_backend_selection(fake_triton_lora):
    """torch.compile guards on the selection: switching backends re-dispatches."""
    compiled = torch.compile(call, fullgraph=True)
    t = CASE.inputs(torch.float32, "cpu", requires_grad=False)
    with peftops.use_backend("reference"):
        ref = compiled(t)
    assert fake_triton_lora["forward"] == 0
    with peftops.use_backend("triton"):
        out = compiled(t)
    assert fake_triton_lora["forward"] == 1
    assert_close(out, ref)
