"""DoRA layers (``LoRALinear(use_dora=True)``, ``apply_lora(..., use_dora=True)``) against the
real peft ``LoraConfig(use_dora=True)`` on tiny models (CPU, float32): initialisation, logits
and every gradient (A, B, magnitude), dropout in eval, merge/unmerge, state dict keys as peft
saves them, training, the cached ``||W||^2``, and the named errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

import peftops  # noqa: E402
from peftops.nn import LoRAConv1D, LoRALinear, apply_lora, merge_adapters, unmerge_adapters  # noqa: E402
from tests.integrations import hf_models  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_model(factory, targets, randomise=True, **config):
    """peft's DoRA model; with ``randomise``, A, B and the magnitude moved off their init so
    that every term of the forward and backward matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own notes (fan_in_fan_out)
        model = get_peft_model(
            factory(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, **config)
        )
    if randomise:
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif "lora_magnitude_vector" in name:
                    p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=gen))
    return model


def _ours_name(peft_name: str) -> str:
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default", "")


def _copy_from_peft(peft_model, model) -> None:
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                ours[_ours_name(name)].copy_(p)


def _dora_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.use_dora}


def _loss(model, ids):
    return model(ids).logits.square().mean()


FACTORIES = [
    pytest.param(hf_models.llama, LLAMA_TARGETS, LoRALinear, id="llama"),
    pytest.param(hf_models.gpt2, ["c_attn", "c_fc"], LoRAConv1D, id="gpt2-conv1d"),
]


@pytest.mark.parametrize("factory,targets,kind", FACTORIES)
def test_fresh_magnitude_is_peft_init(factory, targets, kind):
    peft_model = _peft_model(factory, targets, randomise=False)
    model = apply_lora(factory(), targets, r=4, alpha=8, use_dora=True)
    layers = _dora_layers(model)
    assert layers and {type(m) for m in layers.values()} == {kind}
    mags = {_ours_name(n): p for n, p in peft_model.named_parameters() if "magnitude" in n}
    assert sorted(mags) == sorted(f"{n}.lora_magnitude_vector" for n in layers)
    for name, layer in layers.items():
        torch.testing.assert_close(layer.lora_magnitude_vector, mags[f"{name}.lora_magnitude_vector"], **TOL)
    # B = 0 at init: a fresh DoRA model computes the base model.
    ids = hf_models.token_ids()
    torch.testing.assert_close(model(ids).logits, factory()(ids).logits, **TOL)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("factory,targets,kind", FACTORIES)
def test_logits_and_every_gradient_match_peft(factory, targets, kind, backend):
    peft_model = _peft_model(factory, targets)
    model = apply_lora(factory(), targets, r=4, alpha=8, use_dora=True)
    _copy_from_peft(peft_model, model)
    ids = hf_models.token_ids()
    _loss(peft_model, ids).backward()
    with peftops.use_backend(backend):
        _loss(model, ids).backward()
        logits = model(ids).logits
    torch.testing.assert_close(logits, peft_model(ids).logits, **TOL)
    assert not torch.allclose(logits, factory()(ids).logits, **TOL)
    grads = {_ours_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable.keys() == grads.keys()
    assert any(n.endswith("lora_magnitude_vector") for n in trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, grads[name], **TOL, msg=name)


def test_dropout_in_eval_matches_peft_and_is_inactive():
    peft_model = _peft_model(hf_models.llama, LLAMA_TARGETS, lora_dropout=0.3)
    model = apply_lora(hf_models.llama(), LLAMA_TARGETS, r=4, alpha=8, dropout=0.3, use_dora=True)
    _copy_from_peft(peft_model, model)
    peft_model.eval()
    model.eval()
    ids = hf_models.token_ids()
    _loss(peft_model, ids).backward()
    _loss(model, ids).backward()
    torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, **TOL)
    grads = {_ours_name(n): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], **TOL, msg=name)


def test_dropout_in_training_is_peft_formula_on_the_layer():
    # Masks differ between peft and peftops; peft's formula with peftops' own mask is the truth.
    # The reference backend's mask is a function of the seed the op draws from torch's generator.
    torch.manual_seed(0)
    layer = LoRALinear(12, 6, r=3, alpha=6, dropout=0.5, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 12)
    with peftops.use_backend("reference"):
        torch.manual_seed(3)
        y = layer(x)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)
    keep = peftops.reference.dropout_keep_mask(seed, x.shape, 0.5, x.device)
    w, a, b, m = layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
    c = m / torch.linalg.vector_norm(w + layer.scaling * (b @ a), dim=1).detach()
    xd = x * keep / 0.5
    want = F.linear(x, w, layer.bias) + (c - 1) * F.linear(xd, w) + c * layer.scaling * F.linear(F.linear(xd, a), b)
    torch.testing.assert_close(y, want, **TOL)


