"""``peftops.nn.BottleneckAdapter``: serial (Houlsby/Pfeiffer) and parallel (He et al. 2022).

Numeric checks compare with the formula written here with ``F.linear`` and torch's own
activations in float64, ``y = res + scale * up(act(down(x)))``, through
:func:`peftops.testing.assert_close`.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import peftops
from peftops.nn import BottleneckAdapter
from peftops.testing import assert_close

HYP = settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "silu": F.silu,
}


def randn(*shape, dtype=torch.float32, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def make_adapter(d, r, *, activation="gelu", scale=1.0, parallel=False, dtype=torch.float32, device="cpu", seed=0):
    """An adapter with a random (non-zero) up projection, so the branch is visible."""
    torch.manual_seed(seed)
    ad = BottleneckAdapter(d, r, activation=activation, scale=scale, parallel=parallel, dtype=dtype)
    with torch.no_grad():
        ad.up.weight.copy_(torch.randn(d, r, dtype=dtype) / math.sqrt(r))
        ad.up.bias.copy_(torch.randn(d, dtype=dtype) * 0.1)
        ad.down.bias.copy_(torch.randn(r, dtype=dtype) * 0.1)
    return ad.to(device)


def formula(ad, x, residual, activation, scale):
    """float64 autograd leaves for (x, residual, Wd, bd, Wu, bu) and the output."""
    f = lambda t: None if t is None else t.detach().to(torch.float64).requires_grad_()  # noqa: E731
    leaves = [f(t) for t in (x, residual, ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias)]
    xx, res, wd, bd, wu, bu = leaves
    z = F.linear(ACTIVATIONS[activation](F.linear(xx, wd, bd)), wu, bu)
    y = (xx if res is None else res) + scale * z
    return y, leaves


# -- init ---------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fresh_adapter_is_exactly_identity_serial_and_adds_nothing_parallel(device, activation, dtype):
    torch.manual_seed(0)
    serial = BottleneckAdapter(24, 6, activation=activation, scale=2.0, dtype=dtype).to(device)
    parallel = BottleneckAdapter(24, 6, activation=activation, scale=2.0, parallel=True, dtype=dtype).to(device)
    for ad in (serial, parallel):
        assert torch.count_nonzero(ad.up.weight) == 0 and torch.count_nonzero(ad.up.bias) == 0
        # The down projection is random. Not "every element nonzero": a 16-bit uniform init can
        # round a draw to exactly 0 (torch 2.11's CUDA bf16 did, 3 of 144 elements).
        assert torch.unique(ad.down.weight).numel() > ad.down.weight.numel() // 2
    x = randn(3, 5, 24, device=device, seed=1).to(dtype)
    res = randn(3, 5, 24, device=device, seed=2).to(dtype)
    # The up projection is zero, so the branch is exactly zero: no rounding at all.
    assert torch.equal(serial(x), x)
    assert torch.equal(parallel(x, res), res)


def test_fresh_adapter_trains_the_down_projection_after_the_first_step(device):
    """At init dWd = 0 (Wu = 0); after one step on Wu the down projection gets a gradient."""
    torch.manual_seed(0)
    ad = BottleneckAdapter(16, 4).to(device)
    x, target = randn(32, 16, device=device, seed=1), randn(32, 16, device=device, seed=2)
    opt = torch.optim.Adam(ad.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in ad.named_parameters()}
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(ad(x), target).backward()
        for name, p in ad.named_parameters():
            assert p.grad is not None, f"step {step}: {name}.grad is None"
        assert torch.count_nonzero(ad.up.weight.grad) == ad.up.weight.numel()
        if step > 0:
            assert torch.count_nonzero(ad.down.weight.grad) == ad.down.weight.numel()
        opt.step()
    for name, p in ad.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change"


# -- values and gradients -----------------------------------------------------------------


@HYP
@given(
    lead=st.lists(st.integers(0, 5), max_size=2),
    d=st.integers(1, 40),
    r=st.integers(1, 12),
    activation=st.sampled_from(list(ACTIVATIONS)),
    scale=st.floats(-4.0, 4.0),
    parallel=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_backward_match_formula(device, lead, d, r, activation, scale, parallel, dtype, seed):
    ad = make_adapter(
        d, r, activation=activation, scale=scale, parallel=parallel, dtype=dtype, device=device, seed=seed
    )
    x = randn(*lead, d, dtype=dtype, device=device, seed=seed + 1).requires_grad_()
    res = randn(*lead, d, dtype=dtype, device=device, seed=seed + 2).requires_grad_() if parallel else None
    y = ad(x, res) if parallel else ad(x)
    assert y.shape == x.shape and y.dtype == dtype
    g = randn(*lead, d, dtype=dtype, device=device, seed=seed + 3)
    y.backward(g)

    y_ref, leaves = formula(ad, x, res, activation, scale)
    y_ref.backward(g.to(torch.float64))
    assert_close(y, y_ref, dtype=dtype, name="y")
    names = ("dx", "dres", "dWd", "dbd", "dWu", "dbu")
    tensors = (x, res, ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias)
    for name, t, ref in zip(names, tensors, leaves, strict=False):
        if t is None:
            continue
        assert t.grad is not None, f"{name} is None"
        assert_close(t.grad, ref.grad, dtype=dtype, kind="bwd", name=name)


def test_adapter_module_matches_the_functional_op(device):
    ad = make_adapter(20, 5, activation="silu", scale=0.5, device=device, seed=4)
    x = randn(6, 20, device=device, seed=5)
    expected = peftops.bottleneck_adapter(
        x, ad.down.weight, ad.down.bias, ad.up.weight, ad.up.bias, activation="silu", scale=0.5
    )
    assert torch.equal(ad(x), expected)


# -- residual handling --------------------------------------------------------------------


def test_parallel_adapter_requires_a_residual():
    ad = BottleneckAdapter(8, 2, parallel=True)
    with pytest.raises(ValueError, match=r"residual: expected the sublayer's output, got None"):
        ad(torch.randn(3, 8))


def test_serial_adapter_rejects_a_residual():
    ad = BottleneckAdapter(8, 2)
    with pytest.raises(ValueError, match=r"residual: expected None"):
        ad(torch.randn(3, 8), torch.randn(3, 8))


def test_residual_shape_and_dtype_must_match_x():
    ad = BottleneckAdapter(8, 2, parallel=True)
    with pytest.raises(ValueError, match=r"residual: expected shape \(3, 8\)"):
        ad(torch.randn(3, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match=r"residual: expected dtype torch.float32"):
        ad(torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64))


def test_wrong_feature_size():
    ad = BottleneckAdapter(8, 2)
    with pytest.raises(ValueError, match=r"down_weight: expected shape \(\*, 7\).*from x"):
        ad(torch.randn(3, 7))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor"):
        ad([0.0] * 8)


# -- autocast, compile, dtype, odd shapes ---------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_autocast_bf16_with_float32_parameters(device, parallel):
    ad = make_adapter(32, 8, parallel=parallel, device=device, seed=1)
    x = randn(5, 32, device=device, seed=2).requires_grad_()
    res = randn(5, 32, device=device, seed=3).requires_grad_() if parallel else None
    g = randn(5, 32, device=device, seed=4)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = ad(x, res) if parallel else ad(x)
    assert y.dtype == torch.bfloat16
    y.backward(g.to(torch.bfloat16))
    for name, p in ad.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    assert x.grad.dtype == torch.float32 and (res is None or res.grad.dtype == torch.float32)

    # The formula on the bfloat16-rounded operands.
    bf = lambda t: None if t is None else t.detach().to(torch.bfloat16)  # noqa: E731
    shadow = make_adapter(32, 8, parallel=parallel, dtype=torch.float64, device=device)
    with torch.no_grad():
        for p, q in zip(shadow.parameters(), ad.parameters(), strict=False):
            p.copy_(bf(q).double())
    y_ref, leaves = formula(shadow, bf(x), bf(res), "gelu", 1.0)
    y_ref.backward(bf(g).double())
    assert_close(y, y_ref, dtype=torch.bfloat16, name="y")
    assert_close(x.grad, leaves[0].grad, dtype=torch.bfloat16, kind="bwd", name="dx")
    for (name, p), ref in zip(ad.named_parameters(), leaves[2:], strict=False):
        assert_close(p.grad, ref.grad, dtype=torch.bfloat16, kind="bwd", name=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("parallel", [False, True])
def test_torch_compile_fullgraph_matches_eager(device, backend, parallel):
    torch._dynamo.reset()
    ad = make_adapter(16, 4, activation="gelu_tanh", scale=0.7, parallel=parallel, device=device, seed=1)
    x = randn(2, 3, 16, device=device, seed=2)
    res = randn(2, 3, 16, device=device, seed=3)
    g = randn(2, 3, 16, device=device, seed=4)

    def run(fn):
        ad.zero_grad(set_to_none=True)
        xx, rr = x.clone().requires_grad_(), res.clone().requires_grad_()
        y = fn(xx, rr) if parallel else fn(xx)
        y.backward(g)
        grads = [xx.grad] + ([rr.grad] if parallel else []) + [p.grad.clone() for p in ad.parameters()]
        return y.detach(), grads

    y_e, g_e = run(ad)
    y_c, g_c = run(torch.compile(ad, fullgraph=True, backend=backend))
    assert_close(y_c, y_e, name="compiled y")
    for i, (a, b) in enumerate(zip(g_c, g_e, strict=False)):
        assert_close(a, b, kind="bwd", name=f"compiled grad {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_to_dtype(device, dtype):
    ad = make_adapter(12, 3, device=device).to(dtype)
    assert all(p.dtype == dtype for p in ad.parameters())
    x = randn(4, 12, device=device, seed=1).to(dtype).requires_grad_()
    y = ad(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert all(p.grad.dtype == dtype for p in ad.parameters())
    y_ref, _ = formula(ad, x, None, "gelu", 1.0)
    assert_close(y, y_ref, dtype=dtype)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("shape", [(0, 10), (2, 0, 10)])
def test_zero_size_batch(device, parallel, shape):
    ad = make_adapter(10, 3, parallel=parallel, device=device)
    x = torch.zeros(shape, device=device, requires_grad=True)
    y = ad(x, torch.zeros(shape, device=device)) if parallel else ad(x)
    assert y.shape == shape
    y.sum().backward()
    assert x.grad.shape == shape
    for name, p in ad.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and torch.count_nonzero(p.grad) == 0, name


def test_state_dict_round_trip():
    src = make_adapter(10, 4, activation="relu", seed=3)
    sd = src.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "down.weight": (4, 10),
        "down.bias": (4,),
        "up.weight": (10, 4),
        "up.bias": (10,),
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    dst = BottleneckAdapter(10, 4, activation="relu")
    dst.load_state_dict(torch.load(buf))
    x = randn(3, 10, seed=1)
    assert torch.equal(dst(x), src(x))


def test_mark_only_adapters_trainable_freezes_the_host_model():
    model = nn.Sequential(nn.Linear(8, 8), BottleneckAdapter(8, 2), nn.Linear(8, 3))
    peftops.mark_only_adapters_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1.down.weight", "1.down.bias", "1.up.weight", "1.up.bias"}


# -- bad constructor arguments --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"d": 0}, ValueError, r"\bd: expected an int >= 1"),
        ({"d": 8.0}, TypeError, r"\bd: expected an int"),
        ({"r": 0}, ValueError, r"\br: expected an int >= 1"),
        ({"r": "2"}, TypeError, r"\br: expected an int"),
        ({"activation": "tanh"}, ValueError, r"activation: expected one of"),
        ({"scale": float("inf")}, ValueError, r"scale: expected a finite"),
        ({"scale": None}, TypeError, r"scale: expected a real"),
        # Wrong kind of value: TypeError, as the functional op raises for the same argument.
        ({"activation": None}, TypeError, r"activation: expected a str"),
        # bool("False") is True: a string must not silently make a parallel adapter.
        ({"parallel": "False"}, TypeError, r"parallel"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    args = {"d": 8, "r": 2, **kwargs}
    with pytest.raises(exc, match=match):
        BottleneckAdapter(**args)
