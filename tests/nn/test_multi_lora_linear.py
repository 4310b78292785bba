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


# -- bad sizes ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("in_f, out_f, name", [(0, 4, "in_features"), (4, 0, "out_features")])
def test_zero_features_are_rejected(in_f, out_f, name):
    with pytest.raises(ValueError, match=rf"MultiLoRALinear: {name}: expected an int >= 1, got 0"):
        MultiLoRALinear(in_f, out_f, capacity=2, r_max=4)
    with pytest.raises(ValueError, match=rf"MultiLoRALinear.from_linear: linear: expected {name} >= 1, got 0"):
        MultiLoRALinear.from_linear(nn.Linear(in_f, out_f), capacity=2, r_max=4)


@pytest.mark.parametrize("kwargs, name", [({"capacity": 0}, "capacity"), ({"r_max": 0}, "r_max")])
def test_zero_capacity_or_rank_is_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"MultiLoRALinear: {name}: expected an int >= 1, got 0"):
        MultiLoRALinear(4, 4, **{"capacity": 2, "r_max": 4, **kwargs})
    layer = MultiLoRALinear(4, 4, capacity=2, r_max=4)
    with pytest.raises(ValueError, match=r"add_adapter: r: expected an int >= 1, got 0"):
        layer.add_adapter("a", r=0, alpha=1)


# -- scales stay float32 ------------------------------------------------------------------


def thirds_layer():
    layer = MultiLoRALinear(12, 10, capacity=3, r_max=6)
    layer.add_adapter("third", r=6, alpha=2)  # 1/3: not a float16 or bfloat16 number
    layer.add_adapter("rs", r=5, alpha=1, use_rslora=True)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to("cpu", torch.float16),
        lambda m: m.double(),
        lambda m: nn.Sequential(m).half()[0],  # cast through a parent model
    ],
    ids=["half", "bfloat16", "to-bf16", "to-cpu-fp16", "double", "parent-half"],
)
def test_casting_the_module_keeps_the_scales_float32_and_exact(cast):
    layer = thirds_layer()
    expected = layer.scales.clone()
    assert expected[0].item() == pytest.approx(1 / 3, rel=1e-7)
    layer = cast(layer)
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, expected)
    assert layer.ranks.dtype == torch.int64
    dtype = layer.weight.dtype
    assert dtype != torch.float32 and layer.lora_A.dtype == dtype
    # The output uses the exact scale: compare with a LoRALinear holding scale 1/3 as a Python float.
    x = torch.randn(4, 12, dtype=dtype)
    single = as_lora_linear(layer.float(), "third").to(dtype)
    assert single.scaling == pytest.approx(1 / 3, rel=1e-7)
    assert_close(layer.to(dtype)(x, ["third"] * 4), single(x), dtype=dtype)


def test_float32_scales_survive_state_dict_and_load_state_dict():
    layer = thirds_layer()
    expected = layer.scales.clone()
    half = thirds_layer().half()
    sd = half.state_dict()
    assert sd["scales"].dtype == torch.float32 and torch.equal(sd["scales"], expected)
    fresh = MultiLoRALinear(12, 10, capacity=3, r_max=6, dtype=torch.bfloat16)
    fresh.load_state_dict(sd)
    assert fresh.scales.dtype == torch.float32 and torch.equal(fresh.scales, expected)
    # ``to_empty`` from meta (deferred init) keeps the buffer float32 as well.
    meta = MultiLoRALinear(12, 10, capacity=3, r_max=6, device="meta").half().to_empty(device="cpu")
    assert meta.scales.dtype == torch.float32 and meta.lora_A.dtype == torch.float16
    assert not meta.in_use.any()  # no adapter yet, whatever the uninitialised memory held


# -- ids naming a free slot ----------------------------------------------------------------


def test_tensor_ids_naming_a_free_or_removed_slot_raise_in_eager():
    layer = layer_with_adapters()  # slots 0..2 in use, 3 free
    x = torch.randn(3, 12)
    with pytest.raises(ValueError, match=r"MultiLoRALinear: adapter_ids: .*got 3, a free slot"):
        layer(x, torch.tensor([0, 3, -1]))
    layer.remove_adapter("bob")  # slot 1
    with pytest.raises(ValueError, match=r"adapter_ids: .*got 1, a free slot"):
        layer(x, torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match=r"adapter_ids: .*got 1, a free slot"):
        layer(torch.randn(2, 5, 12), torch.tensor([2, 1]))  # one id per row
    layer.set_batch_adapters(torch.tensor([2, 1, 0]))
    with pytest.raises(ValueError, match=r"adapter_ids: .*got 1, a free slot"):
        layer(x)
    # The same rule as slot ints in a list.
    with pytest.raises(ValueError, match=r"adapter id 1 is not a slot in use"):
        layer(x, [0, 1, None])
    # Ids in use and -1 pass; out-of-range ids still get the op's own range error.
    assert_close(layer(x, torch.tensor([2, -1, 0])), layer(x, ["carol", None, "alice"]))
    with pytest.raises(
        ValueError, match=r"multi_lora_linear: adapter_ids: expected adapter ids .* in \[-1, 3\], got 7"
    ):
        layer(x, torch.tensor([0, 7, -1]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_free_slot_ids_under_torch_compile_give_the_base_layer(backend):
    """Traced code cannot read ids back, so the eager check is skipped: a free slot's scale is 0
    and its weights finite, so its rows get the base layer only."""
    layer = layer_with_adapters()
    layer.remove_adapter("bob")
    with torch.no_grad():  # a freed slot an optimizer has moved since: finite, scale still 0
        layer.lora_A[1].normal_()
        layer.lora_B[1].normal_()
    x = torch.randn(4, 12)
    with peftops.use_backend(backend):
        compiled = torch.compile(lambda x, ids: layer(x, ids), backend="eager", fullgraph=True)
        y = compiled(x, torch.tensor([1, 3, 0, -1]))
        others = layer(x[2:], ["alice", None])
    base = nn.functional.linear(x, layer.weight, layer.bias)
    assert_close(y[:2], base[:2], name="free-slot rows")
    assert_close(y[2:], others, name="other rows")


# -- ids for another batch size ------------------------------------------------------------


def test_ids_set_for_fewer_rows_than_the_batch_are_an_error_that_says_why():
    # generate() with num_beams=3 turns 2 rows into 6: the ids set for 2 rows must not be
    # broadcast or reused, and the error names where they came from and the way out.
    layer = layer_with_adapters()
    layer.set_batch_adapters(["alice", None])
    with pytest.raises(
        ValueError,
        match=r"MultiLoRALinear: adapter_ids: expected one per row \(6 rows\) or per token \(6, 3\) of the "
        r"input, got shape \(2,\) from set_batch_adapters.*peftops\.generate",
    ):
        layer(torch.randn(6, 3, 12))
    with pytest.raises(ValueError, match=r"expected one per row \(6 rows\) .* got shape \(2,\) from the adapter_ids"):
        layer(torch.randn(6, 3, 12), torch.tensor([0, -1]))
    # Per-token ids still pass, whatever their count, where the shape is the tokens'.
    x = torch.randn(2, 12)
    assert_close(layer(x), layer(x, ["alice", None]))
