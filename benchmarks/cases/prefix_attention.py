r"""Prefix attention (``peftops.prefix_attention``): causal attention over ``[prefix ; sequence]``.

Cases: B=4, H=32, L=2048, D=128 with prefixes of 64 and 256 tokens (the issue's shapes: one
key/value head per query head, as the SDPA baselines it quotes); the same at P=64 with
Llama-3-8B's grouped-query layout (8 key/value heads; the SDPA baselines then repeat each
key/value head, as users do); and B=16, H=16, L=512, D=64, P=32. The prefix is shared by the batch, ``(Hkv, P, D)``, as prefix tuning trains
it; the causal mask is aligned bottom-right (every query sees the whole prefix).

Work, with V = L P + L (L + 1) / 2 visible (query, key) pairs per head::

    fwd  flops 4 B H D V              (Q K^T and P V over the visible pairs)
         elems q + k + v + prefixes (read) + out (written)
    bwd  flops 10 B H D V             (FlashAttention's count: recompute Q K^T, then dV, dP, dQ, dK)
         elems q + k + v + prefixes + dout (read) + dq + dk + dv + dprefixes (written)

The saved output and log-sum-exp are not counted (an implementation may recompute them).
The base provider ``sdpa-noprefix`` is plain causal SDPA on the same sequence without the
prefix (the same formulas with P = 0): the ratio column is the price of the prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import peftops

from ..registry import QUICK_CPU, Case, Provider, Registry, Work
from .common import normal, real_shape_suites, register_op

OP = "prefix_attention"
CASES = {  # name -> (batch, heads, kv_heads, seq_len, head_dim, prefix_len)
    "B4-H32-L2048-D128-P64": (4, 32, 32, 2048, 128, 64),
    "B4-H32-L2048-D128-P256": (4, 32, 32, 2048, 128, 256),
    "B4-H32-KV8-L2048-D128-P64": (4, 32, 8, 2048, 128, 64),
    "B16-H16-L512-D64-P32": (16, 16, 16, 512, 64, 32),
}
QUICK_CASE = "B16-H16-L512-D64-P32"


def work(batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, prefix_len: int, direction: str) -> Work:
    pairs = seq_len * prefix_len + seq_len * (seq_len + 1) // 2
    q_elems = batch * heads * seq_len * head_dim
    kv_elems = 2 * batch * kv_heads * seq_len * head_dim + 2 * kv_heads * prefix_len * head_dim
    if direction == "fwd":
        return Work(4 * batch * heads * head_dim * pairs, q_elems + kv_elems + q_elems)
    return Work(10 * batch * heads * head_dim * pairs, 2 * (q_elems + kv_elems) + q_elems)


def _inputs(batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, prefix_len: int):
    def make(dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> dict:
        # Unit-variance q and k give unit-variance scores after the 1/sqrt(D) scale: softmax
        # rows that are neither one-hot nor uniform.
        return {
            "q": normal(gen, (batch, heads, seq_len, head_dim), 1.0, dtype, device),
            "k": normal(gen, (batch, kv_heads, seq_len, head_dim), 1.0, dtype, device),
            "v": normal(gen, (batch, kv_heads, seq_len, head_dim), 1.0, dtype, device),
            "prefix_k": normal(gen, (kv_heads, prefix_len, head_dim), 1.0, dtype, device),
            "prefix_v": normal(gen, (kv_heads, prefix_len, head_dim), 1.0, dtype, device),
        }

    return make


def case(
    name: str, batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, prefix_len: int, suites: frozenset
) -> Case:
    shape = (batch, heads, kv_heads, seq_len, head_dim)
    return Case(
        op=OP,
        name=name,
        make_inputs=_inputs(*shape, prefix_len),
        grad_inputs=("q", "k", "v", "prefix_k", "prefix_v"),
        work=lambda direction: work(*shape, prefix_len, direction),
        base="sdpa-noprefix",
        params={
            "batch": batch,
            "heads": heads,
            "kv_heads": kv_heads,
            "seq_len": seq_len,
            "head_dim": head_dim,
            "prefix_len": prefix_len,
            "causal": True,
        },
        suites=suites,
    )


def reference(t: dict) -> torch.Tensor:
    out, _lse = peftops.reference.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], True)
    return out


def public(t: dict) -> torch.Tensor:
    return peftops.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], causal=True)


def _query_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention the way SDPA users write it: repeat each key/value head."""
    group = heads // kv.shape[1]
    return kv if group == 1 else kv.repeat_interleave(group, dim=1)


def sdpa_cat(t: dict) -> torch.Tensor:
    """What users write today: the batch-expanded prefix concatenated in front of the keys, SDPA
    with a bottom-right causal mask (``is_causal=True`` aligns top-left: wrong once P > 0)."""
    q, k, v = t["q"], t["k"], t["v"]
    batch, heads, seq_len = q.shape[0], q.shape[1], q.shape[2]
    prefix = [p.unsqueeze(0).expand(batch, -1, -1, -1) for p in (t["prefix_k"], t["prefix_v"])]
    keys = _query_heads(torch.cat([prefix[0], k], dim=2), heads)
    values = _query_heads(torch.cat([prefix[1], v], dim=2), heads)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(seq_len, keys.shape[2]))


def sdpa_noprefix(t: dict) -> torch.Tensor:
    """Plain causal SDPA on the sequence alone (grouped the same way as ``sdpa-cat``)."""
    q = t["q"]
    heads = q.shape[1]
    return F.scaled_dot_product_attention(q, _query_heads(t["k"], heads), _query_heads(t["v"], heads), is_causal=True)


def _noprefix_work(c: Case, direction: str) -> Work:
    p = c.params
    return work(p["batch"], p["heads"], p["kv_heads"], p["seq_len"], p["head_dim"], 0, direction)


def register(registry: Registry) -> None:
    register_op(
        registry,
        OP,
        public,
        reference,
        [
            Provider("sdpa-cat", sdpa_cat),
            Provider("sdpa-noprefix", sdpa_noprefix, checked=False, work=_noprefix_work),
        ],
    )
    for name, shape in CASES.items():
        registry.add_case(case(name, *shape, suites=real_shape_suites(name, QUICK_CASE)))
    registry.add_case(case("small-B1-H4-L128-D64-P16", 1, 4, 4, 128, 64, 16, frozenset({QUICK_CPU})))
