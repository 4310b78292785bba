r"""Bottleneck adapter (``peftops.bottleneck_adapter``), serial form ``y = x + s * up(act(down(x)))``.

Cases: 16384 tokens at d=4096 (Llama-3-8B hidden size) with r=64 and r=16; 4096 tokens at
d=1024 with r=64. Biases on both projections (as the adapters library has them); activation
GELU, peftops' default (smooth, so a bf16 result never sits on the other side of a kink from
the float32 reference); scale 1.

Work for T tokens, hidden d, bottleneck r; P = 2dr + r + d adapter parameters::

    fwd  flops 4Tdr                 elems x Td + P (read) + y Td (written)
    bwd  flops 8Tdr: dWu, dh = dz Wu, dWd, dx (the recomputed pre-activation not counted)
         elems g Td + x Td + P (read) + dx Td + dP (written)

At these shapes the op is memory-bound (T x d dominates), so the base provider is ``copy``:
the memory floor, reading x and writing y once, and in the backward reading g and writing dx.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops

from ..registry import QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, real_shape_suites, register_op

OP = "bottleneck_adapter"
ACTIVATION = "gelu"
SCALE = 1.0
CASES = {  # name -> (tokens, d, rank)
    "T16384-d4096-r64": (16384, 4096, 64),
    "T16384-d4096-r16": (16384, 4096, 16),
    "T4096-d1024-r64": (4096, 1024, 64),
}
QUICK_CASE = "T4096-d1024-r64"


def work(tokens: int, d: int, rank: int, direction: str) -> Work:
    params = 2 * d * rank + rank + d
    if direction == "fwd":
        return Work(4 * tokens * d * rank, 2 * tokens * d + params)
    return Work(8 * tokens * d * rank, 3 * tokens * d + 2 * params)


def _inputs(tokens: int, d: int, rank: int):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        # nn.Linear's scale (1/sqrt(fan_in)) for weights and biases alike; the up projection is
        # random rather than zero-initialised, so the adapter branch contributes to y.
        return {
            "x": normal(gen, (tokens, d), 1.0, dtype, device),
            "down_weight": normal(gen, (rank, d), d**-0.5, dtype, device),
            "down_bias": normal(gen, (rank,), d**-0.5, dtype, device),
            "up_weight": normal(gen, (d, rank), rank**-0.5, dtype, device),
            "up_bias": normal(gen, (d,), rank**-0.5, dtype, device),
            "activation": ACTIVATION,
            "scale": SCALE,
        }

    return make


def case(name: str, tokens: int, d: int, rank: int, suites: frozenset) -> Case:
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, d, rank),
        grad_inputs=("x", "down_weight", "down_bias", "up_weight", "up_bias"),
        work=lambda direction: work(tokens, d, rank, direction),
        base="copy",
        params={"tokens": tokens, "d": d, "rank": rank, "activation": ACTIVATION, "scale": SCALE},
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    return peftops.reference.bottleneck_adapter(
        t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["activation"], t["scale"]
    )


def public(t: dict) -> torch.Tensor:
    return peftops.bottleneck_adapter(
        t["x"],
        t["down_weight"],
        t["down_bias"],
        t["up_weight"],
        t["up_bias"],
        activation=t["activation"],
        scale=t["scale"],
    )


def eager(t: dict) -> torch.Tensor:
    """What adapter libraries run: ``nn.Linear``, activation, ``nn.Linear``, scaled residual add."""
    x = t["x"]
    h = peftops.reference.activation(F.linear(x, t["down_weight"], t["down_bias"]), t["activation"])
    return x + t["scale"] * F.linear(h, t["up_weight"], t["up_bias"])


class _Copy(torch.autograd.Function):
    """``x.clone()`` whose backward clones too: a floor for both directions (a plain clone's
    backward passes the gradient through without touching memory)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def copy(t: dict) -> torch.Tensor:
    return _Copy.apply(t["x"])


def _copy_work(c: Case, direction: str) -> Work:
    return Work(0, 2 * c.params["tokens"] * c.params["d"])


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("nn-eager", eager),
            Provider("copy", copy, checked=False, work=_copy_work),
        ],
    )
    for name, (tokens, d, rank) in CASES.items():
        registry.add_case(case(name, tokens, d, rank, real_shape_suites(name, QUICK_CASE)))
    registry.add_case(case("small-T1024-d512-r64", 1024, 512, 64, frozenset({QUICK_CPU})))
