"""``LoRALinear``: a drop-in ``nn.Linear`` with a LoRA adapter."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.lora_linear import lora_linear
from ._base import AdapterModule, dropout_rate, finite, nonempty_linear, positive_int, strict_bool


class LoRALinear(AdapterModule):
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
    """

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
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        positive_int(owner, "in_features", in_features)
        positive_int(owner, "out_features", out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__()
        self._setup(base.weight, base.bias, r, alpha, dropout, use_rslora)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0, use_rslora: bool = False
    ) -> LoRALinear:
        """Wrap ``linear``: the new layer holds the same ``weight``/``bias`` Parameters, no copy."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear.from_linear: linear: expected an nn.Linear, got {type(linear).__name__}")
        nonempty_linear(f"{cls.__name__}.from_linear", linear)
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._setup(linear.weight, linear.bias, r, alpha, dropout, use_rslora)
        return layer

    def _setup(self, weight: Tensor, bias: Tensor | None, r, alpha, dropout, use_rslora) -> None:
        owner = type(self).__name__
        r = positive_int(owner, "r", r)
        alpha = finite(owner, "alpha", alpha)
        dropout = dropout_rate(owner, dropout)
        use_rslora = strict_bool(owner, "use_rslora", use_rslora)
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.merged = False
        self._remerge_pending = False
        # Other modules' parameters that are this weight, as (name, module, attribute), found
        # by apply_lora / merge_adapters; merge() refuses the ones that still hold it.
        self._ties: tuple[tuple[str, nn.Module, str], ...] = ()
        self.reset_lora_parameters()
        # Checkpoints always hold the unmerged base weight, so they load the same into any
        # layer. A merged layer is unmerged before loading and re-merged after: re-adding
        # s B A to a weight the load did not overwrite would count the update twice.
        self.register_state_dict_post_hook(_unmerged_weight_in_state_dict)
        self.register_load_state_dict_pre_hook(_unmerge_before_load)
        self.register_load_state_dict_post_hook(_remerge_after_load)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_parameters(self) -> Iterator[Tensor]:
        yield self.lora_A.weight
        yield self.lora_B.weight

    def forward(self, input: Tensor) -> Tensor:
        if self.merged:
            if self.training and torch.is_grad_enabled() and any(p.requires_grad for p in self.adapter_parameters()):
                raise RuntimeError(
                    "LoRALinear: the adapter is merged into the weight and would get no gradient; "
                    "call unmerge() to train it, or eval() / torch.no_grad() for inference"
                )
            return F.linear(input, self.weight, self.bias)
        return lora_linear(
            input,
            self.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            scale=self.scaling,
            bias=self.bias,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def delta_weight(self) -> Tensor:
        """``scaling * B A`` in float32 (float64 for a float64 layer)."""
        acc = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        return self.scaling * (self.lora_B.weight.to(acc) @ self.lora_A.weight.to(acc))

    def _merged_weight(self, sign: float) -> Tensor:
        return (self.weight.to(torch.float64) + sign * self.delta_weight().to(torch.float64)).to(self.weight.dtype)

    def weight_shared_with(self) -> list[str]:
        """Names of the other modules' parameters, found by :func:`peftops.apply_lora` or
        :func:`peftops.nn.merge_adapters`, that still are this layer's ``weight`` (tied)."""
        return [name for name, module, attr in self._ties if getattr(module, attr, None) is self.weight]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight: one rounding of ``W + s B A`` to the weight's
        dtype. The merged layer runs as a plain linear; its adapter gets no gradient.

        Raises ``RuntimeError`` if the weight is tied to another module of the model (see the
        class docstring): merging would change that module's function too."""
        if self.merged:
            raise RuntimeError("LoRALinear.merge: the adapter is already merged")
        tied = self.weight_shared_with()
        if tied:
            raise RuntimeError(
                f"LoRALinear.merge: the weight is shared with {', '.join(map(repr, tied))} (tied), and merging "
                "would write the update into those modules too; untie the weight (give this layer its own "
                "copy) or keep the adapter unmerged"
            )
        self._fold(+1.0)

    def _fold(self, sign: float) -> None:
        self.weight.copy_(self._merged_weight(sign))
        self.merged = sign > 0

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the weight dtype's rounding of the merged sum)."""
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge: the adapter is not merged")
        self._fold(-1.0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.lora_alpha:g}, dropout={self.lora_dropout:g}, rslora={self.use_rslora}, merged={self.merged}"
        )


def _unmerged_weight_in_state_dict(module: LoRALinear, state_dict, prefix, local_metadata) -> None:
    if module.merged:
        with torch.no_grad():
            state_dict[prefix + "weight"] = module._merged_weight(-1.0)


def _unmerge_before_load(module: LoRALinear, state_dict, prefix, *args) -> None:
    # The load then writes unmerged values next to unmerged ones, whichever keys it has. If it
    # stops before the post-hook, the layer is left unmerged and says so.
    if module.merged:
        with torch.no_grad():
            module._fold(-1.0)
        module._remerge_pending = True


def _remerge_after_load(module: LoRALinear, incompatible_keys) -> None:
    # Runs after the children (lora_A, lora_B) loaded, and before a strict load raises.
    if module._remerge_pending:
        module._remerge_pending = False
        with torch.no_grad():
            module._fold(+1.0)
