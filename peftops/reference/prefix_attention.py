r"""Prefix-augmented attention, the spec (prefix tuning, Li & Liang 2021).

Shapes: ``q: (B, Hq, L, D)``, ``k, v: (B, Hkv, S, D)``, prefixes ``(Hkv, P, D)`` shared by the
batch or ``(B, Hkv, P, D)`` per row, ``key_padding_mask: (B, S)`` bool (True = attend).
Query head ``h`` reads key/value head ``h // (Hq / Hkv)`` (grouped-query attention).

The keys of row b are ``K = [prefix_k ; k]`` (P + S of them)::

    visible(i, j) = True                          for a prefix key j < P
                  = mask[b, j'] and (not causal or j' <= i + (S - L)),  j' = j - P

    S_ij = scale * q_i . K_j   where visible, -inf elsewhere
    lse_i = log sum_j exp(S_ij)                 (-inf for a row that sees no key)
    P_ij  = exp(S_ij - lse_i)                   (all zeros for such a row)
    o_i   = sum_j P_ij V_j

The causal mask is aligned bottom-right: the last query sees every key, so a decode step
(L = 1) attends to everything. ``sdpa(is_causal=True)`` aligns top-left instead, which is
wrong once a prefix (or a cache) makes S + P != L.

Backward, for ``dO``, with ``Delta_i = sum_d dO_id o_id``::

    dV_j  = sum_i P_ij dO_i
    dS_ij = P_ij (dO_i . V_j - Delta_i)
    dq_i  = scale * sum_j dS_ij K_j
    dK_j  = scale * sum_i dS_ij q_i

Key/value gradients are summed over the query heads of each group, and for a shared prefix
over the batch as well.

Prefix banks (:func:`prefix_attention_banks`): ``prefix_k, prefix_v: (N, Hkv, P_max, D)`` hold N
prefixes in slots, ``prefix_ids: (B,)`` names row b's slot (-1: no prefix) and
``prefix_lengths: (N,)`` how many of a slot's keys are real. Row b is the single-row attention
above with the prefix ``bank[ids[b], :, :lengths[ids[b]]]`` (nothing for -1): the rest of the
slot is never read. Each slot's gradient is the sum over the rows that name it; absent slots
and positions past a slot's length get zeros. Unchecked values (under capture) have one
meaning: an id outside ``[0, N)`` means no prefix, a length is clamped to ``[0, P_max]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .common import acc_dtype


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def _full_kv(k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None, acc) -> tuple[Tensor, Tensor]:
    k, v = k.to(acc), v.to(acc)
    if prefix_k is None or prefix_v is None:  # both or neither (the op checks)
        return k, v
    batch = k.shape[0]
    pk, pv = prefix_k.to(acc), prefix_v.to(acc)
    if pk.dim() == 3:
        pk = pk.unsqueeze(0).expand(batch, -1, -1, -1)
        pv = pv.unsqueeze(0).expand(batch, -1, -1, -1)
    return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def visible_mask(
    batch: int,
    q_len: int,
    seq_len: int,
    prefix_len: int,
    causal: bool,
    key_padding_mask: Tensor | None,
    device: torch.device,
) -> Tensor:
    """``(B, 1, L, P + S)`` bool: which keys each query sees (see the module docstring)."""
    vis = torch.ones(batch, 1, q_len, prefix_len + seq_len, dtype=torch.bool, device=device)
    seq = vis[..., prefix_len:]
    if causal:
        i = torch.arange(q_len, device=device).unsqueeze(1)
        j = torch.arange(seq_len, device=device).unsqueeze(0)
        seq &= j <= i + (seq_len - q_len)
    if key_padding_mask is not None:
        seq &= key_padding_mask[:, None, None, :].to(torch.bool)
    return vis


def _probabilities(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale):
    """Recompute everything the forward and the backward share, in the accumulation dtype."""
    acc = acc_dtype(q.dtype)
    batch, hq, q_len, _ = q.shape
    hkv, seq_len = k.shape[1], k.shape[2]
    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    kf, vf = _full_kv(k, v, prefix_k, prefix_v, acc)
    group = hq // hkv
    kf = kf.repeat_interleave(group, dim=1)
    vf = vf.repeat_interleave(group, dim=1)
    qf = q.to(acc)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    vis = visible_mask(batch, q_len, seq_len, prefix_len, causal, key_padding_mask, q.device)
    scores = scores.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    # A row that sees no key has lse = -inf; its probabilities are defined as zeros.
    dead = torch.isneginf(lse)
    probs = torch.exp(scores - lse.masked_fill(dead, 0.0).unsqueeze(-1)).masked_fill(dead.unsqueeze(-1), 0.0)
    return qf, kf, vf, probs, lse


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None = None,
    prefix_v: Tensor | None = None,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out, lse)``: ``out`` in the input dtype, ``lse: (B, Hq, L)`` in float32
    (float64 for float64 inputs). Differentiable with plain autograd (through ``out``)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    _, _, vf, probs, lse = _probabilities(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    return (probs @ vf).to(q.dtype), lse


def _fresh(t: Tensor, dtype: torch.dtype) -> Tensor:
    # The sequence and prefix gradients are slices of one buffer: give each its own dense
    # memory, since an op's outputs may not alias each other.
    return t.to(dtype, copy=True, memory_format=torch.contiguous_format)


def _sum_groups(t: Tensor, hkv: int) -> Tensor:
    b, hq, n, d = t.shape
    return t.reshape(b, hkv, hq // hkv, n, d).sum(2)


def prefix_attention_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor | None,
    prefix_v: Tensor | None,
    causal: bool,
    key_padding_mask: Tensor | None,
    scale: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dq, dk, dv, d_prefix_k, d_prefix_v)``, entry i ``None`` unless ``output_mask[i]``.

    Recomputes the probabilities from q, k, v in float32; a shared prefix's gradient is the
    sum over the batch.
    """
    need_q, need_k, need_v, need_pk, need_pv = output_mask
    hkv = k.shape[1]
    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    qf, kf, vf, probs, _ = _probabilities(q, k, v, prefix_k, prefix_v, causal, key_padding_mask, scale)
    do = grad_out.to(qf.dtype)
    out = probs @ vf
    delta = (do * out).sum(-1, keepdim=True)
    ds = probs * (do @ vf.transpose(-1, -2) - delta)

    dq = (scale * (ds @ kf)).to(q.dtype) if need_q else None
    dk_full = _sum_groups(scale * (ds.transpose(-1, -2) @ qf), hkv) if (need_k or need_pk) else None
    dv_full = _sum_groups(probs.transpose(-1, -2) @ do, hkv) if (need_v or need_pv) else None

    def split(full: Tensor | None, need_seq: bool, need_prefix: bool, seq_t: Tensor, prefix_t: Tensor | None):
        if full is None:  # neither part was asked for
            return None, None
        d_seq = _fresh(full[:, :, prefix_len:], seq_t.dtype) if need_seq else None
        d_prefix = None
        if need_prefix and prefix_t is not None:
            d_prefix = full[:, :, :prefix_len]
            if prefix_t.dim() == 3:
                d_prefix = d_prefix.sum(0)
            d_prefix = _fresh(d_prefix, prefix_t.dtype)
        return d_seq, d_prefix

    dk, dpk = split(dk_full, need_k, need_pk, k, prefix_k)
    dv, dpv = split(dv_full, need_v, need_pv, v, prefix_v)
    return dq, dk, dv, dpk, dpv


