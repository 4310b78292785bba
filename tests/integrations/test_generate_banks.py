"""peftops.integrations.generate with bottleneck, prefix and prompt banks, next to LoRA or alone:
each row's ids repeated with the row when transformers expands the batch (beam search,
``num_return_sequences``), checked against each row generated alone and against the base model;
the ids each bank held come back; bad ids fail before any forward.

The model with three banks is the serving example's (``examples/serve_multi_adapter.py``:
``build``, random adapters from ``add``), so this and the example exercise the same banks."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.examples import load_example
from tests.integrations import hf_models

transformers = pytest.importorskip("transformers")

import peftops  # noqa: E402
from peftops.integrations import prefix_tuning  # noqa: E402
from peftops.integrations.generate import generate  # noqa: E402
from peftops.integrations.prompt_tuning import add_prompt, apply_prompt_tuning, set_prompt_ids  # noqa: E402
from peftops.nn import MultiBottleneckAdapter, MultiLoRALinear, set_batch_adapters  # noqa: E402
from peftops.nn.multi_prompt import MultiPromptEmbedding  # noqa: E402

NEW = 3
# (lora, prefix, bottleneck) per row, None for none. Each kind serves a row on its own, so a bank
# whose ids were dropped would leave that row equal to the base model's; row 3 mixes all three.
ROWS = [
    ("support", None, None),
    (None, "formal", None),
    (None, None, "medical"),
    ("legal", "terse", "kids"),
    (None, None, None),
]
MODES = {
    "greedy": {},
    "beam": {"num_beams": 2, "num_return_sequences": 2},
    # Expanded by 3 (the beams), returned by 2: the ids follow the expansion, not what comes back.
    "beam3_nrs2": {"num_beams": 3, "num_return_sequences": 2},
}


ex = load_example("serve_multi_adapter")


@pytest.fixture(scope="module", autouse=True)
def reference_backend():
    # Which adapters each row gets is under test, not the kernels: the reference backend keeps the
    # generate() calls cheap where Triton would be interpreted.
    with peftops.use_backend("reference"):
        yield


@pytest.fixture(autouse=True)
def one_thread():
    # A 64-wide model: a second thread only adds synchronisation on a loaded 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def llama():
    # No end-of-sequence token: every row runs to max_new_tokens, so rows compare whole.
    return hf_models.llama(eos_token_id=None).eval()


@pytest.fixture(scope="module")
def model():
    return ex.build(llama())


@pytest.fixture(scope="module")
def base():
    return llama()


@pytest.fixture(scope="module")
def prompts():
    ids = hf_models.token_ids(len(ROWS), 5, seed=2).clamp(min=1)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[3, :1] = 0  # left padding: positions, and prefix shifts, counted per row
    return ids, mask


def ids_of(model, rows, form: str) -> dict:
    """generate()'s keyword arguments for ``rows``; ``form`` "names", or "slots": the prefix ids as
    a tensor and the bottleneck ids as slot ints, -1 for none."""
    lora, prefix, bottleneck = (list(kind) for kind in zip(*rows, strict=True))
    if form == "slots":
        pslots, bslots = ex.slots(model, "prefix"), ex.slots(model, "bottleneck")
        prefix = torch.tensor([-1 if n is None else pslots[n] for n in prefix])
        bottleneck = [-1 if n is None else bslots[n] for n in bottleneck]
    return {"adapter_ids": lora, "prefix_ids": prefix, "bottleneck_ids": bottleneck}


def gen(model, ids, mask, **kw):
    return generate(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **kw)


@pytest.mark.parametrize("mode", MODES)
def test_each_row_generates_as_its_three_adapters_alone(model, base, prompts, mode):
    kw = MODES[mode]
    per = kw.get("num_return_sequences", 1)
    ids, mask = prompts
    mixed = gen(model, ids, mask, **ids_of(model, ROWS, "slots" if mode == "beam" else "names"), **kw)
    assert mixed.shape[0] == len(ROWS) * per
    plain = base.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **kw)
    for i, row in enumerate(ROWS):
        rows = slice(i * per, (i + 1) * per)
        alone = gen(model, ids[i : i + 1], mask[i : i + 1], **ids_of(model, [row], "names"), **kw)
        assert torch.equal(mixed[rows], alone), (mode, i, row)
        if row == (None, None, None):
            assert torch.equal(mixed[rows], plain[rows]), (mode, i)
        else:  # the adapters are not a no-op here, so a dropped bank would show
            assert not torch.equal(mixed[rows], plain[rows]), (mode, i, row)


def banks(model):
    lora = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    bottleneck = [m for m in model.modules() if isinstance(m, MultiBottleneckAdapter)]
    return lora, bottleneck


def held(model):
    """Every bank's ids object, to compare by identity."""
    lora, bottleneck = banks(model)
    state = model.__dict__[prefix_tuning._STATE]
    return [m._batch_ids for m in lora] + [m._batch_ids for m in bottleneck] + [state.ids]


