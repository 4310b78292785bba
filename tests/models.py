"""A tiny decoder-only transformer for the end-to-end tests, plus a synthetic task.

The model is small on purpose (2 layers, hidden 32, 4 query heads over 2 key/value heads,
vocabulary 48) so that a few dozen training steps on CPU take a second or two. Its
attention is :class:`peftops.nn.PrefixSelfAttention` (so :func:`peftops.prefix_attention`),
and prefix tuning exercises the op;
each block has a slot for a :class:`peftops.nn.BottleneckAdapter` (serial, after the MLP,
or parallel, around it); the model can own a :class:`peftops.nn.PrefixKV` feeding every
layer's attention and a :class:`peftops.nn.PromptEmbedding` prepended to the token
embeddings. LoRA goes in through :func:`peftops.apply_lora` on the ``*_proj`` layers.

The "pretrained" base is random: what matters is that it is frozen and that the adapter
alone has to learn the task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftops.nn import BottleneckAdapter, PrefixKV, PrefixSelfAttention, PromptEmbedding


@dataclass(frozen=True)
class TinyConfig:
    vocab: int = 48
    hidden: int = 32
    layers: int = 2
    q_heads: int = 4
    kv_heads: int = 2  # grouped-query attention: 2 query heads per key/value head
    mlp: int = 64
    max_len: int = 64

    @property
    def head_dim(self) -> int:
        return self.hidden // self.q_heads


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden, cfg.mlp)
        self.down_proj = nn.Linear(cfg.mlp, cfg.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        # The library's attention block: the prefix tuning tests run through it.
        self.attn = PrefixSelfAttention(cfg.hidden, cfg.q_heads, cfg.kv_heads, o_bias=True)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        self.mlp = MLP(cfg)
        self.adapter: BottleneckAdapter | None = None

    def forward(self, x: Tensor, prefix=None, key_padding_mask=None) -> Tensor:
        x = x + self.attn(self.ln1(x), prefix, key_padding_mask)
        h = self.ln2(x)
        m = self.mlp(h)
        if self.adapter is not None:
            # Serial (Houlsby/Pfeiffer): on the MLP's output. Parallel (He et al. 2022):
            # reads the MLP's input, adds to its output.
            m = self.adapter(h, m) if self.adapter.parallel else self.adapter(m)
        return x + m


class TinyDecoder(nn.Module):
    def __init__(self, cfg: TinyConfig = TinyConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        # A "unit-gain" init for the frozen base: every Linear keeps its input's scale
        # (std 1/sqrt(fan_in)), so the sublayers, and the adapters reading and writing
        # them, matter next to the residual stream; unit-norm output rows let a
        # well-aligned final state give a confident prediction (nn.Linear's default init
        # caps the logits near 3 and leaves prompt tuning almost no leverage).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(m.in_features))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.embed.weight, std=0.3)
        nn.init.normal_(self.pos.weight, std=0.1)
        self.prefix: PrefixKV | None = None
        self.prompt: PromptEmbedding | None = None

    # -- adapter slots -------------------------------------------------------------------

    def add_adapters(self, r: int = 8, *, parallel: bool = False, activation: str = "gelu", scale: float = 1.0):
        for block in self.blocks:
            block.adapter = BottleneckAdapter(self.cfg.hidden, r, activation=activation, scale=scale, parallel=parallel)
        return self

    def add_prefix(self, prefix_len: int, reparam_hidden: int | None = None):
        cfg = self.cfg
        self.prefix = PrefixKV(cfg.layers, cfg.kv_heads, prefix_len, cfg.head_dim, reparam_hidden)
        return self

    def add_prompt(self, num_tokens: int):
        self.prompt = PromptEmbedding(num_tokens, self.cfg.hidden)
        return self

    # -- forward -------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``input_ids: (B, L)`` -> logits ``(B, L, vocab)`` for the input positions.

        ``attention_mask: (B, L)`` bool, True = a real token (keys only; padded queries
        still produce logits, which the caller ignores).
        """
        x = self.embed(input_ids)
        if self.prompt is not None:
            x = self.prompt(x)
            if attention_mask is not None:
                attention_mask = self.prompt.extend_attention_mask(attention_mask)
        n = x.shape[1]
        x = x + self.pos(torch.arange(n, device=x.device))
        prefixes = self.prefix() if self.prefix is not None else [None] * len(self.blocks)
        for block, prefix in zip(self.blocks, prefixes, strict=False):
            x = block(x, prefix, attention_mask)
        logits = self.lm_head(self.ln_f(x))
        if self.prompt is not None:
            logits = logits[:, self.prompt.num_tokens :]
        return logits


# -- the synthetic task -----------------------------------------------------------------

CYCLE_LEN = 8


def task_cycle(cfg: TinyConfig, seed: int = 1234) -> Tensor:
    """A fixed cycle of ``CYCLE_LEN`` distinct tokens: the task's hidden rule."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(cfg.vocab, generator=gen)[:CYCLE_LEN]


def task_batch(cycle: Tensor, batch: int, seq_len: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences that walk the cycle from a random start; the target is the next token.

    Every token of the cycle is equally frequent, so a model that ignores its input can
    do no better than ``log(CYCLE_LEN)`` (the unigram entropy): beating that needs the
    current token, i.e. a trained adapter that reads its input.
    """
    start = torch.randint(0, len(cycle), (batch, 1), generator=gen)
    idx = (start + torch.arange(seq_len + 1)) % len(cycle)
    seq = cycle[idx]
    return seq[:, :-1], seq[:, 1:]


UNIGRAM_LOSS = math.log(CYCLE_LEN)


PAD = 0  # any id works: padded positions are masked out as keys and ignored in the loss


def left_pad(inputs: Tensor, targets: Tensor, max_pad: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Shift each row right by a random 0..max_pad, filling with ``PAD``: returns
    ``(inputs, targets, attention_mask)`` with targets ``-100`` (ignored) at the padding."""
    b, n = inputs.shape
    pads = torch.randint(0, max_pad + 1, (b,), generator=gen)
    pos = torch.arange(n).expand(b, n)
    mask = pos >= pads[:, None]
    src = (pos - pads[:, None]).clamp(min=0)
    new_inputs = torch.where(mask, inputs.gather(1, src), torch.full_like(inputs, PAD))
    new_targets = torch.where(mask, targets.gather(1, src), torch.full_like(targets, -100))
    return new_inputs, new_targets, mask
