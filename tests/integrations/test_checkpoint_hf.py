"""PEFT-format checkpoints of peftops models, against the real peft (CPU, float32, tiny models).

Each direction is checked on outputs, not only on keys: peftops' model and peft's model loaded
from the same directory compute the same logits.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import peftops  # noqa: E402
from peftops.integrations.checkpoint import load_adapter, merge_and_unload, save_adapter  # noqa: E402
from tests.integrations import hf_models  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
ATTN = ["q_proj", "v_proj"]


def _randomize(model, seed=3):
    """Random B (and A) everywhere, so a lost or misplaced tensor changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _logits(model, ids, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _peft_loaded(factory, path, **kwargs):
    return PeftModel.from_pretrained(factory(), path, **kwargs)


# -- peftops -> peft -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (hf_models.llama, dict(target_modules=ATTN, r=4, alpha=8)),
        (hf_models.llama, dict(target_modules="all-linear", r=4, alpha=8, use_rslora=True)),
        (
            hf_models.llama,
            dict(
                target_modules=ATTN + ["down_proj"],
                r=4,
                alpha=8,
                rank_pattern={"layers.1.self_attn.q_proj": 2},
                alpha_pattern={"down_proj": 3.0},
            ),
        ),
        (hf_models.gpt2, dict(target_modules=["c_attn", "c_proj"], r=4, alpha=8)),
        (hf_models.llama, dict(target_modules=["embed_tokens", "q_proj"], r=4, alpha=8)),
    ],
    ids=["llama-attn", "llama-all-linear-rslora", "llama-patterns", "gpt2-conv1d", "llama-embedding"],
)
def test_save_adapter_loads_in_peft(tmp_path, factory, kwargs):
    model = _randomize(peftops.apply_lora(factory(), **kwargs))
    ids = hf_models.token_ids()
    expected = _logits(model, ids)
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = _peft_loaded(factory, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, **TOL)
    # And the base alone differs: the adapter is really in there.
    assert not torch.allclose(_logits(factory(), ids), expected, **TOL)


