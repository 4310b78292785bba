"""Run a live HF PEFT model's LoRA layers on peftops' :func:`~peftops.lora_linear`, in place.

``accelerate(model)`` binds a replacement ``forward`` on each eligible
``peft.tuners.lora.layer.Linear`` *instance* (peft's classes are never patched, so other models
and ``isinstance`` checks are untouched); ``restore(model)`` deletes those bindings, so the
class's ``forward`` (peft's) is found again. Parameters are the layers' own: nothing is copied,
so ``save_pretrained``, ``set_adapter``, ``disable_adapter()``, ``merge_and_unload``, optimizers
and the Trainer see the same tensors as before.

What runs on the op, per call (everything else runs peft's own forward, see below):

* the active adapter, or several: the first through the op (base GEMM, bias and its LoRA term
  fused), each further one added with peft's own formula ``lora_B(lora_A(dropout(x))) * scaling``,
  as peft sums them;
* dropout: ``p`` from peft's ``lora_dropout[name]`` (``nn.Dropout``; ``nn.Identity`` is 0), active
  when that module is in training mode. The op draws its own mask from torch's generator, so
  with dropout the two forwards agree in distribution, not bit for bit;
* the base layer's bias; the scale is peft's ``scaling[name]`` (rsLoRA and ``set_scale``
  included), read at each call;
* ``disable_adapters`` and merged layers: the base layer alone, as peft;
* mixed batches (peft's ``adapter_names=``): rows grouped by adapter, each group through the op,
  ``"__base__"`` rows and adapters this layer lacks through the base layer.

QLoRA: peft's 4-bit layer (``peft.tuners.lora.bnb.Linear4bit``, over bitsandbytes'
``Linear4bit``: NF4 or FP4, double-quantised scales or not) runs :func:`~peftops.lora_linear_nf4`
on the base's packed weight (``weight.data``, viewed as uint8 whatever its ``quant_storage``) and
``weight.quant_state``, read at each call, so a merge that requantises the base is seen. peft's
4-bit forward computes the base in bitsandbytes' compute dtype and the LoRA term in the adapter's
dtype, casting x to each; the op computes everything in x's dtype, so a call runs on it only when
x, the compute dtype and the adapter weights share one dtype (W is dequantised straight to it,
as bitsandbytes 0.50 does, whatever dtype it was quantised from; QLoRA with float32 adapters
over bfloat16 activations, peft's default, runs peft's forward), outside autocast, and while the
weight is in bitsandbytes' layout (not the AVX512-BF16 repacking its CPU inference makes).

A layer the op cannot compute as peft does (DoRA or another LoRA variant, ``lora_bias``, a base
layer that is neither ``nn.Linear``, GPT-2's ``Conv1D`` nor (under peft's 4-bit LoRA layer)
bitsandbytes' ``Linear4bit``, such as an 8-bit layer, embeddings and convolutions,
``fan_in_fan_out`` on an ``nn.Linear``, hooks on the base layer, ...) is left alone and named in the
report with the reason. A call that an accelerated layer cannot take (an extra argument, a
dtype mismatch, an adapter added later with a variant, ...) runs peft's forward, is counted in
``report.fallbacks`` and warned about once per reason (:class:`PeftopsFallbackWarning`).
"""

from __future__ import annotations

import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..ops.lora_linear import lora_linear
from ..ops.lora_linear_nf4 import lora_linear_nf4

__all__ = ["AccelerateReport", "PeftopsFallbackWarning", "accelerate", "restore"]


class PeftopsFallbackWarning(UserWarning):
    """An accelerated layer ran peft's own forward for a call (once per reason and report)."""


@dataclass
class AccelerateReport:
    """What :func:`accelerate` did to a model.

    ``accelerated``: module names whose LoRA layers run peftops' op. ``quantized``: those of them
    over a 4-bit base, which run :func:`~peftops.lora_linear_nf4` (the others run
    :func:`~peftops.lora_linear`). ``skipped``: module name -> why the layer keeps peft's forward.
    ``fallbacks``: ``(module name, reason) -> calls`` that an accelerated layer handed to peft's
    forward at call time (see the module docstring).
    """

    accelerated: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    fallbacks: Counter = field(default_factory=Counter)
    quantized: list[str] = field(default_factory=list)
    _warned: set = field(default_factory=set, repr=False, compare=False)

    def __str__(self) -> str:
        ops = "lora_linear" + (", lora_linear_nf4 for 4-bit bases" if self.quantized else "")
        lines = [
            f"peftops.accelerate: {len(self.accelerated)} LoRA layer(s) on peftops' {ops}, "
            f"{len(self.skipped)} left on peft's forward"
        ]
        four_bit = set(self.quantized)
        lines += [
            f"  accelerated  {name}" + (" (4-bit base: lora_linear_nf4)" if name in four_bit else "")
            for name in self.accelerated
        ]
        lines += [f"  skipped      {name}: {reason}" for name, reason in self.skipped.items()]
        if self.fallbacks:
            lines.append(f"  calls run on peft's forward: {sum(self.fallbacks.values())}")
            lines += [f"    {n} x {name}: {reason}" for (name, reason), n in self.fallbacks.items()]
        return "\n".join(lines)


