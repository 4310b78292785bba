"""The bottleneck-adapter spec (peftops.reference.bottleneck_adapter): activation derivatives and the
written-out backward against autograd."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftops import reference
from peftops.testing import assert_close

from ..ops.helpers import grads_of
from ..strategies import ACTIVATIONS, AdapterCase, adapter_cases


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_derivative_formulas(activation):
    h = torch.linspace(-6, 6, 1001, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(reference.activation(h, activation).sum(), h)
    assert_close(reference.activation_grad(h.detach(), activation), auto, name=f"{activation}'")


@given(case=adapter_cases(max_features=40, max_rank=16), need=st.lists(st.booleans(), min_size=5, max_size=5))
@settings(max_examples=15)
def test_reference_explicit_backward_matches_autograd(case: AdapterCase, need):
    t = case.inputs(torch.float64, "cpu")
    fwd = lambda **kw: reference.bottleneck_adapter(**kw, activation=case.activation, scale=case.scale)  # noqa: E731
    out, want = grads_of(fwd, t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    need[2] &= case.down_bias
    need[4] &= case.up_bias
    got = reference.bottleneck_adapter_backward(
        g,
        t["x"].detach(),
        t["down_weight"].detach(),
        None if t["down_bias"] is None else t["down_bias"].detach(),
        t["up_weight"].detach(),
        activation=case.activation,
        scale=case.scale,
        serial=not case.parallel,
        output_mask=need,
    )
    for name, grad, needed in zip(("x", "down_weight", "down_bias", "up_weight", "up_bias"), got, need, strict=False):
        if needed:
            assert_close(grad, want[name], kind="bwd", name=f"explicit d{name}")
        else:
            assert grad is None, f"d{name} computed although not requested"
