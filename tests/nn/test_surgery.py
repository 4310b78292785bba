"""Model surgery: ``apply_lora``, ``mark_only_adapters_trainable``, ``count_trainable``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftops
from peftops.nn import (
    BottleneckAdapter,
    LoRALinear,
    PrefixKV,
    PromptEmbedding,
    apply_lora,
    count_trainable,
    mark_only_adapters_trainable,
)
from peftops.nn.surgery import merge_adapters, unmerge_adapters
from peftops.testing import assert_close


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d // 2, bias=False)
        self.v_proj = nn.Linear(d, d // 2, bias=False)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.o_proj(q * torch.cat([k, v], -1).tanh())


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = Attn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.attn(self.norm(x)))


class Toy(nn.Module):
    """Names like a transformer's: blocks.{i}.attn.{q,k,v,o}_proj, blocks.{i}.mlp.{0,2}, head."""

    def __init__(self, d=8, n=2, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def toy(seed=0, **kw):
    torch.manual_seed(seed)
    return Toy(**kw)


def linear_names(model):
    return {n for n, m in model.named_modules() if type(m) is nn.Linear}


IDS = torch.tensor([[1, 4, 2, 9], [3, 3, 0, 10]])


# -- apply_lora ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "targets, expected",
    [
        (
            ["q_proj", "v_proj"],
            {"blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"},
        ),
        (r"blocks\.1\.attn\.(k|o)_proj", {"blocks.1.attn.k_proj", "blocks.1.attn.o_proj"}),
        (r"blocks\.\d+\.mlp\.(0|2)", {"blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"}),
        (["head"], {"head"}),
        (("attn.o_proj", "blocks.0.mlp.2"), {"blocks.0.attn.o_proj", "blocks.1.attn.o_proj", "blocks.0.mlp.2"}),
    ],
)
def test_apply_lora_swaps_exactly_the_targets(targets, expected):
    model = toy()
    originals = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    params_before = {n: p for n, p in model.named_parameters()}
    x_before = model(IDS)

    out = apply_lora(model, targets, r=2, alpha=4)
    assert out is model  # in place
    swapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert swapped == expected
    assert (
        linear_names(model) - {f"{n}.lora_A" for n in swapped} - {f"{n}.lora_B" for n in swapped}
        == set(originals) - expected
    )
    for name in expected:
        new = model.get_submodule(name)
        assert new.weight is originals[name].weight and new.bias is originals[name].bias  # shared, not copied
        assert (new.r, new.scaling) == (2, 2.0)
    for name in set(originals) - expected:
        assert model.get_submodule(name) is originals[name]
    # The base parameters are the very same objects, under the same names.
    for name, p in params_before.items():
        assert dict(model.named_parameters())[name] is p
    # B = 0, so the model computes what it computed before.
    assert_close(model(IDS), x_before)


