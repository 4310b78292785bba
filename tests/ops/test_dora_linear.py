"""peftops.dora_linear: every backend against peft's formulation (forward and every gradient,
with and without dropout), gradcheck, opcheck, torch.compile, the cached ||W||^2, the saved
saved unscaled output, validation."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from peftops import reference
from peftops.ops.dora_linear import dora_linear
from peftops.testing import assert_close

from .helpers import as_float64, assert_matches, backend_params, grads_of, use

OP = "dora_linear"


def op_call(backend, scale, dropout_p=0.0):
    def fn(x, weight, lora_a, lora_b, magnitude, bias):
        with use(backend):
            return dora_linear(x, weight, lora_a, lora_b, magnitude, scale=scale, bias=bias, dropout_p=dropout_p)

    return fn


def truth(scale, keep=None, p=0.0):
    """peft's ``DoraLinearVariant.forward``, written out: the base layer's output, plus
    ``(c - 1)`` times the base term (on the dropped x when dropout is active), plus ``c``
    times the LoRA term, with ``c = m / ||W + s B A||`` detached."""

    def fn(x, weight, lora_a, lora_b, magnitude, bias):
        norm = torch.linalg.vector_norm(weight + scale * (lora_b @ lora_a), dim=1).detach()
        c = magnitude / norm
        xd = x if keep is None else x * keep / (1 - p)
        base = F.linear(x, weight, bias)
        base_d = (base if bias is None else base - bias) if keep is None else F.linear(xd, weight)
        return base + (c - 1) * base_d + c * scale * F.linear(F.linear(xd, lora_a), lora_b)

    return fn


def make_inputs(dtype, device, with_bias=True, lead=(3, 7), in_f=20, out_f=13, r=4, layout="plain", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=gen)
    if layout == "sliced":  # a non-contiguous x
        x = torch.randn(*lead, in_f + 5, generator=gen)[..., 2 : 2 + in_f]
    w = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    if layout == "sliced":  # a transposed weight view, as a Conv1D's LoRA layer passes it
        w = w.T.contiguous().T
    a = torch.randn(r, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, r, generator=gen) / r**0.5
    m = torch.rand(out_f, generator=gen) + 0.5
    bias = torch.randn(out_f, generator=gen) if with_bias else None

    def leaf(t):
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_()

    return dict(x=leaf(x), weight=leaf(w), lora_a=leaf(a), lora_b=leaf(b), magnitude=leaf(m), bias=leaf(bias))


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout,with_bias", [("plain", True), ("sliced", False)])
def test_matches_peft_formulation_forward_and_gradients(device, backend, dtype, layout, with_bias):
    inputs = make_inputs(dtype, device, with_bias, layout=layout)
    assert_matches(op_call(backend, 0.75), truth(0.75), inputs, dtype, what=f"{backend} {layout}")


def _call_op(backend, t, p, seed, save_pre=True, weight_sq=None, scale=0.75):
    args = (t["x"], t["weight"], t["lora_a"], t["lora_b"], t["magnitude"], t["bias"], weight_sq, scale, p, seed)
    return torch.ops.peftops.dora_linear(*args, save_pre, backend)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("with_bias", [True, False])
def test_dropout_matches_peft_formulation_with_the_op_mask(device, backend, with_bias):
    # The op returns its keep-mask; peft's formulation with that mask is the truth.
    t = make_inputs(torch.float32, device, with_bias)
    torch.manual_seed(4)
    y, _, _, keep, _ = _call_op(backend, t, 0.3, torch.tensor(5))
    assert keep.shape == t["x"].shape and 0.5 < keep.float().mean() < 0.9
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device)
    leaves = {k: v for k, v in t.items() if v is not None}
    got = torch.autograd.grad(y, list(leaves.values()), g)
    t64 = as_float64(t)
    want_y = truth(0.75, keep.double(), 0.3)(**t64)
    want = torch.autograd.grad(want_y, [t64[k] for k in leaves], g.double())
    assert_close(y, want_y, dtype=torch.float32, name="y")
    for name, a, e in zip(leaves, got, want, strict=True):
        assert_close(a, e, dtype=torch.float32, kind="bwd", name=f"d{name}")


# gradcheck's finite differences see the norm move with W, A and B; the op (as peft) treats
# it as a constant. So gradcheck covers the inputs the norm does not depend on, and float64
# autograd of peft's formulation (norm detached) covers the others.


def _gradcheck_partial(fn, t):
    fixed = {k: t[k].detach() for k in ("weight", "lora_a", "lora_b")}

    def free(x, magnitude, bias):
        return fn(x=x, magnitude=magnitude, bias=bias, **fixed)

    assert torch.autograd.gradcheck(free, (t["x"], t["magnitude"], t["bias"]))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_float64(backend):
    t = make_inputs(torch.float64, "cpu", lead=(2, 3), in_f=6, out_f=5, r=2)
    _gradcheck_partial(op_call(backend, 0.5), t)
    out, grads = grads_of(op_call(backend, 0.5), t)
    out_ref, grads_ref = grads_of(truth(0.5), t)
    torch.testing.assert_close(out, out_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], msg=lambda m, n=name: f"d{n}: {m}")


def test_gradcheck_float64_reference_with_dropout():
    # The reference regenerates its mask from the seed, so a fixed seed gives a fixed function.
    t = make_inputs(torch.float64, "cpu", lead=(2, 3), in_f=6, out_f=5, r=2)
    seed = torch.tensor(3)

    def fn(x, weight, lora_a, lora_b, magnitude, bias):
        args = dict(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude, bias=bias)
        return _call_op("reference", args, 0.3, seed)[0]

    _gradcheck_partial(fn, t)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dropout_p,save_pre,with_bias", [(0.0, True, True), (0.0, False, False), (0.25, True, False)])
def test_opcheck(device, backend, dropout_p, save_pre, with_bias):
    t = make_inputs(torch.float32, device, with_bias, lead=(5,), in_f=9, out_f=6, r=3, layout="sliced")
    seed = torch.tensor(77, device=device) if dropout_p else None
    w_sq = reference.weight_sq_norm(t["weight"])
    args = (t["x"], t["weight"], t["lora_a"], t["lora_b"], t["magnitude"], t["bias"], w_sq, 0.5, dropout_p, seed,
            save_pre, backend)  # fmt: skip
    opcheck(torch.ops.peftops.dora_linear.default, args)
    with torch.no_grad():
        _, u, pre, keep, norm = torch.ops.peftops.dora_linear(*args)
    assert pre.shape == ((5, 6) if save_pre else (0,))
    g = torch.randn(5, 6, device=device)
    detached = [t[k].detach() for k in ("x", "weight", "lora_a", "lora_b", "magnitude")]
    opcheck(
        torch.ops.peftops.dora_linear_backward.default,
        (g, *detached, u, pre, keep, norm, 0.5, dropout_p, [True, False, True, True, True, with_bias], backend),
    )


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_magnitude_gradient_without_the_saved_unscaled_output(device, backend):
    # A caller that did not save the unscaled output still gets dm: the backward recomputes it.
    t = make_inputs(torch.float32, device, lead=(6,), in_f=9, out_f=6, r=3)
    out = [_call_op(backend, t, 0.0, None, save_pre=s) for s in (True, False)]
    g = torch.randn(6, 6, device=device)
    grads = [torch.autograd.grad(o[0], [t["magnitude"], t["lora_b"]], g) for o in out]
    assert out[1][2].numel() == 0
    for a, e in zip(grads[1], grads[0], strict=True):
        assert_close(a, e, kind="bwd")


def test_unscaled_output_saved_only_when_the_magnitude_trains():
    t = make_inputs(torch.float32, "cpu", lead=(4,), in_f=8, out_f=5, r=2)
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    for needs in (True, False):
        t["magnitude"].requires_grad_(needs)
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), use("torch"):
            dora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["magnitude"], scale=1.0)
        assert ((4, 5) in saved) == needs, saved


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_weight_sq_norm_is_used_and_matches(device, backend):
    t = {k: v.detach() if v is not None else None for k, v in make_inputs(torch.float32, device).items()}
    w_sq = reference.weight_sq_norm(t["weight"])
    with use(backend):
        plain = dora_linear(*[t[k] for k in ("x", "weight", "lora_a", "lora_b", "magnitude")], scale=0.75)
        cached = dora_linear(*[t[k] for k in ("x", "weight", "lora_a", "lora_b", "magnitude")], scale=0.75,
                             weight_sq_norm=w_sq)  # fmt: skip
        stale = dora_linear(*[t[k] for k in ("x", "weight", "lora_a", "lora_b", "magnitude")], scale=0.75,
                            weight_sq_norm=w_sq * 4)  # fmt: skip
    assert_close(cached, plain)
    if backend == "torch":  # the reference recomputes the norm directly, by design
        assert not torch.allclose(stale, plain)


def test_torch_backend_norm_is_the_gram_norm():
    from peftops.composite.dora_linear import dora_weight_norm

    t = make_inputs(torch.float64, "cpu", in_f=23, out_f=11, r=5)
    w, a, b = t["weight"].detach(), t["lora_a"].detach(), t["lora_b"].detach()
    want = torch.linalg.vector_norm(w + 1.3 * (b @ a), dim=1)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 1.3, None), want)
    torch.testing.assert_close(dora_weight_norm(w, a, b, 1.3, (w * w).sum(1)), want)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_frozen_magnitude_and_base_get_no_gradient(device, backend):
    t = make_inputs(torch.float32, device)
    t["weight"].requires_grad_(False)
    t["magnitude"].requires_grad_(False)
    _, grads = grads_of(op_call(backend, 0.75), t)
    assert set(grads) == {"x", "lora_a", "lora_b", "bias"}


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compile_fullgraph_matches_eager(device, backend, dropout_p):
    import torch._inductor.config as inductor_config

    def step(x, weight, lora_a, lora_b, magnitude, bias):
        with use(backend):
            y = dora_linear(x, weight, lora_a, lora_b, magnitude, scale=0.5, bias=bias, dropout_p=dropout_p)
        return torch.tanh(y)

    results = []
    with inductor_config.patch(fallback_random=True):
        for fn in (step, torch.compile(step, fullgraph=True)):
            t = make_inputs(torch.float32, device, lead=(2, 5), in_f=24, out_f=12, layout="sliced", seed=8)
            torch.manual_seed(11)
            results.append(grads_of(fn, t))
    (y0, g0), (y1, g1) = results
    assert_close(y1, y0, name="compiled output")
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")


BAD_INPUTS = [
    (dict(x=torch.randn(4, 3)), ValueError, r"dora_linear: weight: expected shape \(\*, 3\)"),
    (dict(lora_b=torch.randn(6, 3)), ValueError, r"dora_linear: lora_b: expected shape \(6, 2\).*got \(6, 3\)"),
    (dict(magnitude=torch.randn(5)), ValueError, r"dora_linear: magnitude: expected shape \(6,\).*got \(5,\)"),
    (dict(magnitude=torch.randn(6, 1)), ValueError, r"dora_linear: magnitude: expected 1 dims, got 2"),
    (dict(magnitude=torch.randn(6).double()), TypeError, r"magnitude: expected dtype torch.float32.*got torch.float64"),
    (dict(magnitude=None), TypeError, r"dora_linear: magnitude: expected a torch.Tensor, got NoneType"),
    (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\)"),
    (dict(weight_sq_norm=torch.randn(6).half()), TypeError, r"weight_sq_norm: expected dtype torch.float32"),
    (dict(weight_sq_norm=torch.randn(7)), ValueError, r"weight_sq_norm: expected shape \(6,\).*got \(7,\)"),
    (dict(lora_a=torch.randn(0, 8)), ValueError, r"lora_a: expected rank r >= 1"),
    (dict(dropout_p=1.0), ValueError, r"dora_linear: dropout_p: expected a value in \[0, 1\), got 1.0"),
    (dict(scale=float("nan")), ValueError, r"dora_linear: scale: expected a finite number, got nan"),
    (dict(training=1), TypeError, r"dora_linear: training: expected a bool, got int"),
]


@pytest.mark.parametrize("change,exc,match", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_named_argument(change, exc, match):
    args = dict(
        x=torch.randn(4, 8),
        weight=torch.randn(6, 8),
        lora_a=torch.randn(2, 8),
        lora_b=torch.randn(6, 2),
        magnitude=torch.rand(6),
        scale=1.0,
        bias=None,
        dropout_p=0.0,
        training=True,
        weight_sq_norm=None,
    )
    args.update(change)
    x, w, a, b, m = (args.pop(k) for k in ("x", "weight", "lora_a", "lora_b", "magnitude"))
    with pytest.raises(exc, match=match):
        dora_linear(x, w, a, b, m, **args)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_path_is_bitwise_the_registered_op(monkeypatch, device, backend, dropout_p):
    """Eager calls skip the registered op's autograd (host time) but run the same backend
    functions: outputs and every gradient equal bit for bit, dropout masks included."""
    # (the package attribute peftops.ops.dora_linear is the function; the module is imported by name)
    dora_ops = importlib.import_module("peftops.ops.dora_linear")
    results = {}
    for mode in ("eager", "op"):
        monkeypatch.setitem(dora_ops.EAGER_PATH, "mode", mode)
        t = make_inputs(torch.float32, device, with_bias=True)
        torch.manual_seed(5)
        y = op_call(backend, 0.75, dropout_p)(**t)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(device)
        results[mode] = (y, *torch.autograd.grad(y, list(t.values()), g))
    for eager, op in zip(results["eager"], results["op"], strict=True):
        assert torch.equal(eager, op)
    # Without autograd the eager path calls the backend directly, as the op does.
    outs = {}
    for mode in ("eager", "op"):
        monkeypatch.setitem(dora_ops.EAGER_PATH, "mode", mode)
        t = make_inputs(torch.float32, device, with_bias=True)
        torch.manual_seed(5)
        with torch.no_grad():
            outs[mode] = op_call(backend, 0.75, dropout_p)(**t)
    assert outs["eager"].grad_fn is None and torch.equal(outs["eager"], outs["op"])
