"""Prefix tuning on transformers models (peftops.integrations.prefix_tuning) against the real peft.

peft and peftops get the same prefix weights; their logits, the prefix's gradients, greedy
generation and checkpoints must agree (CPU, float32, tiny models).

peft 0.21.2's own ``generate()`` does not run its prefix on transformers 5.24 (it injects the
prefix as ``past_key_values``, which transformers now ignores next to its ``cache``; without a
cache the prefix cache is reused and grows across steps). The greedy reference is therefore
peft's forward in a loop, fed what ``generate()`` feeds a model: the whole sequence, the grown
attention mask and ``position_ids`` from the mask's cumulative sum (peft shifts them by the
prefix length).
"""

from __future__ import annotations

import warnings

import pytest
import torch

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402

from peftops.integrations import prefix_tuning as pt  # noqa: E402
from peftops.integrations.checkpoint import load_adapter, save_adapter  # noqa: E402
from peftops.nn import PrefixKV  # noqa: E402
from tests.integrations import hf_models  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
P = 3
FACTORIES = [hf_models.llama, hf_models.qwen2, hf_models.mistral, hf_models.gpt2]


@pytest.fixture(autouse=True)
def _quiet():
    # peft passes past_key_values, which transformers 5 renames (FutureWarning per call).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _peft(factory, **config):
    return get_peft_model(factory(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **config))


def _peft_weight(peft_model):
    return peft_model.prompt_encoder["default"].embedding.weight


def _ours_from(factory, peft_model):
    model = pt.apply_prefix_tuning(factory(), P)
    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P}
    return pt.load_peft_prefix(model, config, {"prompt_embeddings": _peft_weight(peft_model).detach()})


def _batch():
    ids = hf_models.token_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


def _flat_grad(model):
    """Our prefix gradient in peft's (P, layers * 2 * Hkv * D) layout."""
    g = model.peftops_prefix.prefix.grad
    return g.permute(3, 0, 1, 2, 4).reshape(g.shape[3], -1)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: f.__name__)
def test_logits_and_prefix_grads_match_peft(factory):
    ref = _peft(factory)
    ours = _ours_from(factory, ref)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    for kwargs in ({"attention_mask": mask}, {}, {"attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1)}):
        a = ref(input_ids=ids, labels=labels, **kwargs)
        b = ours(input_ids=ids, labels=labels, **kwargs)
        torch.testing.assert_close(b.logits, a.logits, **TOL)
        ref.zero_grad()
        ours.zero_grad()
        a.loss.backward()
        b.loss.backward()
        torch.testing.assert_close(_flat_grad(ours), _peft_weight(ref).grad, **TOL)


def test_queries_and_keys_are_placed_after_the_prefix():
    """Without the position shift the logits differ from peft's (the issue's 0.44)."""
    ref = _peft(hf_models.llama)
    ours = _ours_from(hf_models.llama, ref)
    ids = hf_models.token_ids(2, 5)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        unshifted = ours(input_ids=ids, position_ids=torch.arange(-P, 5 - P).unsqueeze(0)).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, **TOL)
    assert (unshifted - expected).abs().max() > 1e-2


def _peft_greedy(peft_model, ids, mask, steps):
    seq, m = ids, mask
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).masked_fill(m == 0, 0)
        with torch.no_grad():
            logits = peft_model(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq


def test_generate_greedy_matches_peft():
    factory = hf_models.llama
    ref = _peft(factory)
    with torch.no_grad():  # a larger prefix, so that it decides the tokens
        _peft_weight(ref).mul_(3.0)
    ours = _ours_from(factory, ref).eval()
    ref.eval()
    ids, mask = _batch()
    expected = _peft_greedy(ref, ids, mask, 4)
    with torch.no_grad():
        base = factory().generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert not torch.equal(base, expected)  # the prefix changes what is generated
    for use_cache in (True, False):
        got = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, use_cache=use_cache)
        assert torch.equal(got, expected), use_cache


@pytest.mark.parametrize("projection", [False, True])
def test_peft_checkpoint_loads(tmp_path, projection):
    ref = _peft(hf_models.llama, prefix_projection=projection, encoder_hidden_size=16)
    if projection:
        with torch.no_grad():  # peft's MLP starts near zero output: make it matter
            for p in ref.prompt_encoder["default"].transform.parameters():
                p.normal_(0.0, 0.5)
    ref.save_pretrained(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        expected = ref.eval()(input_ids=ids, attention_mask=mask).logits
        for model in (
            pt.load_prefix_tuning(hf_models.llama(), tmp_path),
            load_adapter(hf_models.llama(), tmp_path),
        ):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, **TOL)


@pytest.mark.parametrize("reparam_hidden", [None, 16])
def test_saved_checkpoint_loads_in_peft(tmp_path, reparam_hidden):
    ours = pt.apply_prefix_tuning(hf_models.llama(), P, reparam_hidden=reparam_hidden)
    save_adapter(ours, tmp_path)
    ids, mask = _batch()
    loaded = PeftModel.from_pretrained(hf_models.llama(), tmp_path).eval()
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, **TOL)
    assert loaded.peft_config["default"].prefix_projection is (reparam_hidden is not None)