# Per-instance attributes set by accelerate() and removed by restore(): the bound forward (an
# instance attribute shadows the class's) and the layer's name and report, for the fallback count.
_STATE = "_peftops_accelerate"


@dataclass
class _LayerState:
    name: str
    report: AccelerateReport


def _peft_lora():
    try:
        from peft.tuners.lora import layer as lora_layer
    except ImportError as e:  # pragma: no cover - the hf extra is part of the test extra
        raise ImportError("peftops.accelerate needs peft and transformers: pip install 'peftops[hf]'") from e
    return lora_layer


def _has_hooks(module: nn.Module) -> bool:
    # Hooks would be skipped by the op, which reads the weights instead of calling the module;
    # accelerate's offload hooks (``_hf_hook``) also replace the instance's forward.
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or hasattr(module, "_hf_hook")
    )


def _is_conv1d(base: nn.Module) -> bool:
    """transformers' ``Conv1D`` exactly (GPT-2): ``x W + b`` with ``W: (in, out)``. Looked up in
    ``sys.modules``: a model holding one has imported transformers already."""
    module = sys.modules.get("transformers.pytorch_utils")
    return module is not None and type(base) is getattr(module, "Conv1D", None)


def _bnb_linear4bit() -> Any:
    """bitsandbytes' ``Linear4bit``, looked up in ``sys.modules`` (a model holding one has imported
    bitsandbytes; importing it here would load its native library for nothing)."""
    module = sys.modules.get("bitsandbytes.nn.modules")
    return getattr(module, "Linear4bit", None)


def _peft_linear4bit() -> Any:
    """peft's 4-bit LoRA layer class, once peft has imported it (only with bitsandbytes present)."""
    module = sys.modules.get("peft.tuners.lora.bnb")
    return getattr(module, "Linear4bit", None)


def _is_4bit_layer(layer: Any) -> bool:
    cls = _peft_linear4bit()
    return cls is not None and isinstance(layer, cls)


def _base_reason_4bit(layer: Any) -> str | None:
    base = layer.base_layer
    cls = _bnb_linear4bit()
    if cls is None or not isinstance(base, cls) or type(base).forward is not cls.forward:
        kind = f"{type(base).__module__}.{type(base).__qualname__}"
        return f"base layer of peft's 4-bit LoRA layer is {kind}, not bitsandbytes' Linear4bit"
    if getattr(base.weight, "quant_state", None) is None:
        return "the 4-bit base layer has no quant_state (not quantised yet: bitsandbytes quantises on .to(device))"
    if _has_hooks(base):
        return "the base layer has hooks or a replaced forward (offloading, quantisation, ...)"
    return None


def _base_reason(layer: Any) -> str | None:
    base = layer.base_layer
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)
    if _is_conv1d(base):
        # peft runs a Conv1D base as x W + b and stores lora_A/lora_B as for nn.Linear, so the
        # op computes it from the transposed view of W (every backend takes any weight strides).
        if not fan_in_fan_out:
            return "base layer is transformers Conv1D with fan_in_fan_out=False (peft would transpose the update)"
    elif not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        kind = f"{type(base).__module__}.{type(base).__qualname__}"
        return f"base layer is {kind}, not torch.nn.Linear or transformers Conv1D (lora_linear computes x W^T + b only)"
    elif fan_in_fan_out:
        return "fan_in_fan_out=True on an nn.Linear (weight stored transposed)"
    if _has_hooks(base):
        return "the base layer has hooks or a replaced forward (offloading, quantisation, ...)"
    return None


