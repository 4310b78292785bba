"""apply_ia3 against real peft IA3 on tiny Llama and BERT: logits and every vector's gradient,
training, and PEFT-format checkpoints both ways (peftops save -> PeftModel.from_pretrained,
peft save_pretrained -> load_peft_ia3)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftops
from peftops.integrations.ia3 import load_peft_ia3, peft_ia3_state
from peftops.nn import apply_ia3, ia3_layers
from tests.integrations import hf_models

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")

MODELS = ["llama", "bert"]


def _logits(model, ids):
    return model(ids).logits


def _randomise(model, seed=5):
    """Vectors away from their all-ones init, so that scaling errors show."""
    gen = torch.Generator().manual_seed(seed)
    for layer in ia3_layers(model).values():
        layer.ia3_l.data.copy_(torch.rand(layer.ia3_l.shape, generator=gen) + 0.5)


def _peft_model(make):
    return peft.get_peft_model(getattr(hf_models, make)(), peft.IA3Config())


def _copy_into_peft(mine, ref):
    for name, layer in ia3_layers(mine).items():
        ref.base_model.model.get_submodule(name).ia3_l["default"].data.copy_(layer.ia3_l.detach())


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("make", MODELS)
def test_logits_and_every_gradient_match_peft(make, backend):
    ids = hf_models.token_ids(batch=2, seq=5)
    mine = apply_ia3(getattr(hf_models, make)())
    ref = _peft_model(make)
    _randomise(mine)
    _copy_into_peft(mine, ref)
    mine_layers = ia3_layers(mine)
    # peft's defaults for the architecture, layer for layer (feedforward ones too).
    ref_layers = {n: m for n, m in ref.base_model.model.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)}
    assert sorted(mine_layers) == sorted(ref_layers)
    assert {n: m.is_feedforward for n, m in mine_layers.items()} == {n: m.is_feedforward for n, m in ref_layers.items()}
    with peftops.use_backend(backend):
        y = _logits(mine, ids)
        y.square().mean().backward()
    y_ref = _logits(ref, ids)
    y_ref.square().mean().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name, layer in mine_layers.items():
        torch.testing.assert_close(
            layer.ia3_l.grad,
            ref_layers[name].ia3_l["default"].grad,
            rtol=1e-4,
            atol=1e-6,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    # peft's parameter names carry the adapter name (ia3_l.default); its checkpoints drop it.
    assert trainable == {
        n.removesuffix(".default") for n, p in ref.base_model.model.named_parameters() if p.requires_grad
    }


def test_training_changes_only_the_vectors_and_lowers_the_loss():
    model = apply_ia3(hf_models.llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = hf_models.token_ids(batch=2, seq=8)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.ia3_l" for n in ia3_layers(model)}


@pytest.mark.parametrize("make", MODELS)
def test_save_loads_in_peft_with_the_same_logits(make, tmp_path):
    mine = apply_ia3(getattr(hf_models, make)())
    _randomise(mine)
    config, tensors = peft_ia3_state(mine)
    config["task_type"] = None
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(tmp_path, "adapter_model.safetensors")
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    ref = peft.PeftModel.from_pretrained(getattr(hf_models, make)(), str(tmp_path))
    ids = hf_models.token_ids(batch=2, seq=5)
    with torch.no_grad():
        torch.testing.assert_close(_logits(mine, ids), _logits(ref, ids))
    assert {n for n, m in ref.base_model.model.named_modules() if isinstance(m, peft.tuners.ia3.IA3Layer)} == set(
        ia3_layers(mine)
    )


@pytest.mark.parametrize("make", MODELS)
def test_peft_save_loads_here_with_the_same_logits(make, tmp_path):
    ref = _peft_model(make)
    gen = torch.Generator().manual_seed(7)
    for module in ref.modules():
        if isinstance(module, peft.tuners.ia3.IA3Layer):
            module.ia3_l["default"].data.copy_(torch.rand(module.ia3_l["default"].shape, generator=gen) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    mine = load_peft_ia3(getattr(hf_models, make)(), config, tensors)
    ids = hf_models.token_ids(batch=2, seq=5)
    with torch.no_grad():
        torch.testing.assert_close(_logits(mine, ids), _logits(ref, ids))


def test_load_rejects_bad_checkpoints():
    config, tensors = peft_ia3_state(apply_ia3(hf_models.llama()))
    with pytest.raises(ValueError, match=r"load_peft_ia3: config: expected peft_type 'IA3', got 'LORA'"):
        load_peft_ia3(hf_models.llama(), {**config, "peft_type": "LORA"}, tensors)
    with pytest.raises(ValueError, match=r"load_peft_ia3: config: layers_to_transform: peftops does not implement"):
        load_peft_ia3(hf_models.llama(), {**config, "layers_to_transform": [0]}, tensors)
    key = next(iter(tensors))
    with pytest.raises(
        ValueError, match=r"load_peft_ia3: tensors: expected one ia3_l per IA3 layer.*missing \['" + key
    ):
        load_peft_ia3(hf_models.llama(), config, {k: v for k, v in tensors.items() if k != key})
    with pytest.raises(ValueError, match=r"load_peft_ia3: tensors: .*ia3_l: expected shape"):
        load_peft_ia3(hf_models.llama(), config, {**tensors, key: torch.ones(3)})
