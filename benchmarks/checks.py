"""Correctness checks: the float32 reference on input set 0, and each provider's output and
gradients compared with it under :mod:`peftops.testing`'s tolerance policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from peftops.testing import close_report, tolerance

from .inputs import grad_args, make_grad_out
from .registry import Inputs, Op, Provider

# ---------------------------------------------------------------------------------------------
# Correctness checks
# ---------------------------------------------------------------------------------------------


@dataclass
class Expected:
    """The reference evaluated in float32 on input set 0: output and gradients."""

    out: torch.Tensor
    grads: list[torch.Tensor] | None


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def evaluate_reference(
    op: Op,
    inputs: Inputs,
    grad_names: Sequence[str],
    grad_out_seed: int,
    dtype: torch.dtype,
    device: torch.device,
    need_grad: bool,
) -> tuple[Expected, torch.Tensor]:
    """Run the reference on float32 copies of ``inputs``; return it and the run-dtype ``grad_out``
    (drawn here because its shape is the reference output's)."""
    acc = reference_dtype(dtype)
    upcast = {
        k: v.detach().to(acc).requires_grad_(k in grad_names) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    with torch.set_grad_enabled(need_grad):
        out = op.reference(upcast)
    grad_out = make_grad_out(out, dtype, device, grad_out_seed)
    grads = None
    if need_grad:
        grads = list(torch.autograd.grad(out, grad_args(upcast, grad_names), grad_out.to(acc)))
    return Expected(out.detach(), grads), grad_out


def check_provider(
    provider: Provider,
    inputs: Inputs,
    grad_out: torch.Tensor,
    grad_names: Sequence[str],
    expected: Expected,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[list[str], list[str]]:
    """Compare the provider's output (and gradients, when the reference has them) with the
    reference under the tolerance policy. Returns the forward and the backward problems."""
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    need_grad = expected.grads is not None
    with torch.set_grad_enabled(need_grad):
        out = provider.fn(inputs)
    fwd_problems, bwd_problems = [], []
    report = close_report(out, expected.out, tolerance(dtype, "fwd", tf32=tf32))
    if report:
        fwd_problems.append(f"output: {report}")
    if not need_grad:
        return fwd_problems, bwd_problems
    if not out.requires_grad:
        return fwd_problems, ["output: does not require grad (no gradient reaches any input)"]
    grads = torch.autograd.grad(out, grad_args(inputs, grad_names), grad_out, allow_unused=True)
    for name, got, want in zip(grad_names, grads, expected.grads, strict=False):
        if got is None:
            bwd_problems.append(f"d{name}: None (the output does not depend on it)")
            continue
        report = close_report(got, want, tolerance(dtype, "bwd", tf32=tf32))
        if report:
            bwd_problems.append(f"d{name}: {report}")
    return fwd_problems, bwd_problems


def verdict(problems: Sequence[str]) -> str:
    return "ok" if not problems else "fail: " + "; ".join(problems)
