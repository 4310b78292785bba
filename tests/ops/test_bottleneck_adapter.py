"""peftops.bottleneck_adapter: values and gradients, validation, registration, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import peftops
from peftops.testing import assert_close

from ..strategies import ACTIVATIONS, DTYPES, AdapterCase, adapter_cases
from .helpers import assert_matches, backend_params, grads_of, use

OP = "bottleneck_adapter"
EAGER_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "silu": F.silu}


def op_call(backend, case: AdapterCase):
    def fn(x, down_weight, down_bias, up_weight, up_bias, residual):
        with use(backend):
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


def eager_truth(case: AdapterCase):
    """Independent formulation: the ``nn.Linear -> activation -> nn.Linear -> add`` users write."""

    def fn(x, down_weight, down_bias, up_weight, up_bias, residual):
        z = F.linear(EAGER_ACT[case.activation](F.linear(x, down_weight, down_bias)), up_weight, up_bias)
        return (x if residual is None else residual) + case.scale * z

    return fn


@pytest.mark.parametrize("device,backend", backend_params(OP))
@given(case=adapter_cases(), data=st.data())
def test_matches_eager_forward_and_gradients(device, backend, case: AdapterCase, data):
    dtype = data.draw(st.sampled_from(DTYPES[device]), label="dtype")
    assert_matches(
        op_call(backend, case), eager_truth(case), case.inputs(dtype, device), dtype, what=f"{backend} {case}"
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("parallel", [False, True])
def test_gradcheck_float64(activation, parallel):
    case = AdapterCase(
        lead=(2, 3),
        d=6,
        rank=3,
        activation=activation,
        parallel=parallel,
        down_bias=True,
        up_bias=True,
        scale=0.5,
        layout="sliced",
        seed=1,
    )
    t = case.inputs(torch.float64, "cpu")
    if activation == "relu":  # keep pre-activations away from the kink, where finite differences lie
        with torch.no_grad():
            t["down_bias"] += torch.where(t["down_bias"] >= 0, 0.5, -0.5)

    def fn(*a):
        return peftops.bottleneck_adapter(*a[:5], activation=activation, scale=0.5, residual=a[5] if parallel else None)  # noqa: E731

    args = [t[k] for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")] + (
        [t["residual"]] if parallel else []
    )
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("parallel,biases", [(False, True), (True, False)])
def test_opcheck(device, backend, parallel, biases):
    case = AdapterCase(
        lead=(5,),
        d=12,
        rank=3,
        activation="silu",
        parallel=parallel,
        down_bias=biases,
        up_bias=biases,
        scale=0.5,
        layout="transposed",
        seed=2,
    )
    t = case.inputs(torch.float32, device)
    args = (t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["residual"], "silu", 0.5, backend)
    opcheck(torch.ops.peftops.bottleneck_adapter.default, args)
    with torch.no_grad():
        _, hidden = torch.ops.peftops.bottleneck_adapter(*args)
    g = torch.randn(5, 12, device=device)
    db = None if t["down_bias"] is None else t["down_bias"].detach()
    opcheck(
        torch.ops.peftops.bottleneck_adapter_backward.default,
        (
            g,
            t["x"].detach(),
            t["down_weight"].detach(),
            db,
            t["up_weight"].detach(),
            hidden,
            "silu",
            0.5,
            not parallel,
            [True, True, biases, True, biases],
            backend,
        ),
    )


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_zero_size_batch(device, backend, lead):
    case = AdapterCase(
        lead=lead,
        d=5,
        rank=2,
        activation="gelu",
        parallel=True,
        down_bias=True,
        up_bias=True,
        scale=1.0,
        layout="contiguous",
        seed=3,
    )
    t = case.inputs(torch.float32, device)
    with use(backend):
        y = peftops.bottleneck_adapter(
            t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], residual=t["residual"]
        )
    assert y.shape == (*lead, 5)
    y.sum().backward()
    assert t["x"].grad.shape == t["x"].shape and torch.count_nonzero(t["up_weight"].grad) == 0


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_compile_fullgraph_matches_eager(device, backend):
    case = AdapterCase(
        lead=(2, 7),
        d=24,
        rank=4,
        activation="gelu_tanh",
        parallel=True,
        down_bias=True,
        up_bias=False,
        scale=0.5,
        layout="transposed",
        seed=4,
    )

    def step(x, down_weight, down_bias, up_weight, up_bias, residual):
        with use(backend):
            y = peftops.bottleneck_adapter(
                x, down_weight, down_bias, up_weight, up_bias, activation="gelu_tanh", scale=0.5, residual=residual
            )
        return torch.tanh(y)

    (y0, g0), (y1, g1) = (
        grads_of(fn, case.inputs(torch.float32, device)) for fn in (step, torch.compile(step, fullgraph=True))
    )
    assert_close(y1, y0, name="compiled output")
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")


BAD_INPUTS = [
    (dict(down_weight=torch.randn(3, 7)), ValueError, r"down_weight: expected shape \(\*, 8\).*got \(3, 7\)"),
    (dict(up_weight=torch.randn(8, 4)), ValueError, r"up_weight: expected shape \(8, 3\).*got \(8, 4\)"),
    (dict(down_bias=torch.randn(4)), ValueError, r"down_bias: expected shape \(3,\)"),
    (dict(up_bias=torch.randn(3)), ValueError, r"up_bias: expected shape \(8,\)"),
    (dict(residual=torch.randn(4, 7)), ValueError, r"residual: expected shape \(4, 8\)"),
    (dict(up_bias=torch.randn(8, dtype=torch.float16)), TypeError, r"up_bias: expected dtype torch.float32"),
    (
        dict(activation="tanh"),
        ValueError,
        r"activation: expected one of 'relu', 'gelu', 'gelu_tanh', 'silu', got 'tanh'",
    ),
    (dict(activation=None), TypeError, r"activation: expected a str, got NoneType"),
    (dict(scale=float("-inf")), ValueError, r"scale: expected a finite number"),
    (dict(x=torch.randn(4, 8, device="meta")), ValueError, r"down_weight: expected device meta"),
    (dict(down_weight=torch.randn(3)), ValueError, r"down_weight: expected 2 dims, got 1"),
    # r = 0 passed validation; the triton forward ran and its backward failed with a reshape error.
    (
        dict(down_weight=torch.randn(0, 8), down_bias=torch.randn(0), up_weight=torch.randn(8, 0)),
        ValueError,
        r"down_weight: expected a bottleneck width r >= 1, got shape \(0, 8\)",
    ),
    (
        dict(x=torch.randn(4, 0), down_weight=torch.randn(3, 0), up_weight=torch.randn(0, 3), up_bias=torch.randn(0)),
        ValueError,
        r"x: expected a feature dim d >= 1, got shape \(4, 0\)",
    ),
]


@pytest.mark.parametrize("change,exc,match", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_named_argument(change, exc, match):
    args = dict(
        x=torch.randn(4, 8),
        down_weight=torch.randn(3, 8),
        down_bias=torch.randn(3),
        up_weight=torch.randn(8, 3),
        up_bias=torch.randn(8),
        activation="gelu",
        scale=1.0,
        residual=None,
    )
    args.update(change)
    pos = [args.pop(k) for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
    with pytest.raises(exc, match=r"bottleneck_adapter: " + match):
        peftops.bottleneck_adapter(*pos, **args)
