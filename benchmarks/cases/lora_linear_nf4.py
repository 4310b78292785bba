r"""QLoRA (``peftops.lora_linear_nf4``): LoRA over a double-quantised NF4 base weight, at issue
14's shapes: 4096x4096 and 4096x14336 (in x out), r 16, 8192 tokens (training) and 64 tokens
(decode); no bias, scale 2, no dropout.

Work for T tokens, K in, N out, rank r; the 4-bit W (N K / 2 bytes, counted as N K / 4 elements
of the 16-bit run dtype, plus the block scales) gets no gradient::

    fwd  flops 2TKN + 2Tr(K + N)
         elems x TK + W NK / 4 + A rK + B Nr (read) + y TN (written)
    bwd  flops 2TNK + 4Tr(K + N)
         elems g TN + x TK + W NK / 4 + A rK + B Nr (read) + dx TK + dA rK + dB Nr (written)

Providers: ``dequant-cublas`` dequantises W into a 16-bit buffer (peftops' reference, which is
bitsandbytes' dequantisation bit for bit), then ``F.linear`` and the two narrow LoRA products:
what Unsloth / axolotl-style QLoRA runs; ``bnb-peft`` is bitsandbytes' ``matmul_4bit`` plus
peft's LoRA products, registered only where bitsandbytes is installed; ``linear`` the frozen
16-bit layer alone (the issue's 1.25x training target and 2x decode target are against it).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import peftops
from peftops.reference import nf4

from ..registry import QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, real_shape_suites, register_op

OP = "lora_linear_nf4"
SCALE = 2.0
PROJECTIONS = {"q_proj": (4096, 4096), "up_proj": (4096, 14336)}
RANK = 16
TOKENS = (8192, 64)
QUICK_CASE = "q_proj-4096x4096-r16-T8192"


def work(tokens: int, k: int, n: int, rank: int, direction: str, weight_elems: float | None = None) -> Work:
    adapter = rank * k + n * rank
    w = n * k / 4 if weight_elems is None else weight_elems
    if direction == "fwd":
        return Work(2 * tokens * k * n + 2 * tokens * rank * (k + n), tokens * k + w + adapter + tokens * n)
    return Work(
        2 * tokens * n * k + 4 * tokens * rank * (k + n), tokens * n + tokens * k + w + adapter + tokens * k + adapter
    )


def _inputs(tokens: int, k: int, n: int, rank: int):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        weight = normal(gen, (n, k), k**-0.5, dtype, device)
        qweight, state = nf4.quantize_4bit(weight, compress_statistics=True)
        return {
            "x": normal(gen, (tokens, k), 1.0, dtype, device),
            "qweight": qweight,
            "quant_state": state,
            # The 16-bit weight the 4-bit one was made from: only the ``linear`` base reads it.
            "weight": weight,
            "lora_a": normal(gen, (rank, k), k**-0.5, dtype, device),
            "lora_b": normal(gen, (n, rank), rank**-0.5, dtype, device),
            "bias": None,
            "scale": SCALE,
        }

    return make


def case(name: str, tokens: int, k: int, n: int, rank: int, suites: frozenset) -> Case:
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, k, n, rank),
        grad_inputs=("x", "lora_a", "lora_b"),
        work=lambda direction: work(tokens, k, n, rank, direction),
        base="linear",
        params={"tokens": tokens, "in": k, "out": n, "rank": rank, "scale": SCALE, "quant": "nf4, double-quantised"},
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    w = nf4.dequantize_4bit(t["qweight"], t["quant_state"]).to(t["x"].dtype)
    return peftops.reference.lora_linear(t["x"], w, t["lora_a"], t["lora_b"], scale=t["scale"], bias=t["bias"])


def public(t: dict) -> torch.Tensor:
    return peftops.lora_linear_nf4(
        t["x"], t["qweight"], t["quant_state"], t["lora_a"], t["lora_b"], scale=t["scale"], bias=t["bias"]
    )


def dequant_cublas(t: dict) -> torch.Tensor:
    """Dequantise into a 16-bit buffer, then the framework's GEMM and the LoRA products."""
    x = t["x"]
    w = nf4.dequantize_4bit(t["qweight"], t["quant_state"]).to(x.dtype)
    return F.linear(x, w, t["bias"]) + t["scale"] * F.linear(F.linear(x, t["lora_a"]), t["lora_b"])


def bnb_peft(t: dict) -> torch.Tensor:
    """bitsandbytes' 4-bit matmul (what peft's QLoRA layer calls) plus peft's LoRA products."""
    import bitsandbytes as bnb

    x = t["x"]
    state = nf4.state_to_bnb(t["quant_state"])
    base = bnb.matmul_4bit(x, t["qweight"].t(), bias=t["bias"], quant_state=state)
    return base + t["scale"] * F.linear(F.linear(x, t["lora_a"]), t["lora_b"])


def linear(t: dict) -> torch.Tensor:
    """The frozen 16-bit layer alone."""
    return F.linear(t["x"], t["weight"], t["bias"])


def _linear_work(c: Case, direction: str) -> Work:
    p = c.params
    return work(p["tokens"], p["in"], p["out"], 0, direction, weight_elems=p["in"] * p["out"])


def register(registry: Registry) -> None:
    baselines = [
        Provider("dequant-cublas", dequant_cublas),
        Provider("linear", linear, checked=False, work=_linear_work),
    ]
    if importlib.util.find_spec("bitsandbytes") is not None:
        baselines.insert(1, Provider("bnb-peft", bnb_peft))
    register_op(registry, OP, public, reference, baselines)
    for proj, (k, n) in PROJECTIONS.items():
        for tokens in TOKENS:
            name = f"{proj}-{k}x{n}-r{RANK}-T{tokens}"
            registry.add_case(case(name, tokens, k, n, RANK, real_shape_suites(name, QUICK_CASE)))
    registry.add_case(case("small-256x192-r8-T128", 128, 256, 192, 8, frozenset({QUICK_CPU})))
