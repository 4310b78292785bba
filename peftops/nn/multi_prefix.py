"""``MultiPrefixKV``: many prefix-tuning adapters in fixed slots, one batch, one prefix per row."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._base import AdapterModule, positive_int
from ._slots import AdapterRef, SlotBank


class MultiPrefixBatch(NamedTuple):
    """What :class:`MultiPrefixKV` hands the attention layers: per layer ``(bank_k, bank_v)``,
    each ``(capacity, Hkv, P_max, D)``, and the ``prefix_ids`` / ``prefix_lengths`` for
    :func:`peftops.prefix_attention`."""

    layers: list[tuple[Tensor, Tensor]]
    prefix_ids: Tensor
    prefix_lengths: Tensor


class MultiPrefixKV(SlotBank, AdapterModule):
    r"""Learned prefix keys and values (Li & Liang 2021) for up to ``capacity`` adapters, each
    with its own length up to ``prefix_len_max``, served together: each batch row names its
    adapter (or none).

    ``add_adapter(name, prefix_len)`` fills the first free slot (unit-variance keys and values,
    as :class:`PrefixKV`, zeros past ``prefix_len``), ``remove_adapter(name)`` zeroes it and
    sets its length to 0. The slots are one fixed-size Parameter
    ``prefix: (num_layers, 2, capacity, Hkv, prefix_len_max, D)`` and the lengths a buffer
    updated in place, so adding or removing an adapter changes no shape: a ``torch.compile``\ d
    model does not recompile. The rows' adapters come from :meth:`set_batch_adapters` or from
    ``forward(adapter_ids)``: names, slot indices, ``None`` (no prefix), or an integer tensor
    with ``-1`` for no prefix.

    ``forward()`` returns a :class:`MultiPrefixBatch`: layer ``i`` runs
    ``prefix_attention(q, k, v, *batch.layers[i], prefix_ids=batch.prefix_ids,
    prefix_lengths=batch.prefix_lengths)``. The op reads each row's prefix from its slot, the
    first ``length`` keys only.

    Gradients: each slot gets exactly the sum of its rows' gradients; slots absent from the
    batch and positions past a slot's length get zeros (an optimizer with weight decay or
    momentum still moves them: mask their updates if that matters).

    Ids naming a free slot: names and slot ints raise ``ValueError`` when turned into ids; a
    tensor of ids raises ``ValueError`` in eager mode (one read-back). While ``torch.compile``
    traces or a CUDA graph captures that check is skipped, and a row naming a free slot gets no
    prefix, because a free slot's length is 0.
    """

    prefix_lengths: Tensor
    in_use: Tensor

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        capacity: int,
        prefix_len_max: int,
        head_dim: int,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_layers = positive_int(owner, "num_layers", num_layers)
        self.num_kv_heads = positive_int(owner, "num_kv_heads", num_kv_heads)
        self.capacity = positive_int(owner, "capacity", capacity)
        self.prefix_len_max = positive_int(owner, "prefix_len_max", prefix_len_max)
        self.head_dim = positive_int(owner, "head_dim", head_dim)
        shape = (self.num_layers, 2, self.capacity, self.num_kv_heads, self.prefix_len_max, self.head_dim)
        self.prefix = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("prefix_lengths", torch.zeros(self.capacity, device=device, dtype=torch.int64))
        # Derived from the slot names (extra state), so not saved.
        self.register_buffer("in_use", torch.zeros(self.capacity, device=device, dtype=torch.bool), persistent=False)
        self._slots: dict[str, int] = {}
        self._batch_ids: Tensor | None = None

    # -- adapters ---------------------------------------------------------------------------

    @torch.no_grad()
    def add_adapter(self, name: str, prefix_len: int) -> int:
        """Put a fresh prefix of ``prefix_len`` keys in the first free slot; returns the slot."""
        owner = f"{type(self).__name__}.add_adapter"
        self._check_new_name(owner, name)
        prefix_len = positive_int(owner, "prefix_len", prefix_len)
        if prefix_len > self.prefix_len_max:
            raise ValueError(
                f"{owner}: prefix_len: expected at most prefix_len_max={self.prefix_len_max}, got {prefix_len}"
            )
        slot = self._first_free_slot(owner)
        self.prefix[:, :, slot].zero_()
        fresh = torch.randn(self.num_layers, 2, self.num_kv_heads, prefix_len, self.head_dim, device=self.prefix.device)
        self.prefix[:, :, slot, :, :prefix_len].copy_(fresh)
        self.prefix_lengths[slot] = prefix_len
        self.in_use[slot] = True
        self._slots[name] = slot
        return slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free ``name``'s slot (zeroed, length 0; shapes do not change)."""
        slot = self.adapter_id(name)
        self.prefix[:, :, slot].zero_()
        self.prefix_lengths[slot] = 0
        self.in_use[slot] = False
        del self._slots[name]

    def _slot_device(self) -> torch.device:
        return self.prefix.device

    # -- forward ----------------------------------------------------------------------------

    def forward(self, adapter_ids: Tensor | Sequence[AdapterRef] | None = None) -> MultiPrefixBatch:
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
            ids = self.adapter_ids(list(ids))
        layers = [(self.prefix[i, 0], self.prefix[i, 1]) for i in range(self.num_layers)]
        return MultiPrefixBatch(layers, ids, self.prefix_lengths)

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
                f"(no prefix), got {int(ids[free][0])}, a free slot"
            )

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, capacity={self.capacity}, "
            f"prefix_len_max={self.prefix_len_max}, head_dim={self.head_dim}, adapters={self._slots}"
        )
