"""``apply_lora``'s peft options against the real peft (CPU, float32, tiny models): target
selection (``all-linear``, ``exclude_modules``, ``modules_to_save``), Conv1D and Embedding
layers, rank/alpha patterns and bias modes give the same layers, the same logits and
gradients, and the same trainable parameters as ``peft.get_peft_model``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import peftops  # noqa: E402
from peftops.nn import (  # noqa: E402
    LORA_LAYER_TYPES,
    LoRAConv1D,
    LoRAEmbedding,
    LoRALinear,
    apply_lora,
    lora_bias,
    mark_only_adapters_trainable,
    merge_adapters,
    modules_to_save,
)
from tests.integrations import hf_models  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def bert_cls():
    return hf_models.bert(head="cls")


def _peft_model(factory, **config):
    """peft's model with random A and B (``init_lora_weights=False``), scaled down so that the
    logits stay in a range where float32 comparisons mean something."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own notes (fan_in_fan_out, embeddings)
        model = get_peft_model(factory(), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(0.1)
    return model


def _peft_layers(peft_model) -> dict:
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _ours_name(peft_name: str) -> str:
    """A peft parameter name as the same parameter is named in a peftops model."""
    name = peft_name.removeprefix("base_model.model.")
    for part in (".base_layer", ".default", ".modules_to_save", ".original_module"):
        name = name.replace(part, "")
    return name


def _copy_lora(peft_model, model) -> None:
    """peft's adapter weights into ``model``'s LoRA layers (same modules, same shapes)."""
    with torch.no_grad():
        for name, layer in _peft_layers(peft_model).items():
            ours = model.get_submodule(name)
            if isinstance(ours, LoRAEmbedding):
                ours.lora_embedding_A.copy_(layer.lora_embedding_A["default"])
                ours.lora_embedding_B.copy_(layer.lora_embedding_B["default"])
            else:
                ours.lora_A.weight.copy_(layer.lora_A["default"].weight)
                ours.lora_B.weight.copy_(layer.lora_B["default"].weight)


def _ours_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYER_TYPES)}


def _loss(model, ids):
    return model(ids).logits.square().mean()


def _trainable(model, peft_names=False) -> set[str]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {_ours_name(n) for n in names} if peft_names else names


# -- target selection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, config",
    [
        (hf_models.llama, {}),
        (hf_models.gpt2, {}),
        (bert_cls, {"task_type": "SEQ_CLS"}),  # peft needs the task to leave the classifier out
        (hf_models.llama, {"exclude_modules": ["down_proj", "layers.0.self_attn.q_proj"]}),
        (hf_models.llama, {"exclude_modules": r".*\.mlp\..*"}),
    ],
    ids=["llama", "gpt2", "bert-cls", "llama-exclude-list", "llama-exclude-regex"],
)
def test_all_linear_selects_what_peft_selects(factory, config):
    """Every nn.Linear / Conv1D but the output head (lm_head, or a classifier's head)."""
    expected = sorted(_peft_layers(_peft_model(factory, target_modules="all-linear", r=2, lora_alpha=4, **config)))
    exclude = config.get("exclude_modules")
    model = apply_lora(factory(), "all-linear", r=2, alpha=4, exclude_modules=exclude)
    assert sorted(_ours_layers(model)) == expected
    heads = {"lm_head", "classifier"}
    assert not heads & set(expected) and len(expected) > 6


def test_all_linear_skips_the_linears_inside_adapters():
    """A second ``all-linear`` call targets the base linears left, never a LoRA layer's lora_A/lora_B."""
    model = apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4)
    apply_lora(model, "ALL-LINEAR", r=2, alpha=4)
    layers = _ours_layers(model)
    assert len(layers) == 14 and not any(".lora_" in n for n in layers)


