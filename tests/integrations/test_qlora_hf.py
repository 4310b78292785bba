"""QLoRA in the Hugging Face workflow (issue 14): a tiny Llama quantised on CPU by transformers +
bitsandbytes (float32 compute, so that peftops and peft can be compared tightly) with peft's QLoRA
adapters, against peftops' ``accelerate``, ``apply_lora`` + ``load_adapter``, ``save_adapter`` and
``merge_and_unload``; and the same model quantised by ``peftops.nn.quantize_model``."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import peftops
from peftops.integrations import peft as peft_integration
from peftops.integrations.peft import PeftopsFallbackWarning
from peftops.nn import LinearNF4, LoRALinearNF4, quantize_model
from peftops.reference import nf4
from tests.integrations import hf_models

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LAYERS = 14  # 2 decoder layers x 7 projections


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense")
    hf_models.llama().save_pretrained(path)
    return path


def bnb_llama(path, quant_type: str = "nf4", double_quant: bool = True):
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    # Training mode (the tiny model's dropout is 0): in eval mode bitsandbytes repacks the weights of
    # CPUs with AVX512-BF16 for its inference kernel, which accelerate leaves to peft.
    return model.train()


def random_lora_b(model: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    # peft initialises B to zero, which would hide every error in the LoRA term.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def qlora_model(path, quant_type="nf4", double_quant=True, **lora):
    model = bnb_llama(path, quant_type, double_quant)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **lora)
    model = peft.get_peft_model(model, config)
    random_lora_b(model)
    return model


def peft_lora_grads(model) -> dict[str, torch.Tensor]:
    """LoRA gradients under peftops' names (``<m>.lora_A.weight``)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("base_model.model.").replace(".default.", ".")
            out[key] = p.grad.clone()
    return out


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach()


def assert_grads_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and len(ours) == 2 * N_LAYERS
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture
def count_nf4_calls(monkeypatch):
    """Calls of lora_linear_nf4 made by accelerated layers (a silent peft forward would make none)."""
    calls = []
    original = peft_integration.lora_linear_nf4

    def counted(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(peft_integration, "lora_linear_nf4", counted)
    return calls


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_accelerate_qlora_matches_peft(dense_dir, count_nf4_calls, quant_type, double_quant):
    model = qlora_model(dense_dir, quant_type, double_quant)
    ids = hf_models.token_ids()
    logits, loss = loss_and_grads(model, ids)
    grads = peft_lora_grads(model)

    report = peftops.accelerate(model)
    assert len(report.accelerated) == N_LAYERS and report.quantized == report.accelerated
    assert not report.skipped
    assert "lora_linear_nf4" in str(report)
    ours_logits, ours_loss = loss_and_grads(model, ids)
    assert len(count_nf4_calls) == N_LAYERS
    assert not report.fallbacks
    torch.testing.assert_close(ours_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loss, loss, rtol=1e-5, atol=1e-6)
    assert_grads_close(peft_lora_grads(model), grads)
    # The 4-bit bases stay frozen and bitsandbytes': nothing was converted.
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.grad is None

    peftops.restore(model)
    torch.testing.assert_close(loss_and_grads(model, ids)[0], logits, rtol=0, atol=0)


def test_accelerate_qlora_mixed_batch_and_disabled(dense_dir, count_nf4_calls):
    model = qlora_model(dense_dir)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    random_lora_b(model, seed=1)
    # peft takes adapter_names in eval mode only; keep bitsandbytes' layout there (see bnb_llama).
    model.eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    ids = hf_models.token_ids()
    names = ["default", "__base__", "other"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        with model.disable_adapter():
            base = model(ids).logits
    report = peftops.accelerate(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=names).logits, mixed, rtol=1e-5, atol=1e-5)
        assert len(count_nf4_calls) == N_LAYERS + 4  # "default" everywhere, "other" on 2 x (q, v)
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)
    assert not report.fallbacks


def test_load_adapter_into_bnb_model_matches_peft(dense_dir, tmp_path):
    model = qlora_model(dense_dir)
    model.save_pretrained(tmp_path)
    ids = hf_models.token_ids()
    logits, loss = loss_and_grads(model, ids)
    grads = peft_lora_grads(model)

    ours = peftops.load_adapter(bnb_llama(dense_dir), tmp_path)
    layers = [m for m in ours.modules() if isinstance(m, LoRALinearNF4)]
    assert len(layers) == N_LAYERS
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in ours.modules())
    ours_logits, ours_loss = loss_and_grads(ours, ids)
    torch.testing.assert_close(ours_logits, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loss, loss, rtol=1e-5, atol=1e-6)
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert_grads_close(ours_grads, grads)