def test_merge_and_unmerge_match_peft():
    peft_model = _peft_model(hf_models.llama, LLAMA_TARGETS)
    model = apply_lora(hf_models.llama(), LLAMA_TARGETS, r=4, alpha=8, use_dora=True)
    _copy_from_peft(peft_model, model)
    peft_model.eval()
    model.eval()
    ids = hf_models.token_ids()
    before = model(ids).logits
    original = {n: m.weight.clone() for n, m in _dora_layers(model).items()}
    peft_model.merge_adapter()
    merge_adapters(model)
    peft_layers = dict(peft_model.base_model.model.named_modules())
    for name, layer in _dora_layers(model).items():
        assert layer.merged
        torch.testing.assert_close(layer.weight, peft_layers[name].base_layer.weight, **TOL, msg=name)
    torch.testing.assert_close(model(ids).logits, peft_model(ids).logits, **TOL)
    torch.testing.assert_close(model(ids).logits, before, **TOL)
    # The state dict holds the unmerged base weight while merged.
    state = model.state_dict()
    for name, w in original.items():
        torch.testing.assert_close(state[f"{name}.weight"], w, **TOL)
    peft_model.unmerge_adapter()
    unmerge_adapters(model)
    for name, layer in _dora_layers(model).items():
        torch.testing.assert_close(layer.weight, original[name], **TOL, msg=name)
        torch.testing.assert_close(layer.weight, peft_layers[name].base_layer.weight, **TOL, msg=name)
    torch.testing.assert_close(model(ids).logits, before, **TOL)


def test_conv1d_merge_round_trip():
    model = apply_lora(hf_models.gpt2(), ["c_attn"], r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for layer in _dora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.1)
            layer.lora_magnitude_vector.mul_(1.1)
    model.eval()
    ids = hf_models.token_ids()
    before = model(ids).logits
    merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, before, **TOL)
    unmerge_adapters(model)
    torch.testing.assert_close(model(ids).logits, before, **TOL)


def test_state_dict_keys_are_peft_saved_keys():
    peft_model = _peft_model(hf_models.llama, LLAMA_TARGETS)
    saved = {k.removeprefix("base_model.model.") for k in get_peft_model_state_dict(peft_model)}
    model = apply_lora(hf_models.llama(), LLAMA_TARGETS, r=4, alpha=8, use_dora=True)
    ours = {k for k in model.state_dict() if ".lora_" in k}
    assert ours == saved
    assert any(k.endswith(".lora_magnitude_vector") for k in saved)


def test_training_changes_only_a_b_and_magnitude_and_lowers_the_loss():
    model = apply_lora(hf_models.llama(), LLAMA_TARGETS, r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        for layer in _dora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = hf_models.token_ids()
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    kinds = {n.rsplit(".", 2)[-2] if n.endswith(".weight") else n.rsplit(".", 1)[-1] for n in changed}
    assert kinds == {"lora_A", "lora_B", "lora_magnitude_vector"}, sorted(changed)[:5]
    assert len(changed) == 3 * len(_dora_layers(model))


def test_weight_changes_invalidate_the_cached_norm():
    torch.manual_seed(0)
    layer = LoRALinear(10, 6, r=2, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 10)

    def fresh_output():
        other = LoRALinear(10, 6, r=2, use_dora=True)
        other.load_state_dict(layer.state_dict())
        other.clear_norm_cache()
        return other(x)

    with peftops.use_backend("torch"):  # the backend that reads the cache
        layer(x)  # fills the cache
        with torch.no_grad():
            layer.weight.mul_(1.5)  # in place through the Parameter: its version moves
        torch.testing.assert_close(layer(x), fresh_output())
        state = layer.state_dict()
        state["weight"] = torch.randn(6, 10)
        layer.load_state_dict(state)
        torch.testing.assert_close(layer(x), fresh_output())
        layer.to(torch.float64)
        assert layer(x.double()).dtype == torch.float64


def test_compiled_dora_layer_matches_eager():
    torch.manual_seed(0)
    layer = LoRALinear(16, 8, r=4, use_dora=True)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 5, 16)
    want = layer(x)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), want, **TOL)


def test_reset_magnitude_refused_while_merged_and_without_dora():
    layer = LoRALinear(6, 4, r=2, use_dora=True)
    layer.merge()
    with pytest.raises(RuntimeError, match=r"LoRALinear.reset_dora_magnitude: .*unmerge\(\) first"):
        layer.reset_dora_magnitude()
    with pytest.raises(RuntimeError, match=r"built without use_dora=True"):
        LoRALinear(6, 4, r=2).reset_dora_magnitude()


def test_apply_lora_use_dora_errors_are_named():
    with pytest.raises(ValueError, match=r"apply_lora: use_dora: 'model.embed_tokens' is an nn.Embedding"):
        apply_lora(hf_models.llama(), ["embed_tokens", "q_proj"], r=4, alpha=8, use_dora=True)
    with pytest.raises(ValueError, match=r"apply_lora: capacity: .*expected no use_dora=True"):
        apply_lora(hf_models.llama(), ["q_proj"], r=4, alpha=8, capacity=2, use_dora=True)
    with pytest.raises(TypeError, match=r"apply_lora: use_dora: expected a bool"):
        apply_lora(hf_models.llama(), ["q_proj"], r=4, alpha=8, use_dora=1)
    with pytest.raises(TypeError, match=r"LoRALinear: use_dora: expected a bool"):
        LoRALinear(4, 4, use_dora="yes")
