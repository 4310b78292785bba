"""What peftops' modules need to know about data parallelism (DDP, FSDP2's ``fully_shard``).

Training needs nothing from here: the adapters are ordinary parameters, frozen base
parameters get no gradient, so DDP and FSDP2 reduce only the adapters'. Two things do:

* Writing into the base weight (``merge`` / ``unmerge``). Under FSDP2 each rank holds a shard
  (a ``DTensor``); DTensor computes the update shard-aware and each rank writes its own shard,
  so merging is collective (every rank calls it) and exact. What cannot work is a module whose
  parameters FSDP2 holds unsharded at the moment (inside a forward, after ``unshard()``, or
  kept by ``reshard_after_forward=False``): those are temporary copies that FSDP2 drops at the
  next reshard, so a write there would be lost while the layer says it is merged.
  :func:`check_writable` refuses it.
* Adding adapters (every ``apply_*``): to a model already wrapped, the new parameters would be
  in neither DDP's gradient buckets nor FSDP2's shards, and would silently train apart on each
  rank; parameters made trainable after wrapping (``apply_bitfit``) are outside DDP's buckets
  likewise. :func:`check_not_wrapped` refuses it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["check_not_wrapped", "check_writable", "is_sharded"]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2 shard)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _fsdp_params_of(module: nn.Module) -> Iterator[Any]:
    """FSDP2's records (``FSDPParam``) of ``module``'s own parameters, if FSDP2 manages them.

    FSDP2 keeps them on the state of the module ``fully_shard`` was called on (an ancestor that
    ``module`` cannot name); torch's composable-state registry maps every such module to it."""
    if not torch.distributed.is_available():
        return
    from torch.distributed._composable_state import _module_state_mapping

    if not _module_state_mapping:  # nothing in this process was ever wrapped by a composable API
        return
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # pragma: no cover  (torch without FSDP2)
        return
    # Private structures: read defensively, so that a torch that renames them loses this check
    # (which tests/distributed/test_training.py then reports) rather than every merge.
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if not isinstance(state, FSDPState):
            continue
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:  # torch before the list of groups: one group or none
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", ()):
                info = getattr(fsdp_param, "_module_info", None)
                if info is not None and info.module is module:
                    yield fsdp_param


def check_writable(owner: str, module: nn.Module) -> None:
    """Raise ``RuntimeError`` if FSDP2 holds ``module``'s parameters unsharded now: they are
    temporary copies (inside a forward, after ``unshard()``, or kept by
    ``reshard_after_forward=False``) that FSDP2 drops at the next reshard, so an in-place write
    (``merge``) would be lost while the layer says it holds it. Sharded parameters (``DTensor``)
    are fine to write: DTensor computes ``W + s B A`` and its norms shard-aware, gathering what
    it needs, and each rank writes its own shard (every rank must call ``merge``)."""
    held = [p._module_info.param_name for p in _fsdp_params_of(module) if p.sharded_state.name != "SHARDED"]
    if held:
        raise RuntimeError(
            f"{owner}: FSDP2 holds this layer's parameters ({', '.join(held)}) unsharded right now (inside a "
            "forward, after unshard(), or kept by reshard_after_forward=False): a write there would go to a "
            "temporary copy that FSDP2 drops at the next reshard. Call reshard() on the fully_shard'ed modules "
            "first (every rank), then merge"
        )


def check_not_wrapped(owner: str, model: nn.Module) -> None:
    """Raise ``ValueError`` if ``model`` is wrapped by DDP or sharded by FSDP2 (``fully_shard``)
    already: parameters added to it now would be outside their gradient reduction. Anything not
    an ``nn.Module`` passes: the caller's own type check names it."""
    if not isinstance(model, nn.Module):
        return
    from torch.nn.parallel import DistributedDataParallel

    how = None
    if isinstance(model, DistributedDataParallel):
        how = "a DistributedDataParallel"
    else:
        fsdp_types: tuple[type, ...] = ()
        try:
            from torch.distributed.fsdp import FSDPModule

            fsdp_types = (FSDPModule,)
        except ImportError:  # pragma: no cover  (torch without FSDP2)
            pass
        sharded = [name or "the model" for name, m in model.named_modules() if isinstance(m, fsdp_types)]
        if sharded:
            how = f"a model sharded by fully_shard ({', '.join(sharded[:4])}{', ...' if len(sharded) > 4 else ''})"
        elif any(is_sharded(p) for p in model.parameters()):
            how = "a model holding DTensor (sharded) parameters"
    if how is not None:
        raise ValueError(
            f"{owner}: model: expected a model not yet wrapped for data parallelism, got {how}: adapters "
            "added (or parameters made trainable) now would be in neither DDP's gradient buckets nor FSDP2's "
            "shards, and would train apart on each rank. Add the adapters first, then wrap (fully_shard / "
            "DistributedDataParallel)"
        )
