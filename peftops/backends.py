"""Backend selection: one public op, several implementations, one dispatch point.

Every op (``lora_linear``, ``bottleneck_adapter``, ``prefix_attention``) is implemented by
one or more *backends*:

* ``reference`` — the readable PyTorch spec in :mod:`peftops.reference`; always available,
  runs on any device, and is the CPU implementation.
* ``triton`` — kernels in :mod:`peftops.kernels`; needs ``triton`` and a CUDA tensor, or a
  CPU tensor with ``TRITON_INTERPRET=1`` set before the first kernel module is imported
  (that is how CI runs kernels).
* ``cuda`` — CUDA C++ in ``csrc/``, compiled into ``peftops._C``; needs a CUDA tensor and
  the built extension.

The requested backend comes from :func:`use_backend` (innermost wins) or else from the
``PEFTOPS_BACKEND`` environment variable, read once when peftops is imported (so that a
``torch.compile``'d model can guard on it; change it at run time with :func:`use_backend`).
``auto`` picks, for the given inputs, the first backend in the op's preference order that
is available, implements the op and supports the inputs; on a GPU the order comes from
measurements kept as data (``kernels/configs/auto.json``), else ``DEFAULT_CUDA_ORDER``. Naming a backend explicitly
never falls back: if it cannot run the call, :class:`BackendUnavailableError` says why.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "OpImpl",
    "available_backends",
    "backend_status",
    "get_backend",
    "implemented_backends",
    "register_impl",
    "resolve_backend",
    "use_backend",
]

#: Concrete backends, in the default ``auto`` preference order for CUDA tensors.
BACKENDS: tuple[str, ...] = ("cuda", "triton", "reference")
_REQUESTABLE = ("auto",) + BACKENDS
ENV_VAR = "PEFTOPS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run this call (never a silent fallback)."""


def _check_name(name: object, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source}: expected a backend name (str), got {type(name).__name__}")
    if name not in _REQUESTABLE:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, _REQUESTABLE))}, got {name!r}")
    return name


class _State:
    """Process-wide selection. A plain object so that torch.compile guards on its contents."""

    def __init__(self) -> None:
        self.default: str = os.environ.get(ENV_VAR, "auto")
        self.stack: list[str] = []


_STATE = _State()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto``, ``reference``, ``triton``, ``cuda``).

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


# Availability is a property of the process (what is installed and built): computed once,
# so eager calls do not re-scan the import path or PATH on every op, and treated as a
# constant by torch.compile instead of being traced. TRITON_INTERPRET is fixed at kernel
# import anyway, since triton.jit reads it when it decorates.
_PROCESS_FACTS: dict[str, object] = {}


def _fact(name: str, compute: Callable[[], object]):
    if name not in _PROCESS_FACTS:
        _PROCESS_FACTS[name] = compute()
    return _PROCESS_FACTS[name]


@torch.compiler.assume_constant_result
def _triton_installed() -> bool:
    return _fact("triton_installed", lambda: importlib.util.find_spec("triton") is not None)


@torch.compiler.assume_constant_result
def _triton_interpret() -> bool:
    return _fact("triton_interpret", lambda: os.environ.get("TRITON_INTERPRET", "0") == "1")


@torch.compiler.assume_constant_result
def _cuda_extension_status() -> str:
    from .cuda_ext import why_unavailable

    return _fact("cuda_extension", lambda: why_unavailable() or "")


def backend_status(backend: str, device: torch.device | str) -> str | None:
    """``None`` if ``backend`` can run on ``device`` in this process, else the reason it cannot."""
    _check_name(backend, "backend")
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if not _triton_installed():
            return "the triton package is not installed"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpret():
            return None
        return (
            f"triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
            f"peftops kernels are imported; got a {device.type} tensor"
        )
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got a {device.type} tensor"
        reason = _cuda_extension_status()
        return reason or None
    raise AssertionError(backend)