def test_apply_lora_freezes_everything_but_lora():
    model = apply_lora(toy(), ["q_proj", "v_proj", "head"], r=2, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {
        f"{m}.lora_{ab}.weight"
        for m in (
            "blocks.0.attn.q_proj",
            "blocks.0.attn.v_proj",
            "blocks.1.attn.q_proj",
            "blocks.1.attn.v_proj",
            "head",
        )
        for ab in "AB"
    }
    assert trainable == expected
    d, vocab, r = 8, 11, 2
    lora_params = 4 * r * (d + d) - 2 * r * (d - d // 2) + r * (d + vocab)  # q: d->d, v: d->d/2, head: d->vocab
    total = sum(p.numel() for p in toy().parameters()) + lora_params
    assert count_trainable(model) == (lora_params, total)


def test_apply_lora_passes_its_hyperparameters_on():
    model = apply_lora(toy(), ["o_proj"], r=4, alpha=2.0, dropout=0.25, use_rslora=True)
    for name in ("blocks.0.attn.o_proj", "blocks.1.attn.o_proj"):
        m = model.get_submodule(name)
        assert (m.r, m.lora_alpha, m.lora_dropout, m.use_rslora) == (4, 2.0, 0.25, True)
        assert m.scaling == pytest.approx(2.0 / 2.0)


def test_apply_lora_state_dict_maps_one_to_one():
    """Base keys are unchanged, so the original checkpoint loads with only LoRA keys missing."""
    base_sd = toy(seed=1).state_dict()
    model = apply_lora(toy(seed=2), ["q_proj", "k_proj"], r=2, alpha=2)
    result = model.load_state_dict(base_sd, strict=False)
    assert result.unexpected_keys == []
    assert sorted(result.missing_keys) == sorted(
        f"blocks.{i}.attn.{p}.lora_{ab}.weight" for i in range(2) for p in ("q_proj", "k_proj") for ab in "AB"
    )
    assert_close(model(IDS), toy(seed=1)(IDS))


def test_apply_lora_then_train_changes_only_lora():
    model = apply_lora(toy(), ["q_proj", "o_proj", "mlp.0"], r=2, alpha=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(IDS).flatten(0, 1), IDS.roll(1, 1).flatten()).backward()
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), f"{n} did not train"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"{n} changed"


# -- apply_lora errors --------------------------------------------------------------------


def assert_untouched(model, reference):
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(p.requires_grad for p in model.parameters())


def test_apply_lora_no_match_lists_the_linears():
    model = toy()
    with pytest.raises(
        ValueError, match=r"target_modules: expected to match at least one module.*blocks\.0\.attn\.q_proj"
    ):
        apply_lora(model, ["query"], r=2, alpha=2)
    # A string is a regex matched against the full name (as HF PEFT): a bare suffix does not match.
    with pytest.raises(ValueError, match=r"target_modules: .*no match for 'q_proj'"):
        apply_lora(model, "q_proj", r=2, alpha=2)
    assert_untouched(model, toy())


@pytest.mark.parametrize(
    "targets, got",
    [(["attn"], "Attn"), (["norm"], "LayerNorm"), (r"blocks\.0\.mlp", "Sequential")],
)
def test_apply_lora_unsupported_target_is_a_type_error(targets, got):
    """The message names the module, its type and the supported types."""
    model = toy()
    supported = r"expected an nn.Linear, nn.Embedding, transformers' Conv1D or a 4-bit linear \(LinearNF4, bitsandbytes' Linear4bit\)"
    with pytest.raises(TypeError, match=rf"target_modules: '.*' {supported}, got {got}"):
        apply_lora(model, targets, r=2, alpha=2)
    assert_untouched(model, toy())


def test_apply_lora_is_all_or_nothing():
    """A list with one bad target swaps nothing, not the good ones before it."""
    model = toy()
    with pytest.raises(TypeError, match="target_modules"):
        apply_lora(model, ["q_proj", "norm"], r=2, alpha=2)
    assert_untouched(model, toy())
    with pytest.raises(ValueError, match=r"\br: expected an int >= 1"):
        apply_lora(model, ["q_proj"], r=0, alpha=2)
    assert_untouched(model, toy())


def test_apply_lora_twice_on_the_same_module_is_an_error():
    model = apply_lora(toy(), ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"target_modules: 'blocks\.0\.attn\.q_proj' already is a LoRALinear"):
        apply_lora(model, ["q_proj"], r=2, alpha=2)
    with pytest.raises(ValueError, match="already is a LoRALinear"):
        apply_lora(model, r"blocks\.1\.attn\.q_proj", r=2, alpha=2)


def test_apply_lora_rejects_subclasses_of_linear():
    """Only the exact types are swapped (a subclass may override forward)."""
    model = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4))
    with pytest.raises(TypeError, match=r"'0' expected an nn.Linear, .*got NonDynamicallyQuantizableLinear"):
        apply_lora(model, ["0"], r=2, alpha=2)


@pytest.mark.parametrize(
    "targets, match",
    [
        ([], r"target_modules: expected a regex str or a non-empty list of str"),
        (["q_proj", 3], r"target_modules: expected a regex str or a non-empty list of str"),
        (None, r"target_modules"),
        (3, r"target_modules"),
    ],
)
def test_apply_lora_bad_target_modules_is_a_type_error(targets, match):
    with pytest.raises(TypeError, match=match):
        apply_lora(toy(), targets, r=2, alpha=2)


