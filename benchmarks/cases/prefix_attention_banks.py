r"""Prefix banks (``peftops.prefix_attention(..., prefix_ids=, prefix_lengths=)``): each batch row
attends with its own user's prefix, read in place from a ``(N, Hkv, P_max, D)`` bank.

Case (issue 15): 16 rows over 16 prefixes of lengths 8 to 64 (evenly spread, one row per
prefix), Llama-3-8B's attention (32 query heads, 8 key/value heads, D=128), 512 tokens per row.
Its base, ``shared-mean``, is the same op with one prefix shared by the batch at the mean
length (36): a bank should cost what its rows' own lengths cost, within 1.1x of that.
``sdpa-gather`` is what users write without banks: gather each row's slot, pad to P_max with
masked keys, SDPA with the bottom-right causal mask.

Work, with V_b = L P_b + L (L + 1) / 2 visible pairs for row b (its own length P_b)::

    fwd  flops 4 H D sum_b V_b     elems q + k + v + the rows' prefixes (read) + out
    bwd  flops 10 H D sum_b V_b    elems 2 (q + k + v + prefixes) + dout
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import peftops
from peftops.reference.prefix_attention import prefix_attention_banks

from ..registry import FULL, QUICK, QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, register_op
from .prefix_attention import _query_heads

OP = "prefix_attention_banks"


def lengths_of(num: int, shortest: int, longest: int) -> list[int]:
    return [shortest + (longest - shortest) * i // max(num - 1, 1) for i in range(num)]


def work(batch, heads, kv_heads, seq_len, head_dim, lengths, direction) -> Work:
    pairs = sum(seq_len * p + seq_len * (seq_len + 1) // 2 for p in lengths)
    q_elems = batch * heads * seq_len * head_dim
    kv_elems = 2 * batch * kv_heads * seq_len * head_dim + 2 * kv_heads * sum(lengths) * head_dim
    if direction == "fwd":
        return Work(4 * heads * head_dim * pairs, 2 * q_elems + kv_elems)
    return Work(10 * heads * head_dim * pairs, 3 * q_elems + 2 * kv_elems)


def _inputs(batch, heads, kv_heads, seq_len, head_dim, lengths):
    num, p_max = len(lengths), max(lengths)
    mean = round(sum(lengths) / num)

    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        return {
            "q": normal(gen, (batch, heads, seq_len, head_dim), 1.0, dtype, device),
            "k": normal(gen, (batch, kv_heads, seq_len, head_dim), 1.0, dtype, device),
            "v": normal(gen, (batch, kv_heads, seq_len, head_dim), 1.0, dtype, device),
            "prefix_k": normal(gen, (num, kv_heads, p_max, head_dim), 1.0, dtype, device),
            "prefix_v": normal(gen, (num, kv_heads, p_max, head_dim), 1.0, dtype, device),
            # Rows take the first B slots in a random order, so the rows' lengths are lengths[:B].
            "prefix_ids": torch.randperm(batch, generator=gen, device=device) % num,
            "prefix_lengths": torch.tensor(lengths, device=device),
            "mean_length": mean,
        }

    return make


def case(name, batch, heads, kv_heads, seq_len, head_dim, lengths, suites) -> Case:
    shape = (batch, heads, kv_heads, seq_len, head_dim)
    row_lengths = [lengths[b % len(lengths)] for b in range(batch)]
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(*shape, lengths),
        grad_inputs=("q", "k", "v", "prefix_k", "prefix_v"),
        work=lambda direction: work(*shape, row_lengths, direction),
        base="shared-mean",
        params={
            "batch": batch,
            "heads": heads,
            "kv_heads": kv_heads,
            "seq_len": seq_len,
            "head_dim": head_dim,
            "prefix_lengths": lengths,
            "causal": True,
        },
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    out, _lse = prefix_attention_banks(
        t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], t["prefix_ids"], t["prefix_lengths"], True
    )
    return out


def public(t: dict) -> torch.Tensor:
    return peftops.prefix_attention(
        t["q"],
        t["k"],
        t["v"],
        t["prefix_k"],
        t["prefix_v"],
        causal=True,
        prefix_ids=t["prefix_ids"],
        prefix_lengths=t["prefix_lengths"],
    )


def shared_mean(t: dict) -> torch.Tensor:
    """One prefix shared by the batch at the bank's mean length (slot 0's first keys)."""
    p = t["mean_length"]
    return peftops.prefix_attention(
        t["q"], t["k"], t["v"], t["prefix_k"][0, :, :p], t["prefix_v"][0, :, :p], causal=True
    )


def sdpa_gather(t: dict) -> torch.Tensor:
    q, k, v, ids = t["q"], t["k"], t["v"], t["prefix_ids"]
    heads, seq_len, p_max = q.shape[1], q.shape[2], t["prefix_k"].shape[2]
    keys = _query_heads(torch.cat([t["prefix_k"][ids], k], dim=2), heads)
    values = _query_heads(torch.cat([t["prefix_v"][ids], v], dim=2), heads)
    visible = torch.arange(p_max, device=q.device)[None, :] < t["prefix_lengths"][ids][:, None]  # (B, P_max)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat(
        [visible[:, None, :].expand(-1, seq_len, -1), causal.expand(q.shape[0], -1, -1)], dim=2
    )  # (B, L, P_max + L)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])


def _shared_mean_work(c: Case, direction: str) -> Work:
    p = c.params
    mean = round(sum(p["prefix_lengths"]) / len(p["prefix_lengths"]))
    return work(p["batch"], p["heads"], p["kv_heads"], p["seq_len"], p["head_dim"], [mean] * p["batch"], direction)


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("shared-mean", shared_mean, checked=False, work=_shared_mean_work),
            Provider("sdpa-gather", sdpa_gather),
        ],
        backends_of="prefix_attention",
    )
    registry.add_case(
        case("B16-H32-KV8-L512-D128-N16-P8..64", 16, 32, 8, 512, 128, lengths_of(16, 8, 64), frozenset({FULL, QUICK}))
    )
    registry.add_case(case("small-B3-H4-KV2-L32-D16-N4", 3, 4, 2, 32, 16, [3, 8, 1, 5], frozenset({QUICK_CPU})))
