"""lora_linear's dispatch: the eager autograd.Function path against the registered op, argument
rules added with the torch backend (r = 0, no input features, autocast and float64), and the
``auto`` table keyed by GPU and shape class."""

from __future__ import annotations

import importlib
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import peftops
from peftops import backends
from peftops.backends import available_backends

lora_ops = importlib.import_module("peftops.ops.lora_linear")


def _inputs(dtype=torch.float32, lead=(2, 5), in_f=12, out_f=7, rank=3, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_()

    return dict(
        x=leaf(*lead, in_f),
        weight=leaf(out_f, in_f, scale=in_f**-0.5),
        lora_a=leaf(rank, in_f, scale=in_f**-0.5),
        lora_b=leaf(out_f, rank, scale=rank**-0.5),
        bias=leaf(out_f) if bias else None,
    )


def _run(t, mode, backend, dropout_p, monkeypatch):
    monkeypatch.setitem(lora_ops.EAGER_PATH, "mode", mode)
    torch.manual_seed(1234)  # the same seed draw (and torch-backend mask) on both paths
    with peftops.use_backend(backend):
        y = peftops.lora_linear(
            t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.5, bias=t["bias"], dropout_p=dropout_p
        )
    leaves = [v for v in t.values() if v is not None]
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y)
    return y, torch.autograd.grad(y, leaves, g)


@pytest.mark.parametrize("backend", available_backends("lora_linear", "cpu"))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_function_path_equals_the_registered_op(backend, dropout_p, monkeypatch):
    t = _inputs()
    y_eager, g_eager = _run(t, "eager", backend, dropout_p, monkeypatch)
    y_op, g_op = _run(t, "op", backend, dropout_p, monkeypatch)
    torch.testing.assert_close(y_eager, y_op, rtol=0, atol=0)
    for a, b in zip(g_eager, g_op, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_eager_path_is_taken_outside_compile(monkeypatch):
    """The host-time saving is real only if eager calls skip the registered op."""
    calls = []
    real = lora_ops._lora_linear
    monkeypatch.setattr(lora_ops, "_lora_linear", lambda *a: calls.append(a) or real(*a))
    t = _inputs()
    peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.0).sum().backward()
    assert calls == []
    monkeypatch.setitem(lora_ops.EAGER_PATH, "mode", "op")
    peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.0)
    assert len(calls) == 1


def test_eager_backward_is_not_twice_differentiable():
    t = _inputs()
    y = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.0)
    (gx,) = torch.autograd.grad(y.sum(), t["x"], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(lora_a=torch.empty(0, 12), lora_b=torch.empty(7, 0)), r"lora_linear: lora_a: expected rank r >= 1"),
        (
            dict(x=torch.empty(2, 0), weight=torch.empty(7, 0), lora_a=torch.empty(3, 0)),
            r"lora_linear: x: expected at least 1 input feature",
        ),
    ],
)
def test_zero_rank_and_zero_features_are_rejected_by_name(change, match):
    t = {k: (v.detach() if v is not None else None) for k, v in _inputs().items()}
    t.update(change)
    with pytest.raises(ValueError, match=match):
        peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.0, bias=None)


def test_int_and_numpy_scales_take_the_slow_path_and_work():
    np = pytest.importorskip("numpy")
    t = _inputs()
    ref = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=2.0)
    for scale in (2, np.float64(2.0), np.float32(2.0)):
        got = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=scale)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_any_real_scale_reaches_the_backends_as_a_float():
    """Validation takes any real number; a Fraction once passed through as it was and broke
    inside the backends (a Fraction times a tensor, addmm_'s beta)."""
    t = _inputs()
    for backend in available_backends("lora_linear", "cpu"):
        with peftops.use_backend(backend):
            ref = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=0.25)
            got = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=Fraction(1, 4))
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_reference_refuses_dropout_without_a_seed_by_name():
    """The public op always draws a seed for dropout; a direct call of the registered op
    without one is refused by name (it failed with an AttributeError on None)."""
    t = _inputs(bias=False)
    with pytest.raises(ValueError, match=r"lora_linear: seed: expected a seed tensor when dropout_p > 0, got None"):
        torch.ops.peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], None, 1.0, 0.3, None, "reference")


def test_autocast_leaves_float64_alone_as_f_linear_does():
    t = _inputs(torch.float64, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(t["x"], t["weight"])
        y = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.0)
    assert expected.dtype == torch.float64
    assert y.dtype == torch.float64
    with torch.no_grad():
        truth = t["x"] @ t["weight"].T + (t["x"] @ t["lora_a"].T) @ t["lora_b"].T
    torch.testing.assert_close(y, truth)


def test_autocast_still_casts_float32():
    t = _inputs(torch.float32, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=1.0)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", [b for b in available_backends("lora_linear", "cpu") if b != "reference"])
