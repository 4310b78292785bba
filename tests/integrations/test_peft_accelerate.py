"""peftops.integrations.peft.accelerate / restore against the real peft (CPU, float32, tiny models).

Every comparison runs the same model twice, first on peft's own forward, then accelerated, so the
reference is peft itself. Each test also counts the calls that reach peftops' op, so a test
cannot pass because the layers silently stayed on peft's forward.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as lora_layer  # noqa: E402

import peftops  # noqa: E402
import peftops.integrations.peft as integration  # noqa: E402
from peftops.integrations.peft import (  # noqa: E402
    AccelerateReport,
    PeftopsFallbackWarning,
    accelerate,
    restore,
)
from tests.integrations.hf_models import bert as _bert  # noqa: E402
from tests.integrations.hf_models import gpt2 as _gpt2  # noqa: E402
from tests.integrations.hf_models import llama as _llama  # noqa: E402
from tests.integrations.hf_models import qwen2 as _qwen2  # noqa: E402
from tests.integrations.hf_models import token_ids as _inputs  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(**kwargs):
    # init_lora_weights=False: B random, so the LoRA term is not zero and a wrong one shows.
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kwargs}
    return LoraConfig(**kwargs)


def _lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)}


@pytest.fixture
def op_calls(monkeypatch):
    """Records each call that reaches peftops' op: which tensors and which arguments it got."""
    calls = []
    real = integration.lora_linear

    def counting(x, weight, lora_a, lora_b, **kwargs):
        calls.append({"weight": weight, "lora_a": lora_a, "lora_b": lora_b, **kwargs})
        return real(x, weight, lora_a, lora_b, **kwargs)

    monkeypatch.setattr(integration, "lora_linear", counting)
    return calls


def _logits_and_grads(model, ids, call=None, **kwargs):
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(ids, **kwargs).logits
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def _close(actual, expected, name=""):
    # 1e-5 relative to the tensor's scale: a gradient summed over tokens in another order (the
    # op's fused GEMMs) differs by float32 rounding, which is large relative to its elements near 0.
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_same(expected, actual):
    (logits_e, grads_e), (logits_a, grads_a) = expected, actual
    _close(logits_a, logits_e, "logits")
    assert grads_a.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        _close(grads_a[name], grads_e[name], name)


def _check_parity(model, op_calls, ids, **kwargs):
    expected = _logits_and_grads(model, ids, **kwargs)
    assert not op_calls
    report = accelerate(model)
    actual = _logits_and_grads(model, ids, **kwargs)
    _assert_same(expected, actual)
    assert len(op_calls) == len(report.accelerated) > 0
    return report


# -- parity with peft's forward ---------------------------------------------------------------


@pytest.mark.parametrize(
    "make, targets",
    [
        (_llama, TARGETS),
        (_qwen2, TARGETS),  # q/k/v with biases
        (_bert, ["query", "key", "value", "dense"]),  # biases everywhere, post-LN, GELU
    ],
    ids=["llama", "qwen2", "bert"],
)
def test_plain_lora_logits_and_grads(make, targets, op_calls):
    model = get_peft_model(make(), _lora(target_modules=targets))
    report = _check_parity(model, op_calls, _inputs())
    assert sorted(report.accelerated) == sorted(_lora_layers(model)) and not report.skipped
    assert not report.fallbacks
    # Parameters shared, never copied: the op read the layers' own tensors.
    layers = _lora_layers(model)
    for call, name in zip(op_calls, report.accelerated, strict=True):
        layer = layers[name]
        assert call["weight"] is layer.base_layer.weight
        assert call["lora_a"] is layer.lora_A["default"].weight
        assert call["lora_b"] is layer.lora_B["default"].weight
        assert call["bias"] is layer.base_layer.bias


def test_trainable_base_bias(op_calls):
    # bias="all": the base biases train too, so their gradients come from the op.
    model = get_peft_model(_llama(attention_bias=True, mlp_bias=True), _lora(bias="all"))
    assert any(n.endswith("base_layer.bias") and p.requires_grad for n, p in model.named_parameters())
    _check_parity(model, op_calls, _inputs())
    assert all(call["bias"] is not None for call in op_calls)


