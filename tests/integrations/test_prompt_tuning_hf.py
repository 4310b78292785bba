"""Prompt tuning and P-tuning on transformers models, against the real peft (CPU, float32, tiny models).

peft's model and peftops' model get the same prompt weights and the same call; logits, losses,
the prompt's gradients, greedy generations and checkpoints must agree.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peft import PeftModel, PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402

from peftops.integrations.checkpoint import load_adapter, save_adapter  # noqa: E402
from peftops.integrations.prompt_tuning import (  # noqa: E402
    PromptEncoder,
    apply_prompt_tuning,
    load_peft_prompt,
    peft_prompt_state,
    remove_prompt_tuning,
)
from peftops.nn.surgery import apply_lora  # noqa: E402
from tests.integrations import hf_models  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
P = 4


@pytest.fixture(autouse=True)
def _quiet():
    # Both peft and peftops warn that position_ids are ignored (generate() passes them).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]osition ids.*")
        warnings.filterwarnings("ignore", message=".*position_ids.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _batch(seq=6):
    """Left-padded batch: row 0 has two padding tokens."""
    ids = hf_models.token_ids(2, seq)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _bert_cls():
    return hf_models.bert(head="cls")


def _pair(factory, peft_config, **kwargs):
    """(peft model, peftops model) on two copies of the same base, same prompt weights."""
    theirs = get_peft_model(factory(), peft_config)
    mine = apply_prompt_tuning(factory(), P, **kwargs)
    encoder = theirs.prompt_encoder["default"]
    with torch.no_grad():
        if isinstance(mine.peftops_prompt, PromptEncoder):
            missing = mine.peftops_prompt.load_state_dict(encoder.state_dict())
            assert not missing.missing_keys and not missing.unexpected_keys
        else:
            encoder.embedding.weight.normal_(generator=torch.Generator().manual_seed(5))
            mine.peftops_prompt.weight.copy_(encoder.embedding.weight)
    return theirs, mine


def _prompt_grads(model):
    """By peft's parameter names (a PromptEmbedding's ``weight`` is peft's ``embedding.weight``)."""
    if isinstance(model, PeftModel):
        return {n: p.grad for n, p in model.prompt_encoder["default"].named_parameters()}
    return {"embedding.weight" if n == "weight" else n: p.grad for n, p in model.peftops_prompt.named_parameters()}


def _logits(model, *args, **kwargs):
    model.eval()
    with torch.no_grad():
        return model(*args, **kwargs).logits


# -- forward and backward parity -------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoder, peft_config",
    [
        (None, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)),
        ("mlp", PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=64)),
    ],
    ids=["prompt", "p-tuning-mlp"],
)
def test_causal_lm_matches_peft(encoder, peft_config):
    kwargs = {"encoder": encoder, "encoder_hidden_size": peft_config.encoder_hidden_size} if encoder else {}
    theirs, mine = _pair(hf_models.llama, peft_config, **kwargs)
    ids, mask, labels = _batch()
    out_t = theirs(input_ids=ids, attention_mask=mask, labels=labels)
    out_m = mine(input_ids=ids, attention_mask=mask, labels=labels)  # the user's call, unchanged
    assert out_m.logits.shape == (2, P + ids.shape[1], hf_models.VOCAB)
    torch.testing.assert_close(out_m.logits, out_t.logits, **TOL)
    torch.testing.assert_close(out_m.loss, out_t.loss, **TOL)
    out_t.loss.backward()
    out_m.loss.backward()
    grads_t, grads_m = _prompt_grads(theirs), _prompt_grads(mine)
    assert set(grads_m) == set(grads_t)  # peft's parameter names
    for name, grad in grads_t.items():
        assert grad is not None and grad.abs().sum() > 0
        torch.testing.assert_close(grads_m[name], grad, rtol=1e-4, atol=1e-6)
    # The base model is frozen and gets no gradient.
    assert all(p.grad is None for n, p in mine.named_parameters() if not n.startswith("peftops_prompt."))