def test_generate_greedy_equals_peft_after_save(tmp_path):
    model = _randomize(peftops.apply_lora(hf_models.qwen2(), "all-linear", r=4, alpha=8))
    model.eval()
    save_adapter(model, tmp_path)
    loaded = _peft_loaded(hf_models.qwen2, tmp_path)
    loaded.eval()
    ids = hf_models.token_ids(batch=2, seq=5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(ours, loaded.generate(input_ids=ids, **kwargs))
    assert not torch.equal(ours, hf_models.qwen2().generate(input_ids=ids, **kwargs))


def test_save_adapter_bias_and_modules_to_save_load_in_peft(tmp_path):
    model = peftops.apply_lora(
        hf_models.bert(head="cls"), ["query", "value"], r=4, alpha=8, bias="lora_only", modules_to_save=["classifier"]
    )
    _randomize(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # Trained biases and head: changed from the base model's, so losing them shows.
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    ids = hf_models.token_ids()
    expected = _logits(model, ids)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["bias"] == "lora_only" and config["modules_to_save"] == ["classifier"]
    assert config["task_type"] == "SEQ_CLS"
    loaded = _peft_loaded(lambda: hf_models.bert(head="cls"), tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), expected, **TOL)


# -- peft -> peftops -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, config",
    [
        (hf_models.llama, dict(target_modules=ATTN, lora_dropout=0.1)),
        (hf_models.qwen2, dict(target_modules="all-linear", use_rslora=True)),
        (
            hf_models.llama,
            dict(
                target_modules=r".*\.(q_proj|down_proj)",
                rank_pattern={"q_proj": 2},
                alpha_pattern={"layers.0.mlp.down_proj": 5},
            ),
        ),
        (hf_models.gpt2, dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
        (hf_models.llama, dict(target_modules=["embed_tokens", "v_proj"])),
        (
            lambda: hf_models.bert(head="cls"),
            dict(target_modules=["query"], bias="all", modules_to_save=["classifier"]),
        ),
    ],
    ids=[
        "llama-dropout",
        "qwen2-all-linear-rslora",
        "llama-regex-patterns",
        "gpt2-conv1d",
        "llama-embedding",
        "bert-bias-all",
    ],
)
def test_peft_checkpoint_loads_into_peftops(tmp_path, factory, config):
    peft_model = get_peft_model(factory(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(tmp_path)
    ids = hf_models.token_ids()
    expected = _logits(peft_model, ids)
    model = load_adapter(factory(), tmp_path)
    torch.testing.assert_close(_logits(model, ids), expected, **TOL)
    layers = [m for m in model.modules() if isinstance(m, peftops.nn.LORA_LAYER_TYPES)]
    assert len(layers) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    dropout = config.get("lora_dropout", 0.0)
    assert all(m.lora_dropout == dropout for m in layers if not hasattr(m, "lora_embedding_A"))
    # Trainable exactly where peft trains.
    trainable = {
        n.replace("base_model.model.", "").replace(".base_layer", "")
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    trainable = {n.replace(".default", "").replace("modules_to_save.", "") for n in trainable}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize(
    "factory, targets", [(hf_models.llama, ATTN), (hf_models.gpt2, ["c_attn"])], ids=["llama", "gpt2"]
)
def test_dora_checkpoints_both_ways(tmp_path, factory, targets):
    peft_model = get_peft_model(
        factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    )
    _randomize(peft_model)  # magnitudes too: their keys hold "lora_"
    ids = hf_models.token_ids()
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_adapter(factory(), tmp_path / "peft")
    assert all(layer.use_dora for layer in ours.modules() if isinstance(layer, peftops.nn.LORA_LAYER_TYPES))
    torch.testing.assert_close(_logits(ours, ids), expected, **TOL)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    torch.testing.assert_close(_logits(_peft_loaded(factory, tmp_path / "ours"), ids), expected, **TOL)
    if factory is hf_models.gpt2:
        return  # banks wrap nn.Linear only
    bank = peftops.apply_lora(factory(), targets, r=4, alpha=8, capacity=2)
    with pytest.raises(ValueError, match="load_adapter: use_dora: a MultiLoRALinear bank holds plain LoRA adapters"):
        load_adapter(bank.eval(), tmp_path / "peft", adapter_name="x")


def test_round_trip_peftops_peft_peftops(tmp_path):
    model = _randomize(peftops.apply_lora(hf_models.mistral(), ["k_proj", "o_proj"], r=3, alpha=6))
    ids = hf_models.token_ids()
    save_adapter(model, tmp_path / "a")
    _peft_loaded(hf_models.mistral, tmp_path / "a").save_pretrained(tmp_path / "b")
    again = load_adapter(hf_models.mistral(), tmp_path / "b")
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), rtol=0, atol=0)


# -- banks ---------------------------------------------------------------------------------------


def test_peft_checkpoints_load_into_multi_lora_banks(tmp_path):
    paths, expected = {}, {}
    ids = hf_models.token_ids(batch=4)
    for i, (name, r, rslora) in enumerate([("math", 4, False), ("code", 2, True)]):
        pm = get_peft_model(
            hf_models.llama(),
            LoraConfig(
                r=r, lora_alpha=8, target_modules=ATTN + ["up_proj"], use_rslora=rslora, init_lora_weights=False
            ),
        )
        _randomize(pm, seed=10 + i)
        pm.save_pretrained(tmp_path / name)
        paths[name], expected[name] = tmp_path / name, _logits(pm, ids)
    base_logits = _logits(hf_models.llama(), ids)
    model = peftops.apply_lora(hf_models.llama(), ATTN + ["up_proj", "down_proj"], r=4, alpha=8, capacity=3)
    model.eval()
    for name, path in paths.items():
        load_adapter(model, path, adapter_name=name)
    rows = ["code", "math", None, "math"]
    peftops.nn.set_batch_adapters(model, rows)
    out = _logits(model, ids)
    for i, row in enumerate(rows):
        torch.testing.assert_close(out[i], (base_logits if row is None else expected[row])[i], **TOL)
    # And back out of the bank, one adapter at a time.
    save_adapter(model, tmp_path / "again", adapter_name="code")
    torch.testing.assert_close(_logits(_peft_loaded(hf_models.llama, tmp_path / "again"), ids), expected["code"], **TOL)


# -- merge_and_unload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, targets",
    [(hf_models.llama, ATTN), (hf_models.gpt2, ["c_attn", "c_fc"]), (hf_models.qwen2, ["embed_tokens", "o_proj"])],
    ids=["llama", "gpt2-conv1d", "qwen2-embedding"],
)
def test_merge_and_unload_round_trips_save_pretrained(tmp_path, factory, targets):
    base = factory()
    base_types = {n: type(m) for n, m in base.named_modules()}
    model = _randomize(peftops.apply_lora(factory(), targets, r=4, alpha=8))
    ids = hf_models.token_ids()
    expected = _logits(model, ids)
    merged = merge_and_unload(model)
    assert {n: type(m) for n, m in merged.named_modules()} == base_types
    assert merged.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(_logits(merged, ids), expected, **TOL)
    merged.save_pretrained(tmp_path)
    reloaded = type(base).from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, ids), expected, **TOL)


