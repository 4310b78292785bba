"""``IA3Linear``: a drop-in ``nn.Linear`` (or GPT-2 ``Conv1D``) with an IA3 vector, and
``apply_ia3``, the model surgery with HF PEFT's ``IA3Config`` semantics and defaults."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distributed import check_not_wrapped, check_writable
from ..ops.ia3_linear import ia3_linear
from ._base import AdapterModule, nonempty_linear, strict_bool
from .lora_linear import conv1d_type
from .surgery import _matches, _module, mark_only_adapters_trainable

# peft.utils.constants (0.21.2): TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# ..._FEEDFORWARD_MODULES_MAPPING, copied so that peftops needs no peft (a test compares them).
IA3_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}

# peft's unmerge divides by l + 1e-8 (so that a zero entry does not divide by zero): the same here.
_UNMERGE_EPS = 1e-8


class IA3Linear(AdapterModule):
    r"""IA3 (Liu et al. 2022) on a linear layer: ``y = (x W^T + b) * l`` or, for a feedforward
    layer, ``y = (x * l) W^T + b`` (:func:`peftops.ia3_linear`).

    Same forward signature and attributes as ``nn.Linear`` (``in_features``, ``out_features``,
    ``weight``, ``bias``). The vector is the Parameter ``ia3_l``, shaped as HF PEFT's
    (``(out, 1)``, or ``(1, in)`` when ``is_feedforward``) and initialised to ones as peft's,
    so adapter state dicts map one to one and a fresh layer computes its base layer.

    ``fan_in_fan_out=True``: ``weight`` is stored ``(in, out)``, as transformers' ``Conv1D``
    (GPT-2) stores it; :meth:`from_conv1d` wraps one.

    :meth:`merge` multiplies ``l`` into ``weight`` (its rows, or its columns for a feedforward
    layer) and, for output scaling, into ``bias``, in place, as peft does; :meth:`unmerge`
    divides it out again (by ``l + 1e-8``, as peft; inexact where ``l`` is near zero).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        is_feedforward: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__()
        self._setup(base.weight, base.bias, is_feedforward, fan_in_fan_out=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, is_feedforward: bool = False) -> IA3Linear:
        """Wrap ``linear``: the new layer holds the same ``weight``/``bias`` Parameters, no copy."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"IA3Linear.from_linear: linear: expected an nn.Linear, got {type(linear).__name__}")
        nonempty_linear("IA3Linear.from_linear", linear)
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._setup(linear.weight, linear.bias, is_feedforward, fan_in_fan_out=False)
        return layer

    @classmethod
    def from_conv1d(cls, conv: nn.Module, is_feedforward: bool = False) -> IA3Linear:
        """Wrap a transformers ``Conv1D`` (weight ``(in, out)``), no copy."""
        conv1d = conv1d_type()
        if conv1d is None or not isinstance(conv, conv1d):
            raise TypeError(f"IA3Linear.from_conv1d: conv: expected a transformers Conv1D, got {type(conv).__name__}")
        weight = conv.weight
        if not isinstance(weight, Tensor) or weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"IA3Linear.from_conv1d: conv: expected a non-empty 2-D weight, got {weight!r:.80}")
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        bias: Any = conv.bias  # a Conv1D's bias Parameter (nn.Module attributes type as Tensor | Module)
        layer._setup(weight, bias, is_feedforward, fan_in_fan_out=True)
        return layer

    def _setup(self, weight: Tensor, bias: Tensor | None, is_feedforward: bool, fan_in_fan_out: bool) -> None:
        self.is_feedforward = strict_bool(type(self).__name__, "is_feedforward", is_feedforward)
        self.fan_in_fan_out = fan_in_fan_out
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = self._linear_weight().shape
        shape = (1, self.in_features) if is_feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=weight.device, dtype=weight.dtype))
        self.merged = False

    def _linear_weight(self) -> Tensor:
        """The base weight as ``F.linear`` takes it, ``(out, in)`` (a transposed view for Conv1D)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def reset_ia3_parameters(self) -> None:
        nn.init.ones_(self.ia3_l)

    def adapter_parameters(self) -> Iterator[Tensor]:
        yield self.ia3_l

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and self.ia3_l.requires_grad:
                raise RuntimeError(
                    "IA3Linear: the vector is merged into the weight and would get no gradient; "
                    "call unmerge() to train it, or eval() / torch.no_grad() for inference"
                )
            return F.linear(input, self._linear_weight(), self.bias)
        scale = self.ia3_l.reshape(-1)
        if scale.dtype != input.dtype:
            scale = scale.to(input.dtype)
        return ia3_linear(input, self._linear_weight(), scale, self.bias, scale_input=self.is_feedforward)

    def _weight_factor(self) -> Tensor:
        # ia3_l as it broadcasts against the stored weight (peft's transpose(ia3_l, fan_in_fan_out)).
        return self.ia3_l.T if self.fan_in_fan_out else self.ia3_l

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``l`` into ``weight`` (and ``bias`` for output scaling), as peft's ``merge``."""
        if self.merged:
            raise RuntimeError("IA3Linear.merge: the vector is already merged")
        check_writable("IA3Linear.merge", self)
        self.weight.copy_(torch.mul(self.weight, self._weight_factor()).to(self.weight.dtype))
        if not self.is_feedforward and self.bias is not None:
            self.bias.copy_(torch.mul(self.bias, self.ia3_l.reshape(self.bias.shape)).to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide ``l`` out again (by ``l + 1e-8``, as peft's ``unmerge``)."""
        if not self.merged:
            raise RuntimeError("IA3Linear.unmerge: the vector is not merged")
        check_writable("IA3Linear.unmerge", self)
        self.weight.copy_(torch.div(self.weight, self._weight_factor() + _UNMERGE_EPS).to(self.weight.dtype))
        if not self.is_feedforward and self.bias is not None:
            scale = self.ia3_l.reshape(self.bias.shape) + _UNMERGE_EPS
            self.bias.copy_(torch.div(self.bias, scale).to(self.bias.dtype))
        self.merged = False

    def unwrap(self) -> nn.Module:
        """A plain base layer holding this layer's ``weight``/``bias`` Parameters, no copy."""
        if self.fan_in_fan_out:
            conv1d = conv1d_type()
            assert conv1d is not None  # (a Conv1D was wrapped, so transformers is loaded)
            base: Any = conv1d(self.out_features, self.in_features)
        else:
            base = nn.Linear(1, 1, bias=False, device="meta")
            base.in_features, base.out_features = self.in_features, self.out_features
        base.weight = self.weight
        base.bias = self.bias
        return base.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"is_feedforward={self.is_feedforward}, fan_in_fan_out={self.fan_in_fan_out}, merged={self.merged}"
        )


def _names(owner: str, name: str, value: object) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Iterable):
        items = list(value)
        if all(isinstance(v, str) for v in items):
            return items
    raise TypeError(f"{owner}: {name}: expected a regex str or a list of str, got {value!r}")


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _is_feedforward(name: str, feedforward: str | list[str]) -> bool:
    # peft's _check_target_module_feedforward: a regex matches the whole name, a list entry is a
    # plain suffix (no dot boundary, unlike target_modules).
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, name) is not None
    return any(name.endswith(key) for key in feedforward)


