"""``PrefixKV`` (prefix tuning) and ``PromptEmbedding`` (prompt tuning)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import AdapterModule, positive_int


class PrefixKV(AdapterModule):
    r"""Learned per-layer prefix keys and values (Li & Liang 2021).

    ``forward()`` returns one ``(prefix_k, prefix_v)`` pair per layer, each ``(Hkv, P, D)``,
    shared by the batch: pass them to :func:`peftops.prefix_attention`, which reads them
    without expanding them over the batch.

    With ``reparam_hidden`` the prefixes are produced by the paper's reparameterisation, an
    MLP over a learned ``(P, Hkv * D)`` embedding,
    ``[k; v]_l = (W_2 tanh(W_1 E + b_1) + b_2)`` split per layer, which trains more stably;
    :meth:`merge_reparam` evaluates it once after training and drops the MLP.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        prefix_len: int,
        head_dim: int,
        reparam_hidden: int | None = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = "PrefixKV"
        self.num_layers = positive_int(owner, "num_layers", num_layers)
        self.num_kv_heads = positive_int(owner, "num_kv_heads", num_kv_heads)
        self.prefix_len = positive_int(owner, "prefix_len", prefix_len)
        self.head_dim = positive_int(owner, "head_dim", head_dim)
        factory = {"device": device, "dtype": dtype}
        width = self.num_kv_heads * self.head_dim
        if reparam_hidden is None:
            self.reparam_hidden = None
            # Unit-variance keys/values, like the embedding init HF PEFT uses for prefixes.
            self.prefix = nn.Parameter(torch.randn(self._shape(), **factory))
        else:
            self.reparam_hidden = positive_int(owner, "reparam_hidden", reparam_hidden)
            self.embedding = nn.Parameter(torch.randn(self.prefix_len, width, **factory))
            self.reparam = nn.Sequential(
                nn.Linear(width, self.reparam_hidden, **factory),
                nn.Tanh(),
                nn.Linear(self.reparam_hidden, self.num_layers * 2 * width, **factory),
            )

    def _shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_kv_heads, self.prefix_len, self.head_dim)

    def prefixes(self) -> Tensor:
        """All prefixes as one ``(num_layers, 2, Hkv, P, D)`` tensor."""
        if self.reparam_hidden is None:
            return self.prefix
        flat = self.reparam(self.embedding)  # (P, layers * 2 * Hkv * D)
        p, layers, hkv, d = self.prefix_len, self.num_layers, self.num_kv_heads, self.head_dim
        return flat.reshape(p, layers, 2, hkv, d).permute(1, 2, 3, 0, 4)

    def forward(self) -> list[tuple[Tensor, Tensor]]:
        allp = self.prefixes()
        return [(allp[i, 0], allp[i, 1]) for i in range(self.num_layers)]

    @torch.no_grad()
    def merge_reparam(self) -> None:
        """Replace the MLP by the prefixes it currently produces (Li & Liang drop it after training)."""
        if self.reparam_hidden is None:
            raise RuntimeError("PrefixKV.merge_reparam: this PrefixKV has no reparameterisation")
        value = self.prefixes().detach().clone().contiguous()
        del self.reparam
        del self.embedding
        self.reparam_hidden = None
        self.prefix = nn.Parameter(value)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, prefix_len={self.prefix_len}, "
            f"head_dim={self.head_dim}, reparam_hidden={self.reparam_hidden}"
        )


class PromptEmbedding(AdapterModule):
    r"""Prompt tuning (Lester et al. 2021): ``num_tokens`` learned embeddings prepended to the
    input embeddings. Initialised uniform in [-0.5, 0.5], the paper's random init.

    ``forward(inputs_embeds: (B, L, H)) -> (B, num_tokens + L, H)``;
    :meth:`extend_attention_mask` prepends the matching "attend" entries to a ``(B, L)`` mask.
    """

    def __init__(self, num_tokens: int, hidden: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.num_tokens = positive_int("PromptEmbedding", "num_tokens", num_tokens)
        self.hidden = positive_int("PromptEmbedding", "hidden", hidden)
        self.weight = nn.Parameter(
            torch.empty(self.num_tokens, self.hidden, device=device, dtype=dtype).uniform_(-0.5, 0.5)
        )

    def forward(self, inputs_embeds: Tensor) -> Tensor:
        if not isinstance(inputs_embeds, Tensor):
            raise TypeError(
                f"PromptEmbedding: inputs_embeds: expected a torch.Tensor, got {type(inputs_embeds).__name__}"
            )
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.hidden:
            raise ValueError(
                f"PromptEmbedding: inputs_embeds: expected shape (B, L, {self.hidden}), got {tuple(inputs_embeds.shape)}"
            )
        if inputs_embeds.dtype != self.weight.dtype:
            raise TypeError(
                f"PromptEmbedding: inputs_embeds: expected dtype {self.weight.dtype}, got {inputs_embeds.dtype}"
            )
        prompt = self.weight.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)
        return torch.cat([prompt, inputs_embeds], dim=1)

    def extend_attention_mask(self, attention_mask: Tensor) -> Tensor:
        """``(B, L)`` mask (bool or 0/1 of any dtype) -> ``(B, num_tokens + L)``, prompt positions attended."""
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"PromptEmbedding: attention_mask: expected a torch.Tensor, got {type(attention_mask).__name__}"
            )
        if attention_mask.dim() != 2:
            raise ValueError(
                f"PromptEmbedding: attention_mask: expected shape (B, L), got {tuple(attention_mask.shape)}"
            )
        ones = attention_mask.new_ones(attention_mask.shape[0], self.num_tokens)
        return torch.cat([ones, attention_mask], dim=1)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, hidden={self.hidden}"
