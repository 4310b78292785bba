"""The ia3_linear spec against an independent formulation (a merged weight, as peft merges),
and its explicit backward against autograd of the forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftops import reference


def _inputs(scale_input: bool, with_bias: bool, dtype=torch.float64, lead=(2, 3)):
    gen = torch.Generator().manual_seed(3)
    in_f, out_f = 7, 5
    x = torch.randn(*lead, in_f, generator=gen, dtype=dtype)
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    l = torch.rand(in_f if scale_input else out_f, generator=gen, dtype=dtype) + 0.5  # noqa: E741
    b = torch.randn(out_f, generator=gen, dtype=dtype) if with_bias else None
    return x, w, l, b


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_merged_weight(scale_input, with_bias):
    x, w, l, b = _inputs(scale_input, with_bias)  # noqa: E741
    if scale_input:  # the columns of W scaled; the bias untouched (peft merges the same way)
        truth = F.linear(x, w * l[None, :], b)
    else:  # the rows of W and the bias scaled
        truth = F.linear(x, w * l[:, None], None if b is None else b * l)
    torch.testing.assert_close(reference.ia3_linear(x, w, l, b, scale_input), truth)


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_explicit_backward_matches_autograd(scale_input, with_bias):
    leaves = [t.requires_grad_() if t is not None else None for t in _inputs(scale_input, with_bias)]
    x, w, l, b = leaves  # noqa: E741
    y = reference.ia3_linear(x, w, l, b, scale_input)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    wrt = [t for t in leaves if t is not None]
    want = torch.autograd.grad(y, wrt, g)
    got = reference.ia3_linear_backward(g, x, w, l, b, scale_input, [True, True, True, with_bias])
    names = ["x", "w", "l", "b"][: len(wrt)]
    for name, a, e in zip(names, [t for t in got if t is not None], want, strict=True):
        torch.testing.assert_close(a, e, msg=lambda m, name=name: f"d{name}: {m}")


def test_output_mask_skips_gradients():
    x, w, l, b = _inputs(False, True)  # noqa: E741
    g = torch.ones(2, 3, 5, dtype=torch.float64)
    dx, dw, dl, db = reference.ia3_linear_backward(g, x, w, l, b, False, [False, False, True, False])
    assert dx is None and dw is None and db is None
    assert dl.shape == (5,)


def test_base_output_is_the_unscaled_output():
    x, w, _, b = _inputs(False, True)
    torch.testing.assert_close(reference.ia3_base_output(x, w, b), F.linear(x, w, b))
