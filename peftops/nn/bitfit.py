"""BitFit (Ben-Zaken et al. 2021): train the model's bias terms, nothing else."""

from __future__ import annotations

from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from ..distributed import check_not_wrapped
from ._base import AdapterModule, strict_bool
from .lora_linear import conv1d_type
from .surgery import BITFIT_ATTR, freeze_base

__all__ = ["BitFitCount", "apply_bitfit", "bias_parameters"]


class BitFitCount(NamedTuple):
    """What :func:`apply_bitfit` left trainable: a :class:`~peftops.nn.ParamCount` plus the
    number of bias parameters it added (``added``, elements)."""

    trainable: int
    total: int
    added: int = 0

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {100 * self.fraction:.4f} || added bias params: {self.added:,}"
        )


def bias_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter named ``bias`` (or ``*.bias``), by name, each once: peft's rule for
    ``bias="all"``, which also catches biases that are not a layer's attribute (BERT's MLM head
    holds ``cls.predictions.bias``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bias_parameters: model: expected an nn.Module, got {type(model).__name__}")
    return {n: p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")}


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def _add_missing(model: nn.Module) -> int:
    conv1d = conv1d_type()
    head = _output_head(model)
    # Layers inside a peftops adapter (LoRA's lora_A / lora_B) are its parameter holders: the
    # fused ops read their weights only, so a bias there would train and change nothing.
    inside = {id(sub) for m in model.modules() if isinstance(m, AdapterModule) for sub in m.modules() if sub is not m}
    added = 0
    for module in model.modules():
        # Exact types only: a subclass may not read self.bias (quantised layers). The output head
        # is left alone: its bias would be vocabulary-sized and a tied head shares its weight
        # with the input embeddings, which have no bias to tie.
        if module is head or id(module) in inside or getattr(module, "bias", None) is not None:
            continue
        if type(module) is nn.Linear:
            weight, out_dim = module.weight, 0
        elif conv1d is not None and type(module) is conv1d:
            weight, out_dim = cast(Tensor, module.weight), 1  # Conv1D keeps its weight (in, out)
        else:
            continue
        out_features = weight.shape[out_dim]
        module.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=weight.dtype))
        added += out_features
    return added


def apply_bitfit(model: nn.Module, add_missing: bool = False) -> BitFitCount:
    """Freeze every parameter of ``model`` except its biases (:func:`bias_parameters`), in place;
    adapters an earlier ``apply_*`` added keep their ``requires_grad``, and a later ``apply_*``
    keeps the biases training.

    ``add_missing=True`` first gives every ``nn.Linear`` and transformers ``Conv1D`` without a
    bias a zero-initialised one (so the model computes what it computed before), except the
    output head (``model.get_output_embeddings()``) and the layers inside peftops adapters (LoRA's
    ``lora_A`` / ``lora_B``: the fused ops would never read such a bias, nor do they read one added
    to a layer LoRA wraps, which gets none); the count of added elements is
    ``report.added``. Returns the trainable/total counts (shared parameters once).

    A model left with no bias to train (Llama has none unless ``add_missing=True``) is a
    ``ValueError``: training nothing is never what was meant.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_bitfit: model: expected an nn.Module, got {type(model).__name__}")
    check_not_wrapped("apply_bitfit", model)
    add_missing = strict_bool("apply_bitfit", "add_missing", add_missing)
    added = _add_missing(model) if add_missing else 0
    biases = bias_parameters(model)
    if not biases:
        raise ValueError(
            f"apply_bitfit: model: expected at least one bias parameter, got none in {type(model).__name__} "
            "(pass add_missing=True to add zero biases to its linear layers)"
        )
    # Biases become adapters: a later apply_* keeps them training, as it keeps LoRA's A and B.
    setattr(model, BITFIT_ATTR, True)
    freeze_base(model)  # adapters of an earlier apply_* keep their flags
    for p in biases.values():
        p.requires_grad_(True)
    seen = {id(p): p for p in model.parameters()}
    return BitFitCount(
        trainable=sum(p.numel() for p in seen.values() if p.requires_grad),
        total=sum(p.numel() for p in seen.values()),
        added=added,
    )