def test_rslora_scale_is_peft_scaling(op_calls):
    model = get_peft_model(_llama(), _lora(use_rslora=True, r=4, lora_alpha=8))
    _check_parity(model, op_calls, _inputs())
    assert {call["scale"] for call in op_calls} == {8 / 2.0}  # alpha / sqrt(r), not alpha / r


def test_dropout_in_eval_is_off(op_calls):
    model = get_peft_model(_llama(), _lora(lora_dropout=0.3))
    model.eval()
    _check_parity(model, op_calls, _inputs())
    assert {(call["dropout_p"], call["training"]) for call in op_calls} == {(0.3, False)}


def test_dropout_in_training_takes_p_from_peft(op_calls):
    model = get_peft_model(_llama(), _lora(lora_dropout=0.3))
    model.train()
    layers = _lora_layers(model)
    name = next(iter(layers))
    layers[name].lora_dropout["default"].p = 0.125  # read at each call, not copied at accelerate
    accelerate(model)
    ids = _inputs()
    torch.manual_seed(3)
    logits = model(ids).logits
    logits.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    first_forward = op_calls[: len(layers)]
    assert (first_forward[0]["dropout_p"], first_forward[0]["training"]) == (0.125, True)
    assert {(call["dropout_p"], call["training"]) for call in first_forward[1:]} == {(0.3, True)}
    # Dropout is really applied: the same seed gives the same output, another seed another one.
    with torch.no_grad():
        torch.manual_seed(3)
        again = model(ids).logits
        torch.manual_seed(4)
        other = model(ids).logits
    torch.testing.assert_close(again, logits.detach())
    assert not torch.allclose(other, logits.detach())


