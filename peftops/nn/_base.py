"""What every peftops adapter module shares."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator

from torch import Tensor, nn


class AdapterModule(nn.Module):
    """Base of peftops' adapter modules: knows which of its parameters are the adapter's.

    :func:`peftops.mark_only_adapters_trainable` trains exactly these, so a frozen base layer
    held inside an adapter module (``LoRALinear.weight``) stays frozen.
    """

    def adapter_parameters(self) -> Iterator[Tensor]:
        return self.parameters()


def positive_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name}: expected an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: {name}: expected an int >= 1, got {value}")
    return int(value)


def nonempty_linear(owner: str, linear: nn.Linear) -> None:
    """A layer with no input or no output features has nothing to adapt (and the ops reject it)."""
    out_features, in_features = linear.weight.shape
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if value < 1:
            raise ValueError(f"{owner}: linear: expected {name} >= 1, got {value}")


def finite(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{owner}: {name}: expected a finite number, got {value}")
    return float(value)


def dropout_rate(owner: str, value: object) -> float:
    rate = finite(owner, "dropout", value)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{owner}: dropout: expected a value in [0, 1), got {rate}")
    return rate


def strict_bool(owner: str, name: str, value: object) -> bool:
    # bool("False") is True: accept real bools only.
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name}: expected a bool, got {type(value).__name__}")
    return value
