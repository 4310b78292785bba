"""peftops.integrations.generate: one adapter per row under transformers' generate(), in every
mode that repeats rows (beam search, num_return_sequences), against single-adapter runs and
against peft's mixed-batch generate (``adapter_names=``) with the same weights."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.integrations import hf_models

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import peftops  # noqa: E402
from peftops.integrations.generate import generate  # noqa: E402
from peftops.nn import MultiLoRALinear, add_adapter, apply_lora, set_batch_adapters  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
ADAPTERS = {"a": (4, 8.0), "b": (2, 4.0)}  # name -> (r, alpha); a in slot 0, b in slot 1
ROWS = ["a", None, "b"]  # None: the base model
NEW = 3
# Each mode also takes the ids in another of the forms set_batch_adapters accepts.
MODES = {
    "greedy": ({}, ROWS),
    "beam": ({"num_beams": 3}, torch.tensor([0, -1, 1])),
    "sample": ({"do_sample": True, "num_return_sequences": 2, "top_k": 0}, [0, -1, "b"]),
    "beam_nrs": ({"num_beams": 3, "num_return_sequences": 2}, ["a", -1, 1]),
}


def llama():
    # No end-of-sequence token: every row runs to max_new_tokens, so a row generated alone has
    # the batch's length and rows compare whole.
    return hf_models.llama(eos_token_id=None)


def multi_model():
    model = llama()
    apply_lora(model, TARGETS, r=4, alpha=1.0, capacity=3)
    for name, (r, alpha) in ADAPTERS.items():
        add_adapter(model, name, r, alpha)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # random B (add_adapter's is zeros), so each adapter changes the tokens
        for layer in model.modules():
            if isinstance(layer, MultiLoRALinear):
                layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    # What is under test is which adapter each row gets, not the kernels (tests/kernels): the
    # reference backend keeps dozens of generate() calls cheap where Triton would be interpreted.
    with peftops.use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def model():
    return multi_model()


@pytest.fixture(scope="module")
def mixed_runs():
    """mode -> the mixed batch's output, shared by the tests that compare it with something."""
    return {}


@pytest.fixture(scope="module")
def base():
    return llama().eval()


@pytest.fixture(scope="module")
def prompts():
    return hf_models.token_ids(batch=len(ROWS), seq=6)


def run(model, ids, seed=0, **kw):
    torch.manual_seed(seed)
    return model.generate(ids, max_new_tokens=NEW, pad_token_id=0, **kw)


def run_ids(model, ids, adapter_ids, seed=0, **kw):
    torch.manual_seed(seed)
    return generate(model, ids, adapter_ids=adapter_ids, max_new_tokens=NEW, pad_token_id=0, **kw)


def layers(model):
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


@pytest.mark.parametrize("mode", MODES)
def test_each_row_generates_as_its_adapter_alone(model, base, prompts, mixed_runs, mode):
    kw, ids = MODES[mode]
    per = kw.get("num_return_sequences", 1)  # rows returned per input row
    mixed = mixed_runs[mode] = run_ids(model, prompts, ids, **kw)
    assert mixed.shape[0] == len(ROWS) * per
    plain = run(base, prompts, **kw)
    if kw.get("do_sample"):
        # Alone, a row would draw other random numbers. The whole batch under one adapter with
        # the same seed draws each row from its own distribution with the generator in the same
        # state, so the rows of that adapter must agree.
        single = {name: run_ids(model, prompts, [name] * len(ROWS), **kw) for name in ADAPTERS}
    else:
        single = {name: run_ids(model, prompts[i : i + 1], [name], **kw) for i, name in enumerate(ROWS) if name}
    for i, name in enumerate(ROWS):
        rows = slice(i * per, (i + 1) * per)
        if name is None:
            assert torch.equal(mixed[rows], plain[rows]), (mode, i)
            continue
        expected = single[name][rows] if kw.get("do_sample") else single[name]
        assert torch.equal(mixed[rows], expected), (mode, i, name)
        assert not torch.equal(mixed[rows], plain[rows]), (mode, i, name)  # the adapter is not a no-op here


