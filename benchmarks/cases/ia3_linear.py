r"""IA3 linear (``peftops.ia3_linear``) at Llama-3-8B projection shapes, as peft's defaults
place it on Llama: k_proj / v_proj (4096 x 1024, output scaling) and down_proj
(14336 x 4096, input scaling, peft's ``feedforward_modules``); 512 and 8192 tokens; no bias.

Work for T tokens, K in, N out; the frozen weight W gets no gradient; l trained::

    fwd  flops 2TKN + TN (or TK)       elems x TK + W NK + l (read) + y TN, and z TN for output
                                       scaling (kept for dl)
    bwd  flops 2TNK + 2TN (or 2TK)     output scaling: dx = (g l) W, dl = sum_T g z;
                                       input scaling: dx = (g W) l, dl = sum_T (g W) x
         elems g TN + W NK + z TN or x TK (read) + dx TK + l (written)

Baseline: peft's ``IA3`` ``Linear.forward`` (``base_layer(x) * l``, or ``base_layer(x * l)``);
``linear``: the frozen base layer alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops

from ..registry import QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, real_shape_suites, register_op

OP = "ia3_linear"
PROJECTIONS = {"k_proj": (4096, 1024, False), "v_proj": (4096, 1024, False), "down_proj": (14336, 4096, True)}
TOKENS = (512, 8192)
QUICK_CASE = "down_proj-14336x4096-T512"


def work(tokens: int, k: int, n: int, scale_input: bool, direction: str, adapter: bool = True) -> Work:
    vec = (k if scale_input else n) if adapter else 0
    scaled = (tokens * (k if scale_input else n)) if adapter else 0
    z = tokens * n if adapter and not scale_input else 0
    if direction == "fwd":
        return Work(2 * tokens * k * n + scaled, tokens * k + n * k + vec + tokens * n + z)
    reduce_read = (z if not scale_input else tokens * k) if adapter else 0
    return Work(2 * tokens * n * k + 2 * scaled, tokens * n + n * k + reduce_read + tokens * k + vec)


def _inputs(tokens: int, k: int, n: int, scale_input: bool):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        width = k if scale_input else n
        return {
            "x": normal(gen, (tokens, k), 1.0, dtype, device),
            "weight": normal(gen, (n, k), k**-0.5, dtype, device),
            # Away from the all-ones init: ones would hide a missing or misplaced scale.
            "ia3_scale": (1.0 + normal(gen, (width,), 0.2, torch.float32, device)).to(dtype),
            "bias": None,
            "scale_input": scale_input,
        }

    return make


def case(name: str, tokens: int, k: int, n: int, scale_input: bool, suites: frozenset) -> Case:
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, k, n, scale_input),
        grad_inputs=("x", "ia3_scale"),
        work=lambda direction: work(tokens, k, n, scale_input, direction),
        base="linear",
        params={"tokens": tokens, "in": k, "out": n, "scale_input": scale_input},
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    return peftops.reference.ia3_linear(t["x"], t["weight"], t["ia3_scale"], t["bias"], t["scale_input"])


def public(t: dict) -> torch.Tensor:
    return peftops.ops.ia3_linear(t["x"], t["weight"], t["ia3_scale"], t["bias"], scale_input=t["scale_input"])


def hf_peft(t: dict) -> torch.Tensor:
    """HF PEFT's ``ia3.Linear.forward``: ``base_layer(x * l)`` (feedforward) or ``base_layer(x) * l``."""
    if t["scale_input"]:
        return F.linear(t["x"] * t["ia3_scale"], t["weight"], t["bias"])
    return F.linear(t["x"], t["weight"], t["bias"]) * t["ia3_scale"]


def linear(t: dict) -> torch.Tensor:
    """The frozen base layer alone: what the adapter is paid for against."""
    return F.linear(t["x"], t["weight"], t["bias"])


def _linear_work(c: Case, direction: str) -> Work:
    p = c.params
    return work(p["tokens"], p["in"], p["out"], p["scale_input"], direction, adapter=False)


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [Provider("hf-peft", hf_peft), Provider("linear", linear, checked=False, work=_linear_work)],
    )
    for proj, (k, n, scale_input) in PROJECTIONS.items():
        for tokens in TOKENS:
            name = f"{proj}-{k}x{n}-T{tokens}"
            registry.add_case(case(name, tokens, k, n, scale_input, real_shape_suites(name, QUICK_CASE)))
    registry.add_case(case("small-512x256-T256", 256, 512, 256, False, frozenset({QUICK_CPU})))
    registry.add_case(case("small-512x256-ff-T256", 256, 512, 256, True, frozenset({QUICK_CPU})))
