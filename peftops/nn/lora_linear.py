"""``LoRALinear``: a drop-in ``nn.Linear`` with a LoRA adapter; ``LoRAConv1D``, the same on
transformers' ``Conv1D`` (GPT-2); ``LoRALayerBase``, what every LoRA layer shares (merging,
ties, state dicts)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..composite.dora_linear import dora_weight_norm
from ..distributed import check_writable
from ..ops.dora_linear import dora_linear
from ..ops.lora_linear import lora_linear
from ._base import AdapterModule, dropout_rate, finite, nonempty_linear, positive_int, strict_bool


class LoRALayerBase(AdapterModule):
    """What :class:`LoRALinear`, :class:`LoRAConv1D` and :class:`~peftops.nn.LoRAEmbedding`
    share: ``r``, ``lora_alpha``, ``scaling``, ``use_rslora``, ``lora_dropout``, ``merged``,
    :meth:`merge` / :meth:`unmerge` of :meth:`delta_weight` into the shared base ``weight``,
    the tie check, and state dicts that always hold the unmerged base weight.

    A subclass sets ``weight`` and its adapter parameters, then calls :meth:`_init_lora`; it
    defines :meth:`delta_weight` (in the layout of ``weight``) and :meth:`unwrap`.
    """

    weight: Tensor

    def _init_lora(self, r, alpha, dropout, use_rslora) -> int:
        """Validate and store the hyperparameters, set up merging; returns the validated ``r``."""
        owner = type(self).__name__
        r = positive_int(owner, "r", r)
        alpha = finite(owner, "alpha", alpha)
        dropout = dropout_rate(owner, dropout)
        use_rslora = strict_bool(owner, "use_rslora", use_rslora)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self._remerge_pending = False
        # Other modules' parameters that are this weight, as (name, module, attribute), found
        # by apply_lora / merge_adapters; merge() refuses the ones that still hold it.
        self._ties: tuple[tuple[str, nn.Module, str], ...] = ()
        # Checkpoints always hold the unmerged base weight, so they load the same into any
        # layer. A merged layer is unmerged before loading and re-merged after: re-adding
        # s B A to a weight the load did not overwrite would count the update twice.
        self.register_state_dict_post_hook(_unmerged_weight_in_state_dict)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_post_hook(_remerge_after_load)
        return r

    def delta_weight(self) -> Tensor:
        """The update merging adds to ``weight``, in its layout, in float32 (float64 for a
        float64 layer)."""
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """A plain base layer holding this layer's ``weight`` (and ``bias``) Parameters, no copy:
        whatever the weight holds now (merged or not) is what it computes with."""
        raise NotImplementedError

    def _acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _check_merged_forward(self) -> None:
        if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters()):
            raise RuntimeError(
                f"{type(self).__name__}: the adapter is merged into the weight and would get no gradient; "
                "call unmerge() to train it, or eval() / torch.no_grad() for inference"
            )

    def _merged_weight(self, sign: float) -> Tensor:
        return (self.weight.to(torch.float64) + sign * self.delta_weight().to(torch.float64)).to(self.weight.dtype)

    def weight_shared_with(self) -> list[str]:
        """Names of the other modules' parameters, found by :func:`peftops.apply_lora` or
        :func:`peftops.nn.merge_adapters`, that still are this layer's ``weight`` (tied)."""
        return [name for name, module, attr in self._ties if getattr(module, attr, None) is self.weight]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one rounding of ``W + delta`` to the weight's
        dtype. The merged layer runs as its base layer; its adapter gets no gradient.

        Raises ``RuntimeError`` if the weight is tied to another module of the model (see
        :class:`LoRALinear`): merging would change that module's function too."""
        owner = type(self).__name__
        if self.merged:
            raise RuntimeError(f"{owner}.merge: the adapter is already merged")
        tied = self.weight_shared_with()
        if tied:
            raise RuntimeError(
                f"{owner}.merge: the weight is shared with {', '.join(map(repr, tied))} (tied), and merging "
                "would write the update into those modules too; untie the weight (give this layer its own "
                "copy) or keep the adapter unmerged"
            )
        self._fold(+1.0)

    def _fold(self, sign: float) -> None:
        check_writable(f"{type(self).__name__}.{'merge' if sign > 0 else 'unmerge'}", self)
        self.weight.copy_(self._merged_weight(sign))
        self.merged = sign > 0

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the weight dtype's rounding of the merged sum)."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the adapter is not merged")
        self._fold(-1.0)


