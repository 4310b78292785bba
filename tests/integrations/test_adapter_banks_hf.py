"""Bottleneck adapter banks inside tiny transformers models (``apply_adapters(..., capacity=N)``,
``add_bottleneck`` / ``remove_bottleneck`` / ``set_bottleneck_ids``).

The reference for a row with adapter ``a`` is that row run alone through a second copy of the
base model given the single adapter of the same config (``apply_adapters`` without capacity),
of ``a``'s width, with ``a``'s slot weights copied in; a row without adapter is the base model.
Gradients: a slot's gradient is the sum of the single adapter's over the slot's rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftops.backends import use_backend
from peftops.integrations.adapters import (
    add_bottleneck,
    apply_adapters,
    remove_adapters,
    remove_bottleneck,
    set_bottleneck_ids,
)
from peftops.nn import MultiBottleneckAdapter
from tests.integrations import hf_models

ARCHS = {"llama": hf_models.llama, "gpt2": hf_models.gpt2, "bert": hf_models.bert}
CONFIGS = ("seq_bn", "double_seq_bn", "par_bn")
HIDDEN = 64  # hf_models' hidden size
REDUCTION = 8  # r_max = 64 // 8 = 8 for every config
RANKS = {"a": 8, "b": 4, "c": 2, "d": 8}  # d is added but never named by a row
CAPACITY = 5  # one slot stays free


def banks_of(model: nn.Module) -> list[MultiBottleneckAdapter]:
    return [m for m in model.modules() if isinstance(m, MultiBottleneckAdapter)]


def bank_model(arch: str, config: str, seed: int = 3) -> nn.Module:
    model = apply_adapters(ARCHS[arch](), config, reduction_factor=REDUCTION, capacity=CAPACITY)
    for name, r in RANKS.items():
        add_bottleneck(model, name, r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # Every slot random, past each adapter's rank and in the free slot too: none of it may leak.
        for bank in banks_of(model):
            for p in (bank.down_weight, bank.down_bias, bank.up_weight, bank.up_bias):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            bank.down_weight.mul_(3.0)  # so the non-linearity bends
    return model


def single_model(arch: str, config: str, bank: nn.Module, name: str) -> nn.Module:
    """The base model with the single adapter of ``config``, ``name``'s width and weights."""
    r = RANKS[name]
    model = apply_adapters(ARCHS[arch](), config, reduction_factor=HIDDEN / r)
    singles = [m for m in model.modules() if type(m).__name__ == "BottleneckAdapter"]
    multis = banks_of(bank)
    assert len(singles) == len(multis) and all(s.r == r for s in singles)
    with torch.no_grad():
        for s, m in zip(singles, multis, strict=True):
            slot = m.adapter_id(name)
            s.down.weight.copy_(m.down_weight[slot, :r])
            s.down.bias.copy_(m.down_bias[slot, :r])
            s.up.weight.copy_(m.up_weight[slot, :, :r])
            s.up.bias.copy_(m.up_bias[slot])
    return model


