"""End to end: each adapter kind fine-tunes a frozen tiny transformer (``tests/models.py``).

Every test trains a few dozen Adam steps, from a fixed seed, on the synthetic task of
``tests/models.py`` (walk a hidden cycle of 8 tokens: predict the next one) and checks:

* the held-out loss falls well below its initial value *and* below the unigram entropy
  ``log 8``, which no model ignoring its input can beat: the adapter must have learned to
  read the current token. A gradient that is None, zero, or wrong in sign or scale would
  leave the loss near its initial ~4.3 nats;
* only adapter parameters changed: every base parameter is bit-identical to before (and
  got no gradient), every element of every adapter parameter moved;
* the adapter's inference-time transformation (LoRA merge, prefix ``merge_reparam``)
  leaves the logits unchanged.

The bounds were set from runs over several seeds (LoRA ends below 0.55 nats from ~4.3,
adapters and prefixes below 0.8, prompt tuning, the weakest method, near 1.7), with
margin for platform differences in floating-point summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

import peftops
from peftops.nn import LoRALinear
from peftops.testing import assert_close
from tests.models import UNIGRAM_LOSS, TinyConfig, TinyDecoder, left_pad, task_batch, task_cycle

CFG = TinyConfig()
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def loss_fn(model, inputs, targets, mask=None):
    logits = model(inputs, mask)
    return F.cross_entropy(logits.reshape(-1, CFG.vocab).float(), targets.reshape(-1), ignore_index=-100)


class Task:
    """A fixed held-out batch and a stream of training batches, optionally left-padded."""

    def __init__(self, max_pad: int = 0, seed: int = 0, device: str = "cpu") -> None:
        self.cycle = task_cycle(CFG)
        self.max_pad = max_pad
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self.eval_batch = self._batch(32, torch.Generator().manual_seed(10_000 + seed))

    def _batch(self, n: int, gen: torch.Generator):
        inputs, targets = task_batch(self.cycle, n, 16, gen)
        mask = None
        if self.max_pad:
            inputs, targets, mask = left_pad(inputs, targets, self.max_pad, gen)
        return tuple(None if t is None else t.to(self.device) for t in (inputs, targets, mask))

    def next(self):
        return self._batch(16, self.gen)

    @torch.no_grad()
    def eval_loss(self, model) -> float:
        model.eval()
        loss = loss_fn(model, *self.eval_batch).item()
        model.train()
        return loss


def train(model, task: Task, steps: int, lr: float, autocast: bool = False) -> tuple[float, float]:
    """Adam on *all* parameters (frozen ones included, so a stray gradient would move them)."""
    initial = task.eval_loss(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    for _ in range(steps):
        inputs, targets, mask = task.next()
        opt.zero_grad(set_to_none=True)
        with ctx:
            loss = loss_fn(model, inputs, targets, mask)
        loss.backward()
        opt.step()
    return initial, task.eval_loss(model)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def check_only_adapters_changed(model, before, is_adapter: Callable[[str], bool]):
    names = {n for n, _ in model.named_parameters()}
    adapter_names = {n for n in names if is_adapter(n)}
    assert adapter_names, "no adapter parameters"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_names
    for name, p in model.named_parameters():
        if name in adapter_names:
            moved = (p.detach() != before[name]).float().mean().item()
            assert moved == 1.0, f"adapter parameter {name}: only {moved:.1%} of its entries changed"
        else:
            assert p.grad is None, f"frozen base parameter {name} received a gradient"
            assert torch.equal(p.detach(), before[name]), f"frozen base parameter {name} changed"


def check_loss(initial, final, *, ratio, unigram_fraction):
    assert final < ratio * initial, f"loss {initial:.3f} -> {final:.3f}, expected below {ratio} x initial"
    bound = unigram_fraction * UNIGRAM_LOSS
    assert final < bound, f"final loss {final:.3f} not below {bound:.3f} ({unigram_fraction} x unigram entropy)"


def base_model(seed: int = 0) -> TinyDecoder:
    torch.manual_seed(seed)
    return TinyDecoder(CFG)


# -- LoRA ---------------------------------------------------------------------------------


def test_lora_fine_tuning():
    model = base_model()
    task = Task()
    inputs = task.eval_batch[0]
    with torch.no_grad():
        base_logits = model(inputs)

    peftops.apply_lora(model, LORA_TARGETS, r=4, alpha=8)
    lora_layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(lora_layers) == len(LORA_TARGETS) * CFG.layers
    # r * (in + out) per layer: q, o 32x32; k, v 32->16; up 32->64; down 64->32.
    per_block = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 2)
    trainable, total = peftops.count_trainable(model)
    assert trainable == per_block * CFG.layers
    assert total == sum(p.numel() for p in base_model().parameters()) + trainable
    with torch.no_grad():
        assert_close(model(inputs), base_logits, name="logits right after apply_lora (B = 0)")

    before = snapshot(model)
    initial, final = train(model, task, steps=40, lr=1e-2)
    check_loss(initial, final, ratio=0.3, unigram_fraction=0.5)
    check_only_adapters_changed(model, before, lambda n: ".lora_A." in n or ".lora_B." in n)

    # Merging every layer gives the same model; unmerging gives the base weights back.
    model.eval()
    with torch.no_grad():
        trained_logits = model(inputs)
        for m in lora_layers:
            m.merge()
        assert_close(model(inputs), trained_logits, name="logits after merge")
        for m in lora_layers:
            m.unmerge()
        assert_close(model(inputs), trained_logits, name="logits after unmerge")
    for m in lora_layers:
        name = next(n for n, mod in model.named_modules() if mod is m)
        assert_close(m.weight, before[f"{name}.weight"], name=f"{name}.weight after merge + unmerge")


def test_lora_fine_tuning_under_bf16_autocast():
    """float32 parameters, bfloat16 autocast: the loss still falls, gradients stay float32."""
    model = peftops.apply_lora(base_model(), LORA_TARGETS, r=4, alpha=8)
    before = snapshot(model)
    initial, final = train(model, Task(), steps=40, lr=1e-2, autocast=True)
    check_loss(initial, final, ratio=0.3, unigram_fraction=0.5)
    check_only_adapters_changed(model, before, lambda n: ".lora_A." in n or ".lora_B." in n)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


# -- bottleneck adapters -------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_bottleneck_adapter_fine_tuning(parallel):
    model = base_model()
    task = Task()
    inputs = task.eval_batch[0]
    with torch.no_grad():
        base_logits = model(inputs)
    model.add_adapters(r=8, parallel=parallel)
    peftops.mark_only_adapters_trainable(model)
    assert peftops.count_trainable(model).trainable == CFG.layers * (32 * 8 + 8 + 8 * 32 + 32)
    with torch.no_grad():
        # The up projections start at zero: the adapted model is exactly the base model.
        assert torch.equal(model(inputs), base_logits)

    before = snapshot(model)
    initial, final = train(model, task, steps=40, lr=3e-2)
    check_loss(initial, final, ratio=0.3, unigram_fraction=0.5)
    check_only_adapters_changed(model, before, lambda n: ".adapter." in n)


# -- prefix tuning ----------------------------------------------------------------------------


@pytest.mark.parametrize("reparam_hidden, lr", [(None, 0.1), (32, 0.03)], ids=["direct", "reparam"])
def test_prefix_tuning(reparam_hidden, lr):
    model = base_model().add_prefix(prefix_len=8, reparam_hidden=reparam_hidden)
    peftops.mark_only_adapters_trainable(model)
    task = Task()
    before = snapshot(model)
    initial, final = train(model, task, steps=60, lr=lr)
    check_loss(initial, final, ratio=0.3, unigram_fraction=0.5)
    check_only_adapters_changed(model, before, lambda n: n.startswith("prefix."))

    if reparam_hidden is not None:
        model.eval()
        inputs = task.eval_batch[0]
        with torch.no_grad():
            trained_logits = model(inputs)
            model.prefix.merge_reparam()
            assert_close(model(inputs), trained_logits, name="logits after merge_reparam")
        assert [n for n, _ in model.prefix.named_parameters()] == ["prefix"]


@pytest.mark.gpu
def test_prefix_tuning_through_the_triton_kernel_on_gpu():
    """The same training on CUDA with the backend pinned to ``triton`` (a pinned backend that
    cannot run raises, so this cannot silently use the reference): the fused kernel's forward
    and backward, shared prefix gradients summed over the batch, train the prefix."""
    model = base_model().add_prefix(prefix_len=8).cuda()
    peftops.mark_only_adapters_trainable(model)
    task = Task(device="cuda")
    before = snapshot(model)
    with peftops.use_backend("triton"):
        initial, final = train(model, task, steps=60, lr=0.1)
    check_loss(initial, final, ratio=0.3, unigram_fraction=0.5)
    check_only_adapters_changed(model, before, lambda n: n.startswith("prefix."))


# -- prompt tuning ----------------------------------------------------------------------------


def test_prompt_tuning_with_left_padding():
    """Left-padded batches: the prompt positions must be visible to every query through
    ``extend_attention_mask``, or the prompt could not steer the padded rows."""
    model = base_model().add_prompt(num_tokens=8)
    peftops.mark_only_adapters_trainable(model)
    task = Task(max_pad=4)
    assert not task.eval_batch[2].all()  # there is padding
    before = snapshot(model)
    initial, final = train(model, task, steps=100, lr=0.1)
    # The weakest method here (it acts only through frozen attention): a looser bound, still
    # below what any input-blind model can reach.
    check_loss(initial, final, ratio=0.6, unigram_fraction=0.9)
    check_only_adapters_changed(model, before, lambda n: n.startswith("prompt."))
