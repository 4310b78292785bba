"""Backend selection: one public op, several implementations, one dispatch point.

A *backend* is a named family of implementations that registers itself, in one place, with
its availability check (:func:`register_backend`), and then registers its implementation of
each op it covers (:func:`register_impl`). This module names no backend; the packages do:

* ``reference`` (:mod:`peftops.ops`): the readable PyTorch spec in :mod:`peftops.reference`;
  runs anywhere.
* ``torch`` (:mod:`peftops.composite`): compositions of the framework's own GEMMs (cuBLAS on
  CUDA, the CPU BLAS elsewhere) with narrow passes for the rank-r terms; runs anywhere.
* ``triton`` (:mod:`peftops.kernels`): fused Triton kernels; CUDA tensors, or CPU tensors
  with ``TRITON_INTERPRET=1`` set before peftops is imported (how CI runs kernels).
* ``cuda`` (:mod:`peftops.cuda_ext`): CUDA C++ in ``csrc/``; CUDA tensors and a built (or
  buildable) extension.

The requested backend comes from :func:`use_backend` (innermost wins) or else from the
``PEFTOPS_BACKEND`` environment variable, read once when peftops is imported (so that a
``torch.compile``'d model can guard on it; change it at run time with :func:`use_backend`).
``auto`` picks the first backend in the op's preference order that is available, implements
the op and supports the inputs. The order is data (``kernels/configs/auto.json``): measured
entries keyed by op, GPU name and a shape class (each op says what its shape class is, e.g.
token count and dropout for ``lora_linear``), else the per-device-type default order there.
Naming a backend explicitly never falls back: if it cannot run the call,
:class:`BackendUnavailableError` says why.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BackendUnavailableError",
    "OpImpl",
    "available_backends",
    "backend_status",
    "get_backend",
    "implementation",
    "implemented_backends",
    "register_backend",
    "register_impl",
    "register_shape_class",
    "registered_backends",
    "resolve_backend",
    "use_backend",
]

AUTO = "auto"
ENV_VAR = "PEFTOPS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run this call (never a silent fallback)."""


@dataclass(frozen=True)
class Backend:
    """A backend's name and its availability: ``status(device_type)`` is ``None`` when the
    backend can run on that device type in this process, else the reason it cannot. It
    depends only on the process (what is installed and built), so it is computed once per
    device type.

    ``call_check(device_type)``, where given, returns ``None`` when every call on that device
    type is fine, else a function of a call's arguments giving the reason this backend cannot
    run that call (for a limit of the backend itself, on every op: Triton's CPU interpreter
    computes bf16 dots wrongly). Asked once per device type, so a backend with no such limit
    on a device costs nothing per call there."""

    name: str
    status: Callable[[str], str | None]
    call_check: Callable[[str], Callable[[Sequence], str | None] | None] | None = None


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str,
    status: Callable[[str], str | None],
    *,
    call_check: Callable[[str], Callable[[Sequence], str | None] | None] | None = None,
) -> None:
    """Declare backend ``name`` (its package calls this once, at import); see :class:`Backend`."""
    if not isinstance(name, str) or not name.isidentifier() or name == AUTO:
        raise ValueError(f"register_backend: name: expected an identifier other than {AUTO!r}, got {name!r}")
    if name in _BACKENDS:
        raise ValueError(f"register_backend: backend {name!r} is already registered")
    _BACKENDS[name] = Backend(name, status, call_check)


def registered_backends() -> tuple[str, ...]:
    """Every declared backend, in the order the packages registered them."""
    return tuple(_BACKENDS)


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a backend name (str), got {type(name).__name__}")
    if name != AUTO and name not in _BACKENDS:
        choices = ", ".join(map(repr, (AUTO, *_BACKENDS)))
        raise ValueError(f"{source}: expected one of {choices}, got {name!r}")
    return name


class _State:
    """Process-wide selection. A plain object so that torch.compile guards on its contents."""

    def __init__(self) -> None:
        self.default: str = os.environ.get(ENV_VAR, AUTO)
        self.stack: list[str] = []