def _adapter_reason(layer: Any, name: str) -> str | None:
    """Why adapter ``name`` of ``layer`` cannot run on the op (static properties only)."""
    variant = layer.lora_variant.get(name)
    if variant is not None:
        return f"adapter {name!r} uses the LoRA variant {type(variant).__name__} (DoRA, aLoRA, ...)"
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if layer.lora_bias.get(name, False) or getattr(lora_b, "bias", None) is not None:
        return f"adapter {name!r} has lora_bias=True"
    if type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear:
        return f"adapter {name!r}: lora_A/lora_B are {type(lora_a).__name__}/{type(lora_b).__name__}, not nn.Linear"
    if lora_a.bias is not None:
        return f"adapter {name!r}: lora_A has a bias"
    if _has_hooks(lora_a) or _has_hooks(lora_b):
        return f"adapter {name!r}: lora_A or lora_B has hooks"
    dropout = layer.lora_dropout[name]
    if type(dropout) is nn.Dropout:
        if not 0.0 <= dropout.p < 1.0:
            return f"adapter {name!r}: lora_dropout p={dropout.p} (the op takes 0 <= p < 1)"
    elif type(dropout) is not nn.Identity:
        return f"adapter {name!r}: lora_dropout is {type(dropout).__name__}, not nn.Dropout or nn.Identity"
    return None


def _dropout_args(layer: Any, name: str) -> tuple[float, bool]:
    dropout = layer.lora_dropout[name]
    if type(dropout) is nn.Identity:
        return 0.0, False
    return float(dropout.p), dropout.training


def _compute_dtype(base: Any, x: Tensor) -> torch.dtype | None:
    """The dtype bitsandbytes' ``Linear4bit.forward`` would compute in for x: its first call
    adopts x's dtype when that is float32 or bfloat16 (``set_compute_type``), later calls keep it."""
    if not base.compute_type_is_set and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    return base.compute_dtype


def _call_reason_4bit(layer: Any, x: Tensor, adapters) -> str | None:
    base = layer.base_layer
    state = getattr(base.weight, "quant_state", None)
    if state is None:
        return "the 4-bit base layer has no quant_state"
    if getattr(state, "packing_format_for_cpu", False):
        return "the 4-bit weight is in bitsandbytes' AVX512-BF16 CPU layout (repacked by an inference call)"
    if base.weight.device != x.device:
        return "x and the 4-bit base weight are on different devices"
    if torch.is_autocast_enabled(x.device.type):
        # peft then skips its casts and bitsandbytes casts x to its compute dtype itself: two
        # dtypes in one layer, which the op (one dtype throughout) does not reproduce.
        return "autocast is on over a 4-bit base (bitsandbytes computes in its own compute dtype)"
    compute = _compute_dtype(base, x)
    if compute is not None and compute != x.dtype:
        return f"x is {x.dtype} but the 4-bit base computes in {compute} (bnb_4bit_compute_dtype)"
    if base.bias is not None and base.bias.device != x.device:
        return "x and the base bias differ in device"
    for name in adapters:
        reason = _adapter_reason(layer, name)
        if reason is not None:
            return reason
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if a.dtype != x.dtype or b.dtype != x.dtype or a.device != x.device or b.device != x.device:
            # peft would cast x to the adapter's dtype and the LoRA term back to x's.
            return f"adapter {name!r}: x and the LoRA weights differ in dtype or device"
    return None


def _call_reason(layer: Any, x: Tensor, adapters) -> str | None:
    """Why this call cannot run on the op; ``adapters``: the LoRA adapters it would run."""
    if _has_hooks(layer.base_layer):
        return "the base layer has hooks or a replaced forward (offloading, quantisation, ...)"
    base = layer.base_layer
    if not isinstance(x, Tensor) or not x.dtype.is_floating_point or x.dim() == 0:
        return "x is not a floating-point tensor with a feature dimension"
    if _is_4bit_layer(layer):
        return _call_reason_4bit(layer, x, adapters)
    device = x.device
    # Under autocast the op casts every float argument to the autocast dtype as F.linear does
    # (peft's nn.Linear calls are cast the same way), so only then may the dtypes differ.
    dtypes = (
        _AUTOCAST_ELIGIBLE
        if x.dtype in _AUTOCAST_ELIGIBLE and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        else (x.dtype,)
    )
    if base.weight.dtype not in dtypes or base.weight.device != device:
        return "x and the base weight differ in dtype or device"
    if base.bias is not None and (base.bias.dtype not in dtypes or base.bias.device != device):
        return "x and the base bias differ in dtype or device"
    for name in adapters:
        reason = _adapter_reason(layer, name)
        if reason is not None:
            return reason
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if a.dtype not in dtypes or b.dtype not in dtypes or a.device != device or b.device != device:
            return f"adapter {name!r}: x and the LoRA weights differ in dtype or device"
    return None


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