@pytest.fixture(scope="module")
def peft_model(model):
    """peft's LoRA on the same base weights, with adapters a and b copied from ``model``'s slots."""
    configs = {
        name: peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
        for name, (r, alpha) in ADAPTERS.items()
    }
    theirs = peft.get_peft_model(llama(), configs["a"], adapter_name="a")
    theirs.add_adapter("b", configs["b"])
    ours = dict(model.named_modules())
    with torch.no_grad():
        for name, module in theirs.base_model.model.named_modules():
            if not isinstance(module, peft.tuners.lora.LoraLayer):
                continue
            layer = ours[name]
            for adapter, (r, _) in ADAPTERS.items():
                slot = layer.adapter_id(adapter)
                module.lora_A[adapter].weight.copy_(layer.lora_A[slot, :r])
                module.lora_B[adapter].weight.copy_(layer.lora_B[slot, :, :r])
                assert module.scaling[adapter] == pytest.approx(float(layer.scales[slot]))
    return theirs.eval()


@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_matches_peft_mixed_batch_generate(model, peft_model, prompts, mixed_runs, mode):
    kw, ids = MODES[mode]
    names = ["__base__" if r is None else r for r in ROWS]
    expected = peft_model.generate(input_ids=prompts, adapter_names=names, max_new_tokens=NEW, pad_token_id=0, **kw)
    mixed = mixed_runs[mode] if mode in mixed_runs else run_ids(model, prompts, ids, **kw)
    assert torch.equal(mixed, expected)


def tiny_t5():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=None,
    )
    return _with_adapter_a(transformers.T5ForConditionalGeneration(config), ["q", "v"])


