"""``MultiPromptEmbedding``: many prompt-tuning prompts in fixed slots, one prompt per row of a batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._base import AdapterModule, positive_int
from ._slots import AdapterRef, SlotBank


class MultiPromptEmbedding(SlotBank, AdapterModule):
    r"""Prompt tuning (Lester et al. 2021) for up to ``capacity`` prompts of ``num_virtual_tokens``
    embeddings each, served together: each batch row names its prompt (or none).

    ``add_adapter(name, init=None)`` fills the first free slot with ``init`` (``(P, token_dim)``)
    or, by default, uniform values in [-0.5, 0.5] as :class:`PromptEmbedding`;
    ``remove_adapter(name)`` zeroes it. The slots are one fixed-size Parameter
    ``weight: (capacity, P, token_dim)``, so adding or removing a prompt changes no shape: a
    ``torch.compile``\ d model does not recompile. The rows' prompts come from
    :meth:`set_batch_adapters` or from ``forward(adapter_ids)``: names, slot indices, ``None``
    (no prompt), or an integer tensor with ``-1`` for no prompt.

    ``forward(adapter_ids=None) -> (B, P, token_dim)``: each row's prompt, gathered from its
    slot in one indexing op; a row without a prompt gets zeros (the caller masks those
    positions out, as :func:`peftops.integrations.prompt_tuning.apply_prompt_tuning` does).

    Gradients: each slot gets exactly the sum of its rows' gradients; slots absent from the
    batch get zeros (an optimizer with weight decay or momentum still moves them: mask their
    updates if that matters).

    Ids naming a free slot or out of range: names and slot ints raise ``ValueError`` when turned
    into ids; a tensor of ids raises ``ValueError`` in eager mode (one read-back). While
    ``torch.compile`` traces or a CUDA graph captures that check is skipped, and such a row
    gets no prompt (:meth:`row_ids` maps it to -1 on the device).
    """

    in_use: Tensor

    def __init__(self, capacity: int, num_virtual_tokens: int, token_dim: int, *, device=None, dtype=None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.capacity = positive_int(owner, "capacity", capacity)
        self.num_virtual_tokens = positive_int(owner, "num_virtual_tokens", num_virtual_tokens)
        self.token_dim = positive_int(owner, "token_dim", token_dim)
        shape = (self.capacity, self.num_virtual_tokens, self.token_dim)
        self.weight = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        # Derived from the slot names (extra state), so not saved.
        self.register_buffer("in_use", torch.zeros(self.capacity, device=device, dtype=torch.bool), persistent=False)
        self._slots: dict[str, int] = {}
        self._batch_ids: Tensor | None = None

    # -- adapters ---------------------------------------------------------------------------

    @torch.no_grad()
    def add_adapter(self, name: str, init: Tensor | None = None) -> int:
        """Put a prompt in the first free slot (``init``, or uniform in [-0.5, 0.5]); returns the slot."""
        owner = f"{type(self).__name__}.add_adapter"
        self._check_new_name(owner, name)
        shape = (self.num_virtual_tokens, self.token_dim)
        if init is not None:
            if not isinstance(init, Tensor):
                raise TypeError(f"{owner}: init: expected None or a torch.Tensor, got {type(init).__name__}")
            if tuple(init.shape) != shape:
                raise ValueError(f"{owner}: init: expected shape {shape}, got {tuple(init.shape)}")
            if not (init.is_floating_point() and bool(torch.isfinite(init).all())):
                raise ValueError(f"{owner}: init: expected finite floating-point values, got dtype {init.dtype}")
        slot = self._first_free_slot(owner)
        if init is None:
            self.weight[slot].uniform_(-0.5, 0.5)
        else:
            self.weight[slot].copy_(init)
        self.in_use[slot] = True
        self._slots[name] = slot
        return slot

    @torch.no_grad()
    def remove_adapter(self, name: str) -> None:
        """Free ``name``'s slot (zeroed; shapes do not change)."""
        slot = self.adapter_id(name)
        self.weight[slot].zero_()
        self.in_use[slot] = False
        del self._slots[name]

    def _slot_device(self) -> torch.device:
        return self.weight.device

    # -- forward ----------------------------------------------------------------------------

    def row_ids(self, adapter_ids: Tensor | Sequence[AdapterRef] | None = None) -> Tensor:
        """The batch's ids as an int64 ``(B,)`` tensor on the slots' device, ``-1`` for every row
        without a prompt (and, unchecked under compile or capture, for free or out-of-range
        slots). Eager: a free or out-of-range slot raises ``ValueError``."""
        owner = type(self).__name__
        ids = self._batch_ids if adapter_ids is None else adapter_ids
        if ids is None:
            raise ValueError(
                f"{owner}: adapter_ids: expected the batch's prompts (forward argument or set_batch_adapters), got none"
            )
        if not isinstance(ids, Tensor):
            return self.adapter_ids(list(ids))
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{owner}: adapter_ids: expected an integer tensor (-1 = no prompt), got {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"{owner}: adapter_ids: expected one id per row, shape (B,), got {tuple(ids.shape)}")
        # Also when set by name earlier: the prompt may have been removed since.
        self._check_slots_in_use(ids)
        ids = ids.to(self.weight.device, torch.int64)
        in_range = (ids >= 0) & (ids < self.capacity)
        used = self.in_use[ids.clamp(0, self.capacity - 1)]
        return torch.where(in_range & used, ids, -1)

    def gather(self, row_ids: Tensor) -> Tensor:
        """``(B, P, token_dim)`` prompts for ids from :meth:`row_ids` (zeros where ``-1``)."""
        # One gather over the bank: its backward scatter-adds each row's gradient into its slot,
        # so absent slots get exact zeros; torch.where (not a multiply by the mask) keeps the
        # -1 rows' gradient out of slot 0 even when it is not finite.
        rows = self.weight[row_ids.clamp(min=0)]
        return torch.where((row_ids >= 0)[:, None, None], rows, rows.new_zeros(()))

    def forward(self, adapter_ids: Tensor | Sequence[AdapterRef] | None = None) -> Tensor:
        return self.gather(self.row_ids(adapter_ids))

    def _check_slots_in_use(self, ids: Tensor) -> None:
        """Eager only: a tensor id out of range or naming a free slot raises."""
        if ids.numel() == 0 or torch.compiler.is_compiling():
            return
        if ids.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a read-back would invalidate the capture
        values = ids.detach().to("cpu", torch.int64)
        in_use = self.in_use.to("cpu")
        expected = f"expected slots in use {sorted(self._slots.values())} or -1 (no prompt)"
        out = (values < -1) | (values >= self.capacity)
        if bool(out.any()):
            raise ValueError(
                f"{type(self).__name__}: adapter_ids: {expected}, got {int(values[out][0])} "
                f"(out of range for capacity {self.capacity})"
            )
        free = (values >= 0) & ~in_use[values.clamp(min=0)]
        if bool(free.any()):
            raise ValueError(f"{type(self).__name__}: adapter_ids: {expected}, got {int(values[free][0])}, a free slot")

    def extra_repr(self) -> str:
        return (
            f"capacity={self.capacity}, num_virtual_tokens={self.num_virtual_tokens}, "
            f"token_dim={self.token_dim}, adapters={self._slots}"
        )
