"""What the fixed-capacity adapter banks share (:class:`~peftops.nn.MultiLoRALinear`,
:class:`~peftops.nn.MultiBottleneckAdapter`, :class:`~peftops.nn.MultiPrefixKV`): slot names,
turning names / slot ints / ``None`` into an id tensor, the batch's ids, and the slot names in
the state dict."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

AdapterRef = str | int | None


class SlotBank:
    """Mixin (before ``nn.Module`` in the bases) for a module with ``_slots`` (name -> slot),
    an ``in_use`` bool buffer, ``_batch_ids`` and :meth:`_slot_device`."""

    _slots: dict[str, int]
    in_use: Tensor
    _batch_ids: Tensor | None

    def _slot_device(self) -> torch.device:
        raise NotImplementedError

    @property
    def adapters(self) -> dict[str, int]:
        """Adapter name -> slot index, for the slots in use."""
        return dict(self._slots)

    def _check_new_name(self, owner: str, name: object) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"{owner}: name: expected a non-empty str, got {name!r}")
        if name in self._slots:
            raise ValueError(
                f"{owner}: name: expected a new adapter name, got {name!r} (already in slot {self._slots[name]})"
            )

    def _first_free_slot(self, owner: str) -> int:
        capacity = self.in_use.shape[0]
        free = sorted(set(range(capacity)) - set(self._slots.values()))
        if not free:
            raise ValueError(f"{owner}: all {capacity} slots are in use ({sorted(self._slots)}); remove one first")
        return free[0]

    def adapter_id(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f"{type(self).__name__}: no adapter named {name!r}; have {sorted(self._slots)}")
        return self._slots[name]

    def adapter_ids(self, refs: Sequence[AdapterRef], device=None) -> Tensor:
        """Names / slot indices / ``None`` (no adapter) -> an int64 id tensor on ``device``."""
        used = set(self._slots.values())
        out = []
        for ref in refs:
            if ref is None:
                out.append(-1)
            elif isinstance(ref, str):
                out.append(self.adapter_id(ref))
            elif isinstance(ref, int) and not isinstance(ref, bool):
                if ref != -1 and ref not in used:
                    raise ValueError(f"{type(self).__name__}: adapter id {ref} is not a slot in use ({sorted(used)})")
                out.append(ref)
            else:
                raise TypeError(
                    f"{type(self).__name__}: expected adapter names, slot ints or None, got {type(ref).__name__}"
                )
        return torch.tensor(out, dtype=torch.int64, device=self._slot_device() if device is None else device)

    def set_batch_adapters(self, ids: Tensor | Sequence[AdapterRef] | None) -> None:
        """The adapters of the next batches' rows (or tokens), until set again; None clears."""
        if ids is None or isinstance(ids, Tensor):
            self._batch_ids = ids
        else:
            self._batch_ids = self.adapter_ids(list(ids))

    def get_extra_state(self) -> dict:
        # The slot names travel with the state dict, so a loaded module knows its adapters.
        return {"slots": dict(self._slots)}

    def set_extra_state(self, state: dict) -> None:
        self._slots = dict(state["slots"])
        self._sync_in_use()

    @torch.no_grad()
    def _sync_in_use(self) -> None:
        if not self.in_use.is_meta:
            self.in_use.zero_()
            self.in_use[list(self._slots.values())] = True

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # type: ignore[misc]  # nn.Module's, after this mixin
        self._sync_in_use()  # to_empty leaves it undefined; it follows the slot names
        return self
