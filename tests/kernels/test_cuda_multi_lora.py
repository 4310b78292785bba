"""The CUDA C++ multi-LoRA decode kernels (csrc/multi_lora_gather.cu, the ``cuda`` backend of
``multi_lora_linear``): on a GPU against the spec (every id pattern, heterogeneous ranks in
larger slots, base-only rows, float32/float16/bfloat16, gradients through the Triton backward)
and under a CUDA graph replayed with a different mix of adapters; on CPU, what the backend
refuses and why. The source is compile-checked in test_csrc_compiles.py."""

from __future__ import annotations

import pytest
import torch

import peftops
from peftops.backends import implementation
from peftops.testing import assert_close

from ..ops.helpers import assert_matches
from .test_multi_lora_linear import case_of, spec


def _cuda_call(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks):
    with peftops.use_backend("cuda"):
        return peftops.multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scales=scales, bias=bias, ranks=ranks)


def test_cuda_backend_is_never_chosen_for_cpu_tensors():
    assert "cuda" not in peftops.available_backends("multi_lora_linear", "cpu")


def _args(t=4, k=16, n=8, slots=2, r_max=8, dtype=torch.float16):
    x, w = torch.randn(t, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    a, b = torch.randn(slots, r_max, k, dtype=dtype), torch.randn(slots, n, r_max, dtype=dtype)
    return x, w, a, b, torch.zeros(t, dtype=torch.int64), torch.ones(slots), None, None


def test_cuda_backend_refuses_dropout_and_unaligned_widths_with_the_reason():
    supports = implementation("multi_lora_linear", "cuda").supports
    x, w, a, b, ids, scales, bias, ranks = _args()
    assert "no dropout (serving), got dropout_p=0.1" in supports(x, w, a, b, ids, scales, bias, ranks, 0.1, None)
    x, w, a, b, ids, scales, bias, ranks = _args(k=12)
    assert "multiples of 8, got 12 and 8" in supports(x, w, a, b, ids, scales, bias, ranks, 0.0, None)
    x, w, a, b, ids, scales, bias, ranks = _args(r_max=6)
    assert "multiples of 8, got 16 and 6" in supports(x, w, a, b, ids, scales, bias, ranks, 0.0, None)
    x, w, a, b, ids, scales, bias, ranks = _args(r_max=4, dtype=torch.float32)  # 4 floats are 16 bytes
    assert "16-byte" not in str(supports(x, w, a, b, ids, scales, bias, ranks, 0.0, None))


# -- GPU ----------------------------------------------------------------------------------------

PATTERNS = ["mixed", "base_only", "one", "distinct", "few"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_the_spec_forward_and_gradients(dtype, pattern):
    """Ranks drawn in [1, r_max] per slot (heterogeneous, in rank-16 slots), in 64 features."""
    case = case_of(24, 7, pattern, in_f=64, out_f=72, r_max=16, seed=3)
    assert_matches(_cuda_call, spec, case.inputs(dtype, "cuda"), dtype, what=f"cuda {pattern} {dtype}")


@pytest.mark.gpu
def test_memcheck_smoke():
    """Small, for compute-sanitizer (benchmarks/gpu_session.sh, memcheck): every path once."""
    case = case_of(9, 3, "mixed", in_f=64, out_f=40, r_max=8, seed=4)
    t = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.inputs(torch.bfloat16, "cuda").items()}
    y = _cuda_call(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], t["adapter_ids"], t["scales"], t["ranks"])
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()


@pytest.mark.gpu
def test_graph_replay_with_another_mix_of_adapters_gives_each_row_its_own():
    """Capture one decode step, then change the ids in place and replay: every row follows its
    new adapter (a serving engine that captured the adapter mix would not)."""
    case = case_of(16, 8, "distinct", in_f=64, out_f=64, r_max=16, seed=5)
    t = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.inputs(torch.bfloat16, "cuda").items()}
    ids = t["adapter_ids"].clone()

    def step():
        return _cuda_call(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], ids, t["scales"], t["ranks"])

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # build the extension and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new_ids = torch.flip(t["adapter_ids"], [0])
    new_ids[::3] = -1
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    want = spec(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], new_ids, t["scales"], t["ranks"])
    assert_close(out, want, dtype=torch.bfloat16, name="replayed with new ids")
