"""``MultiBottleneckAdapter``: many bottleneck adapters in fixed slots, one per row of a batch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..ops.bottleneck_adapter import bottleneck_adapter
from ..reference import ACTIVATIONS
from ._base import AdapterModule, finite, positive_int, strict_bool
from ._slots import AdapterRef, SlotBank


class MultiBottleneckAdapter(SlotBank, AdapterModule):
    r"""``capacity`` bottleneck adapters (``d -> r -> d``, ``r`` up to ``r_max``) in one module:
    each row (or token) of a batch goes through its own adapter, or none.

    ``y = res + scale * (act(x Wd_a^T + bd_a) Wu_a^T + bu_a)`` with ``a`` the row's adapter,
    serial (``parallel=False``, ``res = x``) or parallel (``forward(x, residual=...)``) as
    :class:`BottleneckAdapter`; a row without an adapter gets ``res``. Activation and scale are
    shared by the slots.

    ``add_adapter(name, r)`` fills a free slot, initialised as :class:`BottleneckAdapter` (down
    projection as ``nn.Linear``, up projection zeros: a fresh adapter changes nothing);
    ``remove_adapter(name)`` zeroes it. The slots are fixed-size Parameters
    (``down_weight: (capacity, r_max, d)``, ``down_bias: (capacity, r_max)``,
    ``up_weight: (capacity, d, r_max)``, ``up_bias: (capacity, d)``) and the per-slot ranks a
    buffer updated in place, so adding or removing an adapter changes no shape and a
    ``torch.compile``d model does not recompile. Each batch names its adapters per row or per
    token: ``forward(x, adapter_ids)`` (names, slot indices, ``None`` for no adapter, or an
    integer tensor with ``-1`` for no adapter), or once with :meth:`set_batch_adapters`.

    Gradients: each slot gets exactly the gradient of its own rows; the slots of adapters
    absent from the batch get zeros (an optimizer with weight decay or momentum still moves
    them: use per-adapter optimizers or mask their updates if that matters).

    Ids naming a free slot (never filled, or removed): names and slot ints raise ``ValueError``
    when they are turned into ids; a tensor of ids raises ``ValueError`` naming the slot in
    eager mode (one read-back of the ids, as the op's range check does). While
    ``torch.compile`` traces or a CUDA graph captures, nothing can be read back, so that check
    is skipped, and a row naming a free slot gets no adapter (``res`` exactly), whatever an
    optimizer step left in that slot's weights: the ids are mapped to -1 on the device.
    """

    ranks: Tensor
    in_use: Tensor

    def __init__(
        self,
        d: int,
        capacity: int,
        r_max: int,
        activation: str = "gelu",
        scale: float = 1.0,
        parallel: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.d = positive_int(owner, "d", d)
        self.capacity = positive_int(owner, "capacity", capacity)
        self.r_max = positive_int(owner, "r_max", r_max)
        if not isinstance(activation, str):
            raise TypeError(f"{owner}: activation: expected a str, got {type(activation).__name__}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"{owner}: activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.scale = finite(owner, "scale", scale)
        self.parallel = strict_bool(owner, "parallel", parallel)
        kw = {"device": device, "dtype": dtype}
        self.down_weight = nn.Parameter(torch.zeros(self.capacity, self.r_max, self.d, **kw))
        self.down_bias = nn.Parameter(torch.zeros(self.capacity, self.r_max, **kw))
        self.up_weight = nn.Parameter(torch.zeros(self.capacity, self.d, self.r_max, **kw))
        self.up_bias = nn.Parameter(torch.zeros(self.capacity, self.d, **kw))
        self.register_buffer("ranks", torch.ones(self.capacity, device=device, dtype=torch.int64))
        # Which slots hold an adapter, on the device, for the eager check of tensor ids; derived
        # from the slot names, so not saved.
        self.register_buffer("in_use", torch.zeros(self.capacity, device=device, dtype=torch.bool), persistent=False)
        self._slots: dict[str, int] = {}
        self._batch_ids: Tensor | None = None

    # -- adapters ---------------------------------------------------------------------------

    @torch.no_grad()
    def add_adapter(self, name: str, r: int) -> int:
        """Put a fresh adapter of width ``r`` in the first free slot and return the slot index."""
        owner = f"{type(self).__name__}.add_adapter"
        self._check_new_name(owner, name)
        r = positive_int(owner, "r", r)
        if r > self.r_max:
            raise ValueError(f"{owner}: r: expected at most r_max={self.r_max}, got {r}")
        slot = self._first_free_slot(owner)
        self._zero_slot(slot)
        # nn.Linear(d, r)'s initialisation, as BottleneckAdapter's down projection gets.
        w = torch.empty(r, self.d, device=self.down_weight.device, dtype=self.down_weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        self.down_weight[slot, :r].copy_(w)
        bound = 1.0 / math.sqrt(self.d)
        self.down_bias[slot, :r].uniform_(-bound, bound)
        self.ranks[slot] = r
        self._slots[name] = slot
        self.in_use[slot] = True
        return slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free ``name``'s slot (its parameters are zeroed; shapes do not change)."""
        slot = self.adapter_id(name)
        self._zero_slot(slot)
        self.ranks[slot] = 1
        self.in_use[slot] = False
        del self._slots[name]

    def _zero_slot(self, slot: int) -> None:
        for p in (self.down_weight, self.down_bias, self.up_weight, self.up_bias):
            p[slot].zero_()

    def _slot_device(self) -> torch.device:
        return self.down_weight.device

    # -- forward ----------------------------------------------------------------------------

    def forward(
        self, x: Tensor, adapter_ids: Tensor | Sequence[AdapterRef] | None = None, residual: Tensor | None = None
    ) -> Tensor:
        owner = type(self).__name__
        if self.parallel and residual is None:
            raise ValueError(f"{owner}(parallel=True): residual: expected the sublayer's output, got None")
        if not self.parallel and residual is not None:
            raise ValueError(
                f"{owner}(parallel=False): residual: expected None (a serial adapter adds to x), got a tensor"
            )
        ids = self._batch_ids if adapter_ids is None else adapter_ids
        if ids is None:
            raise ValueError(
                f"{owner}: adapter_ids: expected the batch's adapters (forward argument or set_batch_adapters), got none"
            )
        if isinstance(ids, Tensor):
            # Also when set by name earlier: the adapter may have been removed since.
            if not self._check_slots_in_use(ids):
                # Unchecked (traced or captured): a free slot's rows get no adapter, whatever an
                # optimizer left in its weights; on the device, no read-back.
                in_range = (ids >= 0) & (ids < self.capacity)
                used = self.in_use.to(ids.device)[ids.long().clamp(0, self.capacity - 1)]
                ids = torch.where(in_range & used, ids, -1)
        else:
            ids = self.adapter_ids(list(ids), device=x.device)
        return bottleneck_adapter(
            x,
            self.down_weight,
            self.down_bias,
            self.up_weight,
            self.up_bias,
            activation=self.activation,
            scale=self.scale,
            residual=residual,
            adapter_ids=ids,
            ranks=self.ranks,
        )

    def _check_slots_in_use(self, ids: Tensor) -> bool:
        """Eager only: a tensor id naming a free slot raises (see the class docstring). Returns
        whether the ids were checked (or need no check)."""
        if ids.numel() == 0:
            return True
        if torch.compiler.is_compiling():
            return False
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return False  # a read-back would invalidate the capture
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            return True  # the op rejects the dtype, by name
        # Out-of-range ids are the op's to reject; only in-range ones index the slot table here.
        in_range = (ids >= 0) & (ids < self.capacity)
        free = in_range & ~self.in_use.to(ids.device)[ids.long().clamp(0, self.capacity - 1)]
        if bool(free.any()):
            raise ValueError(
                f"{type(self).__name__}: adapter_ids: expected slots in use {sorted(self._slots.values())} or -1 "
                f"(no adapter), got {int(ids[free][0])}, a free slot"
            )
        return True

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, capacity={self.capacity}, r_max={self.r_max}, activation={self.activation!r}, "
            f"scale={self.scale:g}, parallel={self.parallel}, adapters={self._slots}"
        )
