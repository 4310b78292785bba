"""The multi-tenant LoRA spec (peftops.reference.multi_lora_linear): its written-out backward
against autograd, the whole op against separate per-adapter LoRA references, and tokens without
an adapter (id -1, or an id outside ``[0, N)``) that never touch any adapter slot."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftops import reference
from peftops.testing import assert_close

from ..ops.helpers import grads_of
from ..strategies import MultiLoraCase, multi_lora_cases

GRAD_NAMES = ("x", "weight", "lora_a", "lora_b", "bias")


def flat(t: dict) -> dict:
    """The spec's 2-D form: ``x: (T, in)`` and one id per token."""
    t = dict(t)
    t["x"] = t["x"].reshape(-1, t["x"].shape[-1])
    t["adapter_ids"] = t["adapter_ids"].reshape(-1)
    return t


def spec_output(keep=None, dropout_p=0.0):
    def fn(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks):
        y, _ = reference.multi_lora_linear(
            x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, keep=keep, dropout_p=dropout_p
        )
        return y

    return fn


def explicit_backward(g, t, keep=None, dropout_p=0.0, need=(True,) * 5):
    detached = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in t.items()}
    return reference.multi_lora_linear_backward(
        g,
        detached["x"],
        detached["weight"],
        detached["lora_a"],
        detached["lora_b"],
        detached["adapter_ids"],
        detached["scales"],
        detached["ranks"],
        keep=keep,
        dropout_p=dropout_p,
        output_mask=list(need),
    )


@given(
    case=multi_lora_cases(max_features=24, max_rank=12, max_adapters=5),
    p=st.sampled_from([0.0, 0.3]),
    need=st.lists(st.booleans(), min_size=5, max_size=5),
)
@settings(max_examples=15)
def test_reference_explicit_backward_matches_autograd(case: MultiLoraCase, p, need):
    t = flat(case.inputs(torch.float64, "cpu"))
    keep = torch.rand(t["x"].shape, generator=torch.Generator().manual_seed(case.seed)) >= p if p else None
    out, want = grads_of(spec_output(keep, p), t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    need[4] &= case.bias
    got = explicit_backward(g, t, keep, p, need)
    for name, grad, needed in zip(GRAD_NAMES, got, need, strict=True):
        if needed:
            assert_close(grad, want[name], kind="bwd", name=f"explicit d{name}")
        else:
            assert grad is None, f"d{name} computed although not requested"


@given(case=multi_lora_cases(max_features=24, max_rank=12, max_adapters=5))
@settings(max_examples=15)
def test_reference_is_each_adapters_own_lora_reference(case: MultiLoraCase):
    """Every token's output row, and every adapter's dA and dB, against
    ``reference.lora_linear`` run separately on each adapter's own tokens with its rank sliced
    out explicitly; absent adapters get exactly zero gradients."""
    t = flat(case.inputs(torch.float64, "cpu"))
    out, grads = grads_of(spec_output(), t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (da, db) = torch.autograd.grad(spec_output()(**t), (t["lora_a"], t["lora_b"]), g)
    x, w, ids, bias = t["x"].detach(), t["weight"].detach(), t["adapter_ids"], t["bias"]
    bias = None if bias is None else bias.detach()
    base = reference.lora_linear(x, w, x.new_zeros(1, x.shape[1]), x.new_zeros(w.shape[0], 1), bias=bias)
    assert_close(out[ids < 0], base[ids < 0], name="base-only rows")
    for a in range(case.num):
        rows = ids == a
        r = case.r_max if t["ranks"] is None else int(t["ranks"][a])
        if not rows.any():
            assert torch.count_nonzero(da[a]) == 0 and torch.count_nonzero(db[a]) == 0, f"absent adapter {a}"
            continue
        own_a = t["lora_a"][a, :r].detach().clone().requires_grad_()
        own_b = t["lora_b"][a, :, :r].detach().clone().requires_grad_()
        own = reference.lora_linear(x[rows], w, own_a, own_b, bias=bias, scale=float(t["scales"][a]))
        assert_close(out[rows], own, name=f"rows of adapter {a}")
        want_a, want_b = torch.autograd.grad(own, (own_a, own_b), g[rows])
        assert_close(da[a, :r], want_a, kind="bwd", name=f"dA[{a}]")
        assert_close(db[a, :, :r], want_b, kind="bwd", name=f"dB[{a}]")
        assert torch.count_nonzero(da[a, r:]) == 0 and torch.count_nonzero(db[a, :, r:]) == 0, "rank padding"


# -- tokens without an adapter --------------------------------------------------------------


def small(seed=0, ids=(-1, 1, -1, 2, 1, -1), num=3, dtype=torch.float64):
    case = MultiLoraCase(
        lead=(len(ids),), in_f=5, out_f=4, num=num, r_max=3, ranks=True, bias=True, ids="mixed", layout="contiguous",
        seed=seed,
    )  # fmt: skip
    t = case.inputs(dtype, "cpu")
    t["adapter_ids"] = torch.tensor(ids, dtype=torch.int64)
    return t


def both_gradients(t, g, keep=None, dropout_p=0.0):
    """``(autograd of the spec, the written-out backward)``, each ``{name: grad}``."""
    y = spec_output(keep, dropout_p)(**t)
    wrt = [n for n in GRAD_NAMES if t[n] is not None]
    auto = dict(zip(wrt, torch.autograd.grad(y, [t[n] for n in wrt], g), strict=True))
    explicit = dict(zip(GRAD_NAMES, explicit_backward(g, t, keep, dropout_p), strict=True))
    return y, auto, explicit


def base_layer(t):
    x, w, b = t["x"].detach(), t["weight"].detach(), t["bias"].detach()
    return x @ w.T + b


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["lora_a", "lora_b", "scales"])
def test_a_non_finite_unused_slot_never_reaches_base_only_tokens(where, bad):
    """Slot 0 holds inf or NaN and no token uses it: the base-only rows are the base layer
    exactly, every other row and every gradient outside slot 0 is finite."""
    t = small()
    with torch.no_grad():
        t[where][0] = bad
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, auto, explicit = both_gradients(t, g)
    base_only = t["adapter_ids"] < 0
    assert torch.equal(y[base_only], base_layer(t)[base_only])
    assert torch.isfinite(y).all()
    for how, grads in (("autograd", auto), ("explicit", explicit)):
        for name in ("x", "weight", "bias"):
            assert torch.isfinite(grads[name]).all(), f"{how} d{name}"
        for name in ("lora_a", "lora_b"):
            assert torch.isfinite(grads[name][1:]).all(), f"{how} d{name} outside slot 0"
            assert torch.count_nonzero(grads[name][0]) == 0, f"{how} d{name} of the unused slot 0"


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_a_non_finite_base_only_row_never_reaches_an_adapter(bad, dropout_p):
    """inf or NaN in a base-only row of x, or of the incoming gradient, leaves every adapter's
    gradient (and every other row's dx) exactly what it is with that row finite."""
    t = small()
    keep = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)) >= dropout_p if dropout_p else None
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, clean_auto, clean_explicit = both_gradients(t, g, keep, dropout_p)
    with torch.no_grad():
        t["x"][0, 1] = bad
    g_bad = g.clone()
    g_bad[2, 3] = bad
    _, auto, explicit = both_gradients(t, g_bad, keep, dropout_p)
    for how, got, want in (("autograd", auto, clean_auto), ("explicit", explicit, clean_explicit)):
        for name in ("lora_a", "lora_b"):
            assert torch.equal(got[name], want[name]), f"{how} d{name}"
        adapter_rows = t["adapter_ids"] >= 0
        assert torch.equal(got["x"][adapter_rows], want["x"][adapter_rows]), f"{how} dx of the adapter rows"