def _bank_rows(prefix_ids: Tensor, prefix_lengths: Tensor | None, num: int, p_max: int) -> list[tuple[int, int]]:
    """``(slot, length)`` per row, ``(-1, 0)`` for no prefix (unchecked values as the docstring says)."""
    rows = []
    for a in prefix_ids.tolist():
        if not 0 <= a < num:
            rows.append((-1, 0))
            continue
        length = p_max if prefix_lengths is None else int(prefix_lengths[a])
        rows.append((a, min(max(length, 0), p_max)))
    return rows


def _row_prefix(bank: Tensor, slot: int, length: int) -> Tensor | None:
    return None if slot < 0 else bank[slot : slot + 1, :, :length]


def prefix_attention_banks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_ids: Tensor,
    prefix_lengths: Tensor | None = None,
    causal: bool = True,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` over prefix banks: each row attends with its own slot's first
    ``prefix_lengths[slot]`` keys (see the module docstring)."""
    num, p_max = prefix_k.shape[0], prefix_k.shape[2]
    outs, lses = [], []
    for b, (slot, length) in enumerate(_bank_rows(prefix_ids, prefix_lengths, num, p_max)):
        pk, pv = _row_prefix(prefix_k, slot, length), _row_prefix(prefix_v, slot, length)
        mask = None if key_padding_mask is None else key_padding_mask[b : b + 1]
        o, lse = prefix_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], pk, pv, causal, mask, scale)
        outs.append(o)
        lses.append(lse)
    if not outs:  # B = 0
        return prefix_attention(q, k, v, None, None, causal, key_padding_mask, scale)
    return torch.cat(outs), torch.cat(lses)


def prefix_attention_banks_backward(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    prefix_ids: Tensor,
    prefix_lengths: Tensor | None,
    causal: bool,
    key_padding_mask: Tensor | None,
    scale: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """``(dq, dk, dv, d_prefix_k, d_prefix_v)`` over banks: the per-row gradients, each row's
    prefix gradient added (in float32, in row order) into its slot's first ``length`` keys."""
    need_q, need_k, need_v, need_pk, need_pv = output_mask
    num, p_max = prefix_k.shape[0], prefix_k.shape[2]
    acc = acc_dtype(q.dtype)
    dbank_k = torch.zeros(prefix_k.shape, dtype=acc, device=q.device) if need_pk else None
    dbank_v = torch.zeros(prefix_v.shape, dtype=acc, device=q.device) if need_pv else None
    dqs, dks, dvs = [], [], []
    for b, (slot, length) in enumerate(_bank_rows(prefix_ids, prefix_lengths, num, p_max)):
        pk, pv = _row_prefix(prefix_k, slot, length), _row_prefix(prefix_v, slot, length)
        mask = None if key_padding_mask is None else key_padding_mask[b : b + 1]
        row = slice(b, b + 1)
        dq, dk, dv, dpk, dpv = prefix_attention_backward(
            grad_out[row], q[row], k[row], v[row], pk, pv, causal, mask, scale, output_mask
        )
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
        if dpk is not None and dbank_k is not None:
            dbank_k[slot, :, :length] += dpk[0].to(acc)
        if dpv is not None and dbank_v is not None:
            dbank_v[slot, :, :length] += dpv[0].to(acc)

    def cat(parts: list, need: bool, like: Tensor) -> Tensor | None:
        if not need:
            return None
        return torch.cat(parts) if parts else torch.zeros_like(like)

    return (
        cat(dqs, need_q, q),
        cat(dks, need_k, k),
        cat(dvs, need_v, v),
        None if dbank_k is None else dbank_k.to(prefix_k.dtype),
        None if dbank_v is None else dbank_v.to(prefix_v.dtype),
    )