def test_merge_and_unload_refuses_what_cannot_merge():
    model = peftops.apply_lora(hf_models.llama(), ATTN, r=4, alpha=8, capacity=2)
    with pytest.raises(ValueError, match="merge_and_unload: model: expected LoRA or IA3 layers only"):
        merge_and_unload(model)
    with pytest.raises(ValueError, match="merge_and_unload: model: expected LoRA or IA3 layers"):
        merge_and_unload(hf_models.llama())


def test_ia3_through_save_load_and_merge_and_unload(tmp_path):
    model = peftops.apply_ia3(hf_models.llama())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    ids = hf_models.token_ids()
    expected = _logits(model, ids)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "IA3"
    torch.testing.assert_close(_logits(_peft_loaded(hf_models.llama, tmp_path), ids), expected, **TOL)
    torch.testing.assert_close(_logits(load_adapter(hf_models.llama(), tmp_path), ids), expected, **TOL)
    base = hf_models.llama()
    merged = merge_and_unload(model)
    assert {n: type(m) for n, m in merged.named_modules()} == {n: type(m) for n, m in base.named_modules()}
    torch.testing.assert_close(_logits(merged, ids), expected, **TOL)


# -- bad input -----------------------------------------------------------------------------------


def _peft_dir(tmp_path, **config):
    pm = get_peft_model(hf_models.llama(), LoraConfig(r=4, lora_alpha=8, target_modules=ATTN, **config))
    pm.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    "edit, field",
    [
        ({"use_qalora": True}, "use_qalora"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"lora_bias": True}, "lora_bias"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"some_future_field": 3}, "some_future_field"),
    ],
)
def test_unsupported_config_field_is_named(tmp_path, edit, field):
    path = _peft_dir(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(edit)
    (path / "adapter_config.json").write_text(json.dumps(config))
    model = hf_models.llama()
    with pytest.raises(ValueError, match=rf"load_adapter: adapter_config.json: peftops does not support {field}="):
        load_adapter(model, path)
    # Refused before the model was touched.
    assert not any(isinstance(m, peftops.nn.LORA_LAYER_TYPES) for m in model.modules())


def test_unknown_peft_type_is_named(tmp_path):
    peft_model = get_peft_model(hf_models.llama(), peft.LoHaConfig(target_modules=["k_proj"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="load_adapter: peft_type: expected one of LORA.*got 'LOHA'"):
        load_adapter(hf_models.llama(), tmp_path)


def test_missing_and_stray_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _peft_dir(tmp_path)
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights)
    with pytest.raises(
        ValueError, match="expected a tensor for every LoRA parameter.*" + dropped.replace("base_model.model.", "")
    ):
        load_adapter(hf_models.llama(), path)
    save_file({**tensors, "base_model.model.model.norm.scale": torch.ones(64)}, weights)
    with pytest.raises(
        ValueError,
        match=r"expected every tensor to name a parameter of the model, got base_model\.model\.model\.norm\.scale",
    ):
        load_adapter(hf_models.llama(), path)


def test_save_adapter_bad_input(tmp_path):
    with pytest.raises(ValueError, match="save_adapter: model: expected peftops adapter layers"):
        save_adapter(hf_models.llama(), tmp_path)
    model = peftops.apply_lora(hf_models.llama(), ATTN, r=4, alpha=8)
    with pytest.raises(ValueError, match="save_adapter: adapter_name: expected 'default'"):
        save_adapter(model, tmp_path, adapter_name="other")
    with pytest.raises(TypeError, match="save_adapter: save_directory: expected a str or os.PathLike, got int"):
        save_adapter(model, 3)
    with pytest.raises(ValueError, match="load_adapter: path: expected a PEFT adapter directory"):
        load_adapter(hf_models.llama(), tmp_path / "nowhere")
    loaded = peftops.apply_lora(hf_models.llama(), ATTN, r=4, alpha=8)
    save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="load_adapter: model: expected the base model without LoRA layers"):
        load_adapter(loaded, tmp_path)