def test_no_adapters_at_all():
    """N = 0 slots and every token base-only: the base layer, with empty adapter gradients."""
    t = small(ids=(-1, -1, -1), num=0)
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, auto, explicit = both_gradients(t, g)
    assert torch.equal(y, base_layer(t))
    for grads in (auto, explicit):
        assert grads["lora_a"].shape == (0, 3, 5) and grads["lora_b"].shape == (0, 4, 3)
        assert_close(grads["x"], g @ t["weight"].detach(), kind="bwd", name="dx")


def test_rank_padding_neither_computes_nor_learns_even_when_non_finite():
    """The slots past an adapter's rank may hold anything (a slot reused for a smaller
    adapter keeps old values): inf there changes nothing, as in the kernels (masked loads)."""
    t = small()
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_clean, clean_auto, clean_explicit = both_gradients(t, g)
    with torch.no_grad():
        for a, r in enumerate(t["ranks"].tolist()):
            t["lora_a"][a, r:] = math.inf
            t["lora_b"][a, :, r:] = math.nan
    y, auto, explicit = both_gradients(t, g)
    assert torch.equal(y, y_clean)
    for got, want in ((auto, clean_auto), (explicit, clean_explicit)):
        for name in GRAD_NAMES:
            assert torch.equal(got[name], want[name]), f"d{name}"


def test_ids_outside_the_slots_mean_the_base_layer_only():
    """What an id >= N or < -1 does where the op cannot check it (torch.compile, CUDA graph
    capture): the base layer only, the same as -1, without reading any slot (slot 0 is NaN)."""
    t = small(ids=(3, -2, 1, 7, -1, -100))
    with torch.no_grad():
        t["lora_a"][0] = math.nan
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, auto, explicit = both_gradients(t, g)
    outside = t["adapter_ids"] != 1
    assert torch.equal(y[outside], base_layer(t)[outside])
    for grads in (auto, explicit):
        assert torch.count_nonzero(grads["lora_a"][0]) == 0 and torch.count_nonzero(grads["lora_a"][2]) == 0
        assert torch.isfinite(grads["lora_a"]).all() and torch.isfinite(grads["x"]).all()
