r"""Multi-tenant LoRA (``peftops.multi_lora_linear``): one frozen 4096 x 4096 layer, many adapters.

Cases (issue 6): 4096 tokens spread uniformly over 32 rank-16 adapters, against one adapter
for all tokens (``lora-single``, the same op as ``peftops.lora_linear``); the same tokens over
32 adapters of ranks 8, 16 and 64 in rank-64 slots (reported); and a decode step of 64 tokens,
each with its own adapter, against the plain linear layer. Adapter ids are a fixed random draw.

Work, for T tokens, K in, N out, rank r per token (the frozen weight gets no gradient)::

    fwd  flops 2TKN + 2Tr(K + N)
         elems x TK + W NK + the adapters used (read) + y TN (written)
    bwd  flops 2TNK + 4Tr(K + N)
         elems g TN + x TK + W NK + adapters (read) + dx TK + adapter gradients (written)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops

from ..registry import FULL, QUICK, QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, register_op

OP = "multi_lora_linear"


def work(tokens: int, k: int, n: int, rank: float, used: int, r_max: int, direction: str) -> Work:
    adapters = used * r_max * (k + n)
    if direction == "fwd":
        return Work(2 * tokens * k * n + 2 * tokens * rank * (k + n), tokens * k + n * k + adapters + tokens * n)
    return Work(2 * tokens * n * k + 4 * tokens * rank * (k + n), tokens * n + 2 * tokens * k + n * k + 2 * adapters)


def _inputs(tokens, k, n, num, r_max, ranks, ids_kind):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        if ids_kind == "distinct":
            ids = torch.randperm(num, generator=gen, device=device)[:tokens]
        else:
            ids = torch.randint(0, num, (tokens,), generator=gen, device=device)
        return {
            "x": normal(gen, (tokens, k), 1.0, dtype, device),
            "weight": normal(gen, (n, k), k**-0.5, dtype, device),
            "lora_a": normal(gen, (num, r_max, k), k**-0.5, dtype, device),
            "lora_b": normal(gen, (num, n, r_max), r_max**-0.5, dtype, device),  # random, not the zero init
            "adapter_ids": ids,
            # alpha / r differs between users' adapters: 1 to 3.
            "scales": torch.cat(
                [torch.ones(1, device=device), 1.0 + 2.0 * torch.rand(num - 1, generator=gen, device=device)]
            ),
            "scale0": 1.0,  # lora-single's scale as a Python float: reading scales[0] back would sync
            "ranks": None if ranks is None else torch.tensor(ranks, device=device).repeat(num // len(ranks) + 1)[:num],
        }

    return make


def case(name, tokens, k, n, num, r_max, suites, ranks=None, ids_kind="uniform", base="lora-single") -> Case:
    mean_rank = r_max if ranks is None else sum(ranks) / len(ranks)
    used = min(num, tokens)
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, k, n, num, r_max, ranks, ids_kind),
        grad_inputs=("x", "lora_a", "lora_b"),
        work=lambda direction: work(tokens, k, n, mean_rank, used, r_max, direction),
        base=base,
        params={"tokens": tokens, "in": k, "out": n, "adapters": num, "r_max": r_max, "ranks": ranks, "ids": ids_kind},
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    y, _ = peftops.reference.multi_lora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"], t["scales"], None, t["ranks"]
    )
    return y


def public(t: dict) -> torch.Tensor:
    return peftops.multi_lora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"], scales=t["scales"], ranks=t["ranks"]
    )


def lora_single(t: dict) -> torch.Tensor:
    """The same tokens through one adapter (slot 0): the single-tenant cost the issue compares with."""
    return peftops.lora_linear(t["x"], t["weight"], t["lora_a"][0], t["lora_b"][0], scale=t["scale0"])


def peft_loop(t: dict) -> torch.Tensor:
    """HF PEFT's mixed-adapter batch: the base layer, then a loop over the adapters present with
    boolean indexing (``LoraLayer._mixed_batch_forward``)."""
    x, ids = t["x"], t["adapter_ids"]
    y = F.linear(x, t["weight"])
    for a in torch.unique(ids).tolist():
        rows = ids == a
        r = t["lora_a"].shape[1] if t["ranks"] is None else int(t["ranks"][a])
        y[rows] += F.linear(F.linear(x[rows], t["lora_a"][a, :r]), t["lora_b"][a, :, :r]) * t["scales"][a]
    return y


def linear(t: dict) -> torch.Tensor:
    return F.linear(t["x"], t["weight"])


def _linear_work(c: Case, direction: str) -> Work:
    p = c.params
    return work(p["tokens"], p["in"], p["out"], 0, 0, p["r_max"], direction)


def _forward_paths(device: torch.device) -> list[Provider]:
    """The Triton backend with each forward path forced (``auto`` picks by token count, a rule
    these two providers measure): ``peftops[triton:segmented]``, ``peftops[triton:gathered]``."""
    if "triton" not in peftops.available_backends(OP, device):
        return []
    from peftops.kernels import multi_lora_linear as kernels

    def forced(path: str):
        def fn(t: dict) -> torch.Tensor:
            before = kernels.FORWARD_PATH["forward"]
            kernels.FORWARD_PATH["forward"] = path
            try:
                with peftops.use_backend("triton"):
                    return public(t)
            finally:
                kernels.FORWARD_PATH["forward"] = before

        return fn

    untimed = "Triton interpreter (TRITON_INTERPRET=1)" if device.type == "cpu" else None
    return [Provider(f"peftops[triton:{p}]", forced(p), untimed=untimed) for p in ("segmented", "gathered")]


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("lora-single", lora_single, checked=False),
            Provider("peft-loop", peft_loop),
            Provider("linear", linear, checked=False, work=_linear_work),
        ],
        device_providers=_forward_paths,
    )
    registry.add_case(case("T4096-4096x4096-r16-N32", 4096, 4096, 4096, 32, 16, frozenset({FULL, QUICK})))
    registry.add_case(
        case("T4096-4096x4096-r8.16.64-N32", 4096, 4096, 4096, 32, 64, frozenset({FULL}), ranks=[8, 16, 64])
    )
    registry.add_case(
        case(
            "T64-4096x4096-r16-N64-decode",
            64,
            4096,
            4096,
            64,
            16,
            frozenset({FULL}),
            ids_kind="distinct",
            base="linear",
        )
    )
    registry.add_case(case("small-T96-256x256-r8-N4", 96, 256, 256, 4, 8, frozenset({QUICK_CPU})))
