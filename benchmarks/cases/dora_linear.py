r"""DoRA linear (``peftops.dora_linear``) at the LoRA cases' Llama-3-8B projection shapes
(issue 13's target: DoRA fwd+bwd at most 1.15x peftops LoRA at those shapes, measured in the
same run, and reported against peft's DoRA).

Cases: q_proj 4096x4096, up_proj 4096x14336, down_proj 14336x4096 (in x out); ranks 16 and
64; 512 and 8192 tokens; no bias, scale 2, no dropout (peft's ``base_result`` path).

Work for T tokens, K in, N out, rank r; W frozen; A, B and the magnitude m trained::

    fwd  flops 2TKN + 2Tr(K + N)  + 2NKr + 2Kr^2 + 2Nr^2   (the norm: W A^T, A A^T, B Gram B^T)
               + 2TN                                         (c * z + b)
         elems x TK + W NK (read twice: the GEMM and W A^T) + A rK + B Nr + m N (read)
               + y TN + z TN (written: the unscaled output, kept for dm)
    bwd  flops 2TNK + 4Tr(K + N) + 2TNr + 2TN   dx = (g c) W + s ((g c) B) A, dA, dB from
                                                g^T u, dm = sum_T g z / n
         elems g TN + x TK + W NK + A rK + B Nr + z TN (read) + dx TK + dA rK + dB Nr + dm N

Providers: ``hf-peft`` is peft's ``DoraLinearVariant.forward`` / ``DoraLinearLayer.forward``
as written there (``lora_weight = lora_B(lora_A(eye)).T``, ``||W + s lora_weight||`` detached,
``(c - 1) * base_result + c * s * lora(x)`` added to the base output); ``peftops-lora`` is
``peftops.lora_linear`` on the same A and B (not checked: a different function; the ratio the
1.15x target is about); ``linear`` the frozen base layer alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops

from ..registry import QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, real_shape_suites, register_op

OP = "dora_linear"
SCALE = 2.0
PROJECTIONS = {"q_proj": (4096, 4096), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
RANKS = (16, 64)
TOKENS = (512, 8192)
QUICK_CASE = "q_proj-4096x4096-r16-T512"


def work(tokens: int, k: int, n: int, rank: int, direction: str) -> Work:
    adapter = rank * k + n * rank + n
    if direction == "fwd":
        flops = 2 * tokens * k * n + 2 * tokens * rank * (k + n) + 2 * n * k * rank + 2 * (k + n) * rank**2
        return Work(flops + 2 * tokens * n, tokens * k + 2 * n * k + adapter + 2 * tokens * n)
    flops = 2 * tokens * n * k + 4 * tokens * rank * (k + n) + 2 * tokens * n * rank + 2 * tokens * n
    return Work(flops, 2 * tokens * n + tokens * k + n * k + adapter + tokens * k + adapter)


def lora_work(tokens: int, k: int, n: int, rank: int, direction: str) -> Work:
    from .lora_linear import work as lora

    return lora(tokens, k, n, rank, direction)


def _inputs(tokens: int, k: int, n: int, rank: int):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        weight = normal(gen, (n, k), k**-0.5, dtype, device)
        lora_a = normal(gen, (rank, k), k**-0.5, dtype, device)
        # Random B and a magnitude away from the init norms: either at its init would hide errors.
        lora_b = normal(gen, (n, rank), rank**-0.5, dtype, device)
        norm = torch.linalg.vector_norm(weight.float() + SCALE * (lora_b.float() @ lora_a.float()), dim=1)
        magnitude = (norm * (1.0 + normal(gen, (n,), 0.1, torch.float32, device))).to(dtype)
        return {
            "x": normal(gen, (tokens, k), 1.0, dtype, device),
            "weight": weight,
            "lora_a": lora_a,
            "lora_b": lora_b,
            "magnitude": magnitude,
            "bias": None,
            "scale": SCALE,
        }

    return make


def case(name: str, tokens: int, k: int, n: int, rank: int, suites: frozenset) -> Case:
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, k, n, rank),
        grad_inputs=("x", "lora_a", "lora_b", "magnitude"),
        work=lambda direction: work(tokens, k, n, rank, direction),
        base="linear",
        params={"tokens": tokens, "in": k, "out": n, "rank": rank, "scale": SCALE},
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    return peftops.reference.dora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["magnitude"], scale=t["scale"], bias=t["bias"]
    )


def public(t: dict) -> torch.Tensor:
    return peftops.ops.dora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["magnitude"], scale=t["scale"], bias=t["bias"]
    )


def hf_peft(t: dict) -> torch.Tensor:
    """peft's DoRA forward, eager, as its source computes it (dropout off)."""
    x, weight, lora_a, lora_b, s = t["x"], t["weight"], t["lora_a"], t["lora_b"], t["scale"]
    result = F.linear(x, weight, t["bias"])
    eye = torch.eye(lora_a.shape[1], device=x.device, dtype=x.dtype)
    lora_weight = F.linear(F.linear(eye, lora_a), lora_b).T
    weight_norm = torch.linalg.norm(weight + s * lora_weight.detach(), dim=1).to(weight.dtype).detach()
    mag_norm_scale = (t["magnitude"] / weight_norm).view(1, -1)
    base_result = result if t["bias"] is None else result - t["bias"]
    lora_result = F.linear(F.linear(x, lora_a), lora_b)
    return result + (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * s


def peftops_lora(t: dict) -> torch.Tensor:
    """peftops' LoRA on the same A and B: what DoRA's overhead is measured against."""
    return peftops.ops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=t["scale"], bias=t["bias"])


def linear(t: dict) -> torch.Tensor:
    """The frozen base layer alone."""
    return F.linear(t["x"], t["weight"], t["bias"])


def _lora_work(c: Case, direction: str) -> Work:
    p = c.params
    return lora_work(p["tokens"], p["in"], p["out"], p["rank"], direction)


def _linear_work(c: Case, direction: str) -> Work:
    p = c.params
    return lora_work(p["tokens"], p["in"], p["out"], 0, direction)


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("hf-peft", hf_peft),
            Provider("peftops-lora", peftops_lora, checked=False, work=_lora_work),
            Provider("linear", linear, checked=False, work=_linear_work),
        ],
    )
    for proj, (k, n) in PROJECTIONS.items():
        for rank in RANKS:
            for tokens in TOKENS:
                name = f"{proj}-{k}x{n}-r{rank}-T{tokens}"
                registry.add_case(case(name, tokens, k, n, rank, real_shape_suites(name, QUICK_CASE)))
    registry.add_case(case("small-512x256-r8-T256", 256, 512, 256, 8, frozenset({QUICK_CPU})))