# -- same function as peft -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, ours, config",
    [
        (hf_models.llama, dict(target_modules="all-linear"), dict(target_modules="all-linear")),
        (
            hf_models.gpt2,
            dict(target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
            dict(target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True, fan_in_fan_out=True),
        ),
        (
            hf_models.llama,
            dict(target_modules=["embed_tokens", "q_proj"]),
            dict(target_modules=["embed_tokens", "q_proj"]),
        ),
        (
            hf_models.llama,
            dict(
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 3},
                alpha_pattern={"down_proj": 3.0, "layers.0.self_attn.q_proj": 5},
            ),
            dict(
                target_modules=["q_proj", "v_proj", "down_proj"],
                rank_pattern={r"layers\.1\.self_attn\.q_proj": 2, "v_proj": 3},
                alpha_pattern={"down_proj": 3.0, "layers.0.self_attn.q_proj": 5},
            ),
        ),
    ],
    ids=["llama-all-linear", "gpt2-conv1d-rslora", "llama-embedding", "llama-patterns"],
)
def test_logits_and_gradients_match_peft(factory, ours, config):
    peft_model = _peft_model(factory, r=4, lora_alpha=8, **config)
    model = apply_lora(factory(), r=4, alpha=8, **ours)
    _copy_lora(peft_model, model)
    expected_layers, layers = _peft_layers(peft_model), _ours_layers(model)
    assert sorted(layers) == sorted(expected_layers)
    for name, layer in layers.items():
        ref = expected_layers[name]
        assert (layer.r, layer.lora_alpha, layer.scaling) == (
            ref.r["default"],
            ref.lora_alpha["default"],
            ref.scaling["default"],
        ), name
    kinds = {type(m) for m in layers.values()}
    if factory is hf_models.gpt2:
        assert kinds == {LoRAConv1D}
    else:
        assert LoRAConv1D not in kinds
    ids = hf_models.token_ids()
    _loss(peft_model, ids).backward()
    _loss(model, ids).backward()
    torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, **TOL)
    assert not torch.allclose(model(ids).logits, factory()(ids).logits, **TOL)
    grads = {_ours_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads.keys() == _trainable(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], **TOL, msg=name)


# -- trainable parameters --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
@pytest.mark.parametrize(
    "factory, targets, to_save",
    [(hf_models.gpt2, ["c_attn", "c_fc"], None), (bert_cls, ["query", "value"], ["classifier"])],
    ids=["gpt2", "bert-cls"],
)
def test_trainable_parameters_match_peft(factory, targets, to_save, bias):
    peft_model = _peft_model(factory, target_modules=targets, r=2, lora_alpha=4, bias=bias, modules_to_save=to_save)
    model = apply_lora(factory(), targets, r=2, alpha=4, bias=bias, modules_to_save=to_save)
    assert _trainable(model) == _trainable(peft_model, peft_names=True)
    assert lora_bias(model) == bias
    # The base model's state dict keys are unchanged: no wrapper around what is saved.
    assert set(factory().state_dict()) <= set(model.state_dict())


def test_modules_to_save_stay_trainable_and_train():
    model = apply_lora(bert_cls(), ["query"], r=2, alpha=4, modules_to_save=["classifier"], bias="lora_only")
    assert modules_to_save(model) == ("classifier",)
    classifier = {f"classifier.{n}" for n, _ in model.classifier.named_parameters()}
    assert classifier <= _trainable(model)
    apply_lora(model, ["value"], r=2, alpha=4)
    mark_only_adapters_trainable(model)
    trainable = _trainable(model)
    assert classifier <= trainable and lora_bias(model) == "lora_only"
    assert {"bert.encoder.layer.1.attention.self.value.bias", "bert.encoder.layer.1.attention.self.query.bias"} <= (
        trainable
    )
    assert "bert.encoder.layer.1.attention.self.key.bias" not in trainable

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, labels = hf_models.token_ids(), torch.tensor([0, 1, 2])
    losses = []
    for _ in range(4):
        loss = model(ids, labels=labels).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert (not torch.equal(p, before[name])) == p.requires_grad, name


def test_a_second_apply_lora_keeps_the_first_modules_to_save_and_bias():
    model = apply_lora(bert_cls(), ["query"], r=2, alpha=4, modules_to_save=["classifier"], bias="all")
    apply_lora(model, ["value"], r=2, alpha=4, modules_to_save=["pooler"])
    assert modules_to_save(model) == ("classifier", "bert.pooler") and lora_bias(model) == "all"
    assert {"classifier.weight", "bert.pooler.dense.weight", "bert.embeddings.LayerNorm.bias"} <= _trainable(model)
    with pytest.raises(ValueError, match=r"apply_lora: bias: the model already trains biases as 'all'.*'lora_only'"):
        apply_lora(model, ["key"], r=2, alpha=4, bias="lora_only")


