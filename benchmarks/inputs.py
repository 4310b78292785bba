"""The inputs of a case and what is timed on them: input sets drawn from seeds, their ``grad_out``,
the number of copies to rotate over, and the zero-argument step of each mode.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence

import torch

from .registry import MODES, Case, Inputs
from .timing import MAX_ROTATION_SETS, Step, l2_cache_bytes

GRAD_OUT_SEED = 10_000  # input set i is drawn with seed i, its grad_out with GRAD_OUT_SEED + i


# ---------------------------------------------------------------------------------------------
# Inputs and the steps of each mode
# ---------------------------------------------------------------------------------------------


def _tensors(inputs: Inputs) -> Iterable[torch.Tensor]:
    return (v for v in inputs.values() if isinstance(v, torch.Tensor))


def nbytes(inputs: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(inputs))


def make_input_set(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    inputs = case.make_inputs(dtype, device, gen)
    for name in case.grad_inputs:
        inputs[name].requires_grad_(True)
    return inputs


def make_grad_out(like: torch.Tensor, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def rotation_sets(set_bytes: int, device: torch.device) -> int:
    """How many input copies to rotate over: enough to exceed 2x L2 on a GPU, so that each call
    reads its inputs from memory as in a model; one on a CPU, whose figures are a first look."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_ROTATION_SETS, math.ceil(2 * l2_cache_bytes(device) / max(set_bytes, 1))))


def grad_args(inputs: Inputs, names: Sequence[str]) -> list[torch.Tensor]:
    return [inputs[n] for n in names]


def _forward(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return fn(inputs)


def _forward_backward(
    fn: Callable[[Inputs], torch.Tensor], inputs: Inputs, grad_names: Sequence[str], grad_out: torch.Tensor
) -> tuple:
    out = fn(inputs)
    return torch.autograd.grad(out, grad_args(inputs, grad_names), grad_out, allow_unused=True)


def mode_steps(
    fn: Callable[[Inputs], torch.Tensor],
    sets: Sequence[Inputs],
    grad_outs: Sequence[torch.Tensor],
    grad_names: Sequence[str],
    mode: str,
) -> list[Step]:
    """One zero-argument call per input set doing the timed work of ``mode``.

    ``bwd`` runs each forward here, once and untimed, and keeps its graph for repeated backwards.
    ``allow_unused``: a base provider does not touch the adapter's parameters.
    """
    if mode == "fwd":
        return [functools.partial(_forward, fn, t) for t in sets]
    if mode == "fwd+bwd":
        return [
            functools.partial(_forward_backward, fn, t, grad_names, g) for t, g in zip(sets, grad_outs, strict=False)
        ]
    if mode == "bwd":
        backward = functools.partial(torch.autograd.grad, retain_graph=True, allow_unused=True)
        return [
            functools.partial(backward, fn(t), grad_args(t, grad_names), g)
            for t, g in zip(sets, grad_outs, strict=False)
        ]
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
