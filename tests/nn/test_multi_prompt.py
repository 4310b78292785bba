"""peftops.nn.MultiPromptEmbedding: prompt slots, per-row gathers, gradients, ids, compile without recompiles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from peftops.nn.multi_prompt import MultiPromptEmbedding


def bank(capacity=4, p=3, d=5, names=("alice", "bob", "carol"), seed=0):
    torch.manual_seed(seed)
    m = MultiPromptEmbedding(capacity, p, d)
    for name in names:
        m.add_adapter(name)
    return m


@st.composite
def cases(draw):
    capacity = draw(st.integers(1, 5))
    p = draw(st.integers(1, 4))
    d = draw(st.integers(1, 6))
    used = draw(st.lists(st.integers(0, capacity - 1), unique=True, max_size=capacity))
    rows = draw(st.lists(st.sampled_from([-1, *used]), min_size=0, max_size=6))
    seed = draw(st.integers(0, 2**16))
    return capacity, p, d, used, rows, seed


@given(cases())
def test_rows_get_their_slots_and_slots_the_sum_of_their_rows_gradients(case):
    capacity, p, d, used, rows, seed = case
    g = torch.Generator().manual_seed(seed)
    m = MultiPromptEmbedding(capacity, p, d)
    for slot in range(capacity):
        m.add_adapter(f"p{slot}")  # slots fill in order
    for slot in set(range(capacity)) - set(used):
        m.remove_adapter(f"p{slot}")
    with torch.no_grad():
        m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    ids = torch.tensor(rows, dtype=torch.int64)
    out = m(ids)
    assert out.shape == (len(rows), p, d)
    upstream = torch.randn(out.shape, generator=g)
    (out * upstream).sum().backward()
    grad = m.weight.grad
    assert grad is not None
    for i, slot in enumerate(rows):
        if slot < 0:
            assert torch.equal(out[i], torch.zeros(p, d))
        else:
            assert torch.equal(out[i], m.weight[slot].detach())
    for slot in range(capacity):
        mine = [i for i, s in enumerate(rows) if s == slot]
        if not mine:
            assert torch.equal(grad[slot], torch.zeros(p, d))  # absent: exactly zero
        else:
            torch.testing.assert_close(grad[slot], upstream[mine].sum(0), rtol=1e-6, atol=1e-6)


def test_names_slots_and_none_and_set_batch_adapters():
    m = bank()
    out = m(["bob", None, 0, "carol"])
    assert torch.equal(out[0], m.weight[1].detach())
    assert torch.equal(out[1], torch.zeros(3, 5))
    assert torch.equal(out[2], m.weight[0].detach())
    assert torch.equal(out[3], m.weight[2].detach())
    m.set_batch_adapters(["carol", "carol"])
    assert torch.equal(m(), m.weight[2].detach().expand(2, -1, -1))


def test_add_and_remove_keep_the_parameter_and_zero_the_slot():
    m = bank()
    weight, ptr = m.weight, m.weight.data_ptr()
    init = torch.randn(3, 5)
    m.remove_adapter("bob")
    assert torch.equal(m.weight[1], torch.zeros(3, 5))
    assert m.add_adapter("dave", init) == 1  # the freed slot is reused
    assert torch.equal(m.weight[1], init)
    m.add_adapter("erin")
    assert m.weight is weight and m.weight.data_ptr() == ptr and m.weight.shape == (4, 3, 5)
    assert float(m.weight[3].detach().abs().max()) <= 0.5  # PromptEmbedding's uniform init
    assert m.adapters == {"alice": 0, "dave": 1, "carol": 2, "erin": 3}
    assert m.in_use.tolist() == [True] * 4


def test_state_dict_round_trip_keeps_the_slot_names():
    m = bank()
    m.remove_adapter("alice")
    other = MultiPromptEmbedding(4, 3, 5)
    other.load_state_dict(m.state_dict())
    assert other.adapters == {"bob": 1, "carol": 2}
    assert torch.equal(other.weight, m.weight)
    assert other.in_use.tolist() == [False, True, True, False]


def test_bad_ids_are_named():
    m = bank()
    with pytest.raises(ValueError, match=r"MultiPromptEmbedding: adapter_ids: expected .*got 7 \(out of range"):
        m(torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"MultiPromptEmbedding: adapter_ids: expected .*got -2 \(out of range"):
        m(torch.tensor([-2]))
    with pytest.raises(ValueError, match=r"MultiPromptEmbedding: adapter_ids: expected .*got 3, a free slot"):
        m(torch.tensor([3]))
    ids = torch.tensor([1, 0])
    m.set_batch_adapters(ids)
    m.remove_adapter("bob")  # ids set before: refused once the slot is free
    with pytest.raises(ValueError, match=r"got 1, a free slot"):
        m()
    with pytest.raises(TypeError, match=r"MultiPromptEmbedding: adapter_ids: expected an integer tensor"):
        m(torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"MultiPromptEmbedding: adapter_ids: expected one id per row, shape \(B,\)"):
        m(torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"adapter id 3 is not a slot in use"):
        m([3])
    with pytest.raises(KeyError, match=r"no adapter named 'zed'"):
        m(["zed"])
    m.set_batch_adapters(None)
    with pytest.raises(ValueError, match=r"MultiPromptEmbedding: adapter_ids: expected the batch's prompts"):
        m()


def test_bad_constructor_and_add_arguments_are_named():
    with pytest.raises(ValueError, match=r"MultiPromptEmbedding: capacity: expected an int >= 1, got 0"):
        MultiPromptEmbedding(0, 3, 5)
    with pytest.raises(TypeError, match=r"MultiPromptEmbedding: num_virtual_tokens: expected an int"):
        MultiPromptEmbedding(2, 3.0, 5)
    m = bank(capacity=3)
    with pytest.raises(ValueError, match=r"add_adapter: all 3 slots are in use"):
        m.add_adapter("dave")
    m.remove_adapter("carol")
    with pytest.raises(ValueError, match=r"add_adapter: name: expected a new adapter name, got 'bob'"):
        m.add_adapter("bob")
    with pytest.raises(ValueError, match=r"add_adapter: init: expected shape \(3, 5\), got \(5, 3\)"):
        m.add_adapter("dave", torch.zeros(5, 3))
    with pytest.raises(ValueError, match=r"add_adapter: init: expected finite"):
        m.add_adapter("dave", torch.full((3, 5), float("nan")))
    with pytest.raises(TypeError, match=r"add_adapter: name: expected a non-empty str"):
        m.add_adapter("")
    assert m.adapters == {"alice": 0, "bob": 1}  # nothing half-added


def test_compiled_forward_does_not_recompile_when_prompts_change():
    torch._dynamo.reset()
    m = bank()
    ids = torch.tensor([0, -1, 2])
    m.set_batch_adapters(ids)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled()
        m.remove_adapter("carol")
        m.add_adapter("dave", torch.ones(3, 5))  # slot 2 again
        ids.copy_(torch.tensor([2, 1, -1]))
        second = compiled()
        m.remove_adapter("bob")  # unchecked under compile: the row gets no prompt
        with torch.no_grad():
            m.weight[1].fill_(7.0)  # what a momentum step may leave in a freed slot
        third = compiled()
    assert torch.equal(first[0], m.weight[0].detach()) and torch.equal(first[1], torch.zeros(3, 5))
    assert torch.equal(second[0], torch.ones(3, 5)) and torch.equal(second[2], torch.zeros(3, 5))
    assert torch.equal(third[1], torch.zeros(3, 5)) and torch.equal(third[0], torch.ones(3, 5))
