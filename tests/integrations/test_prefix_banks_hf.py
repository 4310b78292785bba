"""Prefix slots at the model level (``apply_prefix_tuning(..., capacity=)``): each row of a mixed
batch, with its own prefix of its own length (or none), must compute what that row computes
alone on a single-prefix model of that length (or on the base model), in the forward, in the
slots' gradients and in greedy generation with dynamic and static caches (CPU, float32, tiny
models)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

from peftops.integrations import prefix_tuning as pt  # noqa: E402
from tests.integrations import hf_models  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
P_MAX = 5
# name -> prefix length; slot 3 stays free.
PREFIXES = {"a": 2, "b": P_MAX, "c": 3}


def _slots_model(factory, scale: float = 1.0):
    model = pt.apply_prefix_tuning(factory(), P_MAX, capacity=4)
    for name, length in PREFIXES.items():
        pt.add_prefix(model, name, length)
    if scale != 1.0:
        with torch.no_grad():  # a larger prefix, so that it decides the generated tokens
            model.peftops_prefix.prefix.mul_(scale)
    return model


def _alone(factory, model, slot: int):
    """The model that row computes alone: the base for no prefix, else one prefix of the slot's length."""
    if slot < 0:
        return factory()
    bank = model.peftops_prefix
    length = int(bank.prefix_lengths[slot])
    single = pt.apply_prefix_tuning(factory(), length)
    with torch.no_grad():
        single.peftops_prefix.prefix.copy_(bank.prefix[:, :, slot, :, :length])
    return single


def _batch():
    ids = hf_models.token_ids(3, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[2, :1] = 0
    return ids, mask


CASES = {
    "each_row_different_lengths": ["c", "a", "b"],
    "all_none": [None, None, None],
    "one_for_all": ["b", "b", "b"],
    "slot_ints_and_none": [2, -1, 0],
}


def _case_params():
    out = [pytest.param(hf_models.llama, rows, id=f"llama-{name}") for name, rows in CASES.items()]
    rows = CASES["each_row_different_lengths"]
    out += [pytest.param(f, rows, id=f"{f.__name__}-mixed") for f in (hf_models.qwen2, hf_models.mistral)]
    # RoPE is blind to a shift shared by all of a row's keys; GPT-2's absolute positions are not,
    # so a row without a prefix shows that it is not shifted.
    out.append(pytest.param(hf_models.gpt2, CASES["slot_ints_and_none"], id="gpt2-none_unshifted"))
    return out


@pytest.mark.parametrize("factory, rows", _case_params())
def test_mixed_batch_matches_each_row_alone(factory, rows):
    model = _slots_model(factory)
    bank = model.peftops_prefix
    slots = [bank.adapters[r] if isinstance(r, str) else (-1 if r is None else r) for r in rows]
    ids, mask = _batch()
    pt.set_prefix_ids(model, rows)
    weight = torch.randn(3, ids.shape[1], hf_models.VOCAB, generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * weight).sum().backward()

    expected_grad = torch.zeros_like(bank.prefix)
    for r, slot in enumerate(slots):
        single = _alone(factory, model, slot)
        got = single(input_ids=ids[r : r + 1], attention_mask=mask[r : r + 1]).logits
        torch.testing.assert_close(logits[r : r + 1], got, **TOL)
        if slot >= 0:
            (got * weight[r : r + 1]).sum().backward()
            length = int(bank.prefix_lengths[slot])
            expected_grad[:, :, slot, :, :length] += single.peftops_prefix.prefix.grad
    torch.testing.assert_close(bank.prefix.grad, expected_grad, **TOL)
    for slot in range(bank.capacity):
        if slot not in slots:  # absent slots (and the free one): exactly zero
            assert torch.equal(bank.prefix.grad[:, :, slot], torch.zeros_like(bank.prefix.grad[:, :, slot]))
    if any(s >= 0 for s in slots):
        assert bank.prefix.grad.abs().sum() > 0


def test_rows_are_shifted_by_their_own_prefix_length():
    """With every row shifted by P_max (one shared length) a short prefix's row differs."""
    model = _slots_model(hf_models.llama)
    ids, mask = _batch()
    pt.set_prefix_ids(model, ["a", "a", "a"])  # length 2 < P_max
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask).logits
        shifted_by_max = model(
            input_ids=ids, attention_mask=mask, position_ids=torch.arange(P_MAX - 2, 6 + P_MAX - 2).unsqueeze(0)
        ).logits
        alone = _alone(hf_models.llama, model, model.peftops_prefix.adapters["a"])(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(ours, alone.logits, **TOL)
    assert (shifted_by_max - alone.logits).abs().max() > 1e-3


def test_ids_tensor_is_kept_by_reference():
    model = _slots_model(hf_models.llama)
    ids, mask = _batch()
    chosen = torch.tensor([1, -1, 0])
    pt.set_prefix_ids(model, chosen)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        chosen.copy_(torch.tensor([0, 2, -1]))  # what a CUDA graph's replay sees: the same storage
        second = model(input_ids=ids, attention_mask=mask).logits
        pt.set_prefix_ids(model, ["a", "c", None])
        fresh = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(second, fresh, rtol=0, atol=0)
    assert (first - second).abs().max() > 1e-3


def _greedy(model, ids, mask, steps, **kwargs):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, **kwargs)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_greedy_per_row_matches_each_row_alone(cache):
    factory = hf_models.llama
    model = _slots_model(factory, scale=3.0).eval()
    ids, mask = _batch()
    rows = ["b", None, "a"]
    pt.set_prefix_ids(model, rows)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    got = _greedy(model, ids, mask, 4, **kwargs)
    base = _greedy(factory().eval(), ids, mask, 4)
    assert not torch.equal(got[0], base[0])  # the prefixes decide tokens
    for r, name in enumerate(rows):
        slot = -1 if name is None else model.peftops_prefix.adapters[name]
        alone = _greedy(_alone(factory, model, slot).eval(), ids[r : r + 1], mask[r : r + 1], 4)
        assert torch.equal(got[r : r + 1], alone), (r, name)


