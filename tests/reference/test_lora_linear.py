"""The LoRA spec (peftops.reference.lora_linear): against the merged-weight formulation, and its
written-out backward against autograd."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftops import reference
from peftops.testing import assert_close

from ..ops.helpers import grads_of
from ..ops.test_lora_linear import merged_truth
from ..strategies import LoraCase, lora_cases


@given(case=lora_cases(max_features=40, max_rank=16))
@settings(max_examples=10)
def test_reference_spec_matches_merged_weight(case: LoraCase):
    """The spec itself, in float64, against the merged-weight formulation."""
    inputs = case.inputs(torch.float64, "cpu")
    got, g1 = grads_of(lambda **t: reference.lora_linear(**t, scale=case.scale), inputs)
    want, g2 = grads_of(merged_truth(case.scale), inputs)
    assert_close(got, want, name="reference")
    for name in g1:
        assert_close(g1[name], g2[name], kind="bwd", name=f"reference d{name}")


@given(
    case=lora_cases(max_features=40, max_rank=16),
    p=st.sampled_from([0.0, 0.1, 0.5]),
    need=st.lists(st.booleans(), min_size=5, max_size=5),
)
@settings(max_examples=15)
def test_reference_explicit_backward_matches_autograd(case: LoraCase, p, need):
    """The written-out gradient formulas against autograd of the forward spec, with a
    dropout mask, and only the requested gradients computed."""
    inputs = case.inputs(torch.float64, "cpu")
    keep = torch.rand(inputs["x"].shape, generator=torch.Generator().manual_seed(case.seed)) >= p if p else None
    fwd = lambda **t: reference.lora_linear(**t, scale=case.scale, keep=keep, dropout_p=p)  # noqa: E731
    out, want = grads_of(fwd, inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if not case.bias:
        need[4] = False
    got = reference.lora_linear_backward(
        g,
        inputs["x"].detach(),
        inputs["weight"].detach(),
        inputs["lora_a"].detach(),
        inputs["lora_b"].detach(),
        scale=case.scale,
        keep=keep,
        dropout_p=p,
        output_mask=need,
    )
    for name, grad, needed in zip(("x", "weight", "lora_a", "lora_b", "bias"), got, need, strict=False):
        if needed:
            assert_close(grad, want[name], kind="bwd", name=f"explicit d{name}")
        else:
            assert grad is None, f"d{name} computed although not requested"
