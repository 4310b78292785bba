"""What the kernel backends share (peftops.kernels.common, lowrank's and attention's constants):
one dtype rule, one activation numbering, one rank limit per kernel family."""

from __future__ import annotations

import math

import pytest
import torch

import peftops
from peftops import reference
from peftops.backends import implementation
from peftops.kernels import common, lowrank, prefix_attention

F64 = "float32, float16 or bfloat16, got torch.float64"


def test_dtype_reason_lists_what_is_taken():
    assert common.dtype_reason(torch.float16, "the triton kernels take") is None
    assert common.dtype_reason(torch.float64, "the triton kernels take") == f"the triton kernels take {F64}"
    only_16 = (torch.float16, torch.bfloat16)
    assert common.dtype_reason(torch.bfloat16, "the TMA GEMM takes", only_16) is None
    assert (
        common.dtype_reason(torch.float32, "the TMA GEMM takes", only_16)
        == "the TMA GEMM takes float16 or bfloat16, got torch.float32"
    )
    assert common.dtype_reason(torch.float32, "X takes", (torch.float16,)) == "X takes float16, got torch.float32"


def _float64_calls():
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(6, 8, dtype=torch.float64)
    a, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    q = k = v = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    stack_a, stack_b = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 6, 2, dtype=torch.float64)
    return {
        "lora_linear": lambda: peftops.lora_linear(x, w, a, b),
        "bottleneck_adapter": lambda: peftops.bottleneck_adapter(
            x, a, None, a.T.contiguous(), None, activation="relu", scale=1.0
        ),
        "prefix_attention": lambda: peftops.prefix_attention(q, k, v, None, None),
        "multi_lora_linear": lambda: peftops.multi_lora_linear(
            x, w, stack_a, stack_b, torch.tensor([0, -1, 1]), scales=torch.ones(2), ranks=torch.full((2,), 2)
        ),
    }


@pytest.mark.parametrize("op", sorted(_float64_calls()))
def test_every_triton_op_refuses_float64_in_the_same_words(op):
    with peftops.use_backend("triton"), pytest.raises(peftops.BackendUnavailableError, match=f"take {F64}"):
        _float64_calls()[op]()


def test_cuda_backend_refuses_float64_in_the_same_words():
    x, w = torch.randn(3, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    a, b = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    got = implementation("multi_lora_linear", "cuda").supports(x, w, a, b, None, None, None, None, 0.0, None)
    assert got == f"the CUDA kernels take {F64}"


def test_activation_codes_are_the_numbering_the_kernels_switch_on():
    # The Triton _act switches on these numbers: a reordered activation list would silently
    # swap activations in the kernels.
    assert common.ACT_CODES == {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
    assert tuple(common.ACT_CODES) == reference.ACTIVATIONS


def test_rank_limits_are_one_constant_per_family():
    """LoRA's GEMMs and the adapter's row kernels share lowrank's limit (multi-LoRA, its own
    family, has its own)."""
    from peftops.kernels import bottleneck_adapter, lora_linear, lora_linear_tma

    for module in (lora_linear, lora_linear_tma, bottleneck_adapter):
        assert module.MAX_RANK is lowrank.MAX_RANK, module.__name__


def test_attention_log_constants():
    assert prefix_attention.LOG2E.value == math.log2(math.e)
    assert prefix_attention.LN2.value == math.log(2.0)
