"""peftops.nn.MultiBottleneckAdapter: adapter slots, per-row batches, gradients, compile without recompiles."""

from __future__ import annotations

import pytest
import torch

import peftops
from peftops.nn import BottleneckAdapter
from peftops.nn.multi_bottleneck_adapter import MultiBottleneckAdapter
from peftops.testing import assert_close


def bank(seed=0, parallel=False):
    torch.manual_seed(seed)
    m = MultiBottleneckAdapter(12, capacity=4, r_max=8, activation="gelu", scale=0.5, parallel=parallel)
    m.add_adapter("alice", r=8)
    m.add_adapter("bob", r=2)
    m.add_adapter("carol", r=5)
    with torch.no_grad():  # random up projections, not the zero init, so the adapters change the output
        m.up_weight.normal_()
        m.up_bias.normal_()
    return m


def as_single(m: MultiBottleneckAdapter, name: str) -> BottleneckAdapter:
    slot = m.adapter_id(name)
    r = int(m.ranks[slot])
    single = BottleneckAdapter(m.d, r, activation=m.activation, scale=m.scale, parallel=m.parallel)
    with torch.no_grad():
        single.down.weight.copy_(m.down_weight[slot, :r])
        single.down.bias.copy_(m.down_bias[slot, :r])
        single.up.weight.copy_(m.up_weight[slot, :, :r])
        single.up.bias.copy_(m.up_bias[slot])
    return single


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_rows_use_their_own_adapters(backend):
    m = bank()
    x = torch.randn(4, 3, 12)
    with peftops.use_backend(backend):  # (the single adapters run on auto's choice)
        y = m(x, ["bob", None, "alice", "carol"])
        m.set_batch_adapters(["carol"] * 4)
        y_carol = m(x)
    assert_close(y[0], as_single(m, "bob")(x[0]))
    assert torch.equal(y[1], x[1])
    assert_close(y[2], as_single(m, "alice")(x[2]))
    assert_close(y[3], as_single(m, "carol")(x[3]))
    assert_close(y_carol, as_single(m, "carol")(x))


def test_parallel_form_takes_the_residual():
    m = bank(1, parallel=True)
    x, res = torch.randn(3, 2, 12), torch.randn(3, 2, 12)
    y = m(x, torch.tensor([1, -1, 2]), residual=res)
    assert_close(y[0], as_single(m, "bob")(x[0], res[0]))
    assert torch.equal(y[1], res[1])
    assert_close(y[2], as_single(m, "carol")(x[2], res[2]))
    with pytest.raises(ValueError, match=r"MultiBottleneckAdapter\(parallel=True\): residual: expected"):
        m(x, ["bob"] * 3)
    with pytest.raises(ValueError, match=r"MultiBottleneckAdapter\(parallel=False\): residual: expected None"):
        bank()(x, ["bob"] * 3, residual=res)


def test_a_fresh_adapter_changes_nothing_and_ranks_are_per_slot():
    m = MultiBottleneckAdapter(6, capacity=3, r_max=4)
    assert m.add_adapter("a", r=3) == 0
    x = torch.randn(5, 6)
    assert torch.equal(m(x, ["a"] * 5), x)
    assert m.ranks.tolist() == [3, 1, 1]
    assert torch.count_nonzero(m.down_weight[0, 3:]) == 0 and torch.count_nonzero(m.down_weight[0, :3]) == 18


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_mixed_batch_gradients_equal_per_adapter_runs_and_absent_adapters_get_zero(backend):
    m = bank(2)
    x = torch.randn(6, 12)
    with peftops.use_backend(backend):
        m(x, ["alice", "alice", None, "carol", "alice", None]).square().sum().backward()
    bob = m.adapter_id("bob")
    for p in (m.down_weight, m.down_bias, m.up_weight, m.up_bias):
        assert torch.count_nonzero(p.grad[bob]) == 0
    for name, rows in (("carol", [3]), ("alice", [0, 1, 4])):
        slot, single = m.adapter_id(name), as_single(m, name)
        r = int(m.ranks[slot])
        single(x[rows]).square().sum().backward()
        assert_close(m.down_weight.grad[slot, :r], single.down.weight.grad, kind="bwd")
        assert_close(m.down_bias.grad[slot, :r], single.down.bias.grad, kind="bwd")
        assert_close(m.up_weight.grad[slot, :, :r], single.up.weight.grad, kind="bwd")
        assert_close(m.up_bias.grad[slot], single.up.bias.grad, kind="bwd")
        assert torch.count_nonzero(m.down_weight.grad[slot, r:]) == 0
        assert torch.count_nonzero(m.up_weight.grad[slot, :, r:]) == 0


