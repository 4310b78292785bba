"""Argument checks shared by the public ops.

Every check runs before any work and raises ``TypeError`` (wrong kind of thing, wrong
dtype) or ``ValueError`` (wrong shape, size, range or device), with a message that names
the op, the argument, what was expected and what was got.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import cast

import torch
from torch import Tensor
from typing_extensions import TypeVarTuple, Unpack  # (torch's own dependency; typing has them from 3.11)

Ts = TypeVarTuple("Ts")


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def tensor(op: str, name: str, t: object, ndim: int | Sequence[int] | None = None, *, floating: bool = True) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(
            f"{op}: {name}: expected a floating-point tensor (float32, float16, bfloat16, float64), got {t.dtype}"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{op}: {name}: expected {want} dims, got {t.dim()} dims with shape {_shape(t)}")
    return t


def min_dims(op: str, name: str, t: Tensor, n: int) -> None:
    if t.dim() < n:
        raise ValueError(f"{op}: {name}: expected at least {n} dim(s), got {t.dim()} with shape {_shape(t)}")


def shape(op: str, name: str, t: Tensor, expected: Sequence[int | None], why: str = "") -> None:
    """``expected`` may hold ``None`` for a free dimension."""
    got = _shape(t)
    if len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got, strict=False)):
        want = (
            "(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        )
        raise ValueError(f"{op}: {name}: expected shape {want}{' ' + why if why else ''}, got {got}")


def same_dtype_device(op: str, ref_name: str, ref: Tensor, others: Iterable[tuple[str, Tensor | None]]) -> None:
    for name, t in others:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{op}: {name}: expected device {ref.device} (the device of {ref_name}), got {t.device}")


def finite_float(op: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name}: expected a real number, got {type(value).__name__}")
    # Comparisons instead of math.isfinite: torch.compile may hand us a symbolic float.
    if value != value or abs(value) == math.inf:
        raise ValueError(f"{op}: {name}: expected a finite number, got {value}")
    return value if isinstance(value, float) else float(value)


def probability(op: str, name: str, value: object) -> float:
    value = finite_float(op, name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: {name}: expected a value in [0, 1), got {value}")
    return value


def boolean(op: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name}: expected a bool, got {type(value).__name__}")
    return value


def autocast(device_type: str, *tensors: Unpack[Ts]) -> tuple[Unpack[Ts]]:
    """Apply autocast the way ``F.linear`` does: float32, float16 and bfloat16 inputs go to
    the autocast dtype; float64 (which autocast never casts) and integer tensors stay.

    Custom ops are invisible to autocast (its dispatch key falls through), so without this a
    float32 activation meeting a bfloat16 weight under ``torch.autocast`` would be rejected
    as a dtype mismatch.
    """
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # Each argument keeps its kind (a tensor stays a tensor, None stays None), which the
    # annotation says position by position and a generated tuple cannot show the checker.
    cast_all = tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t for t in tensors)
    return cast("tuple[Unpack[Ts]]", cast_all)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
