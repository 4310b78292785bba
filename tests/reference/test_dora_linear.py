"""The dora_linear spec against independent formulations (the merged weight peft merges, and
peft's own ``DoraLinearLayer``), its explicit backward against autograd, and the Gram-trick
weight norm against the direct one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftops import reference


def _inputs(with_bias: bool, dtype=torch.float64, lead=(2, 3), in_f=7, out_f=5, r=3):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(*lead, in_f, generator=gen, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    a = torch.randn(r, in_f, generator=gen, dtype=dtype)
    b = torch.randn(out_f, r, generator=gen, dtype=dtype)
    m = torch.rand(out_f, generator=gen, dtype=dtype) + 0.5
    bias = torch.randn(out_f, generator=gen, dtype=dtype) if with_bias else None
    return x, w, a, b, m, bias


def _keep(x, p=0.4):
    return torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= p


@pytest.mark.parametrize("shape", [(5, 7, 3), (1, 1, 1), (13, 4, 6), (33, 17, 2)])
def test_gram_norm_equals_direct_norm(shape):
    out_f, in_f, r = shape
    _, w, a, b, _, _ = _inputs(False, in_f=in_f, out_f=out_f, r=r)
    want = torch.linalg.vector_norm(w + 0.7 * (b @ a), dim=1)
    torch.testing.assert_close(reference.dora_weight_norm(w, a, b, 0.7), want)
    torch.testing.assert_close(reference.dora_weight_norm(w, a, b, 0.7, reference.weight_sq_norm(w)), want)
    torch.testing.assert_close(reference.dora_weight_norm_direct(w, a, b, 0.7), want)


def test_gram_norm_float32_inputs_accumulate_in_float32():
    _, w, a, b, _, _ = _inputs(False, in_f=37, out_f=11, r=4)
    want = torch.linalg.vector_norm(w + 2.0 * (b @ a), dim=1)
    got = reference.dora_weight_norm(w.half(), a.half(), b.half(), 2.0)
    assert got.dtype == torch.float32
    want16 = torch.linalg.vector_norm(w.half().double() + 2.0 * (b.half().double() @ a.half().double()), dim=1)
    torch.testing.assert_close(got.double(), want16, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got.double(), want, rtol=1e-7, atol=0)  # (the half inputs did round)


def test_gram_norm_of_a_cancelled_row_is_zero_not_nan():
    # W_0 = -s B_0 A: the expansion cancels to ~0 and may round below it.
    _, w, a, b, _, _ = _inputs(False, dtype=torch.float32)
    w[0] = -0.5 * (b[0] @ a)
    got = reference.dora_weight_norm(w, a, b, 0.5)
    # float32 cancellation leaves ~sqrt(eps) * ||W_0|| of noise, never a NaN.
    assert torch.isfinite(got).all() and got[0] < 1e-2


@pytest.mark.parametrize("with_bias", [False, True])
def test_no_dropout_is_the_merged_weight(with_bias):
    x, w, a, b, m, bias = _inputs(with_bias)
    full = w + 1.5 * (b @ a)
    merged = (m / torch.linalg.vector_norm(full, dim=1))[:, None] * full
    got = reference.dora_linear(x, w, a, b, m, scale=1.5, bias=bias)
    torch.testing.assert_close(got, F.linear(x, merged, bias))


@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_rescales_the_dropped_base_term_only(with_bias):
    # peft: result = base_layer(x) + (c - 1) * F.linear(dropout(x), W) + c * s * lora(dropout(x)).
    x, w, a, b, m, bias = _inputs(with_bias)
    keep = _keep(x)
    xd = x * keep / 0.6
    c = m / torch.linalg.vector_norm(w + 1.5 * (b @ a), dim=1)
    want = F.linear(x, w, bias) + (c - 1) * F.linear(xd, w) + c * 1.5 * F.linear(F.linear(xd, a), b)
    got = reference.dora_linear(x, w, a, b, m, scale=1.5, bias=bias, keep=keep, dropout_p=0.4)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dropout", [False, True])
def test_matches_peft_dora_layer(dropout):
    dora = pytest.importorskip("peft.tuners.lora.dora")
    x, w, a, b, m, bias = _inputs(True, dtype=torch.float32)
    base = torch.nn.Linear(7, 5).requires_grad_(False)
    base.weight.copy_(w)
    base.bias.copy_(bias)
    lora_a, lora_b = torch.nn.Linear(7, 3, bias=False), torch.nn.Linear(3, 5, bias=False)
    lora_a.weight.data.copy_(a)
    lora_b.weight.data.copy_(b)
    layer = dora.DoraLinearLayer(fan_in_fan_out=False)
    layer.update_layer(base_layer=base, lora_A=lora_a.weight, lora_B=lora_b.weight, scaling=0.8)
    layer.weight.data.copy_(m)
    keep = _keep(x) if dropout else None
    xd = x * keep / 0.6 if dropout else x
    want = base(x) + layer(
        xd, lora_A=lora_a, lora_B=lora_b, scaling=0.8, base_layer=base, base_result=None if dropout else base(x)
    )
    got = reference.dora_linear(x, w, a, b, m, scale=0.8, bias=bias, keep=keep, dropout_p=0.4 if dropout else 0.0)
    torch.testing.assert_close(got, want)
    # peft's gradients, the norm detached, against the spec's.
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    peft_grads = torch.autograd.grad(want, [lora_a.weight, lora_b.weight, layer.weight], g)
    leaves = [t.clone().requires_grad_() for t in (a, b, m)]
    y = reference.dora_linear(x, w, *leaves[:2], leaves[2], scale=0.8, bias=bias, keep=keep,
                              dropout_p=0.4 if dropout else 0.0)  # fmt: skip
    for name, got_g, want_g in zip("ABm", torch.autograd.grad(y, leaves, g), peft_grads, strict=True):
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-5, msg=lambda s, n=name: f"d{n}: {s}")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_explicit_backward_matches_autograd(with_bias, dropout):
    leaves = [t.requires_grad_() if t is not None else None for t in _inputs(with_bias)]
    x, w, a, b, m, bias = leaves
    keep, p = (_keep(x), 0.4) if dropout else (None, 0.0)
    y = reference.dora_linear(x, w, a, b, m, scale=1.5, bias=bias, keep=keep, dropout_p=p)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    wrt = [t for t in leaves if t is not None]
    want = torch.autograd.grad(y, wrt, g)
    got = reference.dora_linear_backward(g, x, w, a, b, m, 1.5, keep, p, [True] * 5 + [with_bias])
    names = ["x", "w", "a", "b", "m", "bias"][: len(wrt)]
    for name, e, w_ in zip(names, [t for t in got if t is not None], want, strict=True):
        torch.testing.assert_close(e, w_, msg=lambda s, name=name: f"d{name}: {s}")


def test_norm_is_a_constant_in_the_backward():
    # The gradient of A with the norm detached differs from the one through the norm: the
    # spec must give the detached one (peft, DoRA section 4.3).
    x, w, a, b, m, _ = _inputs(False)
    a = a.clone().requires_grad_()
    g = torch.randn(2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = w + (b @ a)
    through = F.linear(x, (m / torch.linalg.vector_norm(full, dim=1))[:, None] * full)
    (d_through,) = torch.autograd.grad(through, a, g)
    (d_spec,) = torch.autograd.grad(reference.dora_linear(x, w, a, b, m, scale=1.0), a, g)
    _, _, d_explicit, _, _, _ = reference.dora_linear_backward(g, x, w, a, b, m, 1.0, None, 0.0, [0, 0, 1, 0, 0, 0])
    torch.testing.assert_close(d_spec, d_explicit)
    assert not torch.allclose(d_spec, d_through)


def test_output_mask_skips_gradients():
    x, w, a, b, m, bias = _inputs(True)
    g = torch.ones(2, 3, 5, dtype=torch.float64)
    got = reference.dora_linear_backward(g, x, w, a, b, m, 1.0, None, 0.0, [False, False, False, False, True, False])
    assert [t is None for t in got] == [True, True, True, True, False, True]
    assert got[4].shape == (5,)
