"""The tolerance policy bites: plausible wrong answers fail it, the right ones pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftops.testing import assert_close, check_fa_rule, tolerance

from ..ops.helpers import assert_matches
from ..ops.test_lora_linear import merged_truth
from ..strategies import LoraCase

CASE = LoraCase(lead=(6, 5), in_f=65, out_f=33, rank=8, bias=True, scale=0.5, layout="transposed", seed=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_rounding_passes_and_twice_the_budget_fails(dtype):
    truth = torch.randn(1000, dtype=torch.float64)
    assert_close(truth.to(dtype), truth)  # one rounding of the truth is within tolerance
    scale = truth.abs().max()
    bad = truth.clone()
    bad[17] += 2 * tolerance(dtype).atol * scale + 2 * tolerance(dtype).rtol * truth[17].abs()
    with pytest.raises(AssertionError, match=r"1/1000 elements out of tolerance.*worst at \(17,\)"):
        assert_close(bad.to(dtype), truth, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_budget_is_a_few_roundings(dtype):
    assert tolerance(dtype).atol <= 4 * torch.finfo(dtype).eps / 2  # 4 unit roundoffs


def test_non_finite_values_fail_and_report_where():
    truth = torch.randn(10, dtype=torch.float64)
    got = truth.clone()
    got[3] = float("nan")
    with pytest.raises(AssertionError, match="1 non-finite values"):
        assert_close(got, truth)


def test_backward_rows_are_looser_than_forward_rows():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert tolerance(dtype, "bwd").atol > tolerance(dtype, "fwd").atol


def _lora(scale_error=1.0, drop_bias_grad=False):
    def fn(x, weight, lora_a, lora_b, bias):
        b = bias.detach() if drop_bias_grad else bias
        return F.linear(x, weight, b) + CASE.scale * scale_error * (x @ lora_a.T) @ lora_b.T

    return fn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "mutant,match",
    [
        (dict(scale_error=1.1), "output"),  # a 10% error in the adapter's scale
        (dict(drop_bias_grad=True), "gradient of bias is None|dbias"),
    ],
)
def test_op_comparison_catches_mutants(dtype, mutant, match):
    inputs = CASE.inputs(dtype, "cpu")
    assert_matches(_lora(), merged_truth(CASE.scale), inputs, dtype, what="correct")
    with pytest.raises(AssertionError, match=match):
        assert_matches(_lora(**mutant), merged_truth(CASE.scale), CASE.inputs(dtype, "cpu"), dtype, what="mutant")


def test_fa_rule_accepts_torch_like_error_and_rejects_six_times_it():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(4096, generator=gen, dtype=torch.float32)
    lowp = ref.to(torch.float16)  # PyTorch in float16: one rounding
    torch_err = (lowp.float() - ref).abs().max()
    ok, _, _ = check_fa_rule(lowp, ref, lowp)
    assert ok
    worse = (ref + 6 * torch_err * torch.sign(torch.randn(4096, generator=gen))).to(torch.float16)
    ok, err, budget = check_fa_rule(worse, ref, lowp)
    assert not ok and err > budget