_STATE = _State()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto`` or a registered backend).

    Autograd records the backend with each forward, so a backward run after the block exits
    still uses the forward's backend.
    """
    _check_name(name, "use_backend(name)")
    _STATE.stack.append(name)
    try:
        yield
    finally:
        _STATE.stack.pop()


def get_backend() -> str:
    """The requested backend name in effect here (possibly ``auto``)."""
    if _STATE.stack:
        return _STATE.stack[-1]
    return _check_name(_STATE.default, f"environment variable {ENV_VAR}")


# Availability is a property of the process: computed once per (backend, device type), and
# a constant for torch.compile instead of something it traces.
_STATUS: dict[tuple[str, str], str | None] = {}


@torch.compiler.assume_constant_result
def _status(backend: str, device_type: str) -> str:
    key = (backend, device_type)
    if key not in _STATUS:
        _STATUS[key] = _BACKENDS[backend].status(device_type)
    return _STATUS[key] or ""


_CALL_CHECKS: dict[tuple[str, str], Callable[[Sequence], str | None] | None] = {}


def _call_check(backend: str, device_type: str) -> Callable[[Sequence], str | None] | None:
    key = (backend, device_type)
    if key not in _CALL_CHECKS:
        factory = _BACKENDS[backend].call_check
        _CALL_CHECKS[key] = factory(device_type) if factory is not None else None
    return _CALL_CHECKS[key]


@torch.compiler.assume_constant_result
def _has_call_check(backend: str, device_type: str) -> bool:
    # A constant to dynamo: compiled code touches the lazily filled dict above only where a
    # check exists (a guard on it would recompile every frame whenever another key is added).
    return _call_check(backend, device_type) is not None


def backend_status(backend: str, device: torch.device | str) -> str | None:
    """``None`` if ``backend`` can run on ``device`` in this process, else the reason it cannot."""
    _check_name(backend, "backend")
    if backend == AUTO:
        return None
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _status(backend, device_type) or None


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op.

    ``forward``/``backward`` take the registered op's arguments (minus ``backend``).
    ``supports(*forward_args)`` returns ``None`` when the call is supported, else the reason.
    ``extras`` carries op-specific capabilities that the op's own module defines and reads
    (for example which tensors a backend saves for its backward).
    """

    forward: Callable
    backward: Callable
    supports: Callable[..., str | None] = field(default=lambda *args: None)

    @property
    def supports_everything(self) -> bool:
        return self.supports is _DEFAULT_SUPPORTS

    extras: dict[str, Any] = field(default_factory=dict)


_IMPLS: dict[str, dict[str, OpImpl]] = {}
_DEFAULT_SUPPORTS = OpImpl(forward=print, backward=print).supports


