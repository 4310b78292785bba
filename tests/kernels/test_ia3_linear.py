"""The Triton IA3 kernels (peftops.kernels.ia3_linear), called directly: forward (epilogue
and prologue scaling, the saved z) and backward (dx with dl and db reduced from the same
tiles, every subset of gradients), at odd shapes crossing several blocks, float32 and
float16, with kernel outputs poisoned (tests/conftest.py). On CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import itertools

import pytest
import torch

from peftops import reference
from peftops.kernels import ia3_linear as kernels
from peftops.testing import assert_close

DTYPES = [torch.float32, torch.float16]
# (tokens, in, out): 37 tokens and 45/19 features cross the interpreter's 32-wide blocks unevenly.
SHAPES = [(37, 45, 19), (5, 3, 70)]


def _inputs(shape, dtype, scale_input, with_bias, seed=0, lead=None):
    m, k, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    l = (torch.rand(k if scale_input else n, generator=gen) + 0.5).to(dtype)  # noqa: E741
    b = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    return x, w, l, b


def _wide(*ts):
    return [None if t is None else t.to(torch.float64) for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_saved_z(dtype, scale_input, with_bias, shape):
    x, w, l, b = _inputs(shape, dtype, scale_input, with_bias)  # noqa: E741
    y, z = kernels.forward(x, w, l, b, scale_input, True)
    assert_close(y, reference.ia3_linear(*_wide(x, w, l, b), scale_input), dtype=dtype, name="y")
    if scale_input:
        assert z.numel() == 0  # input scaling's dl comes from the dx GEMM: nothing saved
    else:
        assert_close(z, reference.ia3_base_output(*_wide(x, w, b)), dtype=dtype, name="z")
    _, z_off = kernels.forward(x, w, l, b, scale_input, False)
    assert z_off.numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_every_gradient_subset(dtype, scale_input, shape):
    """Each subset of (dx, dW, dl, db): what is asked for is right, the rest is None (the
    kernel's flags skip the dx store, or the whole GEMM when only reductions over g are left)."""
    x, w, l, b = _inputs(shape, dtype, scale_input, True, lead=(shape[0] // 5 + 1, 5) if shape[0] > 5 else None)  # noqa: E741
    _, z = kernels.forward(x, w, l, b, scale_input, True)
    g = torch.randn(*x.shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)
    want = reference.ia3_linear_backward(*_wide(g, x, w, l, b), scale_input, [True] * 4)
    for mask in itertools.product([False, True], repeat=4):
        got = kernels.backward(g, x, w, l, b, z, scale_input, list(mask))
        for name, need, a, e in zip(["dx", "dW", "dl", "db"], mask, got, want, strict=True):
            if not need:
                assert a is None, f"{name} computed though not asked for ({mask})"
                continue
            assert a.shape == e.shape and a.dtype == dtype, name
            assert_close(a, e, dtype=dtype, kind="bwd", name=f"{name} {mask}")


def test_strided_operands_and_transposed_weight():
    """x a column slice, the weight a transposed view (how IA3Linear passes a Conv1D's)."""
    x_full = torch.randn(23, 40)
    x = x_full[:, 3:36]
    w_in_out = torch.randn(33, 17) / 6
    l = torch.rand(17) + 0.5  # noqa: E741
    b = torch.randn(17)
    y, z = kernels.forward(x, w_in_out.T, l, b, False, True)
    assert_close(y, reference.ia3_linear(*_wide(x, w_in_out.T, l, b), False), name="y")
    g = torch.randn(23, 17)
    got = kernels.backward(g, x, w_in_out.T, l, b, z, False, [True, True, True, True])
    want = reference.ia3_linear_backward(*_wide(g, x, w_in_out.T, l, b), False, [True] * 4)
    for name, a, e in zip(["dx", "dW", "dl", "db"], got, want, strict=True):
        assert_close(a, e, kind="bwd", name=name)


def test_backward_without_saved_z_recomputes_it():
    x, w, l, b = _inputs((9, 6, 11), torch.float32, False, True)  # noqa: E741
    g = torch.randn(9, 11)
    _, dw, dl, _ = kernels.backward(g, x, w, l, b, x.new_empty((0,)), False, [False, False, True, False])
    want = reference.ia3_linear_backward(*_wide(g, x, w, l, b), False, [False, False, True, False])[2]
    assert dw is None
    assert_close(dl, want, kind="bwd", name="dl")


def test_zero_tokens():
    x, w, l, b = _inputs((0, 6, 11), torch.float32, False, True)  # noqa: E741
    y, z = kernels.forward(x, w, l, b, False, True)
    assert y.shape == (0, 11)
    dx, dw, dl, db = kernels.backward(torch.zeros(0, 11), x, w, l, b, z, False, [True] * 4)
    assert dx.shape == (0, 6) and not dl.any() and not db.any() and not dw.any()
