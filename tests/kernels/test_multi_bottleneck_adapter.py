"""The triton kernels of the bottleneck adapter banks against the spec, under the interpreter on
CPU (outputs poisoned with NaN: an element never written fails), at odd shapes that cross
the row, column and rank blocks and give one adapter several tiles."""

from __future__ import annotations

import pytest
import torch

from peftops.kernels import multi_bottleneck_adapter as kernels
from peftops.reference.bottleneck_adapter import multi_bottleneck_adapter, multi_bottleneck_adapter_backward
from peftops.testing import assert_close


def case(dtype, seed=0, tokens=75, d=45, num=4, r_max=20):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen) * s).to(dtype)

    # Adapter 2 takes 40 tokens (two tiles of 32), adapter 1 none; ids shuffled.
    ids = torch.tensor([2] * 40 + [0] * 15 + [3] * 9 + [-1] * 11)[torch.randperm(tokens, generator=gen)]
    return dict(
        x=rnd(tokens, d),
        down_weight=rnd(num, r_max, d, s=0.3),
        down_bias=rnd(num, r_max, s=0.3),
        up_weight=rnd(num, d, r_max, s=0.3),
        up_bias=rnd(num, d, s=0.3),
        adapter_ids=ids,
        ranks=torch.tensor([20, 7, 17, 1]),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_forward_matches_the_spec(dtype, parallel):
    t = case(dtype)
    res = torch.randn(t["x"].shape).to(dtype) if parallel else None
    args = (t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["adapter_ids"], t["ranks"])
    y, h = kernels.forward(*args, res, "gelu_tanh", 0.8)
    y_ref, h_ref = multi_bottleneck_adapter(*args, activation="gelu_tanh", scale=0.8, residual=res)
    assert_close(y, y_ref, name="y")
    assert_close(h, h_ref, dtype=dtype, name="hidden")
    base = t["adapter_ids"] < 0
    assert torch.equal(y[base], (t["x"] if res is None else res)[base]), "rows without an adapter are the residual"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", [(True,) * 5, *[tuple(i == j for j in range(5)) for i in range(5)]])
def test_backward_matches_the_spec_for_every_single_output(dtype, mask):
    t = case(dtype, seed=1)
    args = (t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["adapter_ids"], t["ranks"])
    _, hidden = kernels.forward(*args, None, "silu", -0.6)
    grad = torch.randn(t["x"].shape).to(dtype)
    common = (t["down_weight"], t["down_bias"], t["up_weight"], t["adapter_ids"], t["ranks"])
    got = kernels.backward(grad, t["x"], *common, hidden, "silu", -0.6, True, list(mask))
    want = multi_bottleneck_adapter_backward(grad, t["x"], *common, "silu", -0.6, True, list(mask))
    for name, g, w, need in zip(("dx", "dWd", "dbd", "dWu", "dbu"), got, want, mask, strict=True):
        if not need:
            assert g is None, name
            continue
        assert_close(g, w, kind="bwd", name=name)
    if mask[3]:
        assert torch.count_nonzero(got[3][1]) == 0, "dWu of the absent adapter"
        assert torch.count_nonzero(got[3][2, :, 17:]) == 0, "dWu rank padding"


def test_without_biases_and_ranks():
    t = case(torch.float32, seed=2)
    args = (t["x"], t["down_weight"], None, t["up_weight"], None, t["adapter_ids"], None)
    y, hidden = kernels.forward(*args, None, "relu", 1.3)
    assert_close(y, multi_bottleneck_adapter(*args, activation="relu", scale=1.3)[0], name="y")
    grad = torch.randn(t["x"].shape)
    common = (t["down_weight"], None, t["up_weight"], t["adapter_ids"], None)
    got = kernels.backward(grad, t["x"], *common, hidden, "relu", 1.3, False, [True, True, False, True, False])
    want = multi_bottleneck_adapter_backward(
        grad, t["x"], *common, "relu", 1.3, False, [True, True, False, True, False]
    )
    for name, g, w in zip(("dx", "dWd", "dbd", "dWu", "dbu"), got, want, strict=True):
        assert (g is None) == (w is None), name
        if g is not None:
            assert_close(g, w, kind="bwd", name=name)
