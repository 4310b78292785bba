"""The Triton DoRA kernels (peftops.kernels.dora_linear), called directly: the forward with the
magnitude in the GEMM's epilogue (pointer and TMA kernels) and the unscaled output saved from
the same accumulator, the backward with dm, dB and db from one token reduction, every subset of
gradients, with and without dropout, at odd shapes crossing several blocks, float32 and
float16, kernel outputs poisoned (tests/conftest.py). On CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch

from peftops import reference
from peftops.kernels import dora_linear as kernels
from peftops.kernels import lora_linear as pointer
from peftops.kernels import lora_linear_tma as T
from peftops.kernels import lowrank
from peftops.testing import assert_close

DTYPES = [torch.float32, torch.float16]
# (tokens, in, out, r): 37 tokens, 45 / 19 features and rank 5 cross the interpreter's blocks unevenly.
SHAPES = [(37, 45, 19, 5), (5, 3, 70, 2)]
SCALE = 0.75


def _inputs(shape, dtype, with_bias, seed=0, lead=None):
    m, k, n, r = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*(lead or (m,)), k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    a = (torch.randn(r, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(n, r, generator=gen) / r**0.5).to(dtype)
    mag = (torch.rand(n, generator=gen) + 0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    return x, w, a, b, mag, bias


def _wide(*ts):
    return [None if t is None else t.to(torch.float64) for t in ts]


# Every gradient alone (each path's own flags), the bias with each pass over g it can ride on
# (dB/dm's reduction, the v pass, neither), and all at once: 10 of the 64 subsets, which
# the interpreter makes slow (all 64 ran once, 2026-11-30, and passed).
MASKS = [
    *(tuple(i == j for j in range(6)) for i in range(6)),
    (False, False, False, True, True, True),
    (True, False, True, False, False, True),
    (False, True, False, False, False, True),
    (True,) * 6,
]


def _keep(keep, p):
    return keep if p > 0 else None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_saved_unscaled_output(dtype, with_bias, dropout_p, shape):
    x, w, a, b, mag, bias = _inputs(shape, dtype, with_bias)
    y, u, pre, keep, norm = kernels.forward(x, w, a, b, mag, bias, None, SCALE, dropout_p, None, True)
    kept = _keep(keep, dropout_p)
    xw, ww, aw, bw, mw, biasw = _wide(x, w, a, b, mag, bias)
    want = reference.dora_linear(xw, ww, aw, bw, mw, scale=SCALE, bias=biasw, keep=kept, dropout_p=dropout_p)
    assert_close(y, want, dtype=dtype, name="y")
    xd = xw if kept is None else xw * kept / (1 - dropout_p)
    assert u.dtype == torch.float32
    assert_close(u, xd @ aw.T, dtype=dtype, name="u")
    assert_close(pre, xd @ ww.T + SCALE * (xd @ aw.T) @ bw.T, dtype=dtype, name="pre")
    assert_close(norm, reference.dora_weight_norm_direct(ww, aw, bw, SCALE), dtype=dtype, name="norm")
    if dropout_p == 0:
        assert keep.numel() == 0
        _, _, pre_off, _, _ = kernels.forward(x, w, a, b, mag, bias, None, SCALE, 0.0, None, False)
        assert pre_off.numel() == 0
    else:
        assert keep.shape == x.shape and keep.dtype == torch.bool
        rate = keep.float().mean().item()
        assert 0.4 < rate < 0.95, rate


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_every_gradient_subset(dtype, dropout_p, shape):
    """Each subset of (dx, dW, dA, dB, dm, db): what is asked for matches the reference, the
    rest is None; db rides on whichever reduction over g runs."""
    lead = (shape[0] // 5 + 1, 5) if shape[0] > 5 else None
    x, w, a, b, mag, bias = _inputs(shape, dtype, True, lead=lead)
    _, u, pre, keep, norm = kernels.forward(x, w, a, b, mag, bias, None, SCALE, dropout_p, None, True)
    g = torch.randn(*x.shape[:-1], w.shape[0], generator=torch.Generator().manual_seed(1)).to(dtype)
    kept = _keep(keep, dropout_p)
    want = reference.dora_linear_backward(*_wide(g, x, w, a, b, mag), SCALE, kept, dropout_p, [True] * 6)
    for mask in MASKS:
        got = kernels.backward(g, x, w, a, b, mag, u, pre, keep, norm, SCALE, dropout_p, list(mask))
        for name, need, got_t, want_t in zip(["dx", "dW", "dA", "dB", "dm", "db"], mask, got, want, strict=True):
            if not need:
                assert got_t is None, f"{name} computed though not asked for ({mask})"
                continue
            assert got_t.shape == want_t.shape and got_t.dtype == dtype, name
            assert_close(got_t, want_t, dtype=dtype, kind="bwd", name=f"{name} {mask}")


def test_dm_without_the_saved_output_recomputes_it():
    x, w, a, b, mag, bias = _inputs((9, 6, 11, 3), torch.float32, True)
    _, u, _, keep, norm = kernels.forward(x, w, a, b, mag, bias, None, SCALE, 0.0, None, False)
    g = torch.randn(9, 11)
    mask = [False, False, False, True, True, True]
    got = kernels.backward(g, x, w, a, b, mag, u, x.new_empty((0,)), keep, norm, SCALE, 0.0, mask)
    want = reference.dora_linear_backward(*_wide(g, x, w, a, b, mag), SCALE, None, 0.0, mask)
    for name, got_t, want_t in zip(["dB", "dm", "db"], got[3:], want[3:], strict=True):
        assert_close(got_t, want_t, kind="bwd", name=name)


def test_strided_input_and_cached_weight_norm():
    """x a column slice, the weight a transposed view (how a Conv1D passes it), ``||W_j||^2``
    passed in: the same output and norm as computing it."""
    x = torch.randn(23, 40)[:, 3:36]
    w = (torch.randn(33, 17) / 6).T
    a, b = torch.randn(4, 33) / 6, torch.randn(17, 4) / 2
    mag, bias = torch.rand(17) + 0.5, torch.randn(17)
    sq = reference.weight_sq_norm(w)
    y, _, _, _, norm = kernels.forward(x, w, a, b, mag, bias, sq, SCALE, 0.0, None, False)
    assert_close(y, reference.dora_linear(*_wide(x, w, a, b, mag), scale=SCALE, bias=bias.double()), name="y")
    assert_close(norm, reference.dora_weight_norm_direct(*_wide(w, a, b), SCALE), name="norm")


def test_zero_tokens():
    x, w, a, b, mag, bias = _inputs((0, 6, 11, 3), torch.float32, True)
    y, u, pre, _, norm = kernels.forward(x, w, a, b, mag, bias, None, SCALE, 0.0, None, True)
    assert y.shape == (0, 11) and u.shape == (0, 3) and pre.shape == (0, 11) and norm.shape == (11,)
    g = torch.randn(0, 11)
    dx, dw, da, db_, dm, dbias = kernels.backward(g, x, w, a, b, mag, u, pre, x.new_empty((0,)), norm, SCALE, 0.0,
                                                  [True] * 6)  # fmt: skip
    assert dx.shape == (0, 6)
    for t in (dw, da, db_, dm, dbias):
        assert torch.count_nonzero(t) == 0


# -- the launch-level pieces --------------------------------------------------------------------


def _gemm_operands(m, n, k, r, dtype, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    u = torch.randn(m, r, generator=gen)
    b = (torch.randn(n, r, generator=gen) / r**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    col = torch.rand(n, generator=gen) + 0.5
    return x, w, u, b, bias, col


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["pointer", "tma"])
def test_col_scaled_gemm_epilogue(dtype, kernel):
    """``col * (x W^T + s u B^T) + bias`` and the unscaled sum from one accumulator, on both
    GEMM kernels (the TMA one runs under the interpreter too)."""
    # TMA wants 16-byte aligned rows: 72 and 48 features, still crossing blocks unevenly.
    x, w, u, b, bias, col = _gemm_operands(37, 72, 48, 5, dtype)
    if kernel == "pointer":
        y, pre = pointer.gemm_col_scaled(x, w.T, u, b.T, bias, col, epi_scale=SCALE, save_pre=True)
    else:
        y, pre = T.gemm_tma_pre(x, w, u, b.T, bias, epi_scale=SCALE, trans_w=True, col_scale=col, save_pre=True)
    xw, ww, bw = _wide(x, w, b)
    z = xw @ ww.T + SCALE * u.double() @ bw.T
    assert_close(pre, z, dtype=dtype, name="pre")
    assert_close(y, col.double() * z + bias.double(), dtype=dtype, name="y")


def test_col_scaled_gemm_refuses_a_wrong_scale_vector():
    x, w, u, b, bias, col = _gemm_operands(4, 6, 5, 2, torch.float32)
    with pytest.raises(ValueError, match=r"col_scale: expected \(6,\) float32"):
        pointer.gemm_col_scaled(x, w.T, u, b.T, bias, col.half())
    with pytest.raises(ValueError, match=r"col_scale: expected \(6,\) float32"):
        pointer.gemm_col_scaled(x, w.T, u, b.T, bias, col[:5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("col_sums", [False, True])
def test_tn_dot_sums(dtype, col_sums):
    """``g^T u``, ``sum_T g * z`` and ``sum_T g`` from one pass, over several token splits."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(300, 19, generator=gen).to(dtype)
    u = torch.randn(300, 5, generator=gen)
    z = torch.randn(300, 19, generator=gen).to(dtype)
    out, sums, dots = lowrank.tn_dot_sums(g, u, z, col_sums=col_sums, out_dtype=torch.float32)
    gw, zw = _wide(g, z)
    assert_close(out, gw.T @ u.double(), dtype=dtype, kind="bwd", name="g^T u")
    assert_close(dots, (gw * zw).sum(0), dtype=dtype, kind="bwd", name="sum g z")
    if col_sums:
        assert_close(sums, gw.sum(0), dtype=dtype, kind="bwd", name="sum g")
    else:
        assert sums is None
    with pytest.raises(ValueError, match="tn_dot_sums: weight: expected shape"):
        lowrank.tn_dot_sums(g, u, z[:, :5], col_sums=False, out_dtype=torch.float32)