def test_apply_lora_bad_model():
    with pytest.raises(TypeError, match=r"apply_lora: model: expected an nn.Module, got dict"):
        apply_lora({"q_proj": nn.Linear(2, 2)}, ["q_proj"], r=2, alpha=2)


# -- mark_only_adapters_trainable / count_trainable -------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.lora = LoRALinear(4, 4, r=2)
        self.adapter = BottleneckAdapter(4, 2)
        self.prefix = PrefixKV(1, 1, 2, 4, reparam_hidden=3)
        self.prompt = PromptEmbedding(2, 4)


def test_mark_only_adapters_trainable():
    model = Mixed()
    assert peftops.mark_only_adapters_trainable(model) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "lora.lora_A.weight",
        "lora.lora_B.weight",
        "adapter.down.weight",
        "adapter.down.bias",
        "adapter.up.weight",
        "adapter.up.bias",
        "prefix.embedding",
        "prefix.reparam.0.weight",
        "prefix.reparam.0.bias",
        "prefix.reparam.2.weight",
        "prefix.reparam.2.bias",
        "prompt.weight",
    }
    # Idempotent, and it also re-freezes a base parameter that was unfrozen by hand.
    model.lora.weight.requires_grad_(True)
    mark_only_adapters_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_mark_only_adapters_trainable_without_adapters():
    with pytest.raises(ValueError, match=r"mark_only_adapters_trainable: model: expected at least one peftops adapter"):
        mark_only_adapters_trainable(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("fn", [mark_only_adapters_trainable, count_trainable])
def test_surgery_helpers_reject_a_non_module(fn):
    with pytest.raises(TypeError, match=r"model: expected an nn.Module"):
        fn([nn.Linear(2, 2)])


def test_count_trainable():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    assert count_trainable(model) == (16 + 8, 16 + 8)
    model[0].bias.requires_grad_(False)
    counts = count_trainable(model)
    trainable, total = counts  # a (trainable, total) pair
    assert (trainable, total) == (20, 24)
    assert counts.fraction == pytest.approx(20 / 24)
    assert str(counts) == "trainable params: 20 || all params: 24 || trainable%: 83.3333"
    assert count_trainable(nn.ReLU()) == (0, 0)


def test_count_trainable_counts_shared_parameters_once():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)  # tied
    assert count_trainable(model) == (12, 12)
    wrapped = nn.ModuleDict({"base": lin, "lora": LoRALinear.from_linear(lin, r=1)})
    assert count_trainable(wrapped) == (12 + 6, 12 + 6)


def test_apply_lora_swaps_a_tied_module_under_every_name():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": shared}), "b": nn.ModuleDict({"proj": shared})})
    apply_lora(model, ["proj"], r=2, alpha=2)
    assert isinstance(model["a"]["proj"], LoRALinear) and model["a"]["proj"] is model["b"]["proj"]
    assert model["a"]["proj"].weight is shared.weight


def test_apply_lora_refuses_to_wrap_lora_internals():
    model = apply_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], r=2, alpha=2)
    with pytest.raises(ValueError, match=r"apply_lora: target_modules: '0.lora_A' is part of a LoRALinear"):
        apply_lora(model, ["lora_A"], r=2, alpha=2)


# -- merging: tied weights ----------------------------------------------------------------


