"""``LoRAEmbedding``: a drop-in ``nn.Embedding`` with a LoRA adapter, as HF PEFT's ``lora.Embedding``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import AdapterModule, positive_int
from .lora_linear import LoRALayerBase


class LoRAEmbedding(LoRALayerBase):
    r"""``y = E[x] + scaling * A^T[x] B^T``: the base lookup plus a rank-``r`` lookup table
    ``A^T: (num_embeddings, r)`` mapped up by ``B: (embedding_dim, r)``.

    Parameters named and shaped as HF PEFT's ``lora.Embedding``: ``lora_embedding_A: (r,
    num_embeddings)`` and ``lora_embedding_B: (embedding_dim, r)``, initialised as peft does (A
    zeros, B standard normal), so a fresh layer computes exactly the base embedding. The
    adapter's lookup takes the base layer's ``padding_idx``, ``max_norm``, ``norm_type``,
    ``scale_grad_by_freq`` and ``sparse``, as peft passes them. ``lora_dropout`` is kept as
    given but not applied: peft applies no dropout to embedding lookups either.

    Holds the base embedding's ``weight`` Parameter (shared, not copied), so the model's state
    dict keys are unchanged. :meth:`merge` writes ``W + scaling * (B A)^T`` into it; merging,
    ties and state dicts behave as in :class:`~peftops.nn.LoRALinear`. A tied output layer (an
    ``lm_head`` holding the same weight) keeps training as usual, and merging refuses it.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        positive_int(owner, "num_embeddings", num_embeddings)
        positive_int(owner, "embedding_dim", embedding_dim)
        base = nn.Embedding(
            num_embeddings,
            embedding_dim,
            padding_idx=padding_idx,
            max_norm=max_norm,
            norm_type=norm_type,
            scale_grad_by_freq=scale_grad_by_freq,
            sparse=sparse,
            device=device,
            dtype=dtype,
        )
        super().__init__()
        self._setup(base, r, alpha, dropout, use_rslora)

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False
    ) -> LoRAEmbedding:
        """Wrap ``embedding``: the new layer holds the same ``weight`` Parameter, no copy."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"LoRAEmbedding.from_embedding: embedding: expected an nn.Embedding, got {type(embedding).__name__}"
            )
        for name, value in zip(("num_embeddings", "embedding_dim"), embedding.weight.shape, strict=True):
            if value < 1:
                raise ValueError(f"LoRAEmbedding.from_embedding: embedding: expected {name} >= 1, got {value}")
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._setup(embedding, r, alpha, dropout, use_rslora)
        return layer

    def _setup(self, base: nn.Embedding, r, alpha, dropout, use_rslora) -> None:
        self.weight = base.weight
        self.num_embeddings, self.embedding_dim = base.weight.shape
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        r = self._init_lora(r, alpha, dropout, use_rslora)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_embedding_A = nn.Parameter(torch.empty(r, self.num_embeddings, device=device, dtype=dtype))
        self.lora_embedding_B = nn.Parameter(torch.empty(self.embedding_dim, r, device=device, dtype=dtype))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        nn.init.zeros_(self.lora_embedding_A)
        nn.init.normal_(self.lora_embedding_B)

    def adapter_parameters(self) -> Iterator[Tensor]:
        yield self.lora_embedding_A
        yield self.lora_embedding_B

    def _embed(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(
            input,
            weight,
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            self._check_merged_forward()
            return self._embed(input, self.weight)
        result = self._embed(input, self.weight)
        after_a = self._embed(input, self.lora_embedding_A.T)
        # Cast back as peft does: under autocast the rank-r product may come out in another dtype.
        return (result + (after_a @ self.lora_embedding_B.T) * self.scaling).to(result.dtype)

    def delta_weight(self) -> Tensor:
        """``scaling * (B A)^T``, ``(num_embeddings, embedding_dim)`` as ``weight``, in float32
        (float64 for a float64 layer)."""
        acc = self._acc_dtype()
        return self.scaling * (self.lora_embedding_B.to(acc) @ self.lora_embedding_A.to(acc)).T

    def unwrap(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding this layer's ``weight`` Parameter (no copy, no merge:
        merge first to keep the update)."""
        with torch.device("meta"):
            base = nn.Embedding(
                self.num_embeddings,
                self.embedding_dim,
                padding_idx=self.padding_idx,
                max_norm=self.max_norm,
                norm_type=self.norm_type,
                scale_grad_by_freq=self.scale_grad_by_freq,
                sparse=self.sparse,
            )
        base.weight = self.weight
        return base.train(self.training)

    def extra_repr(self) -> str:
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return (
            f"{self.num_embeddings}, {self.embedding_dim}{extra}, r={self.r}, alpha={self.lora_alpha:g}, "
            f"rslora={self.use_rslora}, merged={self.merged}"
        )
