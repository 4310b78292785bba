"""The seam between a registered op and its backends, and the ``reference`` backend.

A registered op (``torch.ops.peftops.*``) receives the concrete backend name as its last
argument, chosen by the public function before the call (so ``torch.compile`` guards on the
selection) and saved by autograd (so the backward runs on the forward's backend).
"""

from __future__ import annotations

import torch

from ..backends import implementation, register_backend

LIB = "peftops"

# The spec, in peftops/reference/: runs wherever torch runs. Each op module registers its
# reference implementation next to its registered op.
register_backend("reference", lambda device_type: None)


def call(fn, device: torch.device, *args):
    """``fn(*args)`` with autocast off. Autocast was applied by the public function; the
    implementation runs with the dtypes it was given (the reference accumulates in float32 on
    purpose). Entering the disabling context costs host time, so only when autocast is on."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            return fn(*args)
    return fn(*args)


def run_forward(op: str, backend: str, device: torch.device, *args):
    return call(implementation(op, backend).forward, device, *args)


def run_backward(op: str, backend: str, device: torch.device, *args):
    return call(implementation(op, backend).backward, device, *args)