def with_random_b(model):
    """Random B (a fresh B is zero, which would hide a wrong merge)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    return model


def tied_toy():
    model = toy()
    model.head.weight = model.embed.weight  # tied lm_head / embedding
    return model


def test_merge_adapters_and_unmerge_adapters_round_trip():
    model = with_random_b(apply_lora(toy(), ["q_proj", "v_proj", "head"], r=2, alpha=4)).eval()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    y0 = model(IDS)
    assert merge_adapters(model) is model
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 5 and all(m.merged for m in layers)
    assert_close(model(IDS), y0, name="merged model")
    assert unmerge_adapters(model) is model
    assert not any(m.merged for m in layers)
    assert_close(model(IDS), y0, name="unmerged model")
    for n, p in model.named_parameters():
        assert_close(p, weights[n], name=n)


def test_merging_into_a_tied_weight_is_refused_naming_the_tie():
    """The lm_head's LoRA update must not leak into the embedding that shares its weight."""
    model = with_random_b(apply_lora(tied_toy(), ["head", "q_proj"], r=2, alpha=4)).eval()
    embed_before = model.embed.weight.detach().clone()
    with pytest.raises(ValueError, match=r"merge_adapters: model: .*'head\.weight' is also 'embed\.weight'"):
        merge_adapters(model)
    # All or nothing: no layer was merged, no weight moved.
    assert not any(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert torch.equal(model.embed.weight, embed_before)
    # The layer alone knows the tie apply_lora saw.
    with pytest.raises(RuntimeError, match=r"LoRALinear\.merge: .*weight is shared with 'embed\.weight'"):
        model.head.merge()
    assert torch.equal(model.embed.weight, embed_before) and not model.head.merged
    # Layers whose weight is not shared still merge one by one.
    model.blocks[0].attn.q_proj.merge()


def test_merging_a_layer_also_reachable_under_an_untargeted_name_is_refused():
    shared = nn.Linear(4, 4)
    model = nn.ModuleDict({"a": shared, "b": shared})
    with_random_b(apply_lora(model, ["a"], r=2, alpha=2))
    assert isinstance(model["a"], LoRALinear) and type(model["b"]) is nn.Linear
    with pytest.raises(ValueError, match=r"'a\.weight' is also 'b\.weight'"):
        merge_adapters(model)
    with pytest.raises(RuntimeError, match=r"weight is shared with 'b\.weight'"):
        model["a"].merge()


def test_a_tied_module_swapped_under_every_name_merges():
    """One LoRALinear under two names is one layer: merging it once is right."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    with_random_b(apply_lora(model, ["0", "2"], r=2, alpha=2)).eval()
    x = torch.randn(3, 4)
    y0 = model(x)
    merge_adapters(model)
    assert_close(model(x), y0, name="merged")
    unmerge_adapters(model)


def test_ties_are_checked_when_merging_not_only_when_wrapping():
    # Tied after apply_lora (HF's tie_weights): the model-level helper sees it.
    model = with_random_b(apply_lora(toy(), ["head"], r=2, alpha=4)).eval()
    model.embed.weight = model.head.weight
    with pytest.raises(ValueError, match=r"'head\.weight' is also 'embed\.weight'"):
        merge_adapters(model)
    # Untied after apply_lora: the tie is gone, so both merges go ahead.
    model = with_random_b(apply_lora(tied_toy(), ["head"], r=2, alpha=4)).eval()
    model.embed.weight = nn.Parameter(model.embed.weight.detach().clone())
    model.head.merge()
    model.head.unmerge()
    merge_adapters(model)


def test_merge_through_from_linear_writes_into_the_wrapped_linear():
    """The documented sharing: ``from_linear`` wraps the Parameter, so the linear it came from
    computes the merged function while the layer is merged."""
    lin = nn.Linear(4, 3)
    layer = with_random_b(nn.Sequential(LoRALinear.from_linear(lin, r=2, alpha=2)))[0].eval()
    x = torch.randn(2, 4)
    layer.merge()
    assert layer.weight is lin.weight
    assert_close(lin(x), layer(x), name="wrapped linear while merged")


def test_merge_adapters_without_lora_layers():
    with pytest.raises(
        ValueError, match=r"merge_adapters: model: expected LoRA layers \(LoRALinear, LoRAConv1D, LoRAEmbedding"
    ):
        merge_adapters(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unmerge_adapters: model: expected LoRA layers"):
        unmerge_adapters(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"merge_adapters: model: expected an nn.Module"):
        merge_adapters("model")