def _fallback(layer: Any, reason: str, x, args, kwargs) -> Tensor:
    state: _LayerState = layer.__dict__[_STATE]
    report = state.report
    report.fallbacks[(state.name, reason)] += 1
    if reason not in report._warned:
        report._warned.add(reason)
        warnings.warn(
            f"peftops.accelerate: {state.name} ran peft's own forward for a call: {reason}. "
            "Further such calls are counted in the AccelerateReport's fallbacks, not warned about.",
            PeftopsFallbackWarning,
            stacklevel=3,
        )
    return type(layer).forward(layer, x, *args, **kwargs)


def _with_adapter(layer: Any, x: Tensor, name: str) -> Tensor:
    base = layer.base_layer
    p, training = _dropout_args(layer, name)
    if _is_4bit_layer(layer):
        if not base.compute_type_is_set:
            # What bitsandbytes' first forward would have recorded, so that later calls (peft's
            # forward included) see the same compute dtype whichever path ran first.
            base.set_compute_type(x)
            base.compute_type_is_set = True
        weight = base.weight
        packed = weight.data if weight.data.dtype == torch.uint8 else weight.data.view(torch.uint8)
        bias = base.bias
        return lora_linear_nf4(
            x,
            packed,
            weight.quant_state,
            layer.lora_A[name].weight,
            layer.lora_B[name].weight,
            scale=float(layer.scaling[name]),
            # bitsandbytes casts its bias to x's dtype (in place); a cast here leaves the Parameter be.
            bias=bias.to(x.dtype) if bias is not None else None,
            dropout_p=p,
            training=training,
        )
    return lora_linear(
        x,
        base.weight.t() if _is_conv1d(base) else base.weight,
        layer.lora_A[name].weight,
        layer.lora_B[name].weight,
        scale=float(layer.scaling[name]),
        bias=base.bias,
        dropout_p=p,
        training=training,
    )


def _extra_keywords(kwargs) -> list[str]:
    # adapter_names is peft's mixed batch; alora_offsets=None is what peft's hooks may pass to
    # every layer (aLoRA itself is a variant, refused per adapter).
    return sorted(k for k, v in kwargs.items() if k != "adapter_names" and not (k == "alora_offsets" and v is None))


def _accelerated_forward(self, x, *args, **kwargs):
    # peft's own argument checks first, so that errors (adapter_names of the wrong length,
    # adapter_names with merged adapters) are peft's, word for word.
    self._check_forward_args(x, *args, **kwargs)
    adapter_names = kwargs.get("adapter_names")
    if args or (kwargs and _extra_keywords(kwargs)):
        extra = f"extra arguments to forward ({len(args)} positional, keywords {_extra_keywords(kwargs)})"
        return _fallback(self, extra, x, args, kwargs)
    base = self.base_layer

    if self.disable_adapters:
        if _has_hooks(base):
            return _fallback(self, "the base layer has hooks or a replaced forward", x, args, kwargs)
        if self.merged:
            self.unmerge()
        return base(x)

    if adapter_names is not None:
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(i)
        lora_groups = [n for n in groups if n != "__base__" and n in self.lora_A]
        reason = _call_reason(self, x, lora_groups)
        if reason is not None:
            return _fallback(self, reason, x, args, kwargs)
        if len(groups) == 1:
            (name,) = groups
            return _with_adapter(self, x, name) if name in lora_groups else base(x)
        order, outs = [], []
        for name, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            sub = x.index_select(0, index)
            outs.append(_with_adapter(self, sub, name) if name in lora_groups else base(sub))
            order.extend(rows)
        perm = torch.tensor(order, device=x.device)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(len(order), device=x.device)
        return torch.cat(outs, 0).index_select(0, inverse)

    if self.merged:
        if _has_hooks(base):
            return _fallback(self, "the base layer has hooks or a replaced forward", x, args, kwargs)
        return base(x)

    active = [name for name in self.active_adapters if name in self.lora_A]
    reason = _call_reason(self, x, active)
    if reason is not None:
        return _fallback(self, reason, x, args, kwargs)
    if not active:
        return base(x)
    result = _with_adapter(self, x, active[0])
    for name in active[1:]:
        # peft's own term for each further adapter: the op would recompute the base GEMM.
        result = result + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
    return result


def _is_accelerated(module: nn.Module) -> bool:
    bound = module.__dict__.get("forward")
    return getattr(bound, "__func__", None) is _accelerated_forward