def apply_ia3(
    model: nn.Module,
    target_modules: str | Iterable[str] | None = None,
    feedforward_modules: str | Iterable[str] | None = None,
    *,
    exclude_modules: str | Iterable[str] | None = None,
) -> nn.Module:
    """Swap the matching ``nn.Linear`` / GPT-2 ``Conv1D`` children of ``model`` for
    :class:`IA3Linear` in place, freeze everything but the IA3 vectors, and return ``model``.

    As peft's ``IA3Config``: ``target_modules`` names are matched exactly or as dotted suffixes,
    a str is a regex matched against the full name; ``feedforward_modules`` (the layers whose
    input is scaled) must be among the targets; a list entry matches as a plain suffix of the
    name, a str as a regex. ``None`` takes peft's defaults for ``model.config.model_type``
    (:data:`IA3_TARGET_MODULES`, :data:`IA3_FEEDFORWARD_MODULES`), and raises ``ValueError``
    for an architecture peft has none for. ``exclude_modules`` as peft's.
    """
    owner = "apply_ia3"
    _module(owner, model)
    check_not_wrapped(owner, model)
    target = _names(owner, "target_modules", target_modules)
    feedforward = _names(owner, "feedforward_modules", feedforward_modules)
    exclude = _names(owner, "exclude_modules", exclude_modules)
    model_type = _model_type(model)
    if target is None:
        if model_type not in IA3_TARGET_MODULES:
            raise ValueError(
                f"{owner}: target_modules: expected module names, or a model whose config.model_type has peft "
                f"defaults ({', '.join(sorted(IA3_TARGET_MODULES))}), got None for model_type {model_type!r}"
            )
        target = list(IA3_TARGET_MODULES[model_type])
    if feedforward is None:
        if model_type not in IA3_FEEDFORWARD_MODULES:
            raise ValueError(
                f"{owner}: feedforward_modules: expected module names, or a model whose config.model_type has peft "
                f"defaults ({', '.join(sorted(IA3_FEEDFORWARD_MODULES))}), got None for model_type {model_type!r}"
            )
        feedforward = list(IA3_FEEDFORWARD_MODULES[model_type])
    if isinstance(target, list) and isinstance(feedforward, list) and not set(feedforward) <= set(target):
        extra = sorted(set(feedforward) - set(target))
        raise ValueError(
            f"{owner}: feedforward_modules: expected a subset of target_modules {sorted(target)}, got extra {extra}"
        )
    conv1d = conv1d_type()
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and _matches(name, target)
        and not (exclude is not None and _matches(name, exclude))
        and not isinstance(module, IA3Linear)
    ]
    if not chosen:
        raise ValueError(f"{owner}: target_modules: expected names that match modules of the model, got {target!r}")
    swaps = []
    for name, module in chosen:
        ff = _is_feedforward(name, feedforward)
        # Exact types only: a subclass may override forward (quantized layers).
        if type(module) is nn.Linear:
            swaps.append((name, IA3Linear.from_linear(module, is_feedforward=ff)))
        elif conv1d is not None and type(module) is conv1d:
            swaps.append((name, IA3Linear.from_conv1d(module, is_feedforward=ff)))
        else:
            raise TypeError(
                f"{owner}: target_modules: {name!r} expected an nn.Linear or transformers' Conv1D, "
                f"got {type(module).__name__}"
            )
    for name, layer in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    return mark_only_adapters_trainable(model)


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """The model's :class:`IA3Linear` layers by full name."""
    _module("ia3_layers", model)
    return {name: m for name, m in model.named_modules() if isinstance(m, IA3Linear)}