@dataclass(frozen=True)
class OpImpl:
    """One backend's implementation of one op.

    ``forward``/``backward`` take the registered op's arguments (minus ``backend``).
    ``supports(*forward_args)`` returns ``None`` when the call is supported, else the reason.
    """

    forward: Callable
    backward: Callable
    supports: Callable[..., str | None] = field(default=lambda *args: None)


_IMPLS: dict[str, dict[str, OpImpl]] = {}


def register_impl(op: str, backend: str, impl: OpImpl, *, replace: bool = False) -> None:
    """Register ``backend``'s implementation of ``op`` (kernel modules call this at import)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    table = _IMPLS.setdefault(op, {})
    if backend in table and not replace:
        raise ValueError(f"{op}: backend {backend!r} is already registered (pass replace=True)")
    table[backend] = impl


def unregister_impl(op: str, backend: str) -> None:
    _IMPLS.get(op, {}).pop(backend, None)


def implementation(op: str, backend: str) -> OpImpl:
    try:
        return _IMPLS[op][backend]
    except KeyError:
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} has no implementation of this op "
            f"(implemented: {', '.join(sorted(_IMPLS.get(op, {}))) or 'none'})"
        ) from None


def _why_not(op: str, backend: str, device: torch.device, args: Sequence) -> str | None:
    reason = backend_status(backend, device)
    if reason is not None:
        return reason
    impl = _IMPLS.get(op, {}).get(backend)
    if impl is None:
        return f"it has no implementation of {op} yet"
    return impl.supports(*args)


#: Measured ``auto`` preferences, as data: ``{"entries": [{"op", "device", "order"}]}``, one
#: entry per op and GPU name, written from benchmark runs (benchmarks/NOTES.md).
AUTO_TABLE = Path(__file__).parent / "kernels" / "configs" / "auto.json"
#: Without a measurement for this GPU: Triton first (tensor cores, no build step), then the
#: CUDA extension (which may need a just-in-time build of minutes on first use).
DEFAULT_CUDA_ORDER = ("triton", "cuda", "reference")


@functools.cache
def _measured_orders() -> dict[tuple[str, str], tuple[str, ...]]:
    if not AUTO_TABLE.exists():
        return {}
    doc = json.loads(AUTO_TABLE.read_text())
    return {(e["op"], e["device"]): tuple(e["order"]) for e in doc["entries"]}


@torch.compiler.assume_constant_result
def _cuda_order(op: str, index: int) -> tuple[str, ...]:
    return _measured_orders().get((op, torch.cuda.get_device_name(index)), DEFAULT_CUDA_ORDER)


def _auto_order(op: str, device: torch.device) -> Sequence[str]:
    # The interpreter exists for testing; it is never the fastest choice on CPU.
    if device.type != "cuda":
        return ("reference",)
    return _cuda_order(op, device.index if device.index is not None else torch.cuda.current_device())


def resolve_backend(op: str, device: torch.device, args: Sequence, requested: str | None = None) -> str:
    """The concrete backend that will run ``op`` on these arguments."""
    requested = get_backend() if requested is None else _check_name(requested, "backend")
    if requested != "auto":
        reason = _why_not(op, requested, device, args)
        if reason is not None:
            raise BackendUnavailableError(
                f"{op}: backend {requested!r} was requested but cannot run this call: {reason}"
            )
        return requested
    for backend in _auto_order(op, device):
        if _why_not(op, backend, device, args) is None:
            return backend
    raise BackendUnavailableError(f"{op}: no backend supports this call on {device}")  # reference supports all


def implemented_backends(op: str) -> list[str]:
    """Backends with a registered implementation of ``op``, whatever this process can run."""
    return [b for b in BACKENDS if b in _IMPLS.get(op, {})]


def available_backends(op: str, device: torch.device | str = "cpu") -> list[str]:
    """Backends that implement ``op`` and can run on ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS if backend_status(b, device) is None and b in _IMPLS.get(op, {})]
