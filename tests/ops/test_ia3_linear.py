"""peftops.ia3_linear: every backend against an independent truth (forward and every
gradient), gradcheck, opcheck, torch.compile, the saved z, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import peftops
from peftops.ops.ia3_linear import ia3_linear
from peftops.testing import assert_close

from .helpers import assert_matches, backend_params, grads_of, use

OP = "ia3_linear"


def op_call(backend, scale_input):
    def fn(x, weight, ia3_scale, bias):
        with use(backend):
            return ia3_linear(x, weight, ia3_scale, bias, scale_input=scale_input)

    return fn


def truth(scale_input):
    """Independent formulation: peft's eager module (scale x, or the base layer's output)."""

    def fn(x, weight, ia3_scale, bias):
        if scale_input:
            return F.linear(x * ia3_scale, weight, bias)
        return F.linear(x, weight, bias) * ia3_scale

    return fn


def make_inputs(dtype, device, scale_input, with_bias=True, lead=(3, 7), in_f=20, out_f=13, layout="plain", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=gen)
    if layout == "sliced":  # a non-contiguous x
        x = torch.randn(*lead, in_f + 5, generator=gen)[..., 2 : 2 + in_f]
    w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    if layout == "sliced":  # a transposed weight view, as IA3Linear passes a Conv1D's
        w = w.T.contiguous().T
    l = torch.rand(in_f if scale_input else out_f, generator=gen) + 0.5  # noqa: E741
    b = torch.randn(out_f, generator=gen) if with_bias else None

    def leaf(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

    return dict(x=leaf(x), weight=leaf(w), ia3_scale=leaf(l), bias=leaf(b))


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout,with_bias", [("plain", True), ("sliced", False)])
def test_matches_peft_formulation_forward_and_gradients(device, backend, scale_input, dtype, layout, with_bias):
    inputs = make_inputs(dtype, device, scale_input, with_bias, layout=layout)
    assert_matches(op_call(backend, scale_input), truth(scale_input), inputs, dtype, what=f"{backend} {layout}")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("scale_input", [False, True])
def test_gradcheck_float64(backend, scale_input):
    t = make_inputs(torch.float64, "cpu", scale_input, lead=(2, 3), in_f=6, out_f=5)
    assert torch.autograd.gradcheck(op_call(backend, scale_input), tuple(t.values()))


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("scale_input,save_z", [(False, True), (False, False), (True, False)])
def test_opcheck(device, backend, scale_input, save_z):
    t = make_inputs(torch.float32, device, scale_input, lead=(5,), in_f=9, out_f=6)
    args = (t["x"], t["weight"], t["ia3_scale"], t["bias"], scale_input, save_z, backend)
    opcheck(torch.ops.peftops.ia3_linear.default, args)
    with torch.no_grad():
        _, saved_z = torch.ops.peftops.ia3_linear(*args)
    g = torch.randn(5, 6, device=device)
    detached = [t[k].detach() for k in ("x", "weight", "ia3_scale", "bias")]
    opcheck(
        torch.ops.peftops.ia3_linear_backward.default,
        (g, *detached, saved_z, scale_input, [True, False, True, True], backend),
    )


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("scale_input", [False, True])
def test_compile_fullgraph_matches_eager(device, backend, scale_input):
    def step(x, weight, ia3_scale, bias):
        with use(backend):
            return torch.tanh(ia3_linear(x, weight, ia3_scale, bias, scale_input=scale_input))

    (y0, g0), (y1, g1) = (
        grads_of(fn, make_inputs(torch.float32, device, scale_input, lead=(2, 5), in_f=12, out_f=8))
        for fn in (step, torch.compile(step, fullgraph=True))
    )
    assert_close(y1, y0, name="compiled output")
    assert g0.keys() == g1.keys()
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")


def test_z_is_saved_only_when_the_vector_is_trained():
    """The unscaled output is kept for dl alone: a frozen vector costs no extra output."""
    seen = []
    t = make_inputs(torch.float32, "cpu", False)

    def pack(saved):
        seen.append(tuple(saved.shape))
        return saved

    for l_grad, want in ((True, (3, 7, 13)), (False, (0,))):
        seen.clear()
        t["ia3_scale"].requires_grad_(l_grad)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
            with use("reference"):
                ia3_linear(t["x"], t["weight"], t["ia3_scale"], t["bias"])
        assert seen[-1] == want


def test_public_export():
    assert peftops.ops.ia3_linear is ia3_linear


BAD_INPUTS = [
    (
        dict(ia3_scale=torch.randn(8)),
        ValueError,
        r"ia3_scale: expected shape \(6,\) \(out,\) with out=6 from weight \(scale_input=False\), got \(8,\)",
    ),
    (
        dict(ia3_scale=torch.randn(6), scale_input=True),
        ValueError,
        r"ia3_scale: expected shape \(8,\) \(in,\) with in=8 from x \(scale_input=True\)",
    ),
    (dict(ia3_scale=torch.randn(6, 1)), ValueError, r"ia3_scale: expected 1 dims, got 2"),
    (dict(x=torch.randn(4, 3)), ValueError, r"weight: expected shape \(\*, 3\)"),
    (dict(x=torch.randn(4, 0)), ValueError, r"x: expected at least 1 input feature"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, r"weight: expected 2 dims, got 3"),
    (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\)"),
    (dict(ia3_scale=torch.randn(6, dtype=torch.float64)), TypeError, r"ia3_scale: expected dtype torch.float32"),
    (dict(x=[[1.0] * 8]), TypeError, r"x: expected a torch.Tensor, got list"),
    (dict(ia3_scale=torch.ones(6, dtype=torch.int64)), TypeError, r"ia3_scale: expected a floating-point tensor"),
    (dict(scale_input=1), TypeError, r"scale_input: expected a bool, got int"),
]


@pytest.mark.parametrize("change,exc,match", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_named_argument(change, exc, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), ia3_scale=torch.randn(6), bias=None, scale_input=False)
    args.update(change)
    with pytest.raises(exc, match=r"ia3_linear: " + match):
        ia3_linear(**args)
