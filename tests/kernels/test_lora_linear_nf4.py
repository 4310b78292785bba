"""The Triton QLoRA kernels (peftops.kernels.lora_linear_nf4), called directly: the 4-bit GEMM in
both orientations (forward x W^T, dx g W) against the dequantised weight, blocks straddling
rows (in-features not a multiple of the block), odd block sizes and shapes, the dropout mask in
the dx epilogue, and the backward's every gradient subset with the bias gradient riding on the
reductions. Outputs poisoned (tests/conftest.py); on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import itertools

import pytest
import torch

from peftops import reference
from peftops.kernels import lora_linear_nf4 as kernels
from peftops.kernels import lowrank
from peftops.reference import nf4
from peftops.testing import assert_close

SCALE = 0.75


def _weight(n, k, quant_type="nf4", blocksize=64, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    q, state = nf4.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    return q.reshape(-1), nf4.dequantize_absmax(state), state.code, nf4.dequantize_4bit(q, state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 128), ("nf4", 32)])
@pytest.mark.parametrize("transposed", [True, False], ids=["forward", "dx"])
def test_nf4_gemm_is_the_gemm_on_the_dequantized_weight(dtype, quant_type, blocksize, transposed):
    n, k, m, r = 33, 45, 37, 5  # 33 x 45 = 1485 elements: blocks straddle rows, a short last block
    q, absmax, code, w = _weight(n, k, quant_type, blocksize)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k if transposed else n, generator=gen).to(dtype)
    u = torch.randn(m, r, generator=gen)
    b_rn = (torch.randn(r, n if transposed else k, generator=gen) / 2).to(dtype)
    bias = torch.randn(n if transposed else k, generator=gen).to(dtype)
    out = kernels.nf4_gemm(
        x, q, absmax, code, blocksize, (n, k), weight_dtype=torch.float32, transposed=transposed, u=u, b_rn=b_rn,
        bias=bias, epi_scale=SCALE,
    )  # fmt: skip
    w_op = w.double().T if transposed else w.double()
    want = x.double() @ w_op + SCALE * u.double() @ b_rn.double() + bias.double()
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want, dtype=dtype, name="nf4 gemm")


def _kernel_keep(seed, m, k, p):
    mask = lowrank.empty_mask(m, k, torch.device("cpu"))
    lowrank.down(torch.zeros(m, 8), torch.zeros(8, 1), 1.0, 0.0, seed, out_dtype=torch.float32, mask_out=mask, mask_p=p)
    return torch.stack([(mask[:, j // 8] >> (j % 8)) & 1 for j in range(k)], 1).bool()


def test_nf4_gemm_dx_applies_the_packed_mask_to_the_rank_term_only():
    n, k, m, r = 24, 40, 19, 3
    q, absmax, code, w = _weight(n, k)
    gen = torch.Generator().manual_seed(2)
    g, v, a = torch.randn(m, n, generator=gen), torch.randn(m, r, generator=gen), torch.randn(r, k, generator=gen)
    seed = torch.tensor(11)
    mask = lowrank.empty_mask(m, k, g.device)
    lowrank.down(g, torch.randn(n, r), 1.0, 0.0, seed, out_dtype=torch.float32, mask_out=mask, mask_p=0.3)
    keep = _kernel_keep(seed, m, k, 0.3)
    out = kernels.nf4_gemm(
        g, q, absmax, code, 64, (n, k), weight_dtype=torch.float32, transposed=False, u=v, b_rn=a, bias=None,
        epi_scale=2.0, mask=mask,
    )  # fmt: skip
    want = g.double() @ w.double() + 2.0 * keep * (v.double() @ a.double())
    assert_close(out, want, name="dx with mask")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backward_every_gradient_subset(dtype, dropout_p):
    n, k, m, r = 21, 45, 23, 4
    q, absmax, code, w = _weight(n, k)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=gen).to(dtype)
    a = (torch.randn(r, k, generator=gen) / 6).to(dtype)
    b = (torch.randn(n, r, generator=gen) / 2).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    seed = torch.tensor(5) if dropout_p else None
    y, u, keep = kernels.forward(x, q, absmax, code, n, 64, torch.float32, a, b, bias, SCALE, dropout_p, seed)
    g = torch.randn(m, n, generator=gen).to(dtype)
    # The spec with the kernels' own mask (Philox keyed by seed, token and feature), as the
    # backward's first pass writes it.
    kept = _kernel_keep(seed, m, k, dropout_p) if dropout_p else None
    wide = [t.double() for t in (x, w.to(dtype), a, b, bias)]
    want_y = reference.lora_linear(*wide[:4], scale=SCALE, bias=wide[4], keep=kept, dropout_p=dropout_p)
    assert_close(y, want_y, dtype=dtype, name="y")
    want = reference.lora_linear_backward(
        g.double(), *wide[:4], SCALE, kept, dropout_p, [True, False, True, True, True]
    )
    want = (want[0], want[2], want[3], want[4])
    for mask in itertools.product([False, True], repeat=4):
        got = kernels.backward(g, x, q, absmax, code, n, 64, torch.float32, a, b, u, keep, SCALE, dropout_p, seed,
                               list(mask))  # fmt: skip
        for name, need, got_t, want_t in zip(["dx", "dA", "dB", "db"], mask, got, want, strict=True):
            if not need:
                assert got_t is None, f"{name} computed though not asked for ({mask})"
                continue
            assert_close(got_t, want_t, dtype=dtype, kind="bwd", name=f"{name} {mask}")


def test_zero_tokens():
    q, absmax, code, _ = _weight(12, 40)
    x, a, b = torch.randn(0, 40), torch.randn(3, 40), torch.randn(12, 3)
    y, u, _ = kernels.forward(x, q, absmax, code, 12, 64, torch.float32, a, b, None, SCALE, 0.0, None)
    assert y.shape == (0, 12) and u.shape == (0, 3)


# -- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shape(dtype):
    """1024 tokens, 4096 -> 4096, r 16, double-quantised NF4 in the activations' dtype: the
    forward and every gradient against float64 truth on the dequantised weight."""
    torch.manual_seed(0)
    m, k, n, r = 1024, 4096, 4096, 16
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(dtype)
    q, state = nf4.quantize_4bit(w)
    absmax, wd = nf4.dequantize_absmax(state), nf4.dequantize_4bit(q, state)
    x = torch.randn(m, k, device="cuda").to(dtype)
    a, b = (torch.randn(r, k, device="cuda") * k**-0.5).to(dtype), (torch.randn(n, r, device="cuda") / 4).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y, u, keep = kernels.forward(x, q, absmax, state.code, n, 64, dtype, a, b, bias, 2.0, 0.0, None)
    assert_close(y, reference.lora_linear(*(t.double() for t in (x, wd, a, b)), scale=2.0, bias=bias.double()),
                 dtype=dtype, name="y")  # fmt: skip
    g = torch.randn(m, n, device="cuda").to(dtype)
    got = kernels.backward(g, x, q, absmax, state.code, n, 64, dtype, a, b, u, keep, 2.0, 0.0, None, [True] * 4)
    want = reference.lora_linear_backward(
        *(t.double() for t in (g, x, wd, a, b)), 2.0, None, 0.0, [True, False, True, True, True]
    )
    for name, got_t, want_t in zip(["dx", "dA", "dB", "db"], got, (want[0], *want[2:]), strict=True):
        assert_close(got_t, want_t, dtype=dtype, kind="bwd", name=name)