@pytest.mark.parametrize("reparam_hidden", [None, 16])
def test_training_changes_only_the_prefix_and_lowers_the_loss(reparam_hidden):
    model = pt.apply_prefix_tuning(hf_models.llama(), P, reparam_hidden=reparam_hidden)
    base_keys = set(hf_models.llama().state_dict())
    assert base_keys <= set(model.state_dict())
    assert {k for k in model.state_dict() if k not in base_keys} == {
        f"peftops_prefix.{n}" for n, _ in model.peftops_prefix.named_parameters()
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.peftops_prefix.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("peftops_prefix.") for k in changed)


def test_per_row_prefixes_match_rows_run_separately():
    factory = hf_models.llama
    bank = [PrefixKV(2, 2, P, 16) for _ in range(3)]
    model = pt.apply_prefix_tuning(factory(), P)
    pt.set_prefix_bank(model, bank)
    ids, mask = _batch()
    rows = [2, 0, 2]
    pt.set_prefix_ids(model, rows)
    out = model(input_ids=ids, attention_mask=mask).logits
    out.sum().backward()

    single = pt.apply_prefix_tuning(factory(), P)
    for r, slot in enumerate(rows):
        with torch.no_grad():
            single.peftops_prefix.prefix.copy_(bank[slot].prefix)
            expected = single(input_ids=ids[r : r + 1], attention_mask=mask[r : r + 1]).logits
        torch.testing.assert_close(out[r : r + 1], expected, **TOL)
    assert not bank[1].prefix.grad.any() and bank[0].prefix.grad.abs().sum() > 0  # slot 1 is no row's

    # A tensor bank, and the ids' row count checked against the batch.
    stacked = torch.stack([p.prefixes().detach() for p in bank])
    pt.set_prefix_bank(model, stacked)
    pt.set_prefix_ids(model, torch.tensor(rows))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, out, **TOL)
        with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected one id per batch row \(2 rows"):
            model(input_ids=ids[:2])
    pt.set_prefix_ids(model, None)
    with torch.no_grad():
        shared = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(shared, out)


def test_remove_restores_the_base_model():
    ids, mask = _batch()
    model = pt.apply_prefix_tuning(hf_models.llama(), P)
    pt.remove_prefix_tuning(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            hf_models.llama()(input_ids=ids, attention_mask=mask).logits,
            **TOL,
        )
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "peftops_prefix")


class _NoRegistry(transformers.PreTrainedModel):
    config_class = transformers.LlamaConfig
    _supports_attention_backend = False

    def __init__(self, config):
        super().__init__(config)
        self.lin = torch.nn.Linear(4, 4)


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="apply_prefix_tuning: model: .* got _NoRegistry"):
        pt.apply_prefix_tuning(_NoRegistry(transformers.LlamaConfig(num_hidden_layers=1)), P)
    with pytest.raises(TypeError, match="apply_prefix_tuning: model: .* got Linear"):
        pt.apply_prefix_tuning(torch.nn.Linear(2, 2), P)
    with pytest.raises(ValueError, match="apply_prefix_tuning: num_virtual_tokens: expected an int >= 1, got 0"):
        pt.apply_prefix_tuning(hf_models.llama(), 0)
    with pytest.raises(TypeError, match="apply_prefix_tuning: num_virtual_tokens: expected an int, got bool"):
        pt.apply_prefix_tuning(hf_models.llama(), True)

    config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P}
    weight = torch.zeros(P, 2 * 2 * 2 * 16)
    with pytest.raises(ValueError, match="load_peft_prefix: config: .* got layers_to_transform, task_ids"):
        pt.load_peft_prefix(
            hf_models.llama(), {**config, "task_ids": 1, "layers_to_transform": [0]}, {"prompt_embeddings": weight}
        )
    with pytest.raises(ValueError, match=r"load_peft_prefix: num_layers: expected 2 \(from LlamaForCausalLM"):
        pt.load_peft_prefix(hf_models.llama(), {**config, "num_layers": 3}, {"prompt_embeddings": weight})
    with pytest.raises(ValueError, match=r"load_peft_prefix: prompt_embeddings: expected shape \(3, 128\)"):
        pt.load_peft_prefix(hf_models.llama(), config, {"prompt_embeddings": weight[:, :-1]})

    model = pt.apply_prefix_tuning(hf_models.llama(attention_dropout=0.1), P)
    with pytest.raises(ValueError, match="apply_prefix_tuning: attention dropout: expected 0"):
        model(input_ids=hf_models.token_ids())
    model = pt.apply_prefix_tuning(hf_models.mistral(sliding_window=6), P)
    with pytest.raises(ValueError, match=r"apply_prefix_tuning: sliding_window: .* got 3 \+ 7"):
        model(input_ids=hf_models.token_ids())
    with pytest.raises(ValueError, match="set_prefix_ids: model: expected a bank"):
        pt.set_prefix_ids(model, [0])
    with pytest.raises(ValueError, match=r"set_prefix_bank: bank: expected shape \(N, 2, 2, 2, P, 16\)"):
        pt.set_prefix_bank(model, torch.zeros(2, 2, 2, 2, P, 8))
