"""peftops.nn.MultiLoRALinear: adapter slots, per-row batches, gradients, compile without recompiles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftops
from peftops.nn import LoRALinear, MultiLoRALinear
from peftops.testing import assert_close


def layer_with_adapters(seed=0):
    torch.manual_seed(seed)
    layer = MultiLoRALinear.from_linear(nn.Linear(12, 10), capacity=4, r_max=8)
    layer.add_adapter("alice", r=8, alpha=16)
    layer.add_adapter("bob", r=2, alpha=4)
    layer.add_adapter("carol", r=5, alpha=5, use_rslora=True)
    with torch.no_grad():  # random B, not the zero init, so the adapters change the output
        layer.lora_B.normal_()
    return layer


def as_lora_linear(layer: MultiLoRALinear, name: str) -> LoRALinear:
    slot = layer.adapter_id(name)
    r = int(layer.ranks[slot])
    single = LoRALinear(layer.in_features, layer.out_features, r=r, alpha=1.0)
    with torch.no_grad():
        single.weight.copy_(layer.weight)
        single.bias.copy_(layer.bias)
        single.lora_A.weight.copy_(layer.lora_A[slot, :r])
        single.lora_B.weight.copy_(layer.lora_B[slot, :, :r])
    single.scaling = float(layer.scales[slot])
    return single


def test_rows_use_their_own_adapters():
    layer = layer_with_adapters()
    x = torch.randn(4, 3, 12)
    y = layer(x, ["bob", None, "alice", "carol"])
    assert_close(y[0], as_lora_linear(layer, "bob")(x[0]))
    assert_close(y[1], nn.functional.linear(x[1], layer.weight, layer.bias))
    assert_close(y[2], as_lora_linear(layer, "alice")(x[2]))
    assert_close(y[3], as_lora_linear(layer, "carol")(x[3]))
    layer.set_batch_adapters(["carol"] * 4)
    assert_close(layer(x), as_lora_linear(layer, "carol")(x))


def test_scales_follow_alpha_over_r_and_rslora():
    layer = layer_with_adapters()
    assert layer.scales.tolist() == pytest.approx([2.0, 2.0, 5 / 5**0.5, 0.0])
    assert layer.ranks.tolist() == [8, 2, 5, 1]


def test_mixed_batch_gradients_and_absent_adapters():
    layer = layer_with_adapters()
    peftops.mark_only_adapters_trainable(layer)
    x = torch.randn(6, 12)
    layer(x, ["alice", "alice", None, "carol", "alice", None]).square().sum().backward()
    bob = layer.adapter_id("bob")
    assert torch.count_nonzero(layer.lora_A.grad[bob]) == 0 and torch.count_nonzero(layer.lora_B.grad[bob]) == 0
    assert layer.weight.grad is None
    carol = layer.adapter_id("carol")
    single = as_lora_linear(layer, "carol")
    single(x[3:4]).square().sum().backward()
    assert_close(layer.lora_B.grad[carol, :, :5], single.lora_B.weight.grad, kind="bwd")
    assert_close(layer.lora_A.grad[carol, :5], single.lora_A.weight.grad, kind="bwd")
    assert torch.count_nonzero(layer.lora_A.grad[carol, 5:]) == 0


def test_add_and_remove_adapters():
    layer = layer_with_adapters()
    layer.remove_adapter("bob")
    assert layer.adapters == {"alice": 0, "carol": 2}
    assert layer.add_adapter("dave", r=3, alpha=3) == 1  # the freed slot
    layer.add_adapter("erin", r=1, alpha=1)
    with pytest.raises(ValueError, match="all 4 slots are in use"):
        layer.add_adapter("frank", r=1, alpha=1)
    with pytest.raises(ValueError, match="already in slot"):
        layer.add_adapter("alice", r=1, alpha=1)
    with pytest.raises(ValueError, match="r: expected at most r_max=8, got 9"):
        layer.remove_adapter("erin") or layer.add_adapter("gina", r=9, alpha=1)
    with pytest.raises(KeyError, match="no adapter named 'bob'"):
        layer(torch.randn(1, 12), ["bob"])
    with pytest.raises(ValueError, match="adapter_ids: expected the batch's adapters"):
        layer(torch.randn(1, 12))


def test_state_dict_carries_the_slots():
    layer = layer_with_adapters()
    fresh = MultiLoRALinear(12, 10, capacity=4, r_max=8)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.adapters == layer.adapters
    x = torch.randn(2, 12)
    assert torch.equal(fresh(x, ["carol", "bob"]), layer(x, ["carol", "bob"]))


def test_adding_an_adapter_does_not_recompile():
    layer = layer_with_adapters()
    frames = []

    def counting_backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(lambda x, ids: layer(x, ids), backend=counting_backend, fullgraph=True)
    x = torch.randn(5, 12)
    ids = layer.adapter_ids(["alice", "bob", None, "carol", "alice"])
    y0 = compiled(x, ids)
    layer.remove_adapter("bob")
    layer.add_adapter("dave", r=6, alpha=12)
    ids = layer.adapter_ids(["dave", "dave", "alice", None, "carol"])
    y1 = compiled(x, ids)
    assert len(frames) == 1, f"recompiled {len(frames) - 1} time(s)"
    assert_close(y1, layer(x, ids))
    assert not torch.equal(y0, y1)


def test_apply_lora_with_capacity_builds_multi_adapter_layers_and_trains_per_user():
    from tests.models import TinyConfig, TinyDecoder

    torch.manual_seed(0)
    model = peftops.apply_lora(TinyDecoder(TinyConfig()), ["q_proj", "v_proj"], r=8, alpha=16, capacity=3)
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    assert len(layers) == 4 and all(m.capacity == 3 and m.r_max == 8 for m in layers)
    peftops.nn.add_adapter(model, "alice", r=8, alpha=16)
    peftops.nn.add_adapter(model, "bob", r=4, alpha=8)
    assert all(m.adapters == {"alice": 0, "bob": 1} for m in layers)
    peftops.nn.set_batch_adapters(model, ["alice", "bob", None])
    ids = torch.randint(0, 48, (3, 10))
    model(ids).float().square().mean().backward()
    for m in layers:  # B starts at zero, so only B learns on the first step; slot 2 is unused
        assert torch.count_nonzero(m.lora_B.grad[0]) > 0 and torch.count_nonzero(m.lora_B.grad[1][:, :4]) > 0
        assert torch.count_nonzero(m.lora_B.grad[1][:, 4:]) == 0 and torch.count_nonzero(m.lora_B.grad[2]) == 0
    assert peftops.count_trainable(model).trainable == sum(m.lora_A.numel() + m.lora_B.numel() for m in layers)
    with pytest.raises(ValueError, match="set_batch_adapters: model: expected MultiLoRALinear layers"):
        peftops.nn.set_batch_adapters(nn.Linear(2, 2), ["alice"])