def test_add_and_remove_adapters():
    m = bank()
    m.remove_adapter("bob")
    assert m.adapters == {"alice": 0, "carol": 2}
    assert m.add_adapter("dave", r=3) == 1  # the freed slot
    m.add_adapter("erin", r=1)
    with pytest.raises(ValueError, match="all 4 slots are in use"):
        m.add_adapter("frank", r=1)
    with pytest.raises(ValueError, match="already in slot"):
        m.add_adapter("alice", r=1)
    m.remove_adapter("erin")
    with pytest.raises(ValueError, match="r: expected at most r_max=8, got 9"):
        m.add_adapter("gina", r=9)
    with pytest.raises(KeyError, match="no adapter named 'bob'"):
        m(torch.randn(1, 12), ["bob"])
    with pytest.raises(ValueError, match="adapter_ids: expected the batch's adapters"):
        m(torch.randn(1, 12))
    with pytest.raises(ValueError, match="MultiBottleneckAdapter: capacity: expected an int >= 1"):
        MultiBottleneckAdapter(4, capacity=0, r_max=2)
    with pytest.raises(ValueError, match="MultiBottleneckAdapter: activation: expected one of"):
        MultiBottleneckAdapter(4, capacity=1, r_max=2, activation="tanh")


def test_state_dict_carries_the_slots():
    m = bank(3)
    fresh = MultiBottleneckAdapter(12, capacity=4, r_max=8, scale=0.5)
    fresh.load_state_dict(m.state_dict())
    assert fresh.adapters == m.adapters
    assert fresh.ranks.tolist() == m.ranks.tolist()
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x, ["carol", "bob"]), m(x, ["carol", "bob"]))
    with pytest.raises(ValueError, match="adapter_ids: .*got 3, a free slot"):
        fresh(x, torch.tensor([3, 0]))


def test_adding_an_adapter_does_not_recompile():
    m = bank(4)
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x, ids: m(x, ids), backend=counting_backend, fullgraph=True)
    x = torch.randn(5, 12)
    y0 = compiled(x, m.adapter_ids(["alice", "bob", None, "carol", "alice"]))
    m.remove_adapter("bob")
    m.add_adapter("dave", r=6)
    with torch.no_grad():
        m.up_weight[m.adapter_id("dave")].normal_()
    ids = m.adapter_ids(["dave", "dave", "alice", None, "carol"])
    y1 = compiled(x, ids)
    assert len(frames) == 1, f"recompiled {len(frames) - 1} time(s)"
    assert_close(y1, m(x, ids))
    assert not torch.equal(y0, y1)


def test_tensor_ids_naming_a_free_slot_raise_in_eager_and_get_no_adapter_under_compile():
    m = bank(5)  # slots 0..2 in use, 3 free
    m.remove_adapter("bob")  # slot 1
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match=r"MultiBottleneckAdapter: adapter_ids: .*got 1, a free slot"):
        m(x, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(
        ValueError, match=r"bottleneck_adapter: adapter_ids: expected adapter ids .* in \[-1, 3\], got 7"
    ):
        m(x, torch.tensor([0, 7, -1, 2]))
    with torch.no_grad():  # a freed slot an optimizer has moved since
        for p in (m.down_weight, m.down_bias, m.up_weight, m.up_bias):
            p[1].normal_()
    compiled = torch.compile(lambda x, ids: m(x, ids), backend="eager", fullgraph=True)
    y = compiled(x, torch.tensor([1, 3, 0, 2]))
    assert torch.equal(y[:2], x[:2])
    assert_close(y[2:], m(x[2:], ["alice", "carol"]))
