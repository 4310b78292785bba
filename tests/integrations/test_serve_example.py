"""``examples/serve_multi_adapter.py``: one model carrying LoRA, prefix and bottleneck adapter
banks serves a batch whose rows each name their own three adapters (or none), greedy over a
static KV cache; adapters are swapped between rounds. Each row must equal its request alone and
a model that never held the removed adapters; on a GPU the decode step is one CUDA graph,
captured once and replayed with every later mix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra (transformers) is part of the test extra")

import peftops  # noqa: E402
from tests.examples import example_path, load_example  # noqa: E402
from tests.integrations import hf_models  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = example_path("serve_multi_adapter")
NEW = 4  # new tokens per row


ex = load_example("serve_multi_adapter")


@pytest.fixture(autouse=True)
def one_thread():
    # A 64-wide model: two threads only add synchronisation, badly so on a loaded 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(device="cpu"):
    prompts = hf_models.token_ids(len(ex.ROUND_1), 6)
    mask = torch.ones_like(prompts)
    mask[1, :2] = mask[3, :1] = 0  # left padding
    return prompts.to(device), mask.to(device)


def test_example_runs_on_cpu_and_exits_0():
    # Run as a user would on this machine: without the suite's Triton interpreter, so on CPU the
    # reference backends serve it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "round 2 (swapped legal->finance" in done.stdout
    assert "all rows match their request alone" in done.stdout and "eager decode on cpu" in done.stdout


def test_rounds_with_swapped_adapters_give_each_row_its_own():
    model = ex.build(ex.tiny_llama())
    prompts, mask = _prompts()
    server = ex.Server(model, len(ex.ROUND_1), prompts.shape[1] + NEW)
    first = server.serve(prompts, mask, ex.ROUND_1, NEW)
    first_alone = ex.alone(model, prompts, mask, ex.ROUND_1, NEW)
    ex.swap(model)
    second = server.serve(prompts, mask, ex.ROUND_2, NEW)
    second_alone = ex.alone(model, prompts, mask, ex.ROUND_2, NEW)
    base = server.serve(prompts, mask, [(None, None, None)] * len(ex.ROUND_1), NEW)
    for out, alone in ((first, first_alone), (second, second_alone)):
        assert len(alone) == len(out)
        for r, single in enumerate(alone):
            assert torch.equal(out[r], single), r
    # Every row with an adapter writes something the base model does not.
    for requests, out in ((ex.ROUND_1, first), (ex.ROUND_2, second)):
        for r, request in enumerate(requests):
            assert torch.equal(out[r], base[r]) == (request == (None, None, None)), (r, request)

    # A model that never held legal, terse or kids, its adapters in other slots: round 2 must be
    # exactly what it serves, so nothing of a removed adapter is left in its slot.
    fresh = ex.build(
        ex.tiny_llama(),
        {"lora": ["finance", "code", "support"], "prefix": ["chatty", "formal"], "bottleneck": ["pirate", "medical"]},
    )
    assert ex.slots(fresh, "lora")["finance"] != ex.slots(model, "lora")["finance"]
    clean = ex.Server(fresh, len(ex.ROUND_2), prompts.shape[1] + NEW).serve(prompts, mask, ex.ROUND_2, NEW)
    assert torch.equal(second, clean)
    # Row 2 changed only legal -> finance, in the same slot, on the same prompt.
    assert ex.ROUND_1[2][1:] == ex.ROUND_2[2][1:] and not torch.equal(first[2], second[2])


def test_the_hand_written_loop_generates_what_transformers_generate_does():
    """Prefill and decode steps over the static cache (positions from the left padding, the
    mask over all the cache's slots) against ``model.generate`` with its own dynamic cache."""
    model = ex.build(ex.tiny_llama())
    prompts, mask = _prompts()
    out = ex.Server(model, len(ex.ROUND_1), prompts.shape[1] + NEW).serve(prompts, mask, ex.ROUND_1, NEW)
    peftops.nn.set_batch_adapters(model, [r[0] for r in ex.ROUND_1])
    peftops.set_prefix_ids(model, [r[1] for r in ex.ROUND_1])
    peftops.set_bottleneck_ids(model, [r[2] for r in ex.ROUND_1])
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, want[:, prompts.shape[1] :])