def test_float16_large_scale_keeps_the_rank_r_term_finite(backend):
    """s x A^T overflows float16 (7e4 > 65504) while y does not (defect 8 of issue 11)."""
    x = torch.ones(3, 16, dtype=torch.float16)
    weight = torch.zeros(4, 16, dtype=torch.float16)
    a = torch.full((2, 16), 8.0, dtype=torch.float16)  # x A^T = 128
    b = torch.full((4, 2), 2.0**-10, dtype=torch.float16)
    scale = 600.0  # s x A^T = 76800: inf in float16; y = 2 * 76800 / 1024 = 150
    with peftops.use_backend(backend):
        y = peftops.lora_linear(x, weight, a, b, scale=scale)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((3, 4), 150.0), rtol=2e-3, atol=0)


# -- auto: measured order by GPU and shape class -------------------------------------------


def test_auto_without_a_measurement_gets_the_torch_backend_first():
    features = {"tokens": 8192, "dropout": False, "rank": 16}
    assert backends.auto_order("lora_linear", "cuda", "NVIDIA H200", features)[0] == "torch"
    assert backends.auto_order("lora_linear", "cuda", None, features)[0] == "torch"
    assert backends.auto_order("lora_linear", "cpu", None, features)[0] == "torch"


def test_auto_on_the_h100_follows_its_measurement():
    """Run 5 measured triton slower than addmm for every LoRA case on the H100."""
    for tokens, dropout in ((512, False), (8192, False), (8192, True)):
        order = backends.auto_order(
            "lora_linear", "cuda", "NVIDIA H100 80GB HBM3", {"tokens": tokens, "dropout": dropout, "rank": 16}
        )
        assert order.index("torch") < order.index("triton")
    # The adapter's measurement put triton first there.
    assert backends.auto_order("bottleneck_adapter", "cuda", "NVIDIA H100 80GB HBM3", {})[0] == "triton"


def test_auto_entries_match_their_shape_class(monkeypatch):
    table = (
        {"cuda": ("torch", "triton", "reference"), "*": ("torch", "reference")},
        (
            {
                "op": "lora_linear",
                "device": "G",
                "when": {"tokens": [4096, None], "dropout": False},
                "order": ["triton"],
            },
            {"op": "lora_linear", "device": "G", "when": {"tokens": [None, 4095]}, "order": ["reference"]},
        ),
    )
    monkeypatch.setattr(backends, "_auto_table", lambda: table)
    assert backends.auto_order("lora_linear", "cuda", "G", {"tokens": 8192, "dropout": False}) == ("triton",)
    assert backends.auto_order("lora_linear", "cuda", "G", {"tokens": 4096, "dropout": False}) == ("triton",)
    assert backends.auto_order("lora_linear", "cuda", "G", {"tokens": 8192, "dropout": True}) == (
        "torch",
        "triton",
        "reference",
    )
    assert backends.auto_order("lora_linear", "cuda", "G", {"tokens": 512, "dropout": True}) == ("reference",)
    assert backends.auto_order("lora_linear", "cuda", "other GPU", {"tokens": 512}) == ("torch", "triton", "reference")
    assert backends.auto_order("lora_linear", "xpu", None, {}) == ("torch", "reference")


def test_every_auto_entry_names_its_measurement_and_known_backends():
    import json

    doc = json.loads(backends.AUTO_TABLE.read_text())
    for entry in doc["entries"]:
        assert "results/" in entry["measured"], entry
        assert set(entry["order"]) <= set(backends.registered_backends()), entry
    for order in doc["default_order"].values():
        assert order[-1] == "reference"  # the spec runs anything: auto always finds a backend


def test_auto_settles_only_where_no_argument_can_change_its_answer(monkeypatch):
    """Eager auto caches its answer per (op, device) only when the order is fixed and every
    backend ahead of the pick was skipped for process-wide reasons."""
    device = torch.device("cpu")
    args = tuple(_inputs(bias=False).values())[:4] + (None, 1.0, 0.0, None)
    monkeypatch.setattr(backends, "_SETTLED", {})
    assert backends.resolve_backend("lora_linear", device, args, "auto") == "torch"
    assert backends._SETTLED == {("lora_linear", device): "torch"}
    # A backend ahead of the pick that declines some calls must keep auto walking the order.
    picky = backends.OpImpl(forward=print, backward=print, supports=lambda x, *a: "no" if x.shape[0] == 2 else None)
    monkeypatch.setattr(backends, "_SETTLED", {})
    monkeypatch.setattr(backends, "_auto_candidates", lambda op, dev, a: ("triton", "torch", "reference"))
    monkeypatch.setitem(backends._IMPLS["lora_linear"], "triton", picky)
    monkeypatch.setattr(backends, "_status", lambda b, t: "")
    assert backends.resolve_backend("lora_linear", device, args, "auto") == "torch"  # x has 2 rows
    assert backends._SETTLED == {}
    wide = (torch.randn(3, 12), *args[1:])
    assert backends.resolve_backend("lora_linear", device, wide, "auto") == "triton"


def test_registering_an_implementation_unsettles_auto(monkeypatch):
    device = torch.device("cpu")
    args = tuple(_inputs(bias=False).values())[:4] + (None, 1.0, 0.0, None)
    backends.resolve_backend("lora_linear", device, args, "auto")
    impl = backends.implementation("lora_linear", "torch")
    backends.register_impl("lora_linear", "torch", impl, replace=True)
    assert ("lora_linear", device) not in backends._SETTLED
