r"""LoRA linear (``peftops.lora_linear``) at Llama-3-8B projection shapes.

Cases: projections 4096x4096 (q_proj; o_proj is the same), 4096x14336 (gate_proj, up_proj) and
14336x4096 (down_proj), written in x out; ranks 16 and 64; 512 and 8192 tokens. No bias (Llama
has none); scale 2 (``lora_alpha = 2 r``). No dropout in the checked cases (HF PEFT puts
``nn.Identity`` there when ``lora_dropout=0``); the ``-drop0.1`` cases time dropout 0.1 at
8192 tokens and are not checked, since each implementation draws its own random mask.

Work for T tokens, K in, N out, rank r; the frozen weight W gets no gradient::

    fwd  flops 2TKN + 2Tr(K + N)
         elems x TK + W NK + A rK + B Nr (read) + y TN (written)
    bwd  flops 2TNK + 4Tr(K + N):  dx = gW + s (gB) A,  dA = s (gB)^T x,  dB = s g^T (x A^T),
                                   with x A^T kept from the forward
         elems g TN + x TK + W NK + A rK + B Nr (read) + dx TK + dA rK + dB Nr (written)

The base provider ``linear`` is the frozen layer alone: the same formulas with r = 0, and its
backward does not read x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops

from ..registry import FULL, QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, real_shape_suites, register_op

OP = "lora_linear"
SCALE = 2.0
PROJECTIONS = {"q_proj": (4096, 4096), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}
RANKS = (16, 64)
TOKENS = (512, 8192)
QUICK_CASE = "q_proj-4096x4096-r16-T512"


def work(tokens: int, k: int, n: int, rank: int, direction: str) -> Work:
    adapter = rank * k + n * rank
    if direction == "fwd":
        return Work(2 * tokens * k * n + 2 * tokens * rank * (k + n), tokens * k + n * k + adapter + tokens * n)
    x_read = tokens * k if rank else 0  # only dA needs x
    return Work(
        2 * tokens * n * k + 4 * tokens * rank * (k + n),
        tokens * n + x_read + n * k + adapter + tokens * k + adapter,
    )


def _inputs(tokens: int, k: int, n: int, rank: int, dropout_p: float):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        return {
            "x": normal(gen, (tokens, k), 1.0, dtype, device),
            "weight": normal(gen, (n, k), k**-0.5, dtype, device),
            "lora_a": normal(gen, (rank, k), k**-0.5, dtype, device),
            # Random, not the zero init: a zero B would hide every error in the low-rank path.
            "lora_b": normal(gen, (n, rank), rank**-0.5, dtype, device),
            "bias": None,
            "scale": SCALE,
            "dropout_p": dropout_p,
        }

    return make


def case(name: str, tokens: int, k: int, n: int, rank: int, suites: frozenset, dropout_p: float = 0.0) -> Case:
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, k, n, rank, dropout_p),
        grad_inputs=("x", "lora_a", "lora_b"),
        work=lambda direction: work(tokens, k, n, rank, direction),
        base="linear",
        params={"tokens": tokens, "in": k, "out": n, "rank": rank, "scale": SCALE, "dropout_p": dropout_p},
        suites=suites,
        unchecked="random dropout mask" if dropout_p else None,
    )


def _dropout(t: dict) -> torch.Tensor:
    return F.dropout(t["x"], t["dropout_p"]) if t["dropout_p"] else t["x"]


def reference(t: dict) -> torch.Tensor:
    p = t["dropout_p"]
    keep = torch.rand_like(t["x"], dtype=torch.float32) >= p if p else None
    return peftops.reference.lora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=t["scale"], bias=t["bias"], keep=keep, dropout_p=p
    )


def public(t: dict) -> torch.Tensor:
    return peftops.lora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=t["scale"], bias=t["bias"], dropout_p=t["dropout_p"]
    )


def hf_peft(t: dict) -> torch.Tensor:
    """HF PEFT's ``LoraLayer.forward``: ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``."""
    return (
        F.linear(t["x"], t["weight"], t["bias"])
        + F.linear(F.linear(_dropout(t), t["lora_a"]), t["lora_b"]) * t["scale"]
    )


def addmm(t: dict) -> torch.Tensor:
    """Unsloth's ``matmul_lora``: the low-rank product accumulated into the base output in place."""
    x = t["x"]
    out = x @ t["weight"].t()
    out.addmm_(_dropout(t) @ t["lora_a"].t(), t["lora_b"].t(), alpha=t["scale"])
    return out if t["bias"] is None else out + t["bias"]


def linear(t: dict) -> torch.Tensor:
    """The frozen base layer alone: what the adapter is paid for against."""
    return F.linear(t["x"], t["weight"], t["bias"])


def auto_pick(t: dict) -> str | None:
    """The backend ``auto`` resolves to on these inputs, asked the way ``peftops.lora_linear``
    asks (its dispatch arguments); ``None`` if peftops' internals no longer answer that way."""
    x, p = t["x"], t["dropout_p"]
    seed = torch.zeros((), dtype=torch.int64, device=x.device) if p else None
    args = (x, t["weight"], t["lora_a"], t["lora_b"], t["bias"], t["scale"], p, seed)
    try:
        return peftops.backends.resolve_backend(OP, x.device, args, "auto")
    except Exception:  # noqa: BLE001 - a record for the reader, never a reason to stop the run
        return None


def _linear_work(c: Case, direction: str) -> Work:
    p = c.params
    return work(p["tokens"], p["in"], p["out"], 0, direction)


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("hf-peft", hf_peft),
            Provider("addmm", addmm),
            Provider("linear", linear, checked=False, work=_linear_work),
        ],
        # Issue 10: in every case, what auto picks is no slower than the better of these.
        auto_rivals=("addmm", "hf-peft"),
        auto_pick=auto_pick,
    )
    for proj, (k, n) in PROJECTIONS.items():
        for tokens in TOKENS:
            for rank in RANKS:
                name = f"{proj}-{k}x{n}-r{rank}-T{tokens}"
                registry.add_case(case(name, tokens, k, n, rank, real_shape_suites(name, QUICK_CASE)))
    for proj, (k, n) in PROJECTIONS.items():
        registry.add_case(case(f"{proj}-{k}x{n}-r16-T8192-drop0.1", 8192, k, n, 16, frozenset({FULL}), dropout_p=0.1))
    registry.add_case(case("small-512x512-r16-T256", 256, 512, 512, 16, frozenset({QUICK_CPU})))
    registry.add_case(case("small-512x512-r16-T256-drop0.1", 256, 512, 512, 16, frozenset({QUICK_CPU}), dropout_p=0.1))