def single_grads(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    singles = [m for m in model.modules() if type(m).__name__ == "BottleneckAdapter"]
    return [(s.down.weight.grad, s.down.bias.grad, s.up.weight.grad, s.up.bias.grad) for s in singles]


def loss_of(logits: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    return (logits * proj).sum()


ROWS = {
    "any_order": ["b", None, "a", "c", "a"],
    "all_none": [None, None, None],
    "one_for_all": ["b", "b", "b"],
    "every_row_different": ["c", "a", "b"],
}
CASES = [(arch, config, "any_order") for arch in ARCHS for config in CONFIGS] + [
    ("llama", config, rows) for config in ("seq_bn", "par_bn") for rows in ROWS if rows != "any_order"
]


@pytest.mark.parametrize(("arch", "config", "rows"), CASES)
def test_mixed_batch_matches_each_row_alone_with_its_single_adapter(arch, config, rows):
    names = ROWS[rows]
    model = bank_model(arch, config)
    tokens = hf_models.token_ids(batch=len(names), seq=5)
    set_bottleneck_ids(model, names)
    logits = model(tokens).logits
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    loss_of(logits, proj).backward()

    base = ARCHS[arch]()(tokens).logits.detach()
    expected_grads: dict[str, list[list[torch.Tensor]]] = {}
    for i, name in enumerate(names):
        if name is None:
            # The adapter is skipped for this row: the base model's numbers, bit for bit.
            assert torch.equal(logits[i], base[i]), f"row {i} (no adapter) differs from the base model"
            continue
        single = single_model(arch, config, model, name)
        alone = single(tokens[i : i + 1]).logits
        loss_of(alone, proj[i : i + 1]).backward()
        torch.testing.assert_close(logits[i], alone[0].detach(), rtol=1e-5, atol=1e-5)
        grads = single_grads(single)
        acc = expected_grads.setdefault(name, [[torch.zeros_like(g) for g in site] for site in grads])
        for site_acc, site in zip(acc, grads, strict=True):
            for a, g in zip(site_acc, site, strict=True):
                a += g
    assert any(n is not None for n in names) == bool(expected_grads)
    if expected_grads:
        # The adapters change the model: otherwise the comparison above proves nothing.
        named = [i for i, n in enumerate(names) if n is not None]
        assert not torch.allclose(logits[named].detach(), base[named], atol=1e-3)

    for site, bank in enumerate(banks_of(model)):
        grads = (bank.down_weight.grad, bank.down_bias.grad, bank.up_weight.grad, bank.up_bias.grad)
        for name, slot in bank.adapters.items():
            r = RANKS[name]
            got = (grads[0][slot, :r], grads[1][slot, :r], grads[2][slot, :, :r], grads[3][slot])
            if name in expected_grads:
                for g, want in zip(got, expected_grads[name][site], strict=True):
                    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
            else:
                assert all(torch.count_nonzero(g) == 0 for g in got), f"absent adapter {name!r} got a gradient"
            # Past the slot's rank the weights are not the adapter's.
            assert torch.count_nonzero(grads[0][slot, r:]) == 0
            assert torch.count_nonzero(grads[1][slot, r:]) == 0
            assert torch.count_nonzero(grads[2][slot, :, r:]) == 0
        free = sorted(set(range(CAPACITY)) - set(bank.adapters.values()))
        assert all(torch.count_nonzero(g[free]) == 0 for g in grads)


@pytest.mark.parametrize("config", ["double_seq_bn", "par_bn"])
def test_triton_backend_matches_torch_in_the_model(config):
    # The Triton kernels under the interpreter: one small mixed batch, forward and backward.
    names = ["b", None, "a"]
    tokens = hf_models.token_ids(batch=len(names), seq=3)
    results = []
    for backend in ("torch", "triton"):
        model = bank_model("llama", config)
        set_bottleneck_ids(model, names)
        with use_backend(backend):
            logits = model(tokens).logits
            loss_of(logits, torch.linspace(-1, 1, logits.numel()).view(logits.shape)).backward()
        grads = [p.grad for bank in banks_of(model) for p in bank.parameters()]
        results.append((logits.detach(), grads))
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_only_the_banks_train_and_remove_adapters_restores_the_base_model():
    base = hf_models.llama()
    keys = set(base.state_dict())
    model = apply_adapters(hf_models.llama(), "seq_bn", capacity=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".bottleneck_adapters." in n for n in trainable)
    assert len(trainable) == 4 * len(banks_of(model))
    remove_adapters(model)
    assert set(model.state_dict()) == keys and not banks_of(model)
    assert all(p.requires_grad for p in model.parameters())
    tokens = hf_models.token_ids(batch=2, seq=4)
    assert torch.equal(model(tokens).logits, base(tokens).logits)


@pytest.mark.parametrize("config", ["seq_bn", "double_seq_bn"])
def test_generate_with_kv_cache_gives_each_row_its_adapter(config):
    names = ["a", None, "b"]
    model = bank_model("llama", config)
    model.eval()
    prompts = hf_models.token_ids(batch=len(names), seq=4, seed=5)
    settings = {"max_new_tokens": 5, "do_sample": False, "use_cache": True, "pad_token_id": 0}
    set_bottleneck_ids(model, names)
    with torch.no_grad():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    base = hf_models.llama().eval()
    for i, name in enumerate(names):
        ref = base if name is None else single_model("llama", config, model, name).eval()
        with torch.no_grad():
            alone = ref.generate(prompts[i : i + 1], attention_mask=torch.ones_like(prompts[i : i + 1]), **settings)
        assert torch.equal(out[i], alone[0]), f"row {i} ({name}) differs from its single-adapter generation"
    with torch.no_grad():
        plain = base.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    assert not torch.equal(out[0], plain[0]) or not torch.equal(out[2], plain[2]), "the adapters change nothing"


def test_tensor_ids_are_kept_by_reference_and_read_at_each_forward():
    model = bank_model("llama", "par_bn")
    tokens = hf_models.token_ids(batch=3, seq=4)
    slots = banks_of(model)[0].adapters
    ids = torch.tensor([slots["a"], -1, slots["b"]])
    assert set_bottleneck_ids(model, ids) is model
    # The same object at every site: a CUDA graph captured once reads what is copied in later.
    assert all(bank._batch_ids is ids for bank in banks_of(model))
    with torch.no_grad():
        first = model(tokens).logits
        ids.copy_(torch.tensor([slots["c"], slots["a"], -1]))
        second = model(tokens).logits
        set_bottleneck_ids(model, ["c", "a", None])
        expected = model(tokens).logits
        base = hf_models.llama()(tokens).logits
    assert torch.equal(second, expected)
    assert torch.equal(second[2], base[2]) and not torch.equal(first[2], base[2])
    assert not torch.allclose(first[0], second[0], atol=1e-3)


def test_add_and_remove_between_forwards_keep_the_parameters():
    model = apply_adapters(hf_models.llama(), "seq_bn", reduction_factor=REDUCTION, capacity=2)
    params = dict(model.named_parameters())
    shapes = {k: p.shape for k, p in params.items()}
    assert add_bottleneck(model, "a") == 0 and add_bottleneck(model, "b", 2) == 1
    bank = banks_of(model)[0]
    assert bank.ranks.tolist() == [8, 2]
    # Initialised as the single seq_bn adapter: N(0, 0.02) down weights, zero biases, zero up.
    w = bank.down_weight[0, :8]
    assert 0.01 < float(w.detach().std()) < 0.03 and torch.count_nonzero(bank.down_bias) == 0
    assert torch.count_nonzero(bank.up_weight) == 0 and torch.count_nonzero(bank.up_bias) == 0
    tokens = hf_models.token_ids(batch=2, seq=4)
    base = hf_models.llama()(tokens).logits
    set_bottleneck_ids(model, ["a", "b"])
    # A fresh adapter is the identity.
    assert torch.equal(model(tokens).logits.detach(), base.detach())
    with torch.no_grad():
        for m in banks_of(model):
            m.up_weight.normal_()
    trained = model(tokens).logits.detach()
    assert not torch.allclose(trained, base.detach(), atol=1e-3)
    assert remove_bottleneck(model, "a") is model
    with pytest.raises(ValueError, match="adapter_ids"):  # ids still naming the freed slot
        model(tokens)
    assert add_bottleneck(model, "c", 4) == 0  # the freed slot, zeroed then initialised
    set_bottleneck_ids(model, ["c", "b"])
    out = model(tokens).logits.detach()
    assert torch.equal(out[0], base[0].detach()) and torch.equal(out[1], trained[1])
    assert dict(model.named_parameters()) == params
    assert all(p.shape == shapes[k] for k, p in model.named_parameters())
    assert [m.adapters for m in banks_of(model)] == [{"b": 1, "c": 0}] * len(banks_of(model))


def test_par_bn_slots_are_initialised_as_its_single_adapter():
    model = apply_adapters(hf_models.gpt2(), "par_bn", capacity=1)
    add_bottleneck(model, "a")
    bank = banks_of(model)[0]
    assert bank.r_max == HIDDEN // 2
    w = bank.down_weight[0]
    # Kaiming-uniform (a=sqrt(5)) as nn.Linear's weight: bound 1/sqrt(d).
    assert float(w.detach().abs().max()) <= HIDDEN**-0.5 and float(w.detach().std()) > 0.05
    assert torch.count_nonzero(bank.down_bias) == 0


def test_state_dict_round_trips_with_the_slot_names():
    model = bank_model("gpt2", "double_seq_bn")
    remove_bottleneck(model, "b")
    tokens = hf_models.token_ids(batch=3, seq=4)
    set_bottleneck_ids(model, ["a", None, "c"])
    with torch.no_grad():
        want = model(tokens).logits
    other = apply_adapters(hf_models.gpt2(), "double_seq_bn", reduction_factor=REDUCTION, capacity=CAPACITY)
    other.load_state_dict(model.state_dict())
    assert [m.adapters for m in banks_of(other)] == [m.adapters for m in banks_of(model)]
    set_bottleneck_ids(other, ["a", None, "c"])
    with torch.no_grad():
        assert torch.equal(other(tokens).logits, want)
    assert add_bottleneck(other, "e") == banks_of(model)[0].adapters.get("b", 1)  # b's freed slot


def test_bad_ids_are_refused_by_name():
    model = bank_model("llama", "seq_bn")
    tokens = hf_models.token_ids(batch=2, seq=4)
    with pytest.raises(ValueError, match="set_bottleneck_ids"):
        model(tokens)  # no ids set: never silently the base model
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: .*'nope'"):
        set_bottleneck_ids(model, ["a", "nope"])
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: .*got 4"):
        set_bottleneck_ids(model, ["a", 4])  # a free slot
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: .*got 9"):
        set_bottleneck_ids(model, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: .*got -2"):
        set_bottleneck_ids(model, torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: .*got 4"):
        set_bottleneck_ids(model, torch.tensor([4, 0]))
    with pytest.raises(TypeError, match="set_bottleneck_ids: ids: expected a signed integer"):
        set_bottleneck_ids(model, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: expected one id per row"):
        set_bottleneck_ids(model, torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"set_bottleneck_ids: ids: expected a tensor on the adapters' device cpu"):
        set_bottleneck_ids(model, torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(TypeError, match="set_bottleneck_ids: ids"):
        set_bottleneck_ids(model, "a")
    with pytest.raises(TypeError, match="set_bottleneck_ids: ids"):
        set_bottleneck_ids(model, [1.5])
    # A tensor's later contents are checked by the eager forward.
    ids = torch.tensor([0, 1])
    set_bottleneck_ids(model, ids)
    ids[1] = 7
    with pytest.raises(ValueError, match="adapter_ids.*7"):
        model(tokens)
    ids[1] = 4  # in range, free
    with pytest.raises(ValueError, match="adapter_ids.*free slot"):
        model(tokens)
    set_bottleneck_ids(model, ["a", "b", "c"])  # three ids for a batch of two rows
    with pytest.raises(ValueError, match="adapter_ids"):
        model(tokens)
    set_bottleneck_ids(model, ["a", "b"])
    model(tokens)
    assert set_bottleneck_ids(model, None) is model  # cleared: refused again, not the base model
    with pytest.raises(ValueError, match="set_bottleneck_ids"):
        model(tokens)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="apply_adapters: capacity: expected an int >= 1, got 0"):
        apply_adapters(hf_models.llama(), "seq_bn", capacity=0)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="apply_adapters: capacity: expected an int"):
            apply_adapters(hf_models.llama(), "seq_bn", capacity=bad)
    for config in ("compacter", "mam"):
        with pytest.raises(ValueError, match=f"apply_adapters: capacity: expected None for config '{config}'"):
            apply_adapters(hf_models.llama(), config, reduction_factor=4, capacity=2)
    single = apply_adapters(hf_models.llama(), "seq_bn")
    for call in (lambda m: add_bottleneck(m, "a"), lambda m: remove_bottleneck(m, "a")):
        with pytest.raises(ValueError, match="model: expected a model given to apply_adapters"):
            call(single)
        with pytest.raises(ValueError, match="model: expected a model given to apply_adapters"):
            call(hf_models.llama())
    with pytest.raises(ValueError, match="set_bottleneck_ids: model"):
        set_bottleneck_ids(single, [None])
    with pytest.raises(TypeError, match="add_bottleneck: model"):
        add_bottleneck("model", "a")

    model = apply_adapters(hf_models.llama(), "seq_bn", reduction_factor=REDUCTION, capacity=2)
    add_bottleneck(model, "a")
    with pytest.raises(ValueError, match=r"add_bottleneck: name: .*'a'"):
        add_bottleneck(model, "a")
    with pytest.raises(TypeError, match="add_bottleneck: name"):
        add_bottleneck(model, "")
    with pytest.raises(ValueError, match="add_bottleneck: r: expected at most r_max=8"):
        add_bottleneck(model, "b", 9)
    with pytest.raises(ValueError, match="add_bottleneck: r: expected an int >= 1"):
        add_bottleneck(model, "b", 0)
    add_bottleneck(model, "b")
    with pytest.raises(ValueError, match="add_bottleneck: model: all 2 slots are in use"):
        add_bottleneck(model, "c")
    with pytest.raises(ValueError, match=r"remove_bottleneck: name: .*'c'"):
        remove_bottleneck(model, "c")
    # Sites filled one by one disagree: refused, not guessed.
    banks_of(model)[0].remove_adapter("a")
    with pytest.raises(ValueError, match="sites disagree"):
        set_bottleneck_ids(model, ["b"])