def _two_adapters(**kwargs):
    model = get_peft_model(_llama(**kwargs), _lora())
    torch.manual_seed(5)
    model.add_adapter("other", _lora(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    return model


def test_two_adapters_set_adapter(op_calls):
    model = _two_adapters()
    ids = _inputs()
    expected = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        expected[name] = _logits_and_grads(model, ids)
    accelerate(model)
    for name in ("other", "default"):
        model.set_adapter(name)
        _assert_same(expected[name], _logits_and_grads(model, ids))
    assert op_calls


def test_several_active_adapters_sum(op_calls):
    model = _two_adapters()
    model.base_model.set_adapter(["default", "other"])
    # peft sums the active adapters' terms: the first runs in the op, the second is added after.
    report = _check_parity(model, op_calls, _inputs())
    layers = _lora_layers(model)
    assert all(layers[name].active_adapters == ["default", "other"] for name in report.accelerated)
    assert any(name.endswith("lora_A.other.weight") for name, p in model.named_parameters() if p.requires_grad)


def test_disable_adapter_runs_the_base_layer(op_calls):
    model = get_peft_model(_llama(), _lora())
    ids = _inputs()
    with model.disable_adapter():
        expected = model(ids).logits
    accelerate(model)
    with model.disable_adapter():
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected, **TOL)
    assert not op_calls
    # The adapter is back after the context.
    with_adapter = model(ids).logits
    assert not torch.allclose(with_adapter, actual) and op_calls


def test_merge_adapter_and_merge_and_unload(op_calls):
    model = get_peft_model(_llama(), _lora())
    reference = copy.deepcopy(model)
    ids = _inputs()
    accelerate(model)
    # merged layers run the base layer only, as peft's do
    model.merge_adapter()
    reference.merge_adapter()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)
    assert not op_calls
    model.unmerge_adapter()
    reference.unmerge_adapter()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, **TOL)
    assert op_calls

    merged, merged_ref = model.merge_and_unload(), reference.merge_and_unload()
    assert not _lora_layers(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(merged(ids).logits, merged_ref(ids).logits, **TOL)
    for (n, p), (n_ref, p_ref) in zip(merged.state_dict().items(), merged_ref.state_dict().items(), strict=True):
        assert n == n_ref
        torch.testing.assert_close(p, p_ref, **TOL)


def test_mixed_adapter_batch(op_calls):
    model = _two_adapters()
    model.eval()
    ids = _inputs(batch=5)
    names = ["other", "default", "__base__", "other", "default"]
    expected = model(ids, adapter_names=names).logits
    accelerate(model)
    actual = model(ids, adapter_names=names).logits
    torch.testing.assert_close(actual, expected, **TOL)
    assert op_calls
    # Each row equals a run of the whole batch on that row's adapter alone.
    for name in ("default", "other"):
        model.set_adapter(name)
        alone = model(ids).logits
        for row in (i for i, n in enumerate(names) if n == name):
            torch.testing.assert_close(actual[row], alone[row], **TOL)
    with model.disable_adapter():
        base = model(ids).logits
    torch.testing.assert_close(actual[2], base[2], **TOL)


def test_generate_greedy_and_beams_token_for_token(op_calls):
    model = _two_adapters()
    model.eval()
    ids = _inputs(batch=3, seq=5)
    names = ["other", "__base__", "default"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = {
        "greedy": model.generate(input_ids=ids, **kwargs),
        "mixed-beams": model.generate(input_ids=ids, adapter_names=names, num_beams=2, **kwargs),
    }
    accelerate(model)
    actual = {
        "greedy": model.generate(input_ids=ids, **kwargs),
        "mixed-beams": model.generate(input_ids=ids, adapter_names=names, num_beams=2, **kwargs),
    }
    for mode in expected:
        assert torch.equal(actual[mode], expected[mode]), mode
    assert op_calls


def test_model_with_injected_adapters(op_calls):
    # No PeftModel around it: peft's adapters injected into a plain transformers model.
    model = peft.inject_adapter_in_model(_lora(), _llama())
    _check_parity(model, op_calls, _inputs())


def test_trainer_steps_run_on_the_op(tmp_path, op_calls):
    model = get_peft_model(_llama(), _lora(lora_dropout=0.1))
    report = accelerate(model)
    ids = _inputs(batch=8, seq=6)
    data = [{"input_ids": row, "labels": row} for row in ids]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # Every training forward went through the op (8 layers per step at least), none fell back.
    assert len(op_calls) >= 4 * len(report.accelerated) and not report.fallbacks
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in lora.items() if "lora_B" in n)


def test_save_pretrained_unchanged(tmp_path, op_calls):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _two_adapters()
    model.save_pretrained(tmp_path / "before")
    accelerate(model)
    model(_inputs())  # a forward first, so that nothing it leaves behind can leak into the files
    model.save_pretrained(tmp_path / "after")
    assert op_calls
    for sub in ("", "other"):
        before, after = tmp_path / "before" / sub, tmp_path / "after" / sub
        tensors_before = safetensors.load_file(before / "adapter_model.safetensors")
        tensors_after = safetensors.load_file(after / "adapter_model.safetensors")
        assert tensors_after.keys() == tensors_before.keys() and tensors_before
        for key in tensors_before:
            assert torch.equal(tensors_after[key], tensors_before[key]), key
        config_before = json.loads((before / "adapter_config.json").read_text())
        config_after = json.loads((after / "adapter_config.json").read_text())
        assert config_after == config_before


def test_adamw_steps_train_only_lora_and_match_peft(op_calls):
    model = get_peft_model(_llama(), _lora())
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    accelerate(model)
    ids = _inputs(batch=4, seq=8)
    losses = {}
    for key, m in (("accelerated", model), ("peft", reference)):
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        losses[key] = []
        for _ in range(5):
            loss = m(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[key].append(loss.item())
    assert losses["accelerated"][-1] < losses["accelerated"][0]
    torch.testing.assert_close(losses["accelerated"], losses["peft"], rtol=1e-5, atol=0)
    params_ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == ("lora_" in name), name
        torch.testing.assert_close(p, params_ref[name], rtol=1e-4, atol=1e-6)
    assert len(op_calls) == 5 * len(_lora_layers(model))


def test_reference_backend(op_calls):
    model = get_peft_model(_llama(), _lora(target_modules=["q_proj", "down_proj"], lora_dropout=0.1))
    model.eval()
    with peftops.use_backend("reference"):
        _check_parity(model, op_calls, _inputs())


def test_autocast_runs_on_the_op(op_calls):
    # Under autocast a LoRA layer sees bfloat16 activations and float32 weights (down_proj's
    # input is the product of two autocast GEMMs): the op casts as F.linear does, no fallback.
    model = get_peft_model(_llama(), _lora())
    ids = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(ids).logits
    report = accelerate(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = model(ids).logits
    assert actual.dtype == expected.dtype == torch.bfloat16
    assert len(op_calls) == len(report.accelerated) and not report.fallbacks
    # bfloat16 keeps 8 bits and each of the two layers rounds its sums in another order: a few
    # units in the last place of the largest logit (2**-6 is 4 of them at the scale of the max).
    atol = 2**-6 * expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-6, atol=atol)


def test_compile_fullgraph():
    model = get_peft_model(_llama(num_hidden_layers=1), _lora(target_modules=["q_proj", "down_proj"]))
    ids = _inputs()
    expected = _logits_and_grads(model, ids)
    report = accelerate(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # no graph break in the forward
    _assert_same(expected, _logits_and_grads(model, ids, call=compiled))
    assert not report.fallbacks


# -- what is left on peft's forward, and says so -----------------------------------------------


def test_gpt2_conv1d_is_accelerated(op_calls):
    model = get_peft_model(_gpt2(), _lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    ids = _inputs()
    expected = _logits_and_grads(model, ids)
    report = accelerate(model)
    _assert_same(expected, _logits_and_grads(model, ids))
    assert len(op_calls) == len(report.accelerated) == len(_lora_layers(model)) and not report.skipped
    # The op got the Conv1D's own (in, out) weight, transposed as a view, not a copy.
    conv = {id(m.base_layer.weight): m.base_layer.weight for m in _lora_layers(model).values()}
    for call in op_calls:
        w = call["weight"]
        assert w._base is not None and id(w._base) in conv and w.shape == w._base.t().shape


def test_conv1d_without_fan_in_fan_out_is_skipped(op_calls):
    model = get_peft_model(_gpt2(), _lora(target_modules=["c_attn"], fan_in_fan_out=True))
    for layer in _lora_layers(model).values():
        layer.fan_in_fan_out = False  # what no peft version leaves on a Conv1D: refused, not guessed
    with pytest.warns(PeftopsFallbackWarning, match="no LoRA layer accelerated"):
        report = accelerate(model)
    assert not report.accelerated
    assert all("fan_in_fan_out=False" in reason for reason in report.skipped.values())
    model(_inputs())
    assert not op_calls


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"use_dora": True}, "DoraLinearVariant"),
        ({"lora_bias": True}, "lora_bias"),
    ],
    ids=["dora", "lora_bias"],
)
def test_unsupported_adapters_are_skipped(config, reason, op_calls):
    model = get_peft_model(_llama(), _lora(target_modules=["q_proj", "v_proj"], **config))
    ids = _inputs()
    expected = _logits_and_grads(model, ids)
    with pytest.warns(PeftopsFallbackWarning):
        report = accelerate(model)
    assert len(report.skipped) == 4 and all(reason in r for r in report.skipped.values())
    _assert_same(expected, _logits_and_grads(model, ids))
    assert not op_calls


