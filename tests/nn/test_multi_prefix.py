"""``MultiPrefixKV``: slots, ids, the batch it hands ``prefix_attention``, gradients per slot,
state dicts, and no recompilation when adapters come and go."""

from __future__ import annotations

import pytest
import torch

import peftops
from peftops import reference
from peftops.nn.multi_prefix import MultiPrefixBatch, MultiPrefixKV
from peftops.testing import assert_close

HKV, D = 2, 16


def module(capacity=3, p_max=6, layers=2) -> MultiPrefixKV:
    torch.manual_seed(0)
    return MultiPrefixKV(layers, HKV, capacity, p_max, D)


def test_slots_add_remove_keep_shapes_and_lengths():
    m = module()
    ptr, shape = m.prefix.data_ptr(), m.prefix.shape
    assert m.add_adapter("a", 4) == 0
    assert m.add_adapter("b", 6) == 1
    assert m.add_adapter("c", 1) == 2
    assert m.prefix_lengths.tolist() == [4, 6, 1]
    assert torch.equal(m.prefix[:, :, 0, :, 4:], torch.zeros_like(m.prefix[:, :, 0, :, 4:]))
    assert m.prefix[:, :, 0, :, :4].abs().sum() > 0
    with pytest.raises(ValueError, match=r"MultiPrefixKV.add_adapter: all 3 slots are in use"):
        m.add_adapter("d", 2)
    m.remove_adapter("b")
    assert m.prefix_lengths.tolist() == [4, 0, 1]
    assert torch.equal(m.prefix[:, :, 1], torch.zeros_like(m.prefix[:, :, 1]))
    assert m.add_adapter("d", 2) == 1
    assert m.adapters == {"a": 0, "c": 2, "d": 1}
    assert m.prefix.data_ptr() == ptr and m.prefix.shape == shape


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda m: m.add_adapter("a", 2), ValueError, r"add_adapter: name: expected a new adapter name"),
        (lambda m: m.add_adapter("x", 7), ValueError, r"add_adapter: prefix_len: expected at most prefix_len_max=6"),
        (lambda m: m.add_adapter("x", 0), ValueError, r"add_adapter: prefix_len: expected an int >= 1"),
        (lambda m: m.add_adapter("", 2), TypeError, r"add_adapter: name: expected a non-empty str"),
        (lambda m: m.remove_adapter("zz"), KeyError, r"no adapter named 'zz'"),
        (lambda m: m.set_batch_adapters(["a", 2]), ValueError, r"adapter id 2 is not a slot in use"),
        (lambda m: m(torch.tensor([0, 1])), ValueError, r"adapter_ids: expected slots in use \[0\] .* got 1"),
        (lambda m: m(), ValueError, r"adapter_ids: expected the batch's adapters"),
        (lambda m: m([1.5]), TypeError, r"expected adapter names, slot ints or None, got float"),
    ],
)
def test_bad_calls_raise(call, error, match):
    m = module()
    m.add_adapter("a", 2)
    with pytest.raises(error, match=match):
        call(m)


def attend(m: MultiPrefixKV, q, k, v, batch: MultiPrefixBatch, layer: int):
    bank_k, bank_v = batch.layers[layer]
    return peftops.prefix_attention(
        q, k, v, bank_k, bank_v, prefix_ids=batch.prefix_ids, prefix_lengths=batch.prefix_lengths
    )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forward_matches_per_row_prefixes_and_gradients_stay_in_their_slots(backend):
    m = module()
    m.add_adapter("a", 3)
    m.add_adapter("b", 5)
    m.add_adapter("c", 2)
    m.remove_adapter("c")  # slot 2 free: absent from every batch
    m.set_batch_adapters(["b", None, "a"])
    batch = m()
    assert batch.prefix_ids.tolist() == [1, -1, 0]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, HKV, n, D, generator=gen) for n in (4, 5, 5))
    with peftops.use_backend(backend):
        out = attend(m, q, k, v, batch, layer=1)
    out.square().sum().backward()
    grad = m.prefix.grad
    rows = []
    for b, (slot, n) in enumerate(((1, 5), (None, 0), (0, 3))):
        pk = pv = None
        if slot is not None:
            pk, pv = m.prefix[1, 0, slot : slot + 1, :, :n], m.prefix[1, 1, slot : slot + 1, :, :n]
        rows.append(reference.prefix_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], pk, pv)[0])
    assert_close(out, torch.cat(rows), kind="fwd", name="out")
    # Layer 0 was not used, slot 2 is absent, and keys past each slot's length are not keys.
    zero = torch.zeros_like
    assert torch.equal(grad[0], zero(grad[0]))
    assert torch.equal(grad[1, :, 2], zero(grad[1, :, 2]))
    assert torch.equal(grad[1, :, 0, :, 3:], zero(grad[1, :, 0, :, 3:]))
    assert grad[1, :, 0, :, :3].abs().min() > 0 and grad[1, :, 1, :, :5].abs().min() > 0


def test_state_dict_round_trip_keeps_slots():
    m = module()
    m.add_adapter("a", 3)
    m.add_adapter("b", 5)
    m.remove_adapter("a")
    other = module()
    other.load_state_dict(m.state_dict())
    assert other.adapters == {"b": 1}
    assert other.prefix_lengths.tolist() == [0, 5, 0]
    assert torch.equal(other.prefix, m.prefix)
    assert other.in_use.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="a free slot"):
        other(torch.tensor([0]))


def test_adapters_come_and_go_without_recompiling():
    m = module(layers=1)
    m.add_adapter("a", 2)
    q, k, v = torch.randn(2, HKV, 3, D), torch.randn(2, HKV, 4, D), torch.randn(2, HKV, 4, D)

    def step(ids):
        with peftops.use_backend("reference"):
            return attend(m, q, k, v, m(ids), layer=0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(torch.tensor([0, -1]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        m.add_adapter("b", 6)
        got = compiled(torch.tensor([1, 0]))
        assert torch.equal(got, step(torch.tensor([1, 0])))
        m.remove_adapter("a")
        # Under compile the free-slot check cannot read ids back: slot 0 is free, length 0,
        # so its row gets no prefix (the class docstring).
        got = compiled(torch.tensor([1, 0]))
        assert torch.equal(got, step(torch.tensor([1, -1])))