def register_impl(op: str, backend: str, impl: OpImpl, *, replace: bool = False) -> None:
    """Register ``backend``'s implementation of ``op`` (backend packages call this at import)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected a registered backend ({', '.join(_BACKENDS)}), got {backend!r}")
    table = _IMPLS.setdefault(op, {})
    if backend in table and not replace:
        raise ValueError(f"{op}: backend {backend!r} is already registered (pass replace=True)")
    table[backend] = impl
    _SETTLED.clear()


def unregister_impl(op: str, backend: str) -> None:
    _IMPLS.get(op, {}).pop(backend, None)
    _SETTLED.clear()


def implementation(op: str, backend: str) -> OpImpl:
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} has no implementation of this op "
            f"(implemented: {', '.join(sorted(_IMPLS.get(op, {}))) or 'none'})"
        ) from None


def _why_not(op: str, backend: str, device: torch.device, args: Sequence) -> str | None:
    reason = _status(backend, device.type)
    if reason:
        return reason
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        return f"it has no implementation of {op} yet"
    if _has_call_check(backend, device.type):
        check = _call_check(backend, device.type)
        if check is not None and (reason := check(args)):
            return reason
    return impl.supports(*args)


# -- auto: measured preferences as data -----------------------------------------------------

#: ``{"default_order": {device type or "*": [backends]}, "entries": [{"op", "device", "when",
#: "order", "measured"}]}``: ``device`` a GPU name as torch spells it, ``when`` the shape class
#: the measurement covers (see :func:`register_shape_class`), written from benchmark runs
#: kept in ``benchmarks/results/`` (benchmarks/NOTES.md).
AUTO_TABLE = Path(__file__).parent / "kernels" / "configs" / "auto.json"

_SHAPE_CLASS: dict[str, tuple[tuple[str, ...], Callable[..., tuple]]] = {}


def register_shape_class(op: str, keys: Sequence[str], features: Callable[..., tuple]) -> None:
    """``features(*forward_args)`` describes a call for ``auto``: a tuple of ints and bools,
    one per name in ``keys`` (say ``("tokens", "dropout")`` and ``(8192, False)``), that
    ``auto.json`` entries match with ``"when": {"tokens": [lo, hi], "dropout": false}`` (ranges
    inclusive, ``null`` open). A tuple, not a dict: this runs on every eager call."""
    _SHAPE_CLASS[op] = (tuple(keys), features)


@functools.cache
def _auto_table() -> tuple[dict[str, tuple[str, ...]], tuple[dict, ...]]:
    doc = json.loads(AUTO_TABLE.read_text()) if AUTO_TABLE.exists() else {}
    defaults = {k: tuple(v) for k, v in doc.get("default_order", {}).items()}
    defaults.setdefault("*", ("reference",))
    return defaults, tuple(doc.get("entries", ()))


def _matches(when: dict[str, Any], features: dict[str, Any]) -> bool:
    for key, want in when.items():
        if key not in features:
            return False
        got = features[key]
        if isinstance(want, list):
            lo, hi = want
            if (lo is not None and got < lo) or (hi is not None and got > hi):
                return False
        elif got != want:
            return False
    return True


def auto_order(op: str, device_type: str, device_name: str | None, features: dict[str, Any]) -> tuple[str, ...]:
    """The ``auto`` preference order for ``op``: the first measured entry for this GPU whose
    shape class matches ``features``, else the default order for the device type. Pure: no
    device query, so it is testable anywhere."""
    defaults, entries = _auto_table()
    if device_name is not None:
        for entry in entries:
            if entry["op"] == op and entry["device"] == device_name and _matches(entry.get("when", {}), features):
                return tuple(entry["order"])
    return defaults.get(device_type, defaults["*"])


@torch.compiler.assume_constant_result
def _cuda_device_name(index: int) -> str:
    return _device_names.get(index) or _device_names.setdefault(index, torch.cuda.get_device_name(index))


_device_names: dict[int, str] = {}


@torch.compiler.assume_constant_result
def _current_cuda_index() -> int:
    return torch.cuda.current_device()


@torch.compiler.assume_constant_result
def _cached_order(op: str, device_type: str, device_name: str | None, features: tuple) -> tuple[str, ...]:
    # One table walk per distinct (op, GPU, shape class) in the process; a constant to dynamo.
    key = (op, device_type, device_name, features)
    order = _orders.get(key)
    if order is None:
        keys = _SHAPE_CLASS[op][0] if op in _SHAPE_CLASS else ()
        named = dict(zip(keys, features, strict=True)) if features else {}
        order = _orders[key] = auto_order(op, device_type, device_name, named)
    return order


_orders: dict[tuple, tuple[str, ...]] = {}


def _auto_candidates(op: str, device: torch.device, args: Sequence) -> tuple[str, ...]:
    name = None
    if device.type == "cuda":
        name = _cuda_device_name(device.index if device.index is not None else _current_cuda_index())
    # The shape class matters only where this GPU has measured entries for the op: elsewhere
    # (every CPU, an unmeasured GPU) the order is the device type's default, and the
    # per-call feature computation is host time spent for nothing.
    shape_class = _SHAPE_CLASS.get(op)
    if shape_class is None or not args or not _has_measurement(op, name):
        return _cached_order(op, device.type, name, ())
    return _cached_order(op, device.type, name, shape_class[1](*args))


@torch.compiler.assume_constant_result
def _has_measurement(op: str, device_name: str | None) -> bool:
    if not _MEASURED:
        _MEASURED.update((e["op"], e["device"]) for e in _auto_table()[1])
    return (op, device_name) in _MEASURED


_MEASURED: set[tuple[str, str | None]] = set()


def resolve_backend(op: str, device: torch.device, args: Sequence, requested: str | None = None) -> str:
    """The concrete backend that will run ``op`` on these arguments."""
    requested = get_backend() if requested is None else _check_name(requested, "backend")
    if requested != AUTO:
        reason = _why_not(op, requested, device, args)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {requested!r} was requested but cannot run this call: {reason}"
            )
        return requested
    eager = not torch.compiler.is_compiling()
    if eager:
        settled = _SETTLED.get((op, device))
        if settled is not None:
            return settled
    order = _auto_candidates(op, device, args)
    for backend in order:
        if backend in _BACKENDS and _why_not(op, backend, device, args) is None:
            if eager and _settles(op, backend, device, order):
                _SETTLED[(op, device)] = backend
            return backend
    raise BackendUnavailableError(f"{op}: no backend in auto's order supports this call on {device}")


#: ``auto``'s answer per (op, device) where no argument can change it (see :func:`_settles`): one
#: dict lookup per eager call instead of the order walk. Cleared whenever an implementation is
#: registered or removed.
_SETTLED: dict[tuple[str, torch.device], str] = {}


def _settles(op: str, backend: str, device: torch.device, order: Sequence[str]) -> bool:
    """Whether ``backend`` is ``auto``'s answer for every call of ``op`` on ``device``: the order
    does not depend on the call (no measured entry for this GPU and op, so no shape class),
    every backend before it in the order was skipped for a process-wide reason (unregistered,
    unavailable here, or no implementation of the op), and ``backend`` takes every call (no
    ``supports`` of its own)."""
    name = None
    if device.type == "cuda":
        name = _cuda_device_name(device.index if device.index is not None else _current_cuda_index())
    if (
        _has_measurement(op, name)
        or not _IMPLS[op][backend].supports_everything
        or _has_call_check(backend, device.type)
    ):
        return False
    for earlier in order[: order.index(backend)]:
        if earlier in _BACKENDS and not _status(earlier, device.type) and earlier in _IMPLS.get(op, {}):
            return False  # it was skipped for this call's arguments: another call may differ
    return True


def implemented_backends(op: str) -> list[str]:
    """Backends with a registered implementation of ``op``, whatever this process can run."""
    return [b for b in _BACKENDS if b in _IMPLS.get(op, {})]


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that implement ``op`` and can run on ``device`` in this process."""
    device_type = torch.device(device).type
    return [b for b in _BACKENDS if not _status(b, device_type) and b in _IMPLS.get(op, {})]
