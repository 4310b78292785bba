"""4-bit base layers (QLoRA): :class:`LinearNF4`, a frozen linear layer stored as bitsandbytes
stores a ``Linear4bit`` weight (NF4 or FP4, double-quantised scales), that needs no
bitsandbytes at run time; :class:`LoRALinearNF4`, LoRA over such a weight
(:func:`peftops.lora_linear_nf4`); :func:`quantize_model`, which converts a model's linear
layers.

State dicts hold bitsandbytes' keys for the weight (``weight``, the packed bytes, and
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``), so a checkpoint of a model quantised by
transformers + bitsandbytes loads into one converted here, and back.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora_linear_nf4 import as_state, dequantize_blocks, lora_linear_nf4
from ..reference import nf4
from ._base import AdapterModule, positive_int, strict_bool
from .lora_linear import LoRALinear

#: The state's tensors, kept as non-persistent buffers (``.to()`` moves them); the state dict
#: gets bitsandbytes' keys from the hooks below instead.
_STATE_TENSORS = ("absmax", "code", "offset", "state2_absmax", "state2_code")


class _Quantized4bit:
    """The 4-bit storage shared by :class:`LinearNF4` and :class:`LoRALinearNF4`: ``weight``
    (the packed uint8 bytes, a frozen Parameter as bitsandbytes' ``Params4bit``), the state's
    tensors as buffers and its scalars as attributes."""

    weight: Tensor
    in_features: int
    out_features: int
    absmax: Tensor
    code: Tensor
    offset: Tensor | None
    state2_absmax: Tensor | None
    state2_code: Tensor | None

    def _set_quantized(self, packed: Tensor, state: nf4.QuantState4bit) -> None:
        module = cast(nn.Module, self)
        module.weight = nn.Parameter(packed, requires_grad=False)
        self.out_features, self.in_features = state.shape
        self.quant_type, self.blocksize, self.state_dtype = state.quant_type, state.blocksize, state.dtype
        self.state2_blocksize = state.state2_blocksize
        for name in _STATE_TENSORS:
            module.register_buffer(name, getattr(state, name), persistent=False)

    @property
    def quant_state(self) -> nf4.QuantState4bit:
        """The weight's :class:`~peftops.reference.nf4.QuantState4bit` (sharing the buffers)."""
        return nf4.QuantState4bit(
            self.absmax, (self.out_features, self.in_features), self.state_dtype, self.blocksize, self.quant_type,
            self.code, self.offset, self.state2_absmax, self.state2_code, self.state2_blocksize,
        )  # fmt: skip

    def dequantize(self) -> Tensor:
        """The ``(out, in)`` weight in the state's dtype, as bitsandbytes dequantises it."""
        return nf4.dequantize_4bit(self.weight, self.quant_state)

    def _weight_for(self, x: Tensor) -> Tensor:
        """W in x's dtype, rounded once from the float32 product, as bitsandbytes 0.50's
        ``matmul_4bit`` dequantises for its GEMM (not through the state's dtype)."""
        absmax = nf4.dequantize_absmax(self.quant_state)
        shape = (self.out_features, self.in_features)
        return dequantize_blocks(self.weight, absmax, self.code.float(), shape, self.blocksize, x.dtype)

    def _quant_extra_repr(self) -> str:
        nested = ", double-quantised" if self.state2_absmax is not None else ""
        return f"{self.quant_type}, blocksize={self.blocksize}{nested}, dtype={str(self.state_dtype)[6:]}"


def _save_quant_state(module, state_dict, prefix, local_metadata) -> None:
    state_dict.update(nf4.state_to_dict(module.quant_state, prefix))


def _load_quant_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    keys = [k for k in state_dict if k.startswith(prefix + "weight.")]
    if not keys:
        return  # a strict load then reports the missing weight key itself
    state = nf4.state_from_dict(state_dict, prefix)
    if state.shape != (module.out_features, module.in_features):
        errors.append(
            f"{prefix}weight: a 4-bit weight of shape {state.shape} for a layer of shape "
            f"{(module.out_features, module.in_features)}"
        )
        return
    device = module.weight.device
    for name in _STATE_TENSORS:
        value = getattr(state, name)
        module._buffers[name] = value.to(device) if value is not None else None
    module.quant_type, module.blocksize, module.state_dtype = state.quant_type, state.blocksize, state.dtype
    module.state2_blocksize = state.state2_blocksize
    for k in keys:
        del state_dict[k]
    packed = state_dict.get(prefix + "weight")
    if packed is not None and packed.shape != module.weight.shape:
        # bitsandbytes keeps (bytes, 1); any shape with the right byte count is the same bytes.
        state_dict[prefix + "weight"] = packed.reshape(module.weight.shape)


class LinearNF4(_Quantized4bit, nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored in 4 bits (NF4 or FP4, bitsandbytes'
    layout). Forward: ``x W^T + b`` with ``W`` dequantised as bitsandbytes' 4-bit matmul does
    (straight to x's dtype). Build one with :meth:`from_linear` (quantises) or
    :meth:`from_bnb` (adopts a bitsandbytes ``Linear4bit``'s tensors, no copy)."""

    def __init__(self, packed: Tensor, quant_state: Any, bias: Tensor | None = None) -> None:
        super().__init__()
        state = as_state(quant_state)
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"LinearNF4: packed: expected a uint8 tensor, got {getattr(packed, 'dtype', type(packed))}")
        expected = -(-state.numel // 2)
        if packed.numel() != expected:
            raise ValueError(
                f"LinearNF4: packed: expected {expected} bytes for shape {state.shape}, got {packed.numel()}"
            )
        self._set_quantized(packed, state)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias)
        self._register_state_dict_hook(_save_quant_state)
        self._register_load_state_dict_pre_hook(_load_quant_state, with_module=True)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, quant_type: str = "nf4", *, blocksize: int = 64, compress_statistics: bool = True
    ) -> LinearNF4:
        """Quantise ``linear``'s weight (its dtype is the state's); the bias Parameter is kept."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LinearNF4.from_linear: linear: expected an nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            packed, state = nf4.quantize_4bit(
                linear.weight.detach(), blocksize=blocksize, quant_type=quant_type,
                compress_statistics=compress_statistics,
            )  # fmt: skip
        return cls(packed, state, linear.bias)

    @classmethod
    def from_bnb(cls, linear4bit: nn.Module) -> LinearNF4:
        """Adopt a bitsandbytes ``Linear4bit``'s packed weight, quant state and bias (no copy)."""
        weight = getattr(linear4bit, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise TypeError(
                f"LinearNF4.from_bnb: linear4bit: expected a quantised bitsandbytes Linear4bit, got "
                f"{type(linear4bit).__name__}"
                + (" without a quant_state (not moved to its device yet?)" if weight is not None else "")
            )
        assert weight is not None
        return cls(weight.data, quant_state, getattr(linear4bit, "bias", None))

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self._weight_for(input), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " + (
            self._quant_extra_repr()
        )


def is_4bit_linear(module: nn.Module) -> bool:
    """A peftops :class:`LinearNF4` or a bitsandbytes ``Linear4bit``."""
    if isinstance(module, LinearNF4):
        return True
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


class LoRALinearNF4(_Quantized4bit, LoRALinear):
    """:class:`~peftops.nn.LoRALinear` over a 4-bit base weight (QLoRA): the forward is
    :func:`peftops.lora_linear_nf4`, so the full-precision weight is never stored. Built by
    ``LoRALinear.from_linear`` from a :class:`LinearNF4` or a bitsandbytes ``Linear4bit``.

    :meth:`merge` dequantises, adds ``s B A`` and quantises again (as peft does for 4-bit
    layers, with the same warning: the rounding changes outputs); :meth:`unmerge` subtracts it
    from the requantised weight, so merge then unmerge is not exact. DoRA over a 4-bit weight
    is not supported."""

    @classmethod
    def from_quantized(
        cls, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False,
        *, use_dora: bool = False,
    ) -> LoRALinearNF4:  # fmt: skip
        owner = f"{cls.__name__}.from_quantized"
        if strict_bool(owner, "use_dora", use_dora):
            raise ValueError(f"{owner}: use_dora: DoRA over a 4-bit base weight is not supported, got True")
        if not isinstance(base, LinearNF4):
            if not is_4bit_linear(base):
                raise TypeError(
                    f"{owner}: base: expected a LinearNF4 or a bitsandbytes Linear4bit, got {type(base).__name__}"
                )
            base = LinearNF4.from_bnb(base)
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._set_quantized(base.weight.data, base.quant_state)
        layer.bias = base.bias
        layer.use_dora = False
        layer._w_sq_cache, layer._dora_merge_norm = None, None
        r = layer._init_lora(r, alpha, dropout, use_rslora)
        # The adapter's dtype: the state's (the dtype the base layer computed in before).
        factory = {"device": base.weight.device, "dtype": base.state_dtype}
        layer.lora_A = nn.Linear(layer.in_features, r, bias=False, **factory)
        layer.lora_B = nn.Linear(r, layer.out_features, bias=False, **factory)
        layer._register_state_dict_hook(_save_quant_state)
        layer._register_load_state_dict_pre_hook(_load_quant_state, with_module=True)
        layer.reset_lora_parameters()
        return layer

    def _linear_weight(self) -> Tensor:
        return self.dequantize()

    def _merged_weight(self, sign: float) -> Tensor:
        # LoRALayerBase's state-dict hook asks for the unmerged float weight of a merged layer;
        # a 4-bit checkpoint holds packed bytes, and requantising W - s B A is not the weight
        # the merge started from.
        raise RuntimeError(
            f"{type(self).__name__}: a merged 4-bit layer has no exact unmerged weight to save; unmerge() before "
            "state_dict(), or save the merged model"
        )

    def _acc_dtype(self) -> torch.dtype:
        return torch.float32

    def _fold(self, sign: float) -> None:
        warnings.warn(
            f"{type(self).__name__}: merging into a 4-bit weight quantises W + s B A again; outputs change by "
            "the rounding (as peft warns for 4-bit layers), and unmerge() does not restore the weight exactly",
            UserWarning,
            stacklevel=3,
        )
        merged = (self.dequantize().float() + sign * self.delta_weight()).to(self.state_dtype)
        nested = self.state2_absmax is not None
        packed, state = nf4.quantize_4bit(
            merged, blocksize=self.blocksize, quant_type=self.quant_type, compress_statistics=nested
        )
        self.weight.data = packed.reshape(self.weight.shape)
        for name in _STATE_TENSORS:
            self._buffers[name] = getattr(state, name)
        self.merged = sign > 0

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            self._check_merged_forward()
            return F.linear(input, self._weight_for(input), self.bias)
        return lora_linear_nf4(
            input,
            self.weight,
            self.quant_state,
            self.lora_A.weight.to(input.dtype),
            self.lora_B.weight.to(input.dtype),
            scale=self.scaling,
            bias=self.bias.to(input.dtype) if self.bias is not None else None,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def unwrap(self) -> nn.Module:
        """A :class:`LinearNF4` holding this layer's packed weight, state and bias (no copy)."""
        return LinearNF4(self.weight.data, self.quant_state, self.bias).train(self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._quant_extra_repr()


def quantize_model(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    skip: Iterable[str] = ("lm_head",),
    blocksize: int = 64,
    compress_statistics: bool = True,
) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) with a :class:`LinearNF4` holding its
    weight in 4 bits (double-quantised scales by default: ~4.127 bits per weight at blocks of
    64), except those whose qualified name matches an entry of ``skip`` (the name itself, a
    suffix after a dot, or a regex that matches the whole name), as transformers'
    ``llm_int8_skip_modules`` keeps ``lm_head`` in full precision. Returns ``model``."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantize_model: quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")
    positive_int("quantize_model", "blocksize", blocksize)
    if isinstance(skip, str):
        raise TypeError("quantize_model: skip: expected an iterable of names, got a str (wrap it in a list)")
    patterns = list(skip)

    def skipped(name: str) -> bool:
        return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)

    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not skipped(n)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = LinearNF4.from_linear(linear, quant_type, blocksize=blocksize, compress_statistics=compress_statistics)
        setattr(parent, attr, q.train(linear.training))
    return model


def bits_per_parameter(module: nn.Module) -> float:
    """Bytes a 4-bit layer stores for its weight (packed codes, scales, double quantisation's
    state; not the bias), times 8, per weight element."""
    if not isinstance(module, _Quantized4bit):
        raise TypeError(
            f"bits_per_parameter: module: expected a LinearNF4 or LoRALinearNF4, got {type(module).__name__}"
        )
    tensors = [module.weight, *(t for t in (getattr(module, n) for n in _STATE_TENSORS) if t is not None)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    return 8.0 * total / math.prod((module.out_features, module.in_features))
