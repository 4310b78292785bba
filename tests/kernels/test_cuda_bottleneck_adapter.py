"""The CUDA C++ bottleneck-adapter forward (csrc/bottleneck_adapter.cu, the ``cuda`` backend).
Runs only on a GPU; the source is compile-checked on CPU in test_csrc_compiles.py."""

from __future__ import annotations

import pytest
import torch

import peftops
from peftops.testing import check_fa_rule

from ..ops.helpers import assert_matches, grads_of
from ..ops.test_bottleneck_adapter import eager_truth
from ..strategies import AdapterCase


def test_cuda_backend_is_never_chosen_for_cpu_tensors():
    assert "cuda" not in peftops.available_backends("bottleneck_adapter", "cpu")


def call(backend, case):
    def fn(x, down_weight, down_bias, up_weight, up_bias, residual):
        with peftops.use_backend(backend):
            return peftops.bottleneck_adapter(
                x,
                down_weight,
                down_bias,
                up_weight,
                up_bias,
                activation=case.activation,
                scale=case.scale,
                residual=residual,
            )

    return fn


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("rank,d", [(1, 33), (16, 1000), (64, 4096), (256, 129), (8, 16384)])
def test_gpu_smoke_float32_against_eager(activation, parallel, rank, d):
    """float32 (no TF32 in the CUDA kernel) against the eager formulation: forward and, through
    the Triton backward, every gradient. Also the compute-sanitizer target of gpu_session.sh."""
    case = AdapterCase(
        lead=(3, 37),
        d=d,
        rank=rank,
        activation=activation,
        parallel=parallel,
        down_bias=True,
        up_bias=parallel,
        scale=0.5,
        layout="contiguous",
        seed=rank,
    )
    assert_matches(
        call("cuda", case), eager_truth(case), case.inputs(torch.float32, "cuda"), torch.float32, what=f"cuda {case}"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_cuda_and_triton_agree_within_the_fa_rule(dtype):
    case = AdapterCase(
        lead=(4096,),
        d=1024,
        rank=64,
        activation="gelu",
        parallel=False,
        down_bias=True,
        up_bias=True,
        scale=1.0,
        layout="contiguous",
        seed=9,
    )
    t = case.inputs(dtype, "cuda", requires_grad=False)
    f32 = {k: (None if v is None else v.float()) for k, v in t.items()}
    ref = eager_truth(case)(**f32)
    low = eager_truth(case)(**t)
    for backend in ("cuda", "triton"):
        ok, err, budget = check_fa_rule(call(backend, case)(**t), ref, low)
        assert ok, f"{backend}: error {err:.3g} above the FA budget {budget:.3g}"


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_cuda_graph():
    from torch.library import opcheck

    case = AdapterCase(
        lead=(256,),
        d=512,
        rank=16,
        activation="silu",
        parallel=True,
        down_bias=True,
        up_bias=True,
        scale=2.0,
        layout="contiguous",
        seed=3,
    )
    t = case.inputs(torch.bfloat16, "cuda")
    peftops.cuda_ext.load()
    stream = torch.cuda.current_stream().cuda_stream
    opcheck(
        torch.ops.peftops.bottleneck_adapter_fwd_cuda.default,
        (
            t["x"].detach(),
            t["down_weight"].detach(),
            t["down_bias"].detach(),
            t["up_weight"].detach(),
            t["up_bias"].detach(),
            t["residual"].detach(),
            3,
            2.0,
            stream,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )
    eager = grads_of(call("cuda", case), t)
    compiled = grads_of(torch.compile(call("cuda", case), fullgraph=True), t)
    assert torch.equal(eager[0], compiled[0])
    graph = torch.cuda.CUDAGraph()
    call("cuda", case)(**t)  # build and warm up outside the capture
    with torch.cuda.graph(graph):
        y = call("cuda", case)(**{k: (None if v is None else v.detach()) for k, v in t.items()})
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, eager[0].detach())


def test_cuda_backend_supports_only_what_its_triton_backward_supports():
    """Its backward runs the Triton kernels: a rank those reject must not get the C++ forward
    (issue 11: a rank-300 adapter got the C++ forward and an untested backward)."""
    from peftops.backends import implementation
    from peftops.kernels.bottleneck_adapter import MAX_RANK

    cuda_supports = implementation("bottleneck_adapter", "cuda").supports
    x = torch.randn(4, 16)
    for rank, ok in ((MAX_RANK, True), (MAX_RANK + 1, False)):
        down_weight = torch.randn(rank, 16)
        reason = cuda_supports(x, down_weight, None, torch.randn(16, rank), None, None, "gelu", 1.0)
        assert (reason is None) == ok, reason
        if not ok:
            assert f"ranks up to {MAX_RANK}" in reason and "backward runs the Triton kernels" in reason


@pytest.mark.gpu
def test_cuda_relu_keeps_nan_like_torch():
    """fmaxf(NaN, 0) is 0; torch.relu(NaN) is NaN (issue 11, defect 3, in the C++ forward)."""
    x = torch.randn(5, 16, device="cuda")
    wd, wu = torch.randn(4, 16, device="cuda"), torch.randn(16, 4, device="cuda")
    wd[1, 3] = float("nan")  # hidden column 1 is NaN for every token
    with torch.no_grad(), peftops.use_backend("cuda"):
        y = peftops.bottleneck_adapter(x, wd, None, wu, None, activation="relu")
    assert torch.isnan(y).all()