def test_embedding_is_skipped_by_name(op_calls):
    model = get_peft_model(_llama(), _lora(target_modules=["q_proj", "embed_tokens"]))
    report = _check_parity(model, op_calls, _inputs())
    (name,) = report.skipped
    assert name.endswith("embed_tokens") and "Embedding" in report.skipped[name]
    assert len(report.accelerated) == 2


def test_call_time_fallbacks_are_counted_and_warned_once(op_calls):
    model = get_peft_model(_llama(), _lora(target_modules=["q_proj"]))
    reference = copy.deepcopy(model)
    ids = _inputs()
    report = accelerate(model)
    assert not report.skipped
    # An adapter added after accelerate with a variant the op does not compute (DoRA): its
    # calls run peft's forward, so the output is peft's.
    for m in (model, reference):
        torch.manual_seed(6)
        m.add_adapter("dora", _lora(target_modules=["q_proj"], use_dora=True))
        m.set_adapter("dora")
    expected = reference(ids).logits
    with pytest.warns(PeftopsFallbackWarning, match="DoraLinearVariant") as record:
        actual = model(ids).logits
        model(ids)
    assert len([w for w in record if issubclass(w.category, PeftopsFallbackWarning)]) == 1  # then counted
    torch.testing.assert_close(actual, expected, **TOL)
    assert sum(report.fallbacks.values()) == 2 * 2
    assert all("DoraLinearVariant" in reason for _, reason in report.fallbacks)
    assert "calls run on peft's forward: 4" in str(report)
    assert not op_calls

    # A hook on a base layer after accelerate: peft's forward would run it, so the call falls back.
    model.set_adapter("default")
    name = report.accelerated[0]
    seen = []
    _lora_layers(model)[name].base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with pytest.warns(PeftopsFallbackWarning, match="hooks"):
        model(ids)
    assert len(seen) == 1
    assert [n for (n, reason), count in report.fallbacks.items() if "hooks" in reason and count == 1] == [name]
    assert len(op_calls) == 1  # the other layer still ran the op

    # An argument the op does not take goes to peft's forward, which passes it to the base layer.
    layer = _lora_layers(model)[report.accelerated[1]]
    with pytest.warns(PeftopsFallbackWarning, match=r"extra arguments .*\['unexpected'\]"):
        with pytest.raises(TypeError, match="unexpected"):
            layer(torch.randn(2, 64), unexpected=1)


