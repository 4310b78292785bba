"""4-bit base layers (QLoRA modules): LinearNF4, LoRALinearNF4 (LoRALinear.from_linear on a 4-bit
layer), quantize_model, apply_lora on a quantised model, merging with requantisation, state
dicts in bitsandbytes' keys, and the storage cost (bits per weight)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import peftops
from peftops.nn import LinearNF4, LoRALinear, LoRALinearNF4, bits_per_parameter, quantize_model
from peftops.reference import nf4
from peftops.testing import assert_close


def _linear(k=70, n=24, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_nf4_is_the_dequantized_linear(quant_type, nested, dtype):
    lin = _linear(dtype=dtype)
    q = LinearNF4.from_linear(lin, quant_type, compress_statistics=nested)
    packed, state = nf4.quantize_4bit(lin.weight.detach(), quant_type=quant_type, compress_statistics=nested)
    assert torch.equal(q.weight.reshape(-1), packed.reshape(-1)) and not q.weight.requires_grad
    w = nf4.dequantize_4bit(packed, state)
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(5, 70).to(dtype)
    assert torch.equal(q(x), nn.functional.linear(x, w, lin.bias))
    assert q.bias is lin.bias


def test_state_dict_holds_bitsandbytes_keys_and_round_trips():
    q = LinearNF4.from_linear(_linear())
    sd = q.state_dict()
    assert sorted(sd) == sorted(
        ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
         "weight.quant_state.bitsandbytes__nf4"]
    )  # fmt: skip
    assert sd["weight"].dtype == torch.uint8
    other = LinearNF4.from_linear(_linear(seed=1), "fp4", compress_statistics=False)
    other.load_state_dict(sd)
    x = torch.randn(3, 70)
    assert torch.equal(other(x), q(x))
    assert other.quant_type == "nf4" and other.state2_absmax is not None
    wrong = LinearNF4.from_linear(_linear(k=64))
    with pytest.raises(RuntimeError, match="a 4-bit weight of shape"):
        wrong.load_state_dict(sd)


def test_storage_is_4_127_bits_per_weight_with_double_quantisation():
    big = LinearNF4.from_linear(nn.Linear(4096, 4096, bias=False))
    assert abs(bits_per_parameter(big) - 4.127) < 0.001, bits_per_parameter(big)
    single = LinearNF4.from_linear(nn.Linear(4096, 1024, bias=False), compress_statistics=False)
    assert abs(bits_per_parameter(single) - 4.5) < 0.001  # a float32 scale per 64 weights


def test_lora_over_a_4bit_base_matches_lora_on_the_dequantized_weight():
    q = LinearNF4.from_linear(_linear())
    layer = LoRALinear.from_linear(q, r=4, alpha=8, dropout=0.0)
    assert isinstance(layer, LoRALinearNF4) and isinstance(layer, LoRALinear)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 70, requires_grad=True)
    y = layer(x)
    w = q.dequantize()
    a = layer.lora_A.weight.detach().requires_grad_()
    b = layer.lora_B.weight.detach().requires_grad_()
    x2 = x.detach().requires_grad_()
    want = peftops.lora_linear(x2, w, a, b, scale=layer.scaling, bias=q.bias)
    assert_close(y, want, name="y")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, layer.lora_A.weight, layer.lora_B.weight, layer.bias], g)
    exp = torch.autograd.grad(want, [x2, a, b, q.bias], g)
    for name, u, v in zip(["dx", "dA", "dB", "db"], got, exp, strict=True):
        assert_close(u, v, kind="bwd", name=name)


def test_lora_nf4_state_dict_reloads_and_refuses_dora():
    layer = LoRALinear.from_linear(LinearNF4.from_linear(_linear()), r=4)
    nn.init.normal_(layer.lora_B.weight)
    fresh = LoRALinear.from_linear(LinearNF4.from_linear(_linear(seed=3)), r=4)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 70)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="use_dora: DoRA over a 4-bit base weight is not supported"):
        LoRALinear.from_linear(LinearNF4.from_linear(_linear()), r=4, use_dora=True)
    with pytest.raises(TypeError, match="expected a LinearNF4 or a bitsandbytes Linear4bit"):
        LoRALinearNF4.from_quantized(_linear())


def test_merge_requantizes_with_a_warning_and_unmerge_is_approximate():
    layer = LoRALinear.from_linear(LinearNF4.from_linear(_linear()), r=4).eval()
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    x = torch.randn(8, 70)
    before = layer(x)
    with pytest.warns(UserWarning, match="quantises W"):
        layer.merge()
    merged = layer(x)
    # The requantised merged weight: within the 4-bit rounding of the dequantised W + s B A.
    w_merged = layer.dequantize().float()
    assert layer.weight.dtype == torch.uint8
    assert_close(merged, nn.functional.linear(x, w_merged, layer.bias), name="merged forward")
    assert (merged - before).abs().max() < 0.25 * before.abs().max()
    with pytest.raises(RuntimeError, match="a merged 4-bit layer has no exact unmerged weight"):
        layer.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.unmerge()
    assert not layer.merged


def test_quantize_model_skips_by_name_and_apply_lora_wraps_4bit_layers():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(64, 128))
    model.add_module("act", nn.GELU())
    model.add_module("down", nn.Linear(128, 64))
    model.add_module("lm_head", nn.Linear(64, 10))
    quantize_model(model)
    assert isinstance(model.up, LinearNF4) and isinstance(model.down, LinearNF4)
    assert type(model.lm_head) is nn.Linear
    peftops.apply_lora(model, ["up", "down"], r=4, alpha=8)
    assert isinstance(model.up, LoRALinearNF4) and isinstance(model.down, LoRALinearNF4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.lora_A.weight", "up.lora_B.weight", "down.lora_A.weight", "down.lora_B.weight"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, target = torch.randn(32, 64), torch.randint(0, 10, (32,))
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    with pytest.raises(TypeError, match="skip: expected an iterable of names, got a str"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), skip="lm_head")
    with pytest.raises(ValueError, match="quant_type: expected 'nf4' or 'fp4'"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int4")


def test_all_linear_targets_4bit_layers():
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), skip=[])
    peftops.apply_lora(model, "all-linear", r=2, alpha=4)
    assert all(isinstance(model[i], LoRALinearNF4) for i in (0, 2))