class LoRALinear(LoRALayerBase):
    r"""``y = x W^T + b + (alpha / r) * dropout(x) A^T B^T`` (Hu et al. 2021).

    Same forward signature and attributes as ``nn.Linear`` (``in_features``,
    ``out_features``, ``weight``, ``bias``), so it drops into any model. The adapter's
    parameters are ``lora_A.weight: (r, in)`` and ``lora_B.weight: (out, r)``, named as in
    HF PEFT so that adapter state dicts map one to one; the base keeps ``weight``/``bias``,
    so a model's original state dict still loads. Initialised as HF PEFT: A kaiming-uniform,
    B zeros, so a fresh layer computes exactly the base layer.

    ``scaling = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023).

    :meth:`merge` writes ``W + s B A`` into ``weight`` in place, so every module holding that
    Parameter sees it. That includes the ``nn.Linear`` given to :meth:`from_linear` (the
    documented sharing: after :func:`peftops.apply_lora` it is no longer in the model). A weight
    that other modules of the model still use (a tied ``lm_head``/embedding, a layer also
    reachable under a name that was not targeted) is never merged into: :meth:`merge` refuses
    the ties :func:`peftops.apply_lora` found, and :func:`peftops.nn.merge_adapters` checks the
    whole model when it merges. A layer alone cannot see a tie made after ``apply_lora`` or one
    outside the model: merge through ``merge_adapters(model)``.

    State dicts always hold the unmerged base weight. Loading into a merged layer unmerges it
    first and re-merges once everything is loaded, so whatever the state dict holds (a full
    checkpoint, an adapter-only one loaded with ``strict=False``, a strict load that raises
    after copying what it could), the layer holds the base weight (loaded or kept) plus
    ``s B A`` (loaded or kept).

    ``use_dora=True``: DoRA (Liu et al. 2024), as peft's ``LoraConfig(use_dora=True)``:
    ``y = c * (x W^T + s x A^T B^T) + b`` with ``c = m / ||W + s B A||_row`` (the norm a
    constant in the backward; with dropout, peft's placement: see
    :func:`peftops.ops.dora_linear.dora_linear`). The magnitude ``m`` is the Parameter
    ``lora_magnitude_vector: (out,)``, so the state dict key is peft's saved one
    (``<layer>.lora_magnitude_vector``), initialised as peft does to the row norms of
    ``W + s B A``. :meth:`merge` writes ``c * (W + s B A)`` (the norm taken from the unmerged
    weight and kept for :meth:`unmerge`, as peft). The layer caches ``||W_j||^2`` for the
    norm, keyed on the weight's storage, version counter, dtype and device, so any in-place
    change through the Parameter (merge, ``load_state_dict``, an optimizer step) or a
    ``.to()`` recomputes it; a write through ``weight.data`` bypasses the version counter:
    call :meth:`clear_norm_cache` after one. Under ``torch.compile`` the op computes it.
    """

    lora_magnitude_vector: Tensor  # (only with use_dora=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        positive_int(owner, "in_features", in_features)
        positive_int(owner, "out_features", out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__()
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora, use_dora)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        use_dora: bool = False,
    ) -> LoRALinear:
        """Wrap ``linear``: the new layer holds the same ``weight``/``bias`` Parameters, no copy.

        A 4-bit linear (:class:`~peftops.nn.LinearNF4` or bitsandbytes' ``Linear4bit``) gives a
        :class:`~peftops.nn.LoRALinearNF4` (QLoRA) over its packed weight."""
        from .nf4 import LoRALinearNF4, is_4bit_linear

        if is_4bit_linear(linear):
            return LoRALinearNF4.from_quantized(linear, r, alpha, dropout, use_rslora, use_dora=use_dora)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear: expected an nn.Linear, got {type(linear).__name__}")
        nonempty_linear(f"{cls.__name__}.from_linear", linear)
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora, use_dora)
        return layer

    def _setup(self, weight: Tensor, bias: Tensor | None, r, alpha, dropout, use_rslora, use_dora=False) -> None:
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = self._linear_weight().shape
        self.use_dora = strict_bool(type(self).__name__, "use_dora", use_dora)
        self._w_sq_cache: tuple[tuple, Tensor] | None = None
        self._dora_merge_norm: Tensor | None = None
        r = self._init_lora(r, alpha, dropout, use_rslora)
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        if self.use_dora:
            # A checkpoint may replace the weight; the post-hook runs after it was copied.
            self.register_load_state_dict_post_hook(lambda module, keys: module.clear_norm_cache())
        self.reset_lora_parameters()

    def _linear_weight(self) -> Tensor:
        """The base weight as ``F.linear`` takes it, ``(out, in)``."""
        return self.weight

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            self.reset_dora_magnitude()

    @torch.no_grad()
    def reset_dora_magnitude(self) -> None:
        """Set the magnitude to the row norms of ``W + s B A`` (peft's initialisation, which
        makes the DoRA layer compute what the LoRA layer with the same A and B computes)."""
        owner = type(self).__name__
        if not self.use_dora:
            raise RuntimeError(f"{owner}.reset_dora_magnitude: the layer was built without use_dora=True")
        if self.merged:
            raise RuntimeError(f"{owner}.reset_dora_magnitude: the weight holds the merged update; unmerge() first")
        norm = self._dora_norm(None).to(self.weight.dtype)
        if "lora_magnitude_vector" in self._parameters:
            self.lora_magnitude_vector.copy_(norm)
        else:
            self.lora_magnitude_vector = nn.Parameter(norm)

    def _dora_norm(self, w_sq: Tensor | None) -> Tensor:
        """``||W + s B A||`` per output row of the unmerged weight, float32 (float64 for a
        float64 layer), detached."""
        with torch.no_grad():
            return dora_weight_norm(self._linear_weight(), self.lora_A.weight, self.lora_B.weight, self.scaling, w_sq)

    def clear_norm_cache(self) -> None:
        """Forget the cached ``||W_j||^2`` (needed only after writing ``weight.data`` in place,
        which the version counter does not see)."""
        self._w_sq_cache = None

    def _weight_sq_norm(self) -> Tensor | None:
        if torch.compiler.is_compiling():
            return None  # (a traced graph must not close over a tensor computed outside it)
        w = self._linear_weight()
        key = (w.data_ptr(), w._version, w.dtype, w.device, w.shape)
        cache = self._w_sq_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        with torch.no_grad():
            w_sq = w.pow(2).sum(1, dtype=self._acc_dtype())
        self._w_sq_cache = (key, w_sq)
        return w_sq

    def adapter_parameters(self) -> Iterator[Tensor]:
        yield self.lora_A.weight
        yield self.lora_B.weight
        if self.use_dora:
            yield self.lora_magnitude_vector

    def _in_weight_layout(self, t: Tensor) -> Tensor:
        """An ``(out, in)`` tensor in the layout of ``weight``."""
        return t

    def _merged_weight(self, sign: float) -> Tensor:
        if not self.use_dora:
            return super()._merged_weight(sign)
        f64 = torch.float64
        w = self._linear_weight().to(f64)
        delta = self.scaling * (self.lora_B.weight.to(f64) @ self.lora_A.weight.to(f64))
        m = self.lora_magnitude_vector.to(f64)
        if sign > 0:
            full = w + delta
            # Kept for unmerge: the merged weight no longer tells the unmerged norm (peft alike).
            norm = self._dora_merge_norm = torch.linalg.vector_norm(full, dim=1)
            out = (m / norm)[:, None] * full
        else:
            if self._dora_merge_norm is None:
                raise RuntimeError(f"{type(self).__name__}.unmerge: no norm was kept by merge()")
            out = w * (self._dora_merge_norm / m)[:, None] - delta
        return self._in_weight_layout(out).to(self.weight.dtype)

    def _fold(self, sign: float) -> None:
        super()._fold(sign)
        self.clear_norm_cache()

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            self._check_merged_forward()
            return F.linear(input, self._linear_weight(), self.bias)
        if self.use_dora:
            return dora_linear(
                input,
                self._linear_weight(),
                self.lora_A.weight,
                self.lora_B.weight,
                self.lora_magnitude_vector,
                scale=self.scaling,
                bias=self.bias,
                dropout_p=self.lora_dropout,
                training=self.training,
                weight_sq_norm=self._weight_sq_norm(),
            )
        return lora_linear(
            input,
            self._linear_weight(),
            self.lora_A.weight,
            self.lora_B.weight,
            scale=self.scaling,
            bias=self.bias,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def delta_weight(self) -> Tensor:
        """``scaling * B A``, ``(out, in)`` as ``weight``, in float32 (float64 for a float64 layer)."""
        acc = self._acc_dtype()
        return self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))

    def unwrap(self) -> nn.Module:
        """An ``nn.Linear`` holding this layer's ``weight`` and ``bias`` Parameters (no copy, no
        merge: merge first to keep the update)."""
        with torch.device("meta"):
            base = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        base.weight = cast(nn.Parameter, self.weight)
        if self.bias is not None:
            base.bias = cast(nn.Parameter, self.bias)
        return base.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.lora_alpha:g}, dropout={self.lora_dropout:g}, rslora={self.use_rslora}, merged={self.merged}"
            + (", dora=True" if self.use_dora else "")
        )