def _with_adapter_a(model, targets):
    """LoRA banks on ``targets`` holding adapter "a" (r4), its B random so that it changes outputs."""
    apply_lora(model, targets, r=4, alpha=1.0, capacity=2)
    add_adapter(model, "a", 4, 8.0)
    with torch.no_grad():
        for layer in layers(model):
            layer.lora_B.copy_(0.5 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def test_encoder_decoder_runs_its_encoder_on_the_rows_before_they_are_repeated():
    # The encoder sees B rows and the decoder B * num_beams: the ids must follow both.
    model = tiny_t5()
    prompts = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    kw = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": NEW}
    rows = ["a", None, "a"]
    mixed = generate(model, prompts, adapter_ids=rows, **kw)
    for i, name in enumerate(rows):
        alone = generate(model, prompts[i : i + 1], adapter_ids=[name], **kw)
        assert torch.equal(mixed[2 * i : 2 * i + 2], alone), (i, name)
    assert not torch.equal(mixed[:2], generate(model, prompts[:1], adapter_ids=[None], **kw))


class Boom(transformers.StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


def test_previous_ids_and_the_model_come_back_also_on_error(model, prompts):
    before = torch.tensor([1, -1, 0])
    set_batch_adapters(model, before)
    try:
        generate(model, prompts, adapter_ids=ROWS, num_beams=3, max_new_tokens=1, pad_token_id=0)
        assert all(layer._batch_ids is before for layer in layers(model))
        assert "_expand_inputs_for_generation" not in model.__dict__
        # The criteria run after the expansion, with the ids repeated for 9 rows.
        criteria = transformers.StoppingCriteriaList([Boom()])
        with pytest.raises(RuntimeError, match="boom"):
            run_ids(model, prompts, ROWS, num_beams=3, stopping_criteria=criteria)
        assert all(layer._batch_ids is before for layer in layers(model))
        assert "_expand_inputs_for_generation" not in model.__dict__
    finally:
        set_batch_adapters(model, None)


def test_plain_generate_with_beams_says_why_the_ids_do_not_fit(model, prompts):
    # The failure, now an error that points to the fix instead of the op's shape message.
    set_batch_adapters(model, ROWS)
    try:
        with pytest.raises(ValueError, match=r"got shape \(3,\) from set_batch_adapters.*peftops\.generate"):
            run(model, prompts, num_beams=3)
    finally:
        set_batch_adapters(model, None)


def test_bad_adapter_ids_are_refused_by_name(model, base, prompts):
    cases = [
        (ValueError, r"generate: adapter_ids: expected one per row of the inputs \(3 rows\), got 2", ROWS[:2]),
        (ValueError, r"generate: adapter_ids: .*no adapter named 'zed'", ["a", "zed", None]),
        (ValueError, r"generate: adapter_ids: .*adapter id 2 is not a slot in use", [0, 2, None]),
        (TypeError, r"generate: adapter_ids: expected a list .* got str", "a"),
        (TypeError, r"generate: adapter_ids: .*got float", ["a", 1.0, None]),
        (TypeError, r"generate: adapter_ids: expected a signed integer tensor .* got torch.float32", torch.zeros(3)),
        (ValueError, r"generate: adapter_ids: expected one id per row, shape \(B,\), got shape \(3, 6\)", prompts),
        # Empty either way is the same mistake, and says so the same way.
        (ValueError, r"generate: adapter_ids: expected one per row of the inputs, got an empty list", []),
        (
            ValueError,
            r"generate: adapter_ids: expected one per row of the inputs, got an empty tensor",
            torch.tensor([], dtype=torch.long),
        ),
    ]
    for error, match, ids in cases:
        with pytest.raises(error, match=match):
            generate(model, prompts, adapter_ids=ids, max_new_tokens=2, pad_token_id=0)
        assert all(layer._batch_ids is None for layer in layers(model))
    with pytest.raises(ValueError, match=r"generate: adapter_ids: expected a model with MultiLoRALinear layers"):
        generate(base, prompts, adapter_ids=ROWS, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"generate: model: expected a transformers model with generate\(\), got int"):
        generate(3, prompts, adapter_ids=ROWS)


def test_a_nested_call_is_refused_and_the_patch_keeps_the_signature(model, prompts):
    # A nested call would repeat the ids again and, on its way out, put back the outer call's.
    seen = {}

    class Nested(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            if not seen:
                parameters = inspect.signature(model._expand_inputs_for_generation).parameters
                seen["default"] = parameters["expand_size"].default if "expand_size" in parameters else None
                try:
                    generate(model, prompts, adapter_ids=ROWS, max_new_tokens=1, pad_token_id=0)
                except RuntimeError as e:
                    seen["error"] = str(e)
            return scores

    processors = transformers.LogitsProcessorList([Nested()])
    nested = run_ids(model, prompts, ROWS, num_beams=3, logits_processor=processors)
    assert seen["error"] == "generate: model: already inside peftops.generate (not reentrant)"
    assert (
        seen["default"]
        == inspect.signature(type(model)._expand_inputs_for_generation).parameters["expand_size"].default
    )
    assert torch.equal(nested, run_ids(model, prompts, ROWS, num_beams=3))
    assert "_expand_inputs_for_generation" not in model.__dict__
    assert all(layer._batch_ids is None for layer in layers(model))


def tiny_whisper(lora: bool = True):
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=64,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=8,  # 16 input frames, halved by the second convolution
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
        decoder_start_token_id=3,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    model = transformers.WhisperForConditionalGeneration(config)
    return _with_adapter_a(model, ["q_proj", "v_proj"]) if lora else model.eval()


def test_whisper_keeps_its_own_prompt_ids_and_its_features_count_the_rows():
    # Whisper's generate(prompt_ids=) takes the prompt's token ids; a model without prompt tuning
    # has no prompt bank for peftops' prompt_ids to mean, so they go to Whisper as they are.
    model = tiny_whisper()
    features = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(4))
    tokens = torch.tensor([5, 6])
    kw = {"max_new_tokens": NEW, "num_beams": 2}
    rows = ["a", None]
    mixed = generate(model, input_features=features, adapter_ids=rows, prompt_ids=tokens, **kw)
    for i, name in enumerate(rows):
        alone = generate(model, input_features=features[i : i + 1], adapter_ids=[name], prompt_ids=tokens, **kw)
        assert torch.equal(mixed[i : i + 1], alone), (i, name)
    assert not torch.equal(mixed, generate(model, input_features=features, adapter_ids=rows, **kw))
    # The base row is what Whisper's own generate makes of the same prompt.
    assert torch.equal(mixed[1:], tiny_whisper(lora=False).generate(features[1:], prompt_ids=tokens, **kw))
    # The rows are counted from input_features, before the encoder runs on them.
    calls = []
    handle = model.model.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(
            ValueError, match=r"generate: adapter_ids: expected one per row of the inputs \(2 rows\), got 3"
        ):
            generate(model, input_features=features, adapter_ids=["a", None, "a"], **kw)
    finally:
        handle.remove()
    assert not calls
    assert all(layer._batch_ids is None for layer in layers(model))