def test_quantize_model_trains_and_peft_loads_on_bnb_twin(dense_dir, tmp_path):
    model = quantize_model(hf_models.llama())
    assert sum(isinstance(m, LinearNF4) for m in model.modules()) == N_LAYERS
    # The bnb twin: transformers' 4-bit checkpoint holding peftops' quantisation of the same weights
    # (bnb's CPU library picks some double-quantisation codes differently, see reference/nf4.py).
    bnb_llama(dense_dir).save_pretrained(tmp_path / "twin")
    (file,) = (tmp_path / "twin").glob("*.safetensors")
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(file), metadata={"format": "pt"})

    peftops.apply_lora(model, TARGETS, r=4, alpha=8)
    random_lora_b(model, std=0.02)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(lora) == 2 * N_LAYERS and all("lora_" in n for n in lora)
    ids = hf_models.token_ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = model.state_dict()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)

    peftops.save_adapter(model, tmp_path / "adapter")
    twin = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "twin", device_map="cpu", dtype=torch.float32)
    twin.train()
    assert isinstance(twin.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    theirs = peft.PeftModel.from_pretrained(twin, tmp_path / "adapter")
    assert isinstance(theirs.base_model.model.model.layers[0].mlp.up_proj, peft.tuners.lora.bnb.Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_requantises_with_warning(dense_dir, tmp_path):
    dense = hf_models.llama()
    model = peftops.apply_lora(bnb_llama(dense_dir), TARGETS, r=4, alpha=8)
    random_lora_b(model, std=0.02)
    ids = hf_models.token_ids()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinearNF4)}
    expected = {}
    for name, layer in layers.items():
        target = layer.dequantize().float() + layer.delta_weight().detach()
        packed, state = nf4.quantize_4bit(target, quant_type="nf4", compress_statistics=True)
        expected[name] = (target, nf4.dequantize_4bit(packed, state), nf4.dequantize_absmax(state))
    with torch.no_grad():
        unmerged = model(ids).logits
        quantisation_error = (dense(ids).logits - bnb_llama(dense_dir)(ids).logits).abs().max()

    with pytest.warns(UserWarning, match="4-bit weight quantises W \\+ s B A again") as record:
        merged = peftops.merge_and_unload(model)
    assert sum("4-bit" in str(w.message) for w in record) == N_LAYERS
    for name, (target, requantised, absmax) in expected.items():
        unwrapped = merged.get_submodule(name)
        assert isinstance(unwrapped, LinearNF4) and not isinstance(unwrapped, LoRALinearNF4)
        w = unwrapped.dequantize()
        assert torch.equal(w, requantised), name
        # Rounding bound: half NF4's widest code gap times the block's absmax, plus the error of the
        # double-quantised absmax itself.
        true_absmax = target.reshape(-1, 64).abs().amax(1)
        bound = 0.5 * 0.3038 * true_absmax + (absmax - true_absmax).abs() + 1e-6
        assert ((w - target).reshape(-1, 64).abs() <= bound[:, None]).all(), name
    with torch.no_grad():
        out = merged(ids).logits
    # Requantising costs about as much as quantising the dense model did once; a merge that dropped
    # or doubled the update would be off by the adapter's whole effect.
    assert 0 < (out - unmerged).abs().max() <= 2 * quantisation_error

    # LinearNF4 keeps bitsandbytes' state-dict keys: transformers loads the merged model as Linear4bit.
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", device_map="cpu").train()
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, out, rtol=0, atol=1e-6)


def test_accelerate_dora_on_4bit_falls_back(dense_dir):
    model = qlora_model(dense_dir, use_dora=True)
    ids = hf_models.token_ids()
    with torch.no_grad():
        before = model(ids).logits
    with pytest.warns(PeftopsFallbackWarning, match="no LoRA layer accelerated"):
        report = peftops.accelerate(model)
    assert not report.accelerated and not report.quantized and len(report.skipped) == N_LAYERS
    assert all("DoraLinearVariant" in reason for reason in report.skipped.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_accelerate_4bit_compute_dtype_mismatch_falls_back(dense_dir, count_nf4_calls):
    model = qlora_model(dense_dir)
    ids = hf_models.token_ids()
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    layer.base_layer.compute_dtype = torch.bfloat16  # as bnb_4bit_compute_dtype=bfloat16
    with torch.no_grad():
        expected = model(ids).logits
    report = peftops.accelerate(model)
    assert len(report.accelerated) == N_LAYERS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = model(ids).logits
    assert len(count_nf4_calls) == N_LAYERS - 1
    ((name, reason),) = report.fallbacks
    assert name.endswith("layers.1.self_attn.v_proj") and "computes in torch.bfloat16" in reason
    assert [w.category for w in caught] == [PeftopsFallbackWarning]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_accelerate_4bit_weight_quantised_from_another_dtype_runs_on_the_op(dense_dir, count_nf4_calls):
    """A weight quantised from bfloat16, run in float32: bitsandbytes 0.50 dequantises straight
    to float32 (one rounding of the float32 product), and so does the op: no fallback."""
    model = qlora_model(dense_dir)
    ids = hf_models.token_ids()
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    layer.base_layer.weight.quant_state.dtype = torch.bfloat16
    with torch.no_grad():
        expected = model(ids).logits
    report = peftops.accelerate(model)
    with torch.no_grad():
        out = model(ids).logits
    assert len(count_nf4_calls) == N_LAYERS and not report.fallbacks
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
