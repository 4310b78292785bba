"""What peftops' forward pre-hooks on a transformers model share: the call's arguments by name,
and how many tokens the KV cache already holds."""

from __future__ import annotations

import inspect

from torch import nn

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
# forward function -> its positional parameter names (self excluded). inspect.signature costs
# tens of microseconds, and the hooks run on every call of the model.
_NAMES: dict[object, tuple[str, ...]] = {}


def call_kwargs(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``module.forward``'s arguments as one dict by name (a copy; the call is not changed).
    Raises ``TypeError`` as Python would for too many positionals or a name given twice."""
    if not args:
        return dict(kwargs)
    forward = module.forward
    key = getattr(forward, "__func__", forward)
    names = _NAMES.get(key)
    if names is None:
        names = _NAMES[key] = tuple(
            p.name for p in inspect.signature(forward).parameters.values() if p.kind in _POSITIONAL
        )
    if len(args) > len(names):
        raise TypeError(
            f"{type(module).__name__}.forward: expected at most {len(names)} positional arguments, got {len(args)}"
        )
    out = dict(kwargs)
    for name, value in zip(names, args, strict=False):
        if name in out:
            raise TypeError(f"{type(module).__name__}.forward: got multiple values for argument {name!r}")
        out[name] = value
    return out


def cached_length(cache: object) -> int:
    """Tokens already in a transformers KV cache (a ``Cache`` or the legacy tuple), 0 for none."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    if isinstance(cache, (tuple, list)) and len(cache) > 0 and cache[0] is not None:
        return int(cache[0][0].shape[-2])  # legacy tuple cache: (layers, 2, (B, H, S, D))
    return 0
