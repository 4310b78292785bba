"""The seam between a registered op and its backends.

A registered op (``torch.ops.peftops.*``) receives the concrete backend name as its last
argument, chosen by the public function before the call (so ``torch.compile`` guards on the
selection) and saved by autograd (so the backward runs on the forward's backend).
"""

from __future__ import annotations

import torch

from ..backends import implementation

LIB = "peftops"


def run_forward(op: str, backend: str, device: torch.device, *args):
    # Autocast was applied by the public function; the implementation runs with the
    # dtypes it was given (the reference accumulates in float32 on purpose).
    with torch.autocast(device.type, enabled=False):
        return implementation(op, backend).forward(*args)


def run_backward(op: str, backend: str, device: torch.device, *args):
    with torch.autocast(device.type, enabled=False):
        return implementation(op, backend).backward(*args)