def test_modules_to_save_are_not_lora_targets():
    """As peft: a module to save (and anything inside it) is never a LoRA target."""
    model = apply_lora(bert_cls(), "all-linear", r=2, alpha=4, modules_to_save=["pooler"])
    layers = _ours_layers(model)
    assert not any("pooler" in n for n in layers) and type(model.bert.pooler.dense) is nn.Linear
    with pytest.raises(ValueError, match=r"apply_lora: target_modules: .*every match excluded \(classifier\)"):
        apply_lora(bert_cls(), ["classifier"], r=2, alpha=4, modules_to_save=["classifier"])


# -- Conv1D and Embedding layers -------------------------------------------------------------------


def test_lora_conv1d_holds_the_conv1d_weight_and_merges_in_its_layout():
    conv = Conv1D(6, 4)  # nf=6 out, nx=4 in: weight (4, 6)
    layer = LoRAConv1D.from_conv1d(conv, r=2, alpha=3)
    assert layer.weight is conv.weight and layer.bias is conv.bias
    assert (layer.in_features, layer.out_features, layer.nx, layer.nf) == (4, 6, 4, 6)
    assert layer.lora_A.weight.shape == (2, 4) and layer.lora_B.weight.shape == (6, 2)
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(layer(x), conv(x), **TOL)  # B = 0 at init
    nn.init.normal_(layer.lora_B.weight)
    base = conv.weight.detach().clone()
    expected = conv(x) + layer.scaling * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected, **TOL)
    assert layer.delta_weight().shape == (4, 6)
    layer.eval().merge()
    torch.testing.assert_close(conv(x), expected, **TOL)  # the shared weight holds W + delta
    torch.testing.assert_close(layer.state_dict()["weight"], base, **TOL)
    layer.unmerge()
    torch.testing.assert_close(conv.weight, base, **TOL)
    plain = layer.unwrap()
    assert type(plain) is Conv1D and plain.weight is conv.weight and plain.bias is conv.bias
    torch.testing.assert_close(plain(x), conv(x))


def test_lora_embedding_merge_round_trip_and_unwrap():
    emb = nn.Embedding(10, 6, padding_idx=0)
    layer = LoRAEmbedding.from_embedding(emb, r=3, alpha=6)
    assert layer.weight is emb.weight
    ids = torch.tensor([[0, 3, 9], [3, 1, 0]])
    torch.testing.assert_close(layer(ids), emb(ids))  # A = 0 at init
    nn.init.normal_(layer.lora_embedding_A)
    base = emb.weight.detach().clone()
    out = layer(ids)
    layer.eval().merge()
    assert layer.delta_weight().shape == (10, 6)
    torch.testing.assert_close(emb(ids), out, **TOL)
    torch.testing.assert_close(layer(ids), out, **TOL)
    torch.testing.assert_close(layer.state_dict()["weight"], base, **TOL)  # checkpoints hold the base weight
    layer.unmerge()
    torch.testing.assert_close(emb.weight, base, **TOL)
    plain = layer.unwrap()
    assert type(plain) is nn.Embedding and plain.weight is emb.weight and plain.padding_idx == 0


def test_lora_embedding_applies_no_dropout_as_peft():
    layer = LoRAEmbedding(10, 6, r=2, alpha=4, dropout=0.5).train()
    nn.init.normal_(layer.lora_embedding_A)
    ids = torch.arange(10)
    torch.testing.assert_close(layer(ids), layer(ids))
    assert layer.lora_dropout == 0.5


def test_merge_adapters_over_conv1d_and_embedding_then_unmerge():
    model = apply_lora(hf_models.llama(), ["embed_tokens", "q_proj"], r=2, alpha=4)
    gpt = apply_lora(hf_models.gpt2(), ["c_attn", "c_fc"], r=2, alpha=4)
    ids = hf_models.token_ids()
    for m in (model, gpt):
        for layer in _ours_layers(m).values():
            for p in layer.adapter_parameters():
                nn.init.normal_(p, std=0.1)
        m.eval()
        with torch.no_grad():
            before = m(ids).logits
            base = {n: p.clone() for n, p in m.state_dict().items()}
            merge_adapters(m)
            assert all(layer.merged for layer in _ours_layers(m).values())
            torch.testing.assert_close(m(ids).logits, before, rtol=1e-4, atol=1e-4)
            peftops.unmerge_adapters(m)
            torch.testing.assert_close(m(ids).logits, before, **TOL)
            for n, p in m.state_dict().items():
                torch.testing.assert_close(p, base[n], **TOL, msg=n)