def test_the_three_banks_compose_in_any_order():
    prompts, mask = _prompts()
    orders = [("lora", "bottleneck", "prefix"), ("prefix", "bottleneck", "lora"), ("bottleneck", "prefix", "lora")]
    logits = []
    for order in orders:
        model = hf_models.llama(eos_token_id=None).eval()
        for kind in order:
            if kind == "lora":
                peftops.apply_lora(model, ["q_proj", "v_proj"], r=8, alpha=1.0, capacity=ex.CAPACITY)
            elif kind == "bottleneck":
                peftops.apply_adapters(model, "seq_bn", capacity=ex.CAPACITY, reduction_factor=ex.BN_REDUCTION)
            else:
                peftops.apply_prefix_tuning(model, ex.P_MAX, capacity=ex.CAPACITY)
        for kind, names in ex.INITIAL.items():
            for name in names:
                ex.add(model, kind, name)
        server = ex.Server(model, len(ex.ROUND_1), prompts.shape[1])
        server.serve(prompts, mask, ex.ROUND_1, 1)  # binds the ids
        with torch.no_grad():
            logits.append(model(input_ids=prompts, attention_mask=mask).logits)
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_graph_replayed_with_new_mixes_matches_eager():
    """The decode step captured once; every later round copies a new mix (and, after the swap,
    new adapters in freed slots) into the same tensors and replays it: each row must be what the
    eager step gives for that mix."""
    model = ex.build(ex.tiny_llama().cuda())
    prompts, mask = _prompts("cuda")
    new = 6  # the prefill's token, then round 1: two warm-up steps and three replays; later rounds: five
    graphed = ex.Server(model, len(ex.ROUND_1), prompts.shape[1] + new, cuda_graph=True)
    eager = ex.Server(model, len(ex.ROUND_1), prompts.shape[1] + new)
    mixes = [ex.ROUND_1, ex.ROUND_1[::-1], [(None, None, None)] * len(ex.ROUND_1), "swap", ex.ROUND_2]
    outs = []
    for requests in mixes:
        if requests == "swap":
            ex.swap(model)
            continue
        got = graphed.serve(prompts, mask, requests, new)
        want = eager.serve(prompts, mask, requests, new)
        assert torch.equal(got, want), (requests, got, want)
        outs.append(got)
    assert graphed.captures == 1
    # The mixes reached the graph: a replay that ignored the new ids would repeat round 1's rows.
    assert all(not torch.equal(outs[0], out) for out in outs[1:])


LAST = {
    "prefix": (lambda m: peftops.apply_prefix_tuning(m, 2, capacity=2), peftops.remove_prefix_tuning),
    "prompt": (lambda m: peftops.apply_prompt_tuning(m, 2, capacity=2), peftops.remove_prompt_tuning),
    "bitfit": (lambda m: peftops.apply_bitfit(m, add_missing=True), None),
}


@pytest.mark.parametrize("last", list(LAST))
@pytest.mark.parametrize("lora", [{"capacity": 2}, {"modules_to_save": ["lm_head"]}], ids=["bank", "save-head"])
def test_a_later_apply_leaves_earlier_adapters_as_they_were(last, lora):
    """Found composing the three banks: apply_prefix_tuning, apply_prompt_tuning and apply_bitfit
    froze every parameter of the model, so LoRA and bottleneck banks (and modules_to_save)
    applied before them silently stopped training. They now freeze the base only
    (peftops.nn.surgery.freeze_base): earlier adapters keep their flags, trainable or not, and
    removing prefix/prompt tuning puts every flag back."""
    model = hf_models.llama()
    peftops.apply_lora(model, ["q_proj"], r=2, alpha=1.0, **lora)
    peftops.apply_adapters(model, "seq_bn", capacity=2, reduction_factor=ex.BN_REDUCTION)
    frozen_on_purpose = [p for n, p in model.named_parameters() if "bottleneck" in n and "layers.1." in n]
    assert frozen_on_purpose
    for p in frozen_on_purpose:
        p.requires_grad_(False)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    trainable = {n for n, flag in before.items() if flag}
    assert any("lora_" in n for n in trainable) and any("bottleneck" in n for n in trainable)
    assert ("lm_head" in lora.get("modules_to_save", ())) == any("lm_head" in n for n in trainable)
    apply, remove = LAST[last]
    apply(model)
    after = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= after, sorted(trainable - after)
    new = after - trainable
    assert new and all(("peftops_pr" in n) if last != "bitfit" else n.endswith(".bias") for n in new), sorted(new)
    assert not any(p.requires_grad for p in frozen_on_purpose)  # frozen by the user, not thawed
    assert not any("embed_tokens" in n or n.endswith("q_proj.weight") for n in after)  # the base stays frozen
    if remove is not None:
        remove(model)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_bitfit_after_lora_keeps_lora_and_adds_no_bias_inside_it():
    """apply_bitfit(add_missing=True) gave LoRA's lora_A / lora_B layers biases the fused op
    never reads (trainable, changing nothing); and a LoRA applied after BitFit keeps the biases
    training (apply_lora ends with mark_only_adapters_trainable)."""
    model = hf_models.llama()
    peftops.apply_lora(model, ["q_proj"], r=2, alpha=1.0)
    peftops.apply_bitfit(model, add_missing=True)
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if ".lora_A.bias" in n or ".lora_B.bias" in n]
    assert any(n.endswith("k_proj.bias") for n in names)
    other = hf_models.llama()
    peftops.apply_bitfit(other, add_missing=True)
    peftops.apply_lora(other, ["q_proj"], r=2, alpha=1.0)
    trainable = {n for n, p in other.named_parameters() if p.requires_grad}
    assert any(n.endswith("k_proj.bias") for n in trainable) and any("lora_A" in n for n in trainable)