def test_positional_call_and_inputs_embeds():
    theirs, mine = _pair(hf_models.llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    ids, mask, _ = _batch()
    expected = _logits(theirs, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(_logits(mine, ids, mask), expected, **TOL)
    embeds = mine.get_input_embeddings()(ids)
    torch.testing.assert_close(_logits(mine, inputs_embeds=embeds, attention_mask=mask), expected, **TOL)
    # Positions the user numbered for their own tokens are dropped with a warning, as peft drops them.
    positions = torch.arange(ids.shape[1]).expand(2, -1) + 7
    with pytest.warns(UserWarning, match="apply_prompt_tuning: position_ids"):
        torch.testing.assert_close(_logits(mine, ids, mask, position_ids=positions), expected, **TOL)


def test_sequence_classification_matches_peft():
    theirs, mine = _pair(_bert_cls, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    ids, mask, _ = _batch()
    token_type_ids = torch.zeros_like(ids)
    token_type_ids[:, 3:] = 1  # peft prepends zeros for the prompt
    labels = torch.tensor([0, 2])
    call = dict(input_ids=ids, attention_mask=mask, token_type_ids=token_type_ids, labels=labels)
    out_t, out_m = theirs(**call), mine(**call)
    assert out_m.logits.shape == (2, 3)
    torch.testing.assert_close(out_m.logits, out_t.logits, **TOL)
    torch.testing.assert_close(out_m.loss, out_t.loss, **TOL)
    out_t.loss.backward()
    out_m.loss.backward()
    torch.testing.assert_close(
        _prompt_grads(mine)["embedding.weight"], _prompt_grads(theirs)["embedding.weight"], rtol=1e-4, atol=1e-6
    )
    # The token types reach the model: other types change the output.
    other = _logits(mine, input_ids=ids, attention_mask=mask)
    assert not torch.allclose(other, out_m.logits.detach(), **TOL)


# -- generate --------------------------------------------------------------------------------------


def test_generate_greedy_matches_peft():
    theirs, mine = _pair(hf_models.llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    theirs.eval()
    mine.eval()
    ids, mask, _ = _batch(5)
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        # Greedy decoding by full forwards through peft's model: the definition of the answer.
        seq, seq_mask = ids, mask
        for _ in range(6):
            nxt = theirs(input_ids=seq, attention_mask=seq_mask).logits[:, -1].argmax(-1, keepdim=True)
            seq, seq_mask = torch.cat([seq, nxt], 1), torch.cat([seq_mask, torch.ones_like(nxt)], 1)
        peft_no_cache = theirs.generate(**args, use_cache=False)
        cached = mine.generate(**args, use_cache=True)
        uncached = mine.generate(**args, use_cache=False)
    assert torch.equal(peft_no_cache, seq)
    # peft 0.21's cached prompt-tuning generation re-injects the prompt at every step under
    # transformers >= 5.x's `cache` argument (it looks for `past_key_values`), so its cached
    # output is not the reference: its uncached output and its own forward are.
    assert torch.equal(uncached, seq)
    assert torch.equal(cached, seq)


def test_incremental_decoding_with_cache_adds_the_prompt_once():
    _, mine = _pair(hf_models.llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    mine.eval()
    ids, mask, _ = _batch()
    with torch.no_grad():
        full = mine(input_ids=ids, attention_mask=mask).logits[:, -1]
        first = mine(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = first.cache if "cache" in first else first.past_key_values
        assert cache.get_seq_length() == P + ids.shape[1] - 1
        step = mine(input_ids=ids[:, -1:], attention_mask=mask, cache=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, **TOL)


# -- init ------------------------------------------------------------------------------------------


def _tokenizer(path):
    """A word-level tokenizer over the tiny vocabulary, saved so that peft can load it by name."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(hf_models.VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="w0").save_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("text", ["w5 w9 w17", "w3 w4 w5 w6 w7 w8 w9"], ids=["repeated", "truncated"])
def test_text_init_matches_peft(tmp_path, text):
    tokenizer = _tokenizer(tmp_path)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path),
    )
    theirs = get_peft_model(hf_models.llama(), config)
    mine = apply_prompt_tuning(hf_models.llama(), P, text, tokenizer=tokenizer)
    expected = theirs.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(mine.peftops_prompt.weight, expected, rtol=0, atol=0)
    ids = tokenizer(text)["input_ids"]
    want = (ids * P)[:P]
    torch.testing.assert_close(expected, mine.get_input_embeddings().weight[want], rtol=0, atol=0)
    saved, _ = peft_prompt_state(mine)
    assert saved["prompt_tuning_init"] == "TEXT" and saved["prompt_tuning_init_text"] == text
    assert saved["tokenizer_name_or_path"] == str(tmp_path)


# -- checkpoints -----------------------------------------------------------------------------------

CHECKPOINT_CASES = [
    (hf_models.llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P), {}),
    (_bert_cls, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P), {}),
    (
        hf_models.llama,
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=32),
        {"encoder": "mlp", "encoder_hidden_size": 32},
    ),
]
CHECKPOINT_IDS = ["llama-prompt", "bert-cls-prompt", "llama-p-tuning"]


def _train_head(model):
    """A trained classification head, if ``model`` has one: a reload with a fresh head would differ."""
    head = getattr(model, "classifier", None)
    if isinstance(head, peft.utils.other.ModulesToSaveWrapper):
        head = head.modules_to_save["default"]
    if head is not None:
        with torch.no_grad():
            head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("factory, peft_config, kwargs", CHECKPOINT_CASES, ids=CHECKPOINT_IDS)
def test_peft_checkpoint_loads_into_peftops(tmp_path, factory, peft_config, kwargs):
    theirs, _ = _pair(factory, peft_config, **kwargs)
    _train_head(theirs.base_model)
    theirs.save_pretrained(tmp_path)
    ids, mask, _ = _batch()
    expected = _logits(theirs, input_ids=ids, attention_mask=mask)
    mine = load_adapter(factory(), tmp_path)
    torch.testing.assert_close(_logits(mine, input_ids=ids, attention_mask=mask), expected, **TOL)
    assert all(p.requires_grad for p in mine.peftops_prompt.parameters())


@pytest.mark.parametrize("factory, peft_config, kwargs", CHECKPOINT_CASES, ids=CHECKPOINT_IDS)
def test_peftops_checkpoint_loads_into_peft(tmp_path, factory, peft_config, kwargs):
    _, mine = _pair(factory, peft_config, **kwargs)
    _train_head(mine)
    ids, mask, _ = _batch()
    expected = _logits(mine, input_ids=ids, attention_mask=mask)
    save_adapter(mine, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_config.peft_type.value
    theirs = PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(_logits(theirs, input_ids=ids, attention_mask=mask), expected, **TOL)
    # And back: peftops reads its own checkpoint to the same function.
    again = load_adapter(factory(), tmp_path)
    torch.testing.assert_close(_logits(again, input_ids=ids, attention_mask=mask), expected, **TOL)


# -- training, removal -----------------------------------------------------------------------------


def test_sequence_classifier_head_trains_as_peft():
    theirs = get_peft_model(_bert_cls(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    peft_trainable = {
        n.replace("base_model.", "").replace("modules_to_save.default.", "")
        for n, p in theirs.named_parameters()
        if p.requires_grad and "prompt_encoder" not in n
    }
    mine = apply_prompt_tuning(_bert_cls(), P)
    mine_trainable = {n for n, p in mine.named_parameters() if p.requires_grad}
    assert mine_trainable == peft_trainable | {"peftops_prompt.weight"}
    assert peft_trainable == {"classifier.weight", "classifier.bias"}
    frozen = apply_prompt_tuning(_bert_cls(), P, train_head=False)
    assert [n for n, p in frozen.named_parameters() if p.requires_grad] == ["peftops_prompt.weight"]
    with pytest.raises(ValueError, match="apply_prompt_tuning: train_head: expected None or False for a CAUSAL_LM"):
        apply_prompt_tuning(hf_models.llama(), P, train_head=True)
    # An earlier apply_lora that keeps the head trainable contradicts train_head=False: refused, untouched.
    saved = apply_lora(_bert_cls(), ["query"], r=2, alpha=4, modules_to_save=["classifier"])
    with pytest.raises(ValueError, match=r"train_head: expected None or True .*modules_to_save=\['classifier'\]"):
        apply_prompt_tuning(saved, P, train_head=False)
    assert not hasattr(saved, "peftops_prompt")


def test_training_changes_only_the_prompt_and_lowers_the_loss():
    model = apply_prompt_tuning(hf_models.llama(), P)
    base = {k: v.clone() for k, v in hf_models.llama().state_dict().items()}
    prompt_before = model.peftops_prompt.weight.detach().clone()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["peftops_prompt.weight"]
    ids, mask, labels = _batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert set(state) == set(base) | {"peftops_prompt.weight"}  # base keys unchanged
    for key, value in base.items():
        assert torch.equal(state[key], value), key
    assert not torch.equal(model.peftops_prompt.weight, prompt_before)


def test_remove_prompt_tuning_restores_the_model():
    model = hf_models.llama()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask, _ = _batch()
    expected = _logits(model, input_ids=ids, attention_mask=mask)
    apply_prompt_tuning(model, P)
    assert _logits(model, input_ids=ids, attention_mask=mask).shape[1] == P + ids.shape[1]
    assert remove_prompt_tuning(model) is model
    torch.testing.assert_close(_logits(model, input_ids=ids, attention_mask=mask), expected, rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert set(model.state_dict()) == set(hf_models.llama().state_dict())
    apply_prompt_tuning(model, P)  # and it can be applied again


def test_remove_puts_back_a_head_a_checkpoint_replaced(tmp_path):
    theirs, _ = _pair(_bert_cls, PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
    _train_head(theirs.base_model)
    theirs.save_pretrained(tmp_path)
    model = _bert_cls()
    head = model.classifier.weight.detach().clone()
    load_adapter(model, tmp_path)
    assert not torch.equal(model.classifier.weight, head)
    remove_prompt_tuning(model)
    assert torch.equal(model.classifier.weight, head)


# -- bad input -------------------------------------------------------------------------------------


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="apply_prompt_tuning: tokenizer"):
        apply_prompt_tuning(hf_models.llama(), P, "w1 w2")
    with pytest.raises(ValueError, match="apply_prompt_tuning: num_virtual_tokens"):
        apply_prompt_tuning(hf_models.llama(), 0)
    with pytest.raises(TypeError, match="apply_prompt_tuning: num_virtual_tokens"):
        apply_prompt_tuning(hf_models.llama(), 2.0)
    with pytest.raises(ValueError, match="apply_prompt_tuning: encoder: .*'gru'"):
        apply_prompt_tuning(hf_models.llama(), P, encoder="gru")
    with pytest.raises(TypeError, match="apply_prompt_tuning: model: .*BertForMaskedLM"):
        apply_prompt_tuning(hf_models.bert(head="mlm"), P)
    with pytest.raises(TypeError, match="apply_prompt_tuning: model: expected an nn.Module"):
        apply_prompt_tuning("llama", P)
    model = apply_prompt_tuning(hf_models.llama(), P)
    with pytest.raises(ValueError, match="apply_prompt_tuning: model: .*already"):
        apply_prompt_tuning(model, P)
    ids, mask, _ = _batch()
    with pytest.raises(ValueError, match="apply_prompt_tuning: attention_mask: expected a 2-D"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    with pytest.raises(ValueError, match="remove_prompt_tuning: model"):
        remove_prompt_tuning(hf_models.llama())


def _checkpoint():
    config, tensors = peft_prompt_state(apply_prompt_tuning(hf_models.llama(), P))
    config.update(task_type="CAUSAL_LM", inference_mode=True, base_model_name_or_path=None)
    return config, tensors


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda c, t: c.update(some_new_field=1), "load_adapter: some_new_field"),
        (lambda c, t: c.update(num_transformer_submodules=2), "load_adapter: num_transformer_submodules"),
        (lambda c, t: c.update(token_dim=32), "load_adapter: token_dim"),
        (lambda c, t: c.update(task_type="SEQ_CLS"), "load_adapter: task_type"),
        (lambda c, t: c.update(prompt_tuning_init="ZEROS"), "load_adapter: prompt_tuning_init"),
        (lambda c, t: c.update(peft_type="LORA"), "load_adapter: peft_type"),
        (lambda c, t: t.update(prompt_embeddings=torch.zeros(P + 1, 64)), "load_adapter: prompt_embeddings"),
        (lambda c, t: t.update({"base_model.nowhere.weight": torch.zeros(1)}), "base_model.nowhere.weight"),
    ],
    ids=["unknown-field", "submodules", "token-dim", "task-type", "init", "peft-type", "shape", "stray-key"],
)
def test_bad_checkpoints_are_named(change, match):
    config, tensors = _checkpoint()
    change(config, tensors)
    model = hf_models.llama()
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=match):
        load_peft_prompt(model, config, tensors, "default")
    assert set(model.state_dict()) == keys  # nothing was applied
    config, tensors = _checkpoint()
    with pytest.raises(ValueError, match="load_adapter: adapter_name"):
        load_peft_prompt(hf_models.llama(), config, tensors, "other")