def test_embedding_tied_to_the_lm_head_trains_but_does_not_merge():
    model = apply_lora(hf_models.gpt2(), ["wte"], r=2, alpha=4)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.wte, LoRAEmbedding)
    with pytest.raises(ValueError, match=r"merge_adapters: .*'transformer\.wte\.weight' is also 'lm_head\.weight'"):
        merge_adapters(model)


# -- errors ----------------------------------------------------------------------------------------


def test_unsupported_layer_type_is_a_type_error_naming_module_and_types():
    model = hf_models.llama()
    with pytest.raises(
        TypeError,
        match=r"apply_lora: target_modules: 'model\.layers\.0\.input_layernorm' expected an nn\.Linear, "
        r"nn\.Embedding, transformers' Conv1D or a 4-bit linear \(LinearNF4, bitsandbytes' Linear4bit\), "
        r"got LlamaRMSNorm",
    ):
        apply_lora(model, ["q_proj", "input_layernorm"], r=2, alpha=4)
    assert not _ours_layers(model)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bias="some"), ValueError, r"apply_lora: bias: expected one of 'none', 'all', 'lora_only', got 'some'"),
        (dict(bias=None), ValueError, r"apply_lora: bias: expected one of .*got None"),
        (dict(rank_pattern=["q_proj"]), TypeError, r"apply_lora: rank_pattern: expected a dict"),
        (dict(rank_pattern={"q_proj": 0}), ValueError, r"apply_lora: rank_pattern\['q_proj'\]: expected an int >= 1"),
        (dict(rank_pattern={"q_proj": 2.5}), TypeError, r"rank_pattern\['q_proj'\]: expected an int, got float"),
        (dict(rank_pattern={3: 2}), TypeError, r"apply_lora: rank_pattern: expected non-empty str keys, got 3"),
        (dict(alpha_pattern={"q_proj": float("nan")}), ValueError, r"alpha_pattern\['q_proj'\]: expected a finite"),
        (dict(alpha_pattern={"(q": 2.0}), ValueError, r"apply_lora: alpha_pattern: key '\(q': expected a regex"),
        (dict(exclude_modules=3), TypeError, r"apply_lora: exclude_modules: expected a regex str or a list of str"),
        (dict(modules_to_save="lm_head"), TypeError, r"apply_lora: modules_to_save: expected a list of str"),
        (dict(modules_to_save=["nope"]), ValueError, r"apply_lora: modules_to_save: expected to match at least one"),
        (dict(capacity=4, bias="all"), ValueError, r"apply_lora: capacity: .*expected no bias='all'"),
        (dict(capacity=4, rank_pattern={"q_proj": 2}), ValueError, r"expected no rank_pattern="),
    ],
)
def test_bad_options_are_named_and_change_nothing(kwargs, exc, match):
    model = hf_models.llama()
    with pytest.raises(exc, match=match):
        apply_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, **kwargs)
    assert not _ours_layers(model) and lora_bias(model) == "none" and modules_to_save(model) == ()


def test_unmatched_pattern_key_warns_as_peft():
    with pytest.warns(UserWarning, match=r"apply_lora: rank_pattern: keys \['k_proj'\] match no targeted module"):
        apply_lora(hf_models.llama(), ["q_proj"], r=2, alpha=4, rank_pattern={"k_proj": 3, "q_proj": 2})


def test_lora_layer_types_share_the_contract():
    assert LORA_LAYER_TYPES == (LoRALinear, LoRAConv1D, LoRAEmbedding)
    for layer in (LoRALinear(4, 3, r=2), LoRAConv1D(4, 3, r=2), LoRAEmbedding(5, 3, r=2)):
        for attr in ("r", "lora_alpha", "scaling", "use_rslora", "lora_dropout", "merged"):
            assert hasattr(layer, attr), (type(layer).__name__, attr)
        assert layer.delta_weight().shape == layer.weight.shape
        assert layer.unwrap().weight is layer.weight