# -- restore, and what accelerate refuses -------------------------------------------------------


def test_restore_gives_peft_forward_back(op_calls):
    model = get_peft_model(_llama(), _lora())
    ids = _inputs()
    expected = model(ids).logits
    report = accelerate(model)
    layers = _lora_layers(model)
    for layer in layers.values():
        assert layer.forward.__func__ is not lora_layer.Linear.forward
        assert isinstance(layer, lora_layer.Linear)
    assert sorted(restore(model)) == sorted(report.accelerated)
    for layer in layers.values():
        assert layer.forward.__func__ is lora_layer.Linear.forward
        assert "forward" not in vars(layer)
    op_calls.clear()
    torch.testing.assert_close(model(ids).logits, expected, **TOL)
    assert not op_calls
    with pytest.raises(ValueError, match=r"restore: model .* no layer accelerated"):
        restore(model)
    # and accelerate works again after a restore
    assert accelerate(model).accelerated == report.accelerated


def test_accelerate_twice_is_an_error():
    model = get_peft_model(_llama(), _lora(target_modules=["q_proj"]))
    accelerate(model)
    with pytest.raises(ValueError, match=r"accelerate: model \(PeftModel\) is already accelerated"):
        accelerate(model)
    # also through another handle on the same layers
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate(model.base_model.model)


def test_bad_input():
    with pytest.raises(TypeError, match=r"accelerate: model must be a torch.nn.Module.*got builtins.str"):
        accelerate("model")
    with pytest.raises(ValueError, match=r"accelerate: model \(LlamaForCausalLM\) has no peft LoRA layer"):
        accelerate(_llama())
    with pytest.raises(TypeError, match=r"restore: model must be a torch.nn.Module"):
        restore(None)
    with pytest.raises(ValueError, match="never accelerated"):
        restore(get_peft_model(_llama(), _lora(target_modules=["q_proj"])))


def test_report_str():
    report = AccelerateReport(accelerated=["a.q"], skipped={"a.c": "base layer is Conv1D"})
    text = str(report)
    assert "1 LoRA layer(s) on peftops' lora_linear, 1 left on peft's forward" in text
    assert "accelerated  a.q" in text and "skipped      a.c: base layer is Conv1D" in text