# -- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_real_shape_forward_and_every_gradient(dtype, dropout_p):
    """1024 tokens, 4096 -> 4096, r 16 (the TMA GEMM on Hopper), against float64 truth."""
    gen = torch.Generator(device="cuda").manual_seed(7)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * std).to(dtype)

    m, k, n, r = 1024, 4096, 4096, 16
    x, w, a, b = rand(m, k), rand(n, k, std=k**-0.5), rand(r, k, std=k**-0.5), rand(n, r, std=r**-0.5)
    mag = (torch.rand(n, generator=gen, device="cuda") + 0.5).to(dtype)
    bias = rand(n)
    y, u, pre, keep, norm = kernels.forward(x, w, a, b, mag, bias, None, SCALE, dropout_p, None, True)
    kept = _keep(keep, dropout_p)
    want = reference.dora_linear(*_wide(x, w, a, b, mag), scale=SCALE, bias=bias.double(), keep=kept,
                                 dropout_p=dropout_p)  # fmt: skip
    assert_close(y, want, dtype=dtype, name="y")
    g = rand(m, n)
    got = kernels.backward(g, x, w, a, b, mag, u, pre, keep, norm, SCALE, dropout_p, [True] * 6)
    want_g = reference.dora_linear_backward(*_wide(g, x, w, a, b, mag), SCALE, kept, dropout_p, [True] * 6)
    for name, got_t, want_t in zip(["dx", "dW", "dA", "dB", "dm", "db"], got, want_g, strict=True):
        assert_close(got_t, want_t, dtype=dtype, kind="bwd", name=name)