def accelerate(model: nn.Module) -> AccelerateReport:
    """Make ``model``'s peft LoRA ``Linear`` layers run :func:`peftops.lora_linear` (and peft's
    4-bit ``Linear4bit`` layers :func:`peftops.lora_linear_nf4`), in place.

    ``model``: a ``peft.PeftModel`` or any module with peft LoRA layers injected (for example a
    transformers model after ``inject_adapter_in_model`` or ``add_adapter``). Returns an
    :class:`AccelerateReport` naming every LoRA layer, accelerated or skipped with the reason.
    Undo with :func:`restore`. Layers that peft creates later (an adapter added on new target
    modules) are not accelerated: ``restore`` and ``accelerate`` again to include them.

    Raises ``TypeError`` if ``model`` is not a module, ``ValueError`` if it has no peft LoRA
    layer or is already accelerated (accelerating twice is an error, not a no-op, so that a
    second report cannot silently describe nothing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            "peftops.accelerate: model must be a torch.nn.Module (a peft.PeftModel or a transformers model "
            f"with peft LoRA adapters), got {type(model).__module__}.{type(model).__qualname__}"
        )
    lora_layer = _peft_lora()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, lora_layer.LoraLayer)]
    if not layers:
        raise ValueError(
            f"peftops.accelerate: model ({type(model).__qualname__}) has no peft LoRA layer "
            "(expected a peft.PeftModel with a LoraConfig, or a model with LoRA adapters injected by peft)"
        )
    already = [name for name, m in layers if _is_accelerated(m)]
    if already:
        raise ValueError(
            f"peftops.accelerate: model ({type(model).__qualname__}) is already accelerated "
            f"({len(already)} layer(s), e.g. {already[0]!r}); call peftops.restore(model) first"
        )

    report = AccelerateReport()
    for name, module in layers:
        reason = _layer_reason(module, lora_layer)
        if reason is not None:
            report.skipped[name] = reason
            continue
        module.__dict__[_STATE] = _LayerState(name, report)
        module.forward = types.MethodType(_accelerated_forward, module)
        report.accelerated.append(name)
        if _is_4bit_layer(module):
            report.quantized.append(name)
    if not report.accelerated:
        warnings.warn(f"peftops.accelerate: no LoRA layer accelerated\n{report}", PeftopsFallbackWarning, stacklevel=2)
    return report


def _layer_reason(module: Any, lora_layer) -> str | None:
    qlora = _peft_linear4bit()
    if qlora is not None and isinstance(module, qlora):
        return _layer_reason_4bit(module, qlora)
    if not isinstance(module, lora_layer.Linear):
        base = module.get_base_layer()
        return (
            f"peft layer type {type(module).__module__}.{type(module).__qualname__} "
            f"(base {type(base).__qualname__}) is not a LoRA Linear"
        )
    if type(module).forward is not lora_layer.Linear.forward:
        return f"{type(module).__qualname__} overrides peft's Linear.forward"
    if "forward" in module.__dict__:
        return "the layer's forward was already replaced on the instance (another patch)"
    reason = _base_reason(module)
    if reason is not None:
        return reason
    for name in module.lora_A:
        reason = _adapter_reason(module, name)
        if reason is not None:
            return reason
    return None


def _layer_reason_4bit(module: Any, qlora: Any) -> str | None:
    if type(module).forward is not qlora.forward:
        return f"{type(module).__qualname__} overrides peft's 4-bit Linear4bit.forward"
    if "forward" in module.__dict__:
        return "the layer's forward was already replaced on the instance (another patch)"
    reason = _base_reason_4bit(module)
    if reason is not None:
        return reason
    for name in module.lora_A:
        reason = _adapter_reason(module, name)
        if reason is not None:
            return reason
    return None


def restore(model: nn.Module) -> list[str]:
    """Give ``model``'s accelerated layers peft's forward back; returns their names.

    Raises ``ValueError`` if no layer of ``model`` is accelerated (never accelerated, or restored
    already: restoring twice is an error, so that a restore that did nothing is not mistaken for
    one that did), ``TypeError`` if ``model`` is not a module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"peftops.restore: model must be a torch.nn.Module, got {type(model).__module__}.{type(model).__qualname__}"
        )
    restored = []
    for name, module in model.named_modules():
        if _is_accelerated(module):
            del module.__dict__["forward"]
            module.__dict__.pop(_STATE, None)
            restored.append(name)
    if not restored:
        raise ValueError(
            f"peftops.restore: model ({type(model).__qualname__}) has no layer accelerated by peftops.accelerate "
            "(never accelerated, or restored already)"
        )
    return restored
