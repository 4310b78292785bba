"""``prefix_attention`` over prefix banks (``prefix_ids``, ``prefix_lengths``): every backend
against separate per-row runs of the plain op's spec, the ids in every arrangement, absent
slots and positions past a slot's length never read and given zero gradient, the eager range
checks and the documented meaning of unchecked values under ``torch.compile``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

import peftops
from peftops import reference
from peftops.testing import assert_close

from .helpers import backend_params

OP = "prefix_attention"
B, HKV, GROUP, L, S, D = 3, 1, 2, 5, 6, 16


def make(num: int, p_max: int, dtype=torch.float32, seed: int = 0, hkv: int = HKV, group: int = GROUP):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    q = rnd(B, hkv * group, L, D)
    k, v = rnd(B, hkv, S, D), rnd(B, hkv, S, D)
    bank_k, bank_v = rnd(num, hkv, p_max, D), rnd(num, hkv, p_max, D)
    return q, k, v, bank_k, bank_v


def per_row_truth(q, k, v, bank_k, bank_v, ids, lengths, causal, mask):
    """Row by row in float64 with the plain spec and the row's slice of its slot: the banks'
    gradients come from autograd summing over the slices."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bank_k, bank_v)]
    q64, k64, v64, bk64, bv64 = leaves
    p_max = bank_k.shape[2]
    outs = []
    for b, a in enumerate(ids.tolist()):
        pk = pv = None
        if a >= 0:
            n = p_max if lengths is None else int(lengths[a])
            pk, pv = bk64[a : a + 1, :, :n], bv64[a : a + 1, :, :n]
        m = None if mask is None else mask[b : b + 1]
        o, _ = reference.prefix_attention(
            q64[b : b + 1], k64[b : b + 1], v64[b : b + 1], pk, pv, causal=causal, key_padding_mask=m
        )
        outs.append(o)
    return torch.cat(outs), leaves


def run_case(backend, ids, lengths, *, num, p_max, causal=True, mask=None, dtype=torch.float32, seed=0):
    q, k, v, bank_k, bank_v = make(num, p_max, dtype, seed)
    with peftops.use_backend(backend):
        out = peftops.prefix_attention(
            q, k, v, bank_k, bank_v, causal=causal, key_padding_mask=mask, prefix_ids=ids, prefix_lengths=lengths
        )
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, bank_k, bank_v), g.to(dtype))
    truth, leaves = per_row_truth(q, k, v, bank_k, bank_v, ids, lengths, causal, mask)
    truth_grads = torch.autograd.grad(truth, leaves, g, allow_unused=True)
    assert_close(out, truth, dtype=dtype, kind="fwd", name="out")
    for name, got, want, leaf in zip(("q", "k", "v", "bank_k", "bank_v"), grads, truth_grads, leaves, strict=True):
        want = torch.zeros_like(leaf) if want is None else want
        assert got.shape == want.shape
        assert_close(got, want, dtype=dtype, kind="bwd", name=f"d{name}")
    return grads


CASES = {
    # name: (ids, lengths, N, P_max)
    "any_order": ([2, 0, 1], [5, 3, 7], 3, 7),
    "all_minus_one": ([-1, -1, -1], [4, 2], 2, 4),
    "one_prefix_for_all": ([1, 1, 1], [2, 6], 2, 6),
    "every_row_different": ([0, 2, 3], [1, 4, 3, 6], 4, 6),
    "heterogeneous_lengths_and_gaps": ([3, -1, 0], [19, 4, 1, 0], 4, 20),
    "default_lengths": ([1, -1, 1], None, 2, 5),
    "zero_length_slot": ([0, 1, 0], [0, 3], 2, 3),
}


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("name", list(CASES))
def test_banks_match_separate_per_row_runs(device, backend, name):
    ids, lengths, num, p_max = CASES[name]
    ids_t = torch.tensor(ids, dtype=torch.int64)
    lengths_t = None if lengths is None else torch.tensor(lengths, dtype=torch.int32)
    grads = run_case(backend, ids_t, lengths_t, num=num, p_max=p_max)
    # Exactly zero, not merely small: slots no row names and keys past a slot's length.
    dbank_k, dbank_v = grads[3], grads[4]
    for a in range(num):
        n = 0 if a not in ids else (p_max if lengths is None else lengths[a])
        assert torch.equal(dbank_k[a, :, n:], torch.zeros_like(dbank_k[a, :, n:])), f"slot {a} past {n}"
        assert torch.equal(dbank_v[a, :, n:], torch.zeros_like(dbank_v[a, :, n:])), f"slot {a} past {n}"


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_banks_with_padding_non_causal_and_int8_ids(device, backend):
    mask = torch.tensor([[True] * S, [False, True, True, False, True, True], [False] * S])
    ids = torch.tensor([1, 0, 1], dtype=torch.int8)
    run_case(backend, ids, torch.tensor([3, 2]), num=2, p_max=4, causal=False, mask=mask, seed=3)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_empty_bank(device, backend):
    """N = 0 slots (every id -1), and a bank of P_max = 0 keys: the plain attention, zero-size
    bank gradients."""
    for num, p_max, ids in ((0, 4, [-1, -1, -1]), (2, 0, [0, -1, 1])):
        grads = run_case(backend, torch.tensor(ids), None, num=num, p_max=p_max)
        assert grads[3].shape == (num, HKV, p_max, D)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_absent_slots_and_tails_are_never_read(device, backend):
    """inf and NaN in a slot no row names and past a used slot's length change nothing: the
    output and every gradient are those of the clean bank."""
    ids, lengths = torch.tensor([2, 0, 2]), torch.tensor([3, 5, 2])
    q, k, v, bank_k, bank_v = make(3, 6)
    clean = [t.detach() for t in (bank_k, bank_v)]
    dirty = [t.clone() for t in clean]
    for t in dirty:
        t[1] = math.nan
        t[0, :, 3:] = math.inf
        t[2, :, 2:] = math.nan
    results = []
    for bk, bv in (clean, dirty):
        bk, bv = bk.clone().requires_grad_(), bv.clone().requires_grad_()
        with peftops.use_backend(backend):
            out = peftops.prefix_attention(q, k, v, bk, bv, prefix_ids=ids, prefix_lengths=lengths)
        grads = torch.autograd.grad(out, (q, k, v, bk, bv), torch.ones_like(out))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(results[1][4][1], torch.zeros_like(results[1][4][1]))


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_bank_with_every_row_its_own_slot_equals_per_row_prefixes(device, backend):
    """ids = arange(B), lengths = P_max: the same computation as the per-row ``(B, Hkv, P, D)``
    prefix, gradients included."""
    q, k, v, bank_k, bank_v = make(B, 4)
    ids = torch.arange(B)
    with peftops.use_backend(backend):
        banked = peftops.prefix_attention(q, k, v, bank_k, bank_v, prefix_ids=ids)
        plain = peftops.prefix_attention(q, k, v, bank_k, bank_v)
    g = torch.randn_like(plain)
    a = torch.autograd.grad(banked, (q, bank_k, bank_v), g)
    b = torch.autograd.grad(plain, (q, bank_k, bank_v), g)
    assert_close(banked, plain, kind="fwd", name="out")
    for x, y in zip(a, b, strict=True):
        assert_close(x, y, kind="bwd", name="grad")


