"""Prompt-tuning banks inside tiny transformers models (``apply_prompt_tuning(..., capacity=N)``,
``add_prompt`` / ``remove_prompt`` / ``set_prompt_ids``).

The reference for a row with prompt ``a`` is that row run alone through a second copy of the
base model given the single prompt (``apply_prompt_tuning`` without capacity) with ``a``'s slot
copied in; a row without a prompt is the base model alone, its logits those past the ``P``
virtual positions. Gradients: a slot's gradient is the sum of the single prompt's over the
slot's rows; slots no row names get exact zeros.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peftops.integrations.prompt_tuning import (
    add_prompt,
    apply_prompt_tuning,
    peft_prompt_state,
    remove_prompt,
    remove_prompt_tuning,
    set_prompt_ids,
)
from peftops.nn.multi_prompt import MultiPromptEmbedding
from tests.integrations import hf_models

ARCHS = {"llama": hf_models.llama, "gpt2": hf_models.gpt2}
P = 3
CAPACITY = 5  # a, b, c, d (d is never named by a row) and one free slot
NAMES = ("a", "b", "c", "d")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*position_ids.*")  # generate() passes them
        yield


def bank_of(model: nn.Module) -> MultiPromptEmbedding:
    bank = model.peftops_prompt
    assert isinstance(bank, MultiPromptEmbedding)
    return bank


def bank_model(factory, seed: int = 3) -> nn.Module:
    model = apply_prompt_tuning(factory(), P, capacity=CAPACITY)
    g = torch.Generator().manual_seed(seed)
    for name in NAMES:
        add_prompt(model, name, torch.randn(P, 64, generator=g) * 0.5)
    with torch.no_grad():  # the free slot holds junk too: none of it may leak into a row
        bank_of(model).weight[CAPACITY - 1].normal_(generator=g)
    return model


def single_model(factory, bank: nn.Module, name: str) -> nn.Module:
    model = apply_prompt_tuning(factory(), P)
    with torch.no_grad():
        model.peftops_prompt.weight.copy_(bank_of(bank).weight[bank_of(bank).adapter_id(name)])
    return model


ROWS = {
    "any_order": ["b", None, "a", "c", "a"],
    "one_for_all": ["b", "b", "b"],
    "every_row_different": ["c", "a", "b"],
    "all_none": [None, None],
    "as_tensor": torch.tensor([2, -1, 0, 1]),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("case", sorted(ROWS))
def test_mixed_batch_equals_each_row_alone(arch, case):
    factory = ARCHS[arch]
    model = bank_model(factory)
    bank = bank_of(model)
    rows = ROWS[case]
    names = (
        [None if int(r) < 0 else {s: n for n, s in bank.adapters.items()}[int(r)] for r in rows]
        if (isinstance(rows, torch.Tensor))
        else rows
    )
    x = hf_models.token_ids(len(names), 5)
    proj = torch.randn(len(names), P + 5, hf_models.VOCAB, generator=torch.Generator().manual_seed(7))
    set_prompt_ids(model, rows)
    logits = model(input_ids=x).logits
    (logits * proj).sum().backward()
    grad = bank.weight.grad
    assert grad is not None

    base = factory()
    expected = torch.zeros_like(bank.weight)
    singles = {n: single_model(factory, model, n) for n in set(names) - {None}}
    for i, name in enumerate(names):
        if name is None:
            ref = base(input_ids=x[i : i + 1]).logits
            torch.testing.assert_close(logits[i, P:], ref[0], **TOL)
            continue
        single = singles[name]
        single.peftops_prompt.weight.grad = None
        ref = single(input_ids=x[i : i + 1]).logits
        torch.testing.assert_close(logits[i], ref[0], **TOL)
        (ref * proj[i : i + 1]).sum().backward()
        expected[bank.adapter_id(name)] += single.peftops_prompt.weight.grad
    named = {bank.adapter_id(n) for n in names if n is not None}
    for slot in range(CAPACITY):
        if slot in named:
            torch.testing.assert_close(grad[slot], expected[slot], **TOL)
        else:
            assert torch.equal(grad[slot], torch.zeros_like(grad[slot]))  # absent: exactly zero
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("peftops_prompt"))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_left_padded_batch_matches_single_prompt_and_base_models_on_the_same_batch(arch):
    factory = ARCHS[arch]
    model = bank_model(factory)
    x = hf_models.token_ids(3, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    mask[2, :1] = 0
    set_prompt_ids(model, ["a", None, "a"])
    logits = model(input_ids=x, attention_mask=mask).logits
    single = single_model(factory, model, "a")(input_ids=x, attention_mask=mask).logits
    base = factory()(input_ids=x, attention_mask=mask).logits
    keep = mask.bool()  # padded positions' logits are whatever the model leaves there
    torch.testing.assert_close(logits[0, P:][keep[0]], single[0, P:][keep[0]], **TOL)
    torch.testing.assert_close(logits[2, P:][keep[2]], single[2, P:][keep[2]], **TOL)
    torch.testing.assert_close(logits[1, P:], base[1], **TOL)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_generate_per_row_equals_generate_alone(arch):
    factory = ARCHS[arch]
    model = bank_model(factory)
    rows = ["b", None, "a", "b"]
    x = hf_models.token_ids(len(rows), 4, seed=5)
    set_prompt_ids(model, rows)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
    for i, name in enumerate(rows):
        alone = factory() if name is None else single_model(factory, model, name)
        ref = alone.generate(input_ids=x[i : i + 1], attention_mask=torch.ones_like(x[i : i + 1]), **kw)
        assert out[i].tolist() == ref[0].tolist(), (i, name)


def test_ids_tensor_is_kept_by_reference():
    model = bank_model(hf_models.llama)
    bank = bank_of(model)
    x = hf_models.token_ids(2, 4)
    ids = torch.tensor([bank.adapter_id("a"), -1])
    set_prompt_ids(model, ids)
    with torch.no_grad():
        model(input_ids=x)
        ids.copy_(torch.tensor([-1, bank.adapter_id("c")]))  # as a captured graph's input is refreshed
        swapped = model(input_ids=x).logits
        set_prompt_ids(model, [None, "c"])
        fresh = model(input_ids=x).logits
    assert torch.equal(swapped, fresh)


def test_add_and_remove_keep_the_parameter():
    model = bank_model(hf_models.llama)
    bank = bank_of(model)
    weight, ptr = bank.weight, bank.weight.data_ptr()
    slot = bank.adapter_id("b")
    remove_prompt(model, "b")
    assert torch.equal(bank.weight[slot], torch.zeros(P, 64))
    init = torch.randn(P, 64)
    assert add_prompt(model, "e", init) == slot  # the freed slot is reused
    assert add_prompt(model, "f") == CAPACITY - 1
    assert model.peftops_prompt is bank and bank.weight is weight and bank.weight.data_ptr() == ptr
    assert torch.equal(bank.weight[slot], init)
    assert bank.adapters == {"a": 0, "e": 1, "c": 2, "d": 3, "f": 4}
    # Only the bank trains; the base stays frozen.
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["peftops_prompt.weight"]
    remove_prompt_tuning(model)
    assert not hasattr(model, "peftops_prompt")


def test_sequence_classification_rows_equal_their_single_prompts():
    factory = lambda: hf_models.bert(head="cls")  # noqa: E731
    model = apply_prompt_tuning(factory(), P, capacity=3)
    g = torch.Generator().manual_seed(0)
    add_prompt(model, "a", torch.randn(P, 64, generator=g))
    add_prompt(model, "b", torch.randn(P, 64, generator=g))
    x = hf_models.token_ids(3, 5)
    set_prompt_ids(model, ["b", "a", "b"])
    logits = model(input_ids=x).logits
    for i, name in enumerate(["b", "a", "b"]):
        torch.testing.assert_close(
            logits[i], single_model(factory, model, name)(input_ids=x[i : i + 1]).logits[0], **TOL
        )


def test_bad_ids_and_arguments_are_named():
    model = bank_model(hf_models.llama)
    x = hf_models.token_ids(2, 4)
    with pytest.raises(
        ValueError, match=r"apply_prompt_tuning: ids: expected the rows' prompts, set by set_prompt_ids"
    ):
        model(input_ids=x)
    with pytest.raises(ValueError, match=r"set_prompt_ids: ids: expected prompt names .* got 'zed'"):
        set_prompt_ids(model, ["a", "zed"])
    with pytest.raises(ValueError, match=r"set_prompt_ids: ids: expected .* got 4"):
        set_prompt_ids(model, [4])  # the free slot
    with pytest.raises(ValueError, match=r"set_prompt_ids: ids: expected .* got 9 \(out of range for capacity 5\)"):
        set_prompt_ids(model, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"set_prompt_ids: ids: expected .* got -3 \(out of range"):
        set_prompt_ids(model, torch.tensor([-3, 0]))
    with pytest.raises(TypeError, match=r"set_prompt_ids: ids: expected a signed integer tensor"):
        set_prompt_ids(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"set_prompt_ids: ids: expected one id per row, shape \(B,\)"):
        set_prompt_ids(model, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"set_prompt_ids: ids: expected prompt names, slot ints or None, got float"):
        set_prompt_ids(model, ["a", 1.0])
    set_prompt_ids(model, ["a", "b", "c"])
    with pytest.raises(
        ValueError, match=r"apply_prompt_tuning: ids: expected one prompt id per row of the batch \(2\)"
    ):
        model(input_ids=x)
    ids = torch.tensor([0, 1])
    set_prompt_ids(model, ids)
    remove_prompt(model, "b")  # ids set before: the next eager forward refuses the freed slot
    with pytest.raises(ValueError, match=r"adapter_ids: expected slots in use .* got 1, a free slot"):
        model(input_ids=x)
    set_prompt_ids(model, None)  # clears: the model refuses to run until set again
    with pytest.raises(ValueError, match=r"apply_prompt_tuning: ids: expected the rows' prompts"):
        model(input_ids=x)
    with pytest.raises(ValueError, match=r"remove_prompt: name: expected one of the model's prompts"):
        remove_prompt(model, "b")
    with pytest.raises(ValueError, match=r"add_prompt: name: expected a new prompt name, got 'a'"):
        add_prompt(model, "a")
    with pytest.raises(ValueError, match=r"add_prompt: init: expected shape \(3, 64\)"):
        add_prompt(model, "e", torch.zeros(64, 3))
    add_prompt(model, "e")
    add_prompt(model, "f")
    with pytest.raises(ValueError, match=r"add_prompt: model: all 5 slots are in use"):
        add_prompt(model, "g")
    with pytest.raises(ValueError, match=r"save_adapter: model: expected a single prompt"):
        peft_prompt_state(model)

    with pytest.raises(ValueError, match=r"apply_prompt_tuning: encoder: expected None with capacity=2"):
        apply_prompt_tuning(hf_models.llama(), P, encoder="mlp", capacity=2)
    with pytest.raises(ValueError, match=r"apply_prompt_tuning: capacity: expected an int >= 1, got 0"):
        apply_prompt_tuning(hf_models.llama(), P, capacity=0)
    with pytest.raises(ValueError, match=r"add_prompt: model: expected a model given a prompt bank"):
        add_prompt(apply_prompt_tuning(hf_models.llama(), P), "a")

    cls = apply_prompt_tuning(hf_models.bert(head="cls"), P, capacity=2)
    add_prompt(cls, "a")
    with pytest.raises(ValueError, match=r"set_prompt_ids: ids: expected .*every row needs one: a classification head"):
        set_prompt_ids(cls, ["a", None])
    set_prompt_ids(cls, torch.tensor([0, 0]))
    cls.peftops_prompt.set_batch_adapters(torch.tensor([0, -1]))  # past set_prompt_ids' check
    with pytest.raises(ValueError, match=r"apply_prompt_tuning: ids: expected a prompt for every row of a Bert"):
        cls(input_ids=x)
