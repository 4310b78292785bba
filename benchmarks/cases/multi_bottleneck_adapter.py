r"""Bottleneck adapter banks (``peftops.bottleneck_adapter(..., adapter_ids=, ranks=)``): many
users' adapters over one batch, each token through its own adapter.

Cases (issue 15): 4096 tokens at d=4096 spread uniformly over 32 rank-16 adapters, against the
same tokens through one adapter (``adapter-single``, the op without a bank: the single-tenant
cost); the same tokens over 32 adapters of ranks 8, 16 and 64 in rank-64 slots (each slot
should cost its own rank: the work below counts the mean rank); and a decode step, 64 tokens
each with its own adapter of 64, against the copy floor. Ids are a fixed random draw, GELU,
biases on both projections, scale 1, serial form.

Work for T tokens, hidden d, rank r per token (mean over tokens), U adapters used, r_max slots::

    fwd  flops 4Tdr                 elems x Td + y Td + the used adapters U (2 d r_max + r_max + d)
    bwd  flops 8Tdr                 elems g Td + x Td + dx Td + 2 x the used adapters
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops
from peftops.reference.bottleneck_adapter import multi_bottleneck_adapter

from ..registry import FULL, QUICK, QUICK_CPU, Case, Provider, Registry, Work
from .bottleneck_adapter import copy
from .common import normal, register_op

OP = "multi_bottleneck_adapter"
ACTIVATION = "gelu"


def work(tokens: int, d: int, rank: float, used: int, r_max: int, direction: str) -> Work:
    adapters = used * (2 * d * r_max + r_max + d)
    if direction == "fwd":
        return Work(int(4 * tokens * d * rank), 2 * tokens * d + adapters)
    return Work(int(8 * tokens * d * rank), 3 * tokens * d + 2 * adapters)


def _inputs(tokens, d, num, r_max, ranks, ids_kind):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        if ids_kind == "distinct":
            ids = torch.randperm(num, generator=gen, device=device)[:tokens]
        else:
            ids = torch.randint(0, num, (tokens,), generator=gen, device=device)
        return {
            "x": normal(gen, (tokens, d), 1.0, dtype, device),
            "down_weight": normal(gen, (num, r_max, d), d**-0.5, dtype, device),
            "down_bias": normal(gen, (num, r_max), d**-0.5, dtype, device),
            "up_weight": normal(gen, (num, d, r_max), r_max**-0.5, dtype, device),  # random, not the zero init
            "up_bias": normal(gen, (num, d), r_max**-0.5, dtype, device),
            "adapter_ids": ids,
            "ranks": None if ranks is None else torch.tensor(ranks, device=device).repeat(num // len(ranks) + 1)[:num],
        }

    return make


def case(name, tokens, d, num, r_max, suites, ranks=None, ids_kind="uniform", base="adapter-single") -> Case:
    mean_rank = r_max if ranks is None else sum(ranks) / len(ranks)
    used = min(num, tokens)
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(tokens, d, num, r_max, ranks, ids_kind),
        grad_inputs=("x", "down_weight", "down_bias", "up_weight", "up_bias"),
        work=lambda direction: work(tokens, d, mean_rank, used, r_max, direction),
        base=base,
        params={"tokens": tokens, "d": d, "adapters": num, "r_max": r_max, "ranks": ranks, "ids": ids_kind},
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    y, _h = multi_bottleneck_adapter(
        t["x"],
        t["down_weight"],
        t["down_bias"],
        t["up_weight"],
        t["up_bias"],
        t["adapter_ids"],
        t["ranks"],
        ACTIVATION,
        1.0,
    )
    return y


def public(t: dict) -> torch.Tensor:
    return peftops.bottleneck_adapter(
        t["x"],
        t["down_weight"],
        t["down_bias"],
        t["up_weight"],
        t["up_bias"],
        activation=ACTIVATION,
        adapter_ids=t["adapter_ids"],
        ranks=t["ranks"],
    )


def adapter_single(t: dict) -> torch.Tensor:
    """The same tokens through one adapter (slot 0), the op without a bank: the single-tenant cost."""
    return peftops.bottleneck_adapter(
        t["x"], t["down_weight"][0], t["down_bias"][0], t["up_weight"][0], t["up_bias"][0], activation=ACTIVATION
    )


def loop(t: dict) -> torch.Tensor:
    """What a user writes without banks: one ``nn.Linear``-act-``nn.Linear`` per adapter present,
    on its tokens picked by boolean indexing (peft's mixed-batch pattern)."""
    x, ids = t["x"], t["adapter_ids"]
    y = x.clone()
    for a in torch.unique(ids).tolist():
        rows = ids == a
        r = t["down_weight"].shape[1] if t["ranks"] is None else int(t["ranks"][a])
        h = peftops.reference.activation(F.linear(x[rows], t["down_weight"][a, :r], t["down_bias"][a, :r]), ACTIVATION)
        y[rows] = x[rows] + F.linear(h, t["up_weight"][a, :, :r], t["up_bias"][a])
    return y


def _copy_work(c: Case, direction: str) -> Work:
    return Work(0, 2 * c.params["tokens"] * c.params["d"])


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("adapter-single", adapter_single, checked=False),
            Provider("loop", loop),
            Provider("copy", copy, checked=False, work=_copy_work),
        ],
    )
    registry.add_case(case("T4096-d4096-r16-N32", 4096, 4096, 32, 16, frozenset({FULL, QUICK})))
    registry.add_case(case("T4096-d4096-r8.16.64-N32", 4096, 4096, 32, 64, frozenset({FULL}), ranks=[8, 16, 64]))
    registry.add_case(
        case("T64-d4096-r16-N64-decode", 64, 4096, 64, 16, frozenset({FULL}), ids_kind="distinct", base="copy")
    )
    registry.add_case(case("small-T96-d256-r8-N4", 96, 256, 4, 8, frozenset({QUICK_CPU}), ranks=[8, 4, 2, 8]))