class Boom(transformers.StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


def test_each_bank_gets_its_ids_back_also_on_error(model, prompts):
    ids, mask = prompts
    before = (torch.tensor([0, -1, 1, 2, -1]), torch.tensor([-1, 0, -1, 1, -1]), torch.tensor([2, -1, 0, 1, -1]))
    set_batch_adapters(model, before[0])
    peftops.set_prefix_ids(model, before[1])
    peftops.set_bottleneck_ids(model, before[2])
    expected = held(model)
    lora, bottleneck = banks(model)
    assert len(expected) == len(lora) + len(bottleneck) + 1 and lora and bottleneck
    try:
        gen(model, ids, mask, **ids_of(model, ROWS, "names"), num_beams=2)
        assert all(a is b for a, b in zip(held(model), expected, strict=True))
        # The criteria run after the expansion, with every kind's ids repeated for 10 rows.
        criteria = transformers.StoppingCriteriaList([Boom()])
        with pytest.raises(RuntimeError, match="boom"):
            gen(model, ids, mask, **ids_of(model, ROWS, "names"), num_beams=2, stopping_criteria=criteria)
        assert all(a is b for a, b in zip(held(model), expected, strict=True))
        assert "_expand_inputs_for_generation" not in model.__dict__
    finally:
        set_batch_adapters(model, None)
        peftops.set_prefix_ids(model, None)
        peftops.set_bottleneck_ids(model, None)


def count_forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls, handle


def test_bad_ids_are_refused_by_argument_before_any_forward(model, prompts):
    ids, mask = prompts
    good = ids_of(model, ROWS, "names")
    cases = [
        (ValueError, r"generate: prefix_ids: .*'zed'", {"prefix_ids": ["formal", "zed", None, None, None]}),
        (ValueError, r"generate: bottleneck_ids: .*'zed'", {"bottleneck_ids": [None, "zed", None, None, None]}),
        (
            ValueError,
            r"generate: prefix_ids: expected one per row of the inputs \(5 rows\), got 4",
            {"prefix_ids": good["prefix_ids"][:4]},
        ),
        (
            ValueError,
            r"generate: bottleneck_ids: expected one per row of the inputs \(5 rows\), got 6",
            {"bottleneck_ids": good["bottleneck_ids"] + [None]},
        ),
        (ValueError, r"generate: prefix_ids: .*7", {"prefix_ids": [7, None, None, None, None]}),
        (
            TypeError,
            r"generate: bottleneck_ids: expected a signed integer tensor .* got torch.float32",
            {"bottleneck_ids": torch.zeros(5)},
        ),
        (TypeError, r"generate: prefix_ids: expected a list .* got str", {"prefix_ids": "formal"}),
        (ValueError, r"generate: prompt_ids: expected a model .*apply_prompt_tuning", {"prompt_ids": [None] * 5}),
    ]
    calls, handle = count_forwards(model)
    try:
        for error, match, bad in cases:
            expected = held(model)
            with pytest.raises(error, match=match):
                gen(model, ids, mask, **{**good, **bad}, num_beams=2)
            assert all(a is b for a, b in zip(held(model), expected, strict=True)), match
        with pytest.raises(TypeError, match=r"generate: expected at least one of adapter_ids, prefix_ids, "):
            gen(model, ids, mask)
    finally:
        handle.remove()
    assert not calls


def test_a_kind_given_for_a_model_without_its_bank_names_the_argument(prompts):
    ids, mask = prompts
    model = llama()
    peftops.apply_lora(model, ["q_proj"], r=2, alpha=1.0, capacity=2)
    calls, handle = count_forwards(model)
    rows = [None] * len(ROWS)
    for kind, match in [
        ("prefix_ids", r"generate: prefix_ids: expected a model .*apply_prefix_tuning"),
        ("bottleneck_ids", r"generate: bottleneck_ids: expected a model given to apply_adapters\(\.\.\., capacity=N\)"),
        ("prompt_ids", r"generate: prompt_ids: expected a model .*apply_prompt_tuning\(\.\.\., capacity=N\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            gen(model, ids, mask, adapter_ids=rows, **{kind: rows})
    handle.remove()
    assert not calls
    assert all(m._batch_ids is None for m in banks(model)[0])


P = 2


def prompt_model():
    model = apply_prompt_tuning(llama(), P, capacity=3)
    g = torch.Generator().manual_seed(3)
    for name in ("p", "q"):
        add_prompt(model, name, torch.randn(P, 64, generator=g))
    return model.eval()


def test_prompt_banks_repeat_with_the_rows_without_lora():
    # The prompt goes in front of the expanded rows at the first forward, which comes after the
    # expansion in a decoder-only model (prompt tuning refuses encoder-decoder ones).
    model, base = prompt_model(), llama()
    bank = model.peftops_prompt
    assert isinstance(bank, MultiPromptEmbedding)
    rows = ["q", None, "p"]
    ids = hf_models.token_ids(len(rows), 4, seed=4).clamp(min=1)
    kw = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": NEW, "pad_token_id": 0}
    before = torch.tensor([0, 0, 1])
    set_prompt_ids(model, before)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*position_ids.*")  # generate() passes them
        mixed = generate(model, ids, prompt_ids=rows, **kw)
        assert bank._batch_ids is before
        plain = base.generate(ids, **kw)
        for i, name in enumerate(rows):
            alone = generate(
                model, ids[i : i + 1], prompt_ids=torch.tensor([-1 if name is None else bank.adapter_id(name)]), **kw
            )
            assert torch.equal(mixed[2 * i : 2 * i + 2], alone), (i, name)
            assert torch.equal(mixed[2 * i : 2 * i + 2], plain[2 * i : 2 * i + 2]) == (name is None), (i, name)
        with pytest.raises(ValueError, match=r"generate: prompt_ids: .*'zed'"):
            generate(model, ids, prompt_ids=["p", "zed", None], **kw)
    assert bank._batch_ids is before


def test_a_set_prefix_bank_model_takes_entry_ints_and_repeats_them():
    # One prefix length for every entry (no slots): prefix_ids are entries of the bank, as
    # set_prefix_ids takes them for such a model, and no entry means none (None is refused).
    model = peftops.apply_prefix_tuning(llama(), 2)
    entries = torch.randn(3, 2, 2, 2, 2, 16, generator=torch.Generator().manual_seed(5)) * 3
    peftops.set_prefix_bank(model, entries)
    ids = hf_models.token_ids(3, 4, seed=6).clamp(min=1)
    kw = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": NEW, "pad_token_id": 0}
    rows = [2, 0, 2]
    mixed = generate(model, ids, prefix_ids=rows, **kw)
    for i, entry in enumerate(rows):
        alone = generate(model, ids[i : i + 1], prefix_ids=[entry], **kw)
        assert torch.equal(mixed[2 * i : 2 * i + 2], alone), (i, entry)
        other = generate(model, ids[i : i + 1], prefix_ids=[1], **kw)  # another entry writes otherwise
        assert not torch.equal(mixed[2 * i : 2 * i + 2], other), (i, entry)
    assert model.__dict__[prefix_tuning._STATE].ids is None
    with pytest.raises(TypeError, match=r"generate: prefix_ids: expected ints"):
        generate(model, ids, prefix_ids=[0, None, 1], **kw)
    with pytest.raises(ValueError, match=r"generate: prefix_ids: expected values in \[0, 3\)"):
        generate(model, ids, prefix_ids=[0, 3, 1], **kw)
    # Such a bank has no "none": a wrong type's message does not offer one.
    for bad, match in [
        ("x", r"generate: prefix_ids: expected a list with one entry int of the prefix bank per row, or a 1-D "),
        (torch.zeros(3), r"generate: prefix_ids: expected a signed integer tensor, got torch.float32"),
    ]:
        with pytest.raises(TypeError, match=match) as e:
            generate(model, ids, prefix_ids=bad, **kw)
        assert "None" not in str(e.value) and "-1" not in str(e.value)


def test_set_prefix_bank_ids_are_put_on_the_banks_device_once():
    # Each layer of each step indexes the bank with the ids: a CPU copy would be moved there by
    # every layer. A meta bank stands in for a GPU one; the call stops at its first forward.
    model = peftops.apply_prefix_tuning(llama(), 2)
    peftops.set_prefix_bank(model, torch.zeros(3, 2, 2, 2, 2, 16, device="meta"))
    state = model.__dict__[prefix_tuning._STATE]
    seen = []

    class Stop(Exception):
        pass

    def stop(*_):
        seen.append(state.ids.device)
        raise Stop

    handle = model.register_forward_pre_hook(stop)
    try:
        with pytest.raises(Stop):
            generate(model, hf_models.token_ids(2, 4, seed=6), prefix_ids=[2, 0], num_beams=2, max_new_tokens=1)
    finally:
        handle.remove()
    assert seen == [torch.device("meta")]
    assert state.ids is None


def test_a_kind_left_out_whose_bank_holds_no_ids_is_refused_by_name_before_any_forward(model, prompts):
    # Each of these banks refuses to run without ids; its own error would name neither generate
    # nor the argument that was left out.
    ids, mask = prompts
    good = ids_of(model, ROWS, "names")
    calls, handle = count_forwards(model)
    try:
        for left_out, what in [
            ("adapter_ids", "MultiLoRALinear layers"),
            ("prefix_ids", "prefix slots"),
            ("bottleneck_ids", "bottleneck adapter banks"),
        ]:
            given = {k: v for k, v in good.items() if k != left_out}
            with pytest.raises(
                ValueError, match=rf"generate: {left_out}: expected ids for the model's {what}, got none"
            ):
                gen(model, ids, mask, **given)
            assert all(i is None for i in held(model))
    finally:
        handle.remove()
    assert not calls
    # Ids the bank holds for these rows are used, as before.
    held_prefix = torch.tensor([-1, 0, -1, 1, -1])
    peftops.set_prefix_ids(model, held_prefix)
    try:
        left = gen(model, ids, mask, adapter_ids=good["adapter_ids"], bottleneck_ids=good["bottleneck_ids"])
        assert torch.equal(left, gen(model, ids, mask, **ids_of(model, ROWS, "slots")))
        assert model.__dict__[prefix_tuning._STATE].ids is held_prefix
    finally:
        peftops.set_prefix_ids(model, None)


def test_a_prompt_bank_left_out_is_refused_and_a_set_prefix_bank_left_out_is_the_shared_prefix():
    model = peftops.apply_lora(prompt_model(), ["q_proj"], r=2, alpha=1.0, capacity=2)
    ids = hf_models.token_ids(2, 4, seed=4).clamp(min=1)
    with pytest.raises(ValueError, match=r"generate: prompt_ids: expected ids for the model's prompt bank, got none"):
        generate(model, ids, adapter_ids=[None, None], max_new_tokens=1, pad_token_id=0)
    # A set_prefix_bank model without ids gives every row the shared prefix, as its forward does.
    model = peftops.apply_lora(peftops.apply_prefix_tuning(llama(), 2), ["q_proj"], r=2, alpha=1.0, capacity=2)
    peftops.set_prefix_bank(model, torch.randn(2, 2, 2, 2, 2, 16, generator=torch.Generator().manual_seed(5)))
    set_batch_adapters(model, [None, None])
    try:
        expected = model.generate(ids, max_new_tokens=NEW, pad_token_id=0)
    finally:
        set_batch_adapters(model, None)
    assert torch.equal(generate(model, ids, adapter_ids=[None, None], max_new_tokens=NEW, pad_token_id=0), expected)
