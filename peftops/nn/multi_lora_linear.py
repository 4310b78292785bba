"""``MultiLoRALinear``: one frozen linear layer serving many LoRA adapters in one batch."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from ..ops.multi_lora_linear import multi_lora_linear
from ._base import AdapterModule, dropout_rate, finite, nonempty_linear, positive_int, strict_bool
from ._slots import AdapterRef, SlotBank


class MultiLoRALinear(SlotBank, AdapterModule):
    r"""A drop-in ``nn.Linear`` with ``capacity`` LoRA adapter slots of rank up to ``r_max``.

    ``add_adapter(name, r, alpha)`` fills a free slot (A kaiming-uniform, B zeros, as HF PEFT),
    ``remove_adapter(name)`` clears it. The slots are fixed-size Parameters
    (``lora_A: (capacity, r_max, in)``, ``lora_B: (capacity, out, r_max)``) and the per-slot
    scale and rank are buffers updated in place, so adding or removing an adapter changes no
    shape: a ``torch.compile``d model does not recompile. Each batch names its adapters per row
    or per token: ``forward(x, adapter_ids)`` (names, slot indices, ``None`` for the base layer, or
    an integer tensor with ``-1`` for the base layer), or once with :meth:`set_batch_adapters`.

    Gradients: each adapter's slot gets exactly the gradient of its own tokens; the slots of
    adapters absent from the batch get zeros (an optimizer with weight decay or momentum still
    moves them: use per-adapter optimizers or mask their updates if that matters).

    The per-slot scales are float32 whatever the module's dtype: ``.half()``,
    ``.to(torch.bfloat16)`` and the like leave them as they are (``1/3`` stays ``1/3``, not
    bfloat16's ``0.334``), and the op gets them in float32.

    Ids naming a free slot (never filled, or removed): names and slot ints raise ``ValueError``
    when they are turned into ids; a tensor of ids raises ``ValueError`` naming the slot in
    eager mode (one read-back of the ids, as the op's range check does). While
    ``torch.compile`` traces or a CUDA graph captures, nothing can be read back, so that check
    is skipped: a row naming a free slot then gets the base layer only, because a free slot's
    scale is 0; only a non-finite value left in the free slot's A or B (an optimizer step can
    move a freed slot's weights; a fresh or removed slot is zeros) would reach its rows, as NaN.
    """

    scales: Tensor
    ranks: Tensor
    in_use: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        capacity: int,
        r_max: int,
        bias: bool = True,
        dropout: float = 0.0,
        *,
        device=None,
        dtype=None,
    ) -> None:
        owner = type(self).__name__
        positive_int(owner, "in_features", in_features)
        positive_int(owner, "out_features", out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        super().__init__()
        self._setup(base.weight, base.bias, capacity, r_max, dropout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, capacity: int, r_max: int, dropout: float = 0.0) -> MultiLoRALinear:
        """Wrap ``linear``: the new layer holds the same ``weight``/``bias`` Parameters, no copy."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"MultiLoRALinear.from_linear: linear: expected an nn.Linear, got {type(linear).__name__}")
        nonempty_linear(f"{cls.__name__}.from_linear", linear)
        layer = cls.__new__(cls)
        AdapterModule.__init__(layer)
        layer._setup(linear.weight, linear.bias, capacity, r_max, dropout)
        return layer

    def _setup(self, weight: Tensor, bias: Tensor | None, capacity, r_max, dropout) -> None:
        owner = type(self).__name__
        self.capacity = positive_int(owner, "capacity", capacity)
        self.r_max = positive_int(owner, "r_max", r_max)
        dropout = dropout_rate(owner, dropout)
        self.lora_dropout = dropout
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        dev, dt = weight.device, weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(self.capacity, self.r_max, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.capacity, self.out_features, self.r_max, device=dev, dtype=dt))
        self.register_buffer("scales", torch.zeros(self.capacity, device=weight.device, dtype=torch.float32))
        self.register_buffer("ranks", torch.ones(self.capacity, device=weight.device, dtype=torch.int64))
        # Which slots hold an adapter, on the device, for the eager check of tensor ids; derived
        # from the slot names, so not saved.
        self.register_buffer(
            "in_use", torch.zeros(self.capacity, device=weight.device, dtype=torch.bool), persistent=False
        )
        self._slots: dict[str, int] = {}
        self._batch_ids: Tensor | None = None

    # -- adapters ---------------------------------------------------------------------------

    @torch.no_grad()
    def add_adapter(self, name: str, r: int, alpha: float, *, use_rslora: bool = False) -> int:
        """Put a fresh adapter in the first free slot and return the slot index."""
        owner = f"{type(self).__name__}.add_adapter"
        self._check_new_name(owner, name)
        r = positive_int(owner, "r", r)
        if r > self.r_max:
            raise ValueError(f"{owner}: r: expected at most r_max={self.r_max}, got {r}")
        alpha = finite(owner, "alpha", alpha)
        use_rslora = strict_bool(owner, "use_rslora", use_rslora)
        slot = self._first_free_slot(owner)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        a = torch.empty(r, self.in_features, device=self.lora_A.device, dtype=self.lora_A.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A[slot, :r].copy_(a)
        self.scales[slot] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.ranks[slot] = r
        self._slots[name] = slot
        self.in_use[slot] = True
        return slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free ``name``'s slot (its parameters are zeroed; shapes do not change)."""
        slot = self.adapter_id(name)
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 1
        self.in_use[slot] = False
        del self._slots[name]

    def _slot_device(self) -> torch.device:
        return self.weight.device

    def _apply(self, fn, recurse=True):
        # The scales stay float32 when the module is cast (1/3 in bfloat16 is 0.334): the cast
        # moves them, then the exact values are put back on the device it chose.
        scales = self.scales
        super()._apply(fn, recurse)  # (SlotBank's: it also re-syncs in_use)
        moved = self.scales
        if moved.dtype != torch.float32:
            # Out of meta (to_empty) there are no values to keep.
            self.scales = moved.float() if scales.is_meta else scales.to(device=moved.device, dtype=torch.float32)
        return self

    def adapter_parameters(self) -> Iterator[Tensor]:
        yield self.lora_A
        yield self.lora_B

    # -- forward ----------------------------------------------------------------------------

    def forward(self, input: Tensor, adapter_ids: Tensor | Sequence[AdapterRef] | None = None) -> Tensor:
        ids = self._batch_ids if adapter_ids is None else adapter_ids
        if ids is None:
            raise ValueError(
                f"{type(self).__name__}: adapter_ids: expected the batch's adapters (forward argument "
                "or set_batch_adapters), got none"
            )
        if isinstance(ids, Tensor):
            # Also when set by name earlier: the adapter may have been removed since.
            self._check_slots_in_use(ids)
        else:
            ids = self.adapter_ids(list(ids), device=input.device)
        self._check_batch(ids, input, "the adapter_ids argument" if adapter_ids is not None else "set_batch_adapters")
        return multi_lora_linear(
            input,
            self.weight,
            self.lora_A,
            self.lora_B,
            ids,
            scales=self.scales.to(input.device),
            bias=self.bias,
            ranks=self.ranks,
            dropout_p=self.lora_dropout,
            training=self.training,
        )

    def _check_batch(self, ids: Tensor, input: Tensor, source: str) -> None:
        """Ids of another batch's shape: the op refuses them too, but cannot say where they came
        from; ids set once for ``B`` rows meet ``B * k`` rows under beam search."""
        lead = tuple(input.shape[:-1])
        if input.dim() < 2 or tuple(ids.shape) == lead or (input.dim() >= 3 and tuple(ids.shape) == lead[:1]):
            return
        hint = ""
        if source == "set_batch_adapters":
            hint = (
                ": generate() with num_beams or num_return_sequences repeats each row; "
                "peftops.generate(model, input_ids, adapter_ids=...) repeats the ids with it"
            )
        expected = f"one per row ({lead[0]} rows) or per token {lead}" if input.dim() >= 3 else f"one per token {lead}"
        raise ValueError(
            f"{type(self).__name__}: adapter_ids: expected {expected} of the input, got shape {tuple(ids.shape)} "
            f"from {source}{hint}"
        )

    def _check_slots_in_use(self, ids: Tensor) -> None:
        """Eager only: a tensor id naming a free slot raises (see the class docstring)."""
        if ids.numel() == 0 or torch.compiler.is_compiling():
            return
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a read-back would invalidate the capture
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            return  # the op rejects the dtype, by name
        # Out-of-range ids are the op's to reject; only in-range ones index the slot table here.
        in_range = (ids >= 0) & (ids < self.capacity)
        free = in_range & ~self.in_use.to(ids.device)[ids.long().clamp(0, self.capacity - 1)]
        if bool(free.any()):
            raise ValueError(
                f"{type(self).__name__}: adapter_ids: expected slots in use {sorted(self._slots.values())} or -1 "
                f"(base layer only), got {int(ids[free][0])}, a free slot"
            )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, capacity={self.capacity}, "
            f"r_max={self.r_max}, adapters={self._slots}"
        )