@pytest.mark.parametrize("capacity", [None, 4], ids=["shared", "slots"])
def test_static_cache_decode_steps_match_dynamic(capacity):
    """Prefill then single-token steps into a StaticCache (the serving loop's captured step)
    give the logits of a DynamicCache: keys past the written ones are masked, a multi-token
    prefill stays causal."""
    factory = hf_models.llama
    if capacity is None:
        model = pt.apply_prefix_tuning(factory(), 3)
    else:
        model = _slots_model(factory)
        pt.set_prefix_ids(model, torch.tensor([1, -1, 2]))
    model.eval()
    ids, mask = _batch()
    static = transformers.StaticCache(config=model.config, max_cache_len=12)
    dynamic = transformers.DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=static, use_cache=True).logits
        b = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=dynamic, use_cache=True).logits
        torch.testing.assert_close(a, b, **TOL)
        for _ in range(3):
            token = b[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            pos = pos[:, -1:] + 1
            a = model(input_ids=token, attention_mask=mask, position_ids=pos, cache=static, use_cache=True).logits
            b = model(input_ids=token, attention_mask=mask, position_ids=pos, cache=dynamic, use_cache=True).logits
            torch.testing.assert_close(a, b, **TOL)
        # Without a mask or positions too (the hook counts the cache's tokens on the device).
        static = transformers.StaticCache(config=model.config, max_cache_len=12)
        dynamic = transformers.DynamicCache(config=model.config)
        for chunk in (ids[:, :3], ids[:, 3:4], ids[:, 4:]):  # a multi-token chunk after cached ones too
            a = model(input_ids=chunk, cache=static, use_cache=True).logits
            b = model(input_ids=chunk, cache=dynamic, use_cache=True).logits
            torch.testing.assert_close(a, b, **TOL)


def test_add_and_remove_between_calls_keep_the_parameter():
    factory = hf_models.llama
    model = _slots_model(factory)
    bank = model.peftops_prefix
    param = bank.prefix
    ids, mask = _batch()
    pt.set_prefix_ids(model, ["a", "b", "c"])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    pt.remove_prefix(model, "a")
    slot = pt.add_prefix(model, "d", 4)
    assert slot == 0 and bank.prefix is param and model.peftops_prefix is bank
    assert pt.add_prefix(model, "e") == 3 and int(bank.prefix_lengths[3]) == P_MAX  # default: the longest
    pt.set_prefix_ids(model, ["d", None, "e"])
    logits = model(input_ids=ids, attention_mask=mask).logits
    logits.sum().backward()
    for r, s in enumerate([0, -1, 3]):
        with torch.no_grad():
            got = _alone(factory, model, s)(input_ids=ids[r : r + 1], attention_mask=mask[r : r + 1]).logits
        torch.testing.assert_close(logits[r : r + 1], got, **TOL)
    assert not param.grad[:, :, 1:3].any()  # b and c: in no row
    assert not param.grad[:, :, 0, :, 4:].any()  # past d's length

    # A name removed since the ids were set: an error at the next eager call.
    pt.remove_prefix(model, "d")
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected slots in use \[1, 2, 3\] .* got 0, a free"):
        model(input_ids=ids, attention_mask=mask)


def test_bad_ids_and_arguments_are_named():
    model = _slots_model(hf_models.llama)
    ids, mask = _batch()
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected slot ints in \[-1, 4\), got 7"):
        pt.set_prefix_ids(model, [0, 7, None])
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: .*free slot|set_prefix_ids: ids: .* 3 is not a slot"):
        pt.set_prefix_ids(model, [3, 0, 0])
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected prefix names \['a', 'b', 'c'\], got 'z'"):
        pt.set_prefix_ids(model, ["z", "a", "a"])
    with pytest.raises(TypeError, match=r"set_prefix_ids: ids: expected a signed integer tensor .* got torch.float32"):
        pt.set_prefix_ids(model, torch.zeros(3))
    # Tensor ids are checked at each eager call: out of range, and a free slot.
    chosen = torch.tensor([0, 1, 2])
    pt.set_prefix_ids(model, chosen)
    chosen[1] = 9
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected slots in use \[0, 1, 2\] .* got 9, outside"):
        model(input_ids=ids, attention_mask=mask)
    chosen[1] = 3
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: .* got 3, a free slot"):
        model(input_ids=ids, attention_mask=mask)
    chosen[1] = -1
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected one id per batch row \(2 rows"):
        model(input_ids=ids[:2])
    pt.set_prefix_ids(model, None)
    with pytest.raises(ValueError, match=r"set_prefix_ids: ids: expected each row's prefix .* got none"):
        model(input_ids=ids)

    with pytest.raises(ValueError, match="apply_prefix_tuning: reparam_hidden: expected None with capacity"):
        pt.apply_prefix_tuning(hf_models.llama(), P_MAX, 16, capacity=2)
    with pytest.raises(ValueError, match="apply_prefix_tuning: capacity: expected an int >= 1, got 0"):
        pt.apply_prefix_tuning(hf_models.llama(), P_MAX, capacity=0)
    with pytest.raises(ValueError, match="prefix_len: expected at most prefix_len_max=5, got 6"):
        pt.add_prefix(model, "long", P_MAX + 1)
    with pytest.raises(ValueError, match=r"remove_prefix: name: expected one of \['a', 'b', 'c'\], got 'z'"):
        pt.remove_prefix(model, "z")
    with pytest.raises(ValueError, match="set_prefix_bank: model: expected a model with one shared prefix"):
        pt.set_prefix_bank(model, torch.zeros(2, 2, 2, 2, P_MAX, 16))
    with pytest.raises(ValueError, match="peft_prefix_state: model: expected a model with one shared prefix"):
        pt.peft_prefix_state(model)
    shared = pt.apply_prefix_tuning(hf_models.llama(), P_MAX)
    with pytest.raises(ValueError, match=r"add_prefix: model: expected a model with prefix slots"):
        pt.add_prefix(shared, "a")