def call(**overrides):
    q, k, v, bank_k, bank_v = make(2, 4)
    kwargs = dict(prefix_ids=torch.tensor([0, -1, 1]), prefix_lengths=torch.tensor([4, 2]))
    kwargs.update(overrides)
    pk, pv = kwargs.pop("prefix_k", bank_k), kwargs.pop("prefix_v", bank_v)
    return peftops.prefix_attention(q, k, v, pk, pv, **kwargs)


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (dict(prefix_ids=torch.tensor([0, 2, 1])), ValueError, r"prefix_ids: expected slot ids .* in \[-1, 1\], got 2"),
        (dict(prefix_ids=torch.tensor([0, -2, 1])), ValueError, r"prefix_ids: .* got -2"),
        (dict(prefix_lengths=torch.tensor([5, 2])), ValueError, r"prefix_lengths: expected lengths in \[0, 4\].* 5"),
        (dict(prefix_lengths=torch.tensor([-1, 2])), ValueError, r"prefix_lengths: .* got -1"),
        (dict(prefix_ids=torch.tensor([0, 1])), ValueError, r"prefix_ids: expected shape \(3,\)"),
        (dict(prefix_lengths=torch.tensor([1, 2, 3])), ValueError, r"prefix_lengths: expected shape \(2,\)"),
        (dict(prefix_ids=torch.tensor([0.0, 1.0, 1.0])), TypeError, r"prefix_ids: expected an integer tensor"),
        (dict(prefix_ids=torch.tensor([0, 1, 1], dtype=torch.uint8)), TypeError, r"prefix_ids: expected a signed"),
        (dict(prefix_lengths=torch.tensor([True, False])), TypeError, r"prefix_lengths: expected an integer"),
        (dict(prefix_ids=None), ValueError, r"prefix_lengths: expected None without prefix_ids"),
        (dict(prefix_k=None, prefix_v=None), ValueError, r"prefix_ids: expected None without prefix banks"),
        (dict(prefix_k=torch.zeros(HKV, 4, D)), ValueError, r"prefix_k: expected 4 dims"),
        (dict(prefix_k=torch.zeros(2, 2, 4, D), prefix_v=torch.zeros(2, 2, 4, D)), ValueError, r"prefix_k: .*Hkv=1"),
    ],
)
def test_bad_bank_arguments_raise(overrides, error, match):
    with pytest.raises(error, match=rf"prefix_attention: {match}"):
        call(**overrides)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_unchecked_values_under_compile(device, backend):
    """While torch.compile traces nothing is read back: an id outside [-1, N) means no prefix
    and a length above P_max means P_max (the op's docstring), on every backend."""
    q, k, v, bank_k, bank_v = make(2, 4)

    def fn(ids, lengths):
        with peftops.use_backend(backend):
            return peftops.prefix_attention(q, k, v, bank_k, bank_v, prefix_ids=ids, prefix_lengths=lengths)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got = compiled(torch.tensor([5, -7, 1]), torch.tensor([2, 9]))
    want = fn(torch.tensor([-1, -1, 1]), torch.tensor([2, 4]))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="prefix_ids"):
        fn(torch.tensor([5, -7, 1]), torch.tensor([2, 4]))


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_opcheck_banks(device, backend):
    q, k, v, bank_k, bank_v = (t.detach() for t in make(3, 5))
    ids, lengths = torch.tensor([2, -1, 0]), torch.tensor([5, 0, 3])
    args = (q, k, v, bank_k, bank_v, None, True, 0.3, backend, ids, lengths)
    opcheck(torch.ops.peftops.prefix_attention.default, args)
    out, lse = torch.ops.peftops.prefix_attention(*args)
    opcheck(
        torch.ops.peftops.prefix_attention_backward.default,
        (torch.randn_like(out), q, k, v, bank_k, bank_v, None, out, lse, True, 0.3, [True] * 5, backend, ids, lengths),
    )
