"""The Triton prefix-attention kernels over prefix banks, called directly (outputs poisoned with
NaN by the test configuration): slot lengths across block boundaries, grouped-query heads,
float16, partial gradients, forced block sizes and a bitwise-reproducible bank gradient."""

from __future__ import annotations

import pytest
import torch

from peftops.kernels import prefix_attention as K
from peftops.reference.prefix_attention import prefix_attention_banks, prefix_attention_banks_backward
from peftops.testing import assert_close


def inputs(dtype, *, batch=4, hkv=1, group=2, q_len=5, seq_len=7, num=3, p_max=40, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q = rnd(batch, hkv * group, q_len, d)
    k, v = rnd(batch, hkv, seq_len, d), rnd(batch, hkv, seq_len, d)
    bank_k, bank_v = rnd(num, hkv, p_max, d), rnd(num, hkv, p_max, d)
    return q, k, v, bank_k, bank_v


def check(dtype, ids, lengths, *, causal=True, mask=None, output_mask=(True,) * 5, cfg=None, **shape):
    q, k, v, bank_k, bank_v = inputs(dtype, **shape)
    scale = 0.25
    out, lse = K.forward(q, k, v, bank_k, bank_v, mask, causal, scale, ids, lengths, cfg=(cfg or {}).get("fwd"))
    f64 = [t.double() for t in (q, k, v, bank_k, bank_v)]
    out_ref, lse_ref = prefix_attention_banks(*f64, ids, lengths, causal=causal, key_padding_mask=mask, scale=scale)
    assert_close(out, out_ref, dtype=dtype, kind="fwd", name="out")
    assert_close(lse, lse_ref.float(), dtype=torch.float32, kind="fwd", name="lse")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = K.backward(
        do.to(dtype), q, k, v, bank_k, bank_v, mask, out, lse, causal, scale, list(output_mask), ids, lengths, cfg=cfg
    )
    want = prefix_attention_banks_backward(
        do, *f64, ids, lengths, causal=causal, key_padding_mask=mask, scale=scale, output_mask=output_mask
    )
    for name, got, ref, need in zip(("dq", "dk", "dv", "dbank_k", "dbank_v"), grads, want, output_mask, strict=True):
        if not need:
            assert got is None, name
            continue
        assert_close(got, ref, dtype=dtype, kind="bwd", name=name)
    return grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lengths_across_block_boundaries(dtype):
    """Under the interpreter BLOCK_N is 16: lengths 33, 16 and 1 end after a block's first key,
    on a block boundary and inside the first block; the absent slot 1 and every tail are 0."""
    ids = torch.tensor([2, 0, -1, 2])
    lengths = torch.tensor([16, 40, 33])
    grads = check(dtype, ids, lengths)
    for t in grads[3:]:
        assert torch.equal(t[1], torch.zeros_like(t[1]))
        assert torch.equal(t[0, :, 16:], torch.zeros_like(t[0, :, 16:]))
        assert torch.equal(t[2, :, 33:], torch.zeros_like(t[2, :, 33:]))
    check(dtype, torch.tensor([1, 1, 0, 1]), torch.tensor([1, 3]), num=2, p_max=3, seed=1)


def test_gqa_padding_non_causal_and_forced_blocks():
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, :3] = False
    mask[3] = False
    cfg = {
        "fwd": dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1),
        "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1),
        "dq": dict(BLOCK_M=16, BLOCK_N=32, num_warps=1, num_stages=1),
    }
    check(
        torch.float32,
        torch.tensor([0, 2, 1, 0]),
        torch.tensor([35, 0, 9]),
        causal=False,
        mask=mask,
        cfg=cfg,
        hkv=2,
        group=2,
    )


@pytest.mark.parametrize("output_mask", [(False, False, False, True, False), (True, False, True, False, True)])
def test_partial_gradients(output_mask):
    check(torch.float32, torch.tensor([1, -1, 1, 0]), torch.tensor([5, 18, 2]), output_mask=output_mask, p_max=18)


def test_unchecked_ids_and_lengths_have_their_documented_meaning():
    """What the op passes under capture: ids outside [0, N) read no slot, lengths are clamped."""
    q, k, v, bank_k, bank_v = inputs(torch.float32, p_max=8)
    out, _ = K.forward(q, k, v, bank_k, bank_v, None, True, 0.3, torch.tensor([7, -5, 1, 2]), torch.tensor([3, 99, -4]))
    want, _ = K.forward(q, k, v, bank_k, bank_v, None, True, 0.3, torch.tensor([-1, -1, 1, 2]), torch.tensor([3, 8, 0]))
    assert torch.equal(out, want)


def test_bank_gradient_is_bitwise_reproducible():
    """Every row names slot 0: its gradient sums four rows, in the same order every time."""
    ids, lengths = torch.tensor([0, 0, 0, 0]), torch.tensor([20, 4, 4])
    q, k, v, bank_k, bank_v = inputs(torch.float32, p_max=20)
    out, lse = K.forward(q, k, v, bank_k, bank_v, None, True, 0.3, ids, lengths)
    do = torch.randn_like(out)
    need = [False, False, False, True, True]
    first = K.backward(do, q, k, v, bank_k, bank_v, None, out, lse, True, 0.3, need, ids, lengths)
    second = K.backward(do, q, k, v, bank_k, bank_v, None, out, lse, True, 0.3, need, ids, lengths)
    for a, b in zip(first[3:], second[3:], strict=True):
        assert torch.equal(a, b)