class LoRAConv1D(LoRALinear):
    r"""LoRA on transformers' ``Conv1D`` (GPT-2's ``c_attn``, ``c_proj``, ``c_fc``):
    ``y = x W + b + scaling * dropout(x) A^T B^T`` with the base ``weight`` laid out
    ``(in, out)`` as ``Conv1D`` holds it (peft's ``fan_in_fan_out=True``).

    The layer holds the ``Conv1D``'s own ``weight``/``bias`` Parameters, so the model's state
    dict keys and shapes are unchanged; ``lora_A.weight: (r, in)`` and ``lora_B.weight:
    (out, r)`` as in :class:`LoRALinear` and peft. :meth:`delta_weight` and :meth:`merge` work
    in the ``(in, out)`` layout; :meth:`unwrap` gives back a ``Conv1D``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        positive_int(owner, "in_features", in_features)
        positive_int(owner, "out_features", out_features)
        AdapterModule.__init__(self)
        # Conv1D's own initialisation, without importing transformers.
        weight = nn.Parameter(torch.empty(in_features, out_features, device=device, dtype=dtype))
        nn.init.normal_(weight, std=0.02)
        bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        self._setup(weight, bias, r, alpha, dropout, use_rslora, use_dora)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        use_dora: bool = False,
    ) -> LoRALinear:
        raise TypeError(
            f"LoRAConv1D.from_linear: linear: expected a transformers Conv1D through LoRAConv1D.from_conv1d, "
            f"got {type(linear).__name__} (an nn.Linear is LoRALinear.from_linear's)"
        )

    @classmethod
    def from_conv1d(
        cls,
        conv: nn.Module,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        use_dora: bool = False,
    ) -> LoRAConv1D:
        """Wrap transformers' ``Conv1D`` ``conv``: the new layer holds the same ``weight``/``bias``
        Parameters, no copy."""
        conv_type = conv1d_type()
        if conv_type is None or not isinstance(conv, conv_type):
            raise TypeError(f"LoRAConv1D.from_conv1d: conv: expected a transformers Conv1D, got {type(conv).__name__}")
        weight, bias = cast(Tensor, conv.weight), cast("Tensor | None", conv.bias)
        for name, value in zip(("in_features", "out_features"), weight.shape, strict=True):
            if value < 1:
                raise ValueError(f"LoRAConv1D.from_conv1d: conv: expected {name} >= 1, got {value}")
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._setup(weight, bias, r, alpha, dropout, use_rslora, use_dora)
        return layer

    def _in_weight_layout(self, t: Tensor) -> Tensor:
        return t.t()

    def _linear_weight(self) -> Tensor:
        # A transposed view: every lora_linear backend takes it and gives the gradient in the
        # Parameter's own (in, out) layout.
        return self.weight.t()

    @property
    def nf(self) -> int:
        """``Conv1D``'s name for ``out_features``."""
        return self.out_features

    @property
    def nx(self) -> int:
        """``Conv1D``'s name for ``in_features``."""
        return self.in_features

    def delta_weight(self) -> Tensor:
        """``scaling * (B A)^T``, ``(in, out)`` as ``weight``, in float32 (float64 for a float64 layer)."""
        return super().delta_weight().t()

    def unwrap(self) -> nn.Module:
        """A transformers ``Conv1D`` holding this layer's ``weight`` and ``bias`` Parameters (no
        copy, no merge: merge first to keep the update)."""
        from transformers.pytorch_utils import Conv1D

        with torch.device("meta"):
            base = Conv1D(self.out_features, self.in_features)
        base.weight = self.weight
        base.bias = self.bias
        return base.train(self.training)


def conv1d_type() -> type[nn.Module] | None:
    """transformers' ``Conv1D`` class if transformers is loaded, else ``None``: a model holding a
    ``Conv1D`` imported it already, and ``import peftops`` must not need transformers."""

    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _unmerged_weight_in_state_dict(module: LoRALayerBase, state_dict, prefix, local_metadata) -> None:
    if module.merged:
        with torch.no_grad():
            state_dict[prefix + "weight"] = module._merged_weight(-1.0)


def _unmerge_before_load(module: LoRALayerBase, state_dict, prefix, *args) -> None:
    # The load then writes unmerged values next to unmerged ones, whichever keys it has. If it
    # stops before the post-hook, the layer is left unmerged and says so.
    if module.merged:
        with torch.no_grad():
            module._fold(-1.0)
        module._remerge_pending = True


def _remerge_after_load(module: LoRALayerBase, incompatible_keys) -> None:
    # Runs after the children (lora_A, lora_B) loaded, and before a strict load raises.
    if module._remerge_pending:
        module._remerge_pending = False
        with torch.no_grad():
            module._fold(+1.0)
