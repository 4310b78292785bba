"""BitFit: ``apply_bitfit`` trains biases only, and adds zero biases where asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftops.nn.bitfit import apply_bitfit, bias_parameters
from tests.integrations import hf_models


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train(model: nn.Module, steps: int = 4) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen parameters get no grad: AdamW skips them
    ids = hf_models.token_ids(batch=2, seq=6)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bert_trains_exactly_its_biases():
    model = hf_models.bert(head="mlm")
    ids = hf_models.token_ids()
    before_logits = model(input_ids=ids).logits.detach()
    report = apply_bitfit(model)
    biases = bias_parameters(model)
    assert "cls.predictions.bias" in biases  # a bias that is not a layer's attribute
    assert report.added == 0
    assert report.trainable == sum(p.numel() for p in {id(p): p for p in biases.values()}.values())
    assert report.total == sum(p.numel() for p in model.parameters())
    assert 0 < report.fraction < 0.1
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(biases)
    torch.testing.assert_close(model(input_ids=ids).logits, before_logits, rtol=0, atol=0)

    before = snapshot(model)
    losses = train(model)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(biases)


def test_llama_has_no_bias_unless_added():
    with pytest.raises(ValueError, match=r"apply_bitfit: model: .*add_missing=True"):
        apply_bitfit(hf_models.llama())


def test_llama_add_missing_adds_zero_biases_and_trains_them():
    model = hf_models.llama()
    ids = hf_models.token_ids()
    before_logits = model(input_ids=ids).logits.detach()
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    report = apply_bitfit(model, add_missing=True)
    # Every linear layer but the output head got a bias of its output width.
    expected = {f"{n}.bias": m.out_features for n, m in linears if n != "lm_head"}
    assert model.lm_head.bias is None
    assert {n: p.numel() for n, p in bias_parameters(model).items()} == expected
    assert report.added == sum(expected.values()) == report.trainable
    assert all(not p.any() for p in bias_parameters(model).values())
    # Zero biases: the same function as before.
    torch.testing.assert_close(model(input_ids=ids).logits, before_logits, rtol=0, atol=0)

    before = snapshot(model)
    losses = train(model)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(expected)  # every added bias learned, nothing else moved


def test_gpt2_conv1d_biases():
    model = hf_models.gpt2()
    report = apply_bitfit(model, add_missing=True)
    assert report.added == 0  # Conv1D always has one; the tied lm_head is left without
    assert model.lm_head.bias is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.bias" in trainable and "transformer.h.0.ln_1.bias" in trainable
    assert all(n.endswith(".bias") for n in trainable)


def test_conv1d_without_bias_gets_one():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(6, 4), nn.Linear(6, 3, bias=False))
    model[0].bias = None
    x = torch.randn(2, 4)
    with torch.no_grad():
        expected = model[1](x @ model[0].weight)
    report = apply_bitfit(model, add_missing=True)
    assert report.added == 6 + 3 and report.trainable == 9
    torch.testing.assert_close(model(x), expected)
    assert model[0].bias.shape == (6,) and model[0].bias.dtype == model[0].weight.dtype


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match=r"apply_bitfit: model: expected an nn.Module, got int"):
        apply_bitfit(3)
    with pytest.raises(TypeError, match=r"apply_bitfit: add_missing: expected a bool, got str"):
        apply_bitfit(nn.Linear(2, 2), add_missing="yes")
    with pytest.raises(ValueError, match=r"apply_bitfit: model: expected at least one bias parameter"):
        apply_bitfit(nn.Linear(2, 2, bias=False))
