r"""Triton kernels for ``peftops.prefix_attention``, registered as its ``triton`` backend.

FlashAttention-2 style, for ``q: (B, Hq, L, D)``, ``k, v: (B, Hkv, S, D)`` and a prefix
``pk, pv`` of P keys, shared ``(Hkv, P, D)`` or per row ``(B, Hkv, P, D)``. Query head h reads
key head ``h // G`` (G = Hq / Hkv). Key j of the sequence is visible to query i iff
``mask[b, j]`` and, when causal, ``j <= i + c`` with ``c = S - L`` (bottom-right alignment);
prefix keys are always visible.

Forward (``_fwd_kernel``, one program per (query block, b, h)), in base-2 logits
``t_ij = log2(e) * scale * q_i . k_j``::

    m_i  = max_j t_ij                  running, over key blocks streamed through SRAM
    l_i  = sum_j 2^(t_ij - m_i)        rescaled by 2^(m_old - m_new) when m grows
    o_i  = sum_j 2^(t_ij - m_i) v_j / l_i
    lse_i = ln 2 * (m_i + log2 l_i)    saved for the backward (natural log, float32)

The prefix is read from its own tensors (no concatenation, no batch expansion) and never
masked except for the key bound of its last block; of the sequence blocks only those that
straddle the causal diagonal or the end of the keys are masked, and key blocks wholly above
the diagonal are never visited. A query that sees no key gets ``o = 0``, ``lse = -inf``.

Backward, with ``P_ij = exp(s_ij - lse_i)`` recomputed from q, k and lse, and
``Delta_i = sum_d dO_id O_id`` (``_prep_kernel``)::

    dV_j = sum_i P_ij dO_i
    dS_ij = P_ij (dO_i . v_j - Delta_i)          since dL/ds_ij = P_ij (dP_ij - sum_k P_ik dP_ik)
                                                 and sum_k P_ik dP_ik = dO_i . o_i
    dK_j = scale * sum_i dS_ij q_i
    dq_i = scale * sum_j dS_ij k_j

``_dkdv_kernel`` owns one key block and loops over the query blocks (and over the G query
heads of its group), so dK and dV are summed in registers; ``_dq_kernel`` owns one query
block and loops over the key blocks. No program writes what another writes: no atomics, the
result is bitwise reproducible. A shared prefix's gradient is written per batch row into a
float32 buffer that PyTorch then sums in a fixed order.

Prefix banks (``prefix_ids``): the prefix is ``(N, Hkv, P_max, D)`` and row b reads slot
``ids[b]`` in place (no per-row gather), its loops bounded by the slot's length, so a short
prefix costs its own length in the forward and in dq. The banks' gradient comes from
``_dkdv_bank_kernel``: one program per (key block, slot, key head) loops over the rows naming
its slot, so the per-slot sum needs no atomics and is reproducible, and a slot no row names
writes zeros without reading anything. Its parallelism is per slot: when many rows share one
slot, that slot's programs do their rows one after the other (the shared ``(Hkv, P, D)``
prefix, per-row partials then a sum, is the faster form of that case).

Offsets of the batch and head are int64; inside one (b, h) slice they are int32, which
``supports`` checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..backends import OpImpl, register_impl
from . import block_config
from .common import dot_precision, dtype_reason, empty, interpreting, on_device

OP = "prefix_attention"
#: log2(e) and ln(2), constexpr so that kernel bodies can read them (Triton refuses other
#: globals); host code reads ``.value``.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256

# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


@triton.jit
def _seq_range(m0, S, c, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query rows ``[m0, m0 + BLOCK_M)``: ``(full, hi)`` such that sequence key blocks
    in ``[0, full)`` are visible to every row (no mask) and ``[full, hi)`` need the mask
    (the causal diagonal, the end of the keys); keys from ``hi`` on are visible to none."""
    if CAUSAL:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + c, 0), S)
        full = (tl.maximum(m0 + c + 1, 0) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full = (S // BLOCK_N) * BLOCK_N
    full = tl.minimum(full, (hi // BLOCK_N) * BLOCK_N)
    return full, hi


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A ``(rows, BLOCK_D)`` tile, zero outside ``rows < n_rows`` and ``d < HEAD_DIM``."""
    if MASK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return tile


@triton.jit
def _visible(rows, cols, n_keys, c, KPM, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """``(rows, cols)`` bool: the key bound and the causal diagonal when MASKED, the key padding
    mask when HAS_KPM (it can hide any column, so it applies to every block)."""
    if MASKED:
        vis = (cols < n_keys)[None, :]
        if CAUSAL:
            vis = vis & (cols[None, :] <= rows[:, None] + c)
        if HAS_KPM:
            vis = vis & (tl.load(KPM + cols, mask=cols < n_keys, other=0) != 0)[None, :]
    else:
        vis = (tl.load(KPM + cols, mask=cols < n_keys, other=0) != 0)[None, :]  # HAS_KPM, by the callers
    return vis


@triton.jit
def _prefix_row(b, PIDS, PLEN, N_SLOTS, P, BANK: tl.constexpr):
    """Row b's prefix as ``(slot, length)``: with BANK, slot ``ids[b]`` and its length clamped
    to ``[0, P]`` (an id outside ``[0, N_SLOTS)`` is no prefix, length 0); else the row itself
    (a shared prefix has batch stride 0) and all P keys. The length bounds the row's prefix
    loop, so a short prefix costs its own length."""
    if BANK:
        sid = tl.load(PIDS + b)
        ok = (sid >= 0) & (sid < N_SLOTS)
        slot = tl.where(ok, sid, 0)
        plen = tl.load(PLEN + slot, mask=ok, other=0)
        plen = tl.minimum(tl.maximum(plen, 0), P).to(tl.int32)
    else:
        slot = b
        plen = P
    return slot, plen


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_keys(
    acc,
    l_i,
    m_i,
    q,
    rows,
    offs_d,
    K,
    V,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    KPM,
    start,
    end,
    n_keys,
    c,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online softmax over the key blocks ``[start, end)`` of one key tensor."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(
            K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED
        )
        # Raw scores: the scale goes into the max (per row) and into one FMA per element below
        # (qk_scale > 0, so -inf stays -inf and the max commutes with it).
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASKED or HAS_KPM:
            s = tl.where(_visible(rows, cols, n_keys, c, KPM, MASKED, CAUSAL, HAS_KPM), s, float("-inf"))
        # tl.maximum and tl.max ignore NaN (maxnum), so a NaN score leaves m finite; its own
        # p = 2^(NaN - m) is NaN and carries into l and acc (a NaN stays NaN under any later
        # alpha), so the row comes out NaN as in the reference. The other maxima and minima
        # here are integer block bounds.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if MASKED or HAS_KPM:
            # A row with nothing visible yet keeps m = -inf: subtract 0 there, not -inf (NaN).
            # Unmasked blocks give every row a finite score, so they skip this.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        p = tl.exp2(s * qk_scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(
            V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    KPM,
    PIDS,
    PLEN,
    O,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_pkb,
    stride_pkh,
    stride_pkn,
    stride_pkd,
    stride_pvb,
    stride_pvh,
    stride_pvn,
    stride_pvd,
    stride_mb,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    HQ,
    GROUP,
    L,
    S,
    P,
    N_SLOTS,
    qk_scale,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BANK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # The last query blocks see the most keys under the causal mask: start them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        rows,
        L,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    c = S - L
    kpm = KPM + b * stride_mb

    # Prefix keys: visible to every query, masked only past the row's length in the last block.
    slot, plen = _prefix_row(b, PIDS, PLEN, N_SLOTS, P, BANK)
    pk = PK + slot * stride_pkb + hk * stride_pkh
    pv = PV + slot * stride_pvb + hk * stride_pvh
    p_full = (plen // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        rows,
        offs_d,
        pk,
        pv,
        stride_pkn,
        stride_pkd,
        stride_pvn,
        stride_pvd,
        kpm,
        0,
        p_full,
        plen,
        c,
        qk_scale,
        False,
        False,
        False,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        rows,
        offs_d,
        pk,
        pv,
        stride_pkn,
        stride_pkd,
        stride_pvn,
        stride_pvd,
        kpm,
        p_full,
        plen,
        plen,
        c,
        qk_scale,
        True,
        False,
        False,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )

    # Sequence keys: unmasked blocks below the diagonal, then the masked ones.
    k = K + b * stride_kb + hk * stride_kh
    v = V + b * stride_vb + hk * stride_vh
    full, hi = _seq_range(m0, S, c, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        rows,
        offs_d,
        k,
        v,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        kpm,
        0,
        full,
        S,
        c,
        qk_scale,
        False,
        CAUSAL,
        HAS_KPM,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )
    acc, l_i, m_i = _fwd_keys(
        acc,
        l_i,
        m_i,
        q,
        rows,
        offs_d,
        k,
        v,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        kpm,
        full,
        hi,
        S,
        c,
        qk_scale,
        True,
        CAUSAL,
        HAS_KPM,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(rows < L)[:, None] & (offs_d < HEAD_DIM)[None, :])
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(LSE + (b * HQ + h) * L + rows, lse, mask=rows < L)


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _prep_kernel(
    O,
    DO,
    LSE,
    DELTA,
    LSE2,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    HQ,
    L,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """``Delta = rowsum(dO * O)`` and the base-2 lse, +inf for a row that saw no key so that
    every recomputed probability of that row is ``2^(t - inf) = 0``."""
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
        rows,
        L,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    do = _load_rows(
        DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        rows,
        L,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    at = bh.to(tl.int64) * L + rows
    lse = tl.load(LSE + at, mask=rows < L, other=0.0)
    tl.store(DELTA + at, delta, mask=rows < L)
    tl.store(LSE2 + at, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=rows < L)


@triton.jit
def _dkdv_queries(
    dk,
    dv,
    k,
    v,
    cols,
    offs_d,
    Q,
    DO,
    LSE2,
    DELTA,
    stride_qm,
    stride_qd,
    stride_gm,
    stride_gd,
    start,
    end,
    L,
    c,
    qk_scale,
    MASKED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate one key block's dK (unscaled) and dV over the query blocks ``[start, end)``.
    Rows past L load q = dO = 0 and lse = +inf, so they add nothing; MASKED applies the causal
    diagonal. Column masks (key bound, padding) are the caller's, applied once at the end."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(
            Q + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, rows, L, offs_d, HEAD_DIM, BLOCK_D, True
        )
        lse2 = tl.load(LSE2 + rows, mask=rows < L, other=float("inf"))
        t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, queries)
        p = tl.exp2(t - lse2[None, :])
        if MASKED:
            p = tl.where(cols[:, None] <= rows[None, :] + c, p, 0.0)
        do = _load_rows(
            DO + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd, rows, L, offs_d, HEAD_DIM, BLOCK_D, True
        )
        dv = tl.dot(p.to(do.dtype), do, dv, input_precision=PRECISION)
        delta = tl.load(DELTA + rows, mask=rows < L, other=0.0)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dk = tl.dot(ds.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE2,
    DELTA,
    KPM,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_mb,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    HQ,
    HKV,
    L,
    N_KEYS,
    c,
    qk_scale,
    scale,
    GROUP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of N_KEYS keys (the sequence's, or the prefix's with CAUSAL and HAS_KPM off)
    for one (b, key head): dK and dV summed over the group's query heads and every query."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hk = bh % HKV
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    hk64 = hk.to(tl.int64)
    k = _load_rows(
        K + b * stride_kb + hk64 * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        cols,
        N_KEYS,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    v = _load_rows(
        V + b * stride_vb + hk64 * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        cols,
        N_KEYS,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if CAUSAL:
        # Query i sees key j iff i >= j - c: rows before n0 - c see none of this block, rows
        # from n0 + BLOCK_N - 1 - c on see all of it.
        lo = (tl.maximum(n0 - c, 0) // BLOCK_M) * BLOCK_M
        full = tl.minimum(
            tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - c, 0), BLOCK_M) * BLOCK_M, tl.cdiv(L, BLOCK_M) * BLOCK_M
        )
        full = tl.maximum(full, lo)
    else:
        lo = 0
        full = 0
    # GROUP is a compile-time constant: a run-time trip count here cost registers (spills).
    for g in tl.static_range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q = Q + b * stride_qb + h * stride_qh
        do = DO + b * stride_gb + h * stride_gh
        at = (b * HQ + h) * L
        dk, dv = _dkdv_queries(
            dk,
            dv,
            k,
            v,
            cols,
            offs_d,
            q,
            do,
            LSE2 + at,
            DELTA + at,
            stride_qm,
            stride_qd,
            stride_gm,
            stride_gd,
            lo,
            full,
            L,
            c,
            qk_scale,
            True,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            PRECISION,
        )
        dk, dv = _dkdv_queries(
            dk,
            dv,
            k,
            v,
            cols,
            offs_d,
            q,
            do,
            LSE2 + at,
            DELTA + at,
            stride_qm,
            stride_qd,
            stride_gm,
            stride_gd,
            full,
            L,
            L,
            c,
            qk_scale,
            False,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_M,
            PRECISION,
        )
    if HAS_KPM:
        # A padded key is never visible: its gradient is zero, whatever its probabilities were.
        keep = tl.load(KPM + b * stride_mb + cols, mask=cols < N_KEYS, other=0)
        dk = tl.where((keep != 0)[:, None], dk, 0.0)
        dv = tl.where((keep != 0)[:, None], dv, 0.0)
    mask = (cols < N_KEYS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(
        DK + b * stride_dkb + hk64 * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + b * stride_dvb + hk64 * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _dkdv_bank_kernel(
    Q,
    PK,
    PV,
    DO,
    LSE2,
    DELTA,
    PIDS,
    PLEN,
    DK,
    DV,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_dvd,
    B,
    HQ,
    HKV,
    L,
    P_MAX,
    qk_scale,
    scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One block of one bank slot's prefix keys for one key head: dK and dV summed, in
    registers and in row order, over the batch rows that name the slot (their group's query
    heads, every query). The program owns its output block, so the per-slot sum needs no
    atomics and is reproducible; a slot no row names, and keys past its length, get zeros."""
    pid_n = tl.program_id(0)
    sh = tl.program_id(1)
    slot = (sh // HKV).to(tl.int64)
    hk = sh % HKV
    hk64 = hk.to(tl.int64)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    plen = tl.minimum(tl.maximum(tl.load(PLEN + slot), 0), P_MAX).to(tl.int32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    if n0 < plen:
        k = _load_rows(
            PK + slot * stride_kb + hk64 * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            cols,
            plen,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            True,
        )
        v = _load_rows(
            PV + slot * stride_vb + hk64 * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            cols,
            plen,
            offs_d,
            HEAD_DIM,
            BLOCK_D,
            True,
        )
        for b in range(0, B):
            if tl.load(PIDS + b) == slot:
                b64 = tl.full((), b, tl.int64)
                for g in tl.static_range(GROUP):
                    h = (hk * GROUP + g).to(tl.int64)
                    at = (b64 * HQ + h) * L
                    dk, dv = _dkdv_queries(
                        dk,
                        dv,
                        k,
                        v,
                        cols,
                        offs_d,
                        Q + b64 * stride_qb + h * stride_qh,
                        DO + b64 * stride_gb + h * stride_gh,
                        LSE2 + at,
                        DELTA + at,
                        stride_qm,
                        stride_qd,
                        stride_gm,
                        stride_gd,
                        0,
                        L,
                        L,
                        0,
                        qk_scale,
                        False,
                        HEAD_DIM,
                        BLOCK_D,
                        BLOCK_M,
                        PRECISION,
                    )
    # Keys past the slot's length were loaded as zeros but still got probabilities: they are
    # not keys of any row, so their gradient is zero.
    keep = (cols < plen)[:, None]
    dk = tl.where(keep, dk, 0.0)
    dv = tl.where(keep, dv, 0.0)
    mask = (cols < P_MAX)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(
        DK + slot * stride_dkb + hk64 * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        DV + slot * stride_dvb + hk64 * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _dq_keys(
    dq,
    q,
    do,
    lse2,
    delta,
    rows,
    offs_d,
    K,
    V,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    KPM,
    start,
    end,
    n_keys,
    c,
    qk_scale,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Accumulate one query block's dq (unscaled) over the key blocks ``[start, end)``."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(
            K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, cols, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED
        )
        v = _load_rows(
            V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, cols, n_keys, offs_d, HEAD_DIM, BLOCK_D, MASKED
        )
        t = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(t - lse2[:, None])
        if MASKED or HAS_KPM:
            # Past the key bound k = v = 0, but p = 2^(-lse) can overflow (lse very negative)
            # and inf * 0 is NaN: mask it like the causal diagonal, not by the zeros alone.
            p = tl.where(_visible(rows, cols, n_keys, c, KPM, MASKED, CAUSAL, HAS_KPM), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    PK,
    PV,
    KPM,
    PIDS,
    PLEN,
    DO,
    LSE2,
    DELTA,
    DQ,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_pkb,
    stride_pkh,
    stride_pkn,
    stride_pkd,
    stride_pvb,
    stride_pvh,
    stride_pvn,
    stride_pvd,
    stride_mb,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_gd,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_dqd,
    HQ,
    GROUP,
    L,
    S,
    P,
    N_SLOTS,
    qk_scale,
    scale,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BANK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = bh % HQ
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        rows,
        L,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    do = _load_rows(
        DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_d[None, :] * stride_gd,
        rows,
        L,
        offs_d,
        HEAD_DIM,
        BLOCK_D,
        True,
    )
    at = (b * HQ + h) * L + rows
    lse2 = tl.load(LSE2 + at, mask=rows < L, other=float("inf"))
    delta = tl.load(DELTA + at, mask=rows < L, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    c = S - L
    kpm = KPM + b * stride_mb

    slot, plen = _prefix_row(b, PIDS, PLEN, N_SLOTS, P, BANK)
    pk = PK + slot * stride_pkb + hk * stride_pkh
    pv = PV + slot * stride_pvb + hk * stride_pvh
    p_full = (plen // BLOCK_N) * BLOCK_N
    dq = _dq_keys(
        dq,
        q,
        do,
        lse2,
        delta,
        rows,
        offs_d,
        pk,
        pv,
        stride_pkn,
        stride_pkd,
        stride_pvn,
        stride_pvd,
        kpm,
        0,
        p_full,
        plen,
        c,
        qk_scale,
        False,
        False,
        False,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )
    dq = _dq_keys(
        dq,
        q,
        do,
        lse2,
        delta,
        rows,
        offs_d,
        pk,
        pv,
        stride_pkn,
        stride_pkd,
        stride_pvn,
        stride_pvd,
        kpm,
        p_full,
        plen,
        plen,
        c,
        qk_scale,
        True,
        False,
        False,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )

    k = K + b * stride_kb + hk * stride_kh
    v = V + b * stride_vb + hk * stride_vh
    full, hi = _seq_range(m0, S, c, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_keys(
        dq,
        q,
        do,
        lse2,
        delta,
        rows,
        offs_d,
        k,
        v,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        kpm,
        0,
        full,
        S,
        c,
        qk_scale,
        False,
        CAUSAL,
        HAS_KPM,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )
    dq = _dq_keys(
        dq,
        q,
        do,
        lse2,
        delta,
        rows,
        offs_d,
        k,
        v,
        stride_kn,
        stride_kd,
        stride_vn,
        stride_vd,
        kpm,
        full,
        hi,
        S,
        c,
        qk_scale,
        True,
        CAUSAL,
        HAS_KPM,
        HEAD_DIM,
        BLOCK_D,
        BLOCK_N,
        PRECISION,
    )
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=(rows < L)[:, None] & (offs_d < HEAD_DIM)[None, :],
    )


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _strides4(t: Tensor) -> tuple[int, ...]:
    """``(b, h, n, d)`` strides; a shared ``(H, N, D)`` prefix gets batch stride 0."""
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


def _prefix_args(k: Tensor, v: Tensor, prefix_k: Tensor | None, prefix_v: Tensor | None):
    """Pointers and strides for the prefix: with no prefix, k and v stand in (P = 0 visits none)."""
    if prefix_k is None or prefix_v is None or prefix_k.numel() == 0:  # (the op passes both or neither)
        return k, v, (0, 0, 0, 0), (0, 0, 0, 0), 0
    return prefix_k, prefix_v, _strides4(prefix_k), _strides4(prefix_v), prefix_k.shape[-2]


def _bank_args(k: Tensor, prefix_k: Tensor | None, prefix_ids: Tensor | None, prefix_lengths: Tensor | None):
    """``(PIDS, PLEN, N, BANK)``: the ids and lengths (int64; lengths default to P_max) when the
    prefix is a non-empty bank. An empty bank (N = 0 or P_max = 0) is no prefix for any row."""
    if prefix_ids is None or prefix_k is None or prefix_k.numel() == 0:
        return k, k, 0, False  # stand-in pointers, never read
    num = prefix_k.shape[0]
    if prefix_lengths is None:
        prefix_lengths = torch.full((num,), prefix_k.shape[2], dtype=torch.int64, device=k.device)
    return prefix_ids.to(torch.int64).contiguous(), prefix_lengths.to(torch.int64).contiguous(), num, True


def _mask_args(key_padding_mask: Tensor | None, k: Tensor):
    if key_padding_mask is None:
        return k, 0, False  # a stand-in pointer, never read
    # The kernels index a row of the mask as KPM + j: make the key stride 1 (B x S bytes).
    mask = key_padding_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0), True


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def launch_config(kernel: str, block_d: int, q: Tensor, cfg: dict | None) -> tuple[dict, dict]:
    """``(block sizes, launch options)`` for one attention kernel: ``cfg`` if given (a sweep's
    candidate), else the lookup of :mod:`.block_config` by head-dim class and dtype."""
    cfg = dict(cfg) if cfg else block_config.config(OP, kernel, q.device, dtype=q.dtype, block_d=block_d)
    return cfg, dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))


def forward(
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    key_padding_mask,
    causal,
    scale,
    prefix_ids=None,
    prefix_lengths=None,
    *,
    cfg: dict | None = None,
):
    """``(out, lse)``; ``cfg`` forces the forward kernel's block configuration. With
    ``prefix_ids`` the prefix is a bank read in place through the ids (no per-row gather)."""
    batch, hq, q_len, head_dim = q.shape
    hkv, seq_len = k.shape[1], k.shape[2]
    out = empty(q.shape, dtype=q.dtype, device=q.device)
    lse = empty((batch, hq, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    pk, pv, spk, spv, prefix_len = _prefix_args(k, v, prefix_k, prefix_v)
    kpm, stride_mb, has_kpm = _mask_args(key_padding_mask, k)
    pids, plen, n_slots, bank = _bank_args(k, prefix_k, prefix_ids, prefix_lengths)
    block_d = _block_d(head_dim)
    cfg, meta = launch_config("fwd", block_d, q, cfg)
    grid = (triton.cdiv(q_len, cfg["BLOCK_M"]), batch * hq)
    with on_device(q.device):
        _fwd_kernel[grid](
            q,
            k,
            v,
            pk,
            pv,
            kpm,
            pids,
            plen,
            out,
            lse,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *spk,
            *spv,
            stride_mb,
            *out.stride(),
            hq,
            hq // hkv,
            q_len,
            seq_len,
            prefix_len,
            n_slots,
            scale * LOG2E.value,
            CAUSAL=causal,
            HAS_KPM=has_kpm,
            BANK=bank,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            PRECISION=dot_precision(q.dtype),
            **cfg,
            **meta,
        )
    return out, lse


def _launch_dkdv(
    q,
    do,
    lse2,
    delta,
    keys,
    values,
    dk,
    dv,
    kpm,
    stride_mb,
    has_kpm,
    causal,
    n_keys,
    c,
    batch_strides,
    scale,
    block_d,
    cfg,
):
    batch, hq, q_len, head_dim = q.shape
    hkv = keys.shape[-3]
    cfg, meta = launch_config("dkdv", block_d, q, cfg)
    # A short prefix (P = 64 under BLOCK_N = 128) would leave half of every tile idle.
    cfg["BLOCK_N"] = max(16, min(cfg["BLOCK_N"], triton.next_power_of_2(n_keys)))
    grid = (triton.cdiv(n_keys, cfg["BLOCK_N"]), batch * hkv)
    sk, sv, sdk, sdv = batch_strides
    _dkdv_kernel[grid](
        q,
        keys,
        values,
        do,
        lse2,
        delta,
        kpm,
        dk,
        dv,
        *q.stride(),
        *sk,
        *sv,
        *do.stride(),
        stride_mb,
        *sdk,
        *sdv,
        hq,
        hkv,
        q_len,
        n_keys,
        c,
        scale * LOG2E.value,
        scale,
        GROUP=hq // hkv,
        CAUSAL=causal,
        HAS_KPM=has_kpm,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype),
        **cfg,
        **meta,
    )


def backward(
    grad_out,
    q,
    k,
    v,
    prefix_k,
    prefix_v,
    key_padding_mask,
    out,
    lse,
    causal,
    scale,
    output_mask: Sequence[bool],
    prefix_ids=None,
    prefix_lengths=None,
    *,
    cfg: Mapping[str, dict] | None = None,
):
    """``(dq, dk, dv, dprefix_k, dprefix_v)``, None where ``output_mask`` says so; ``cfg`` forces
    the configuration of the kernels it names (``{"dkdv": ..., "dq": ...}``). With
    ``prefix_ids`` the prefix gradients are the banks' (``_dkdv_bank_kernel``)."""
    cfg = cfg or {}
    banks = prefix_ids is not None and prefix_k is not None
    need_q, need_k, need_v, need_pk, need_pv = output_mask
    batch, hq, q_len, head_dim = q.shape
    hkv, seq_len = k.shape[1], k.shape[2]
    prefix_len = 0 if prefix_k is None else prefix_k.shape[-2]
    shared = prefix_k is not None and prefix_k.dim() == 3
    block_d = _block_d(head_dim)
    dq = empty(q.shape, dtype=q.dtype, device=q.device) if need_q else None
    dk = empty(k.shape, dtype=k.dtype, device=k.device) if need_k else None
    dv = empty(v.shape, dtype=v.dtype, device=v.device) if need_v else None
    dpk = dpv = None
    if q.numel() == 0 or (k.numel() == 0 and prefix_len == 0):
        return _zero_fill(q, k, v, prefix_k, prefix_v, dq, dk, dv, need_pk, need_pv)
    if (need_pk or need_pv) and not banks:
        # A shared prefix's gradient is summed over the batch: one float32 slice per row here,
        # summed below in a fixed order. A per-row prefix is written directly.
        shape = (batch, hkv, prefix_len, head_dim)
        dtype = torch.float32 if shared else prefix_k.dtype
        dpk_rows = empty(shape, dtype=dtype, device=q.device)
        dpv_rows = empty(shape, dtype=dtype, device=q.device)

    kpm, stride_mb, has_kpm = _mask_args(key_padding_mask, k)
    pids, plen, n_slots, bank = _bank_args(k, prefix_k, prefix_ids, prefix_lengths)
    delta = empty((batch, hq, q_len), dtype=torch.float32, device=q.device)
    lse2 = empty((batch, hq, q_len), dtype=torch.float32, device=q.device)
    with on_device(q.device):
        pre_m = 64 if not interpreting() else 16
        _prep_kernel[(triton.cdiv(q_len, pre_m), batch * hq)](
            out,
            grad_out,
            lse,
            delta,
            lse2,
            *out.stride(),
            *grad_out.stride(),
            hq,
            q_len,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_M=pre_m,
        )
        if need_k or need_v:
            # The kernel computes both; a gradient nobody asked for goes to a scratch buffer.
            dk_t = dk if dk is not None else empty(k.shape, dtype=k.dtype, device=k.device)
            dv_t = dv if dv is not None else empty(v.shape, dtype=v.dtype, device=v.device)
            if seq_len:
                _launch_dkdv(
                    q,
                    grad_out,
                    lse2,
                    delta,
                    k,
                    v,
                    dk_t,
                    dv_t,
                    kpm,
                    stride_mb,
                    has_kpm,
                    causal,
                    seq_len,
                    seq_len - q_len,
                    (k.stride(), v.stride(), dk_t.stride(), dv_t.stride()),
                    scale,
                    block_d,
                    cfg.get("dkdv"),
                )
        if (need_pk or need_pv) and banks:
            dpk, dpv = _bank_grads(
                q, grad_out, lse2, delta, prefix_k, prefix_v, pids, plen, bank, need_pk, need_pv, scale, block_d, cfg
            )
        elif need_pk or need_pv:
            if prefix_len:
                _launch_dkdv(
                    q,
                    grad_out,
                    lse2,
                    delta,
                    prefix_k,
                    prefix_v,
                    dpk_rows,
                    dpv_rows,
                    kpm,
                    0,
                    False,
                    False,
                    prefix_len,
                    0,
                    (_strides4(prefix_k), _strides4(prefix_v), dpk_rows.stride(), dpv_rows.stride()),
                    scale,
                    block_d,
                    cfg.get("dkdv"),
                )
            else:
                dpk_rows.zero_()
                dpv_rows.zero_()
            if shared:
                dpk = dpk_rows.sum(0).to(prefix_k.dtype) if need_pk else None
                dpv = dpv_rows.sum(0).to(prefix_v.dtype) if need_pv else None
            else:
                dpk = dpk_rows if need_pk else None
                dpv = dpv_rows if need_pv else None
        if dq is not None:  # (None exactly when not need_q)
            # (An empty bank is no prefix: its P_max keys do not exist.)
            pk, pv, spk, spv, dq_prefix_len = _prefix_args(k, v, prefix_k, prefix_v)
            dq_cfg, meta = launch_config("dq", block_d, q, cfg.get("dq"))
            _dq_kernel[(triton.cdiv(q_len, dq_cfg["BLOCK_M"]), batch * hq)](
                q,
                k,
                v,
                pk,
                pv,
                kpm,
                pids,
                plen,
                grad_out,
                lse2,
                delta,
                dq,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *spk,
                *spv,
                stride_mb,
                *grad_out.stride(),
                *dq.stride(),
                hq,
                hq // hkv,
                q_len,
                seq_len,
                dq_prefix_len,
                n_slots,
                scale * LOG2E.value,
                scale,
                CAUSAL=causal,
                HAS_KPM=has_kpm,
                BANK=bank,
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                PRECISION=dot_precision(q.dtype),
                **dq_cfg,
                **meta,
            )
    return dq, dk, dv, dpk, dpv


def _bank_grads(q, do, lse2, delta, prefix_k, prefix_v, pids, plen, bank, need_pk, need_pv, scale, block_d, cfg):
    """The banks' gradients ``(N, Hkv, P_max, D)``, one program per (key block, slot, key head)
    summing the rows that name its slot (``_dkdv_bank_kernel``); an empty bank gets zeros."""
    dpk = empty(prefix_k.shape, dtype=prefix_k.dtype, device=q.device)
    dpv = empty(prefix_v.shape, dtype=prefix_v.dtype, device=q.device)
    if not bank:
        dpk.zero_()
        dpv.zero_()
    else:
        batch, hq, q_len, head_dim = q.shape
        num, hkv, p_max = prefix_k.shape[0], prefix_k.shape[1], prefix_k.shape[2]
        bank_cfg, meta = launch_config("dkdv", block_d, q, cfg.get("dkdv"))
        # Blocks sized for the longest slot; a shorter slot's blocks past its length exit at once.
        bank_cfg["BLOCK_N"] = max(16, min(bank_cfg["BLOCK_N"], triton.next_power_of_2(p_max)))
        _dkdv_bank_kernel[(triton.cdiv(p_max, bank_cfg["BLOCK_N"]), num * hkv)](
            q,
            prefix_k,
            prefix_v,
            do,
            lse2,
            delta,
            pids,
            plen,
            dpk,
            dpv,
            *q.stride(),
            *prefix_k.stride(),
            *prefix_v.stride(),
            *do.stride(),
            *dpk.stride(),
            *dpv.stride(),
            batch,
            hq,
            hkv,
            q_len,
            p_max,
            scale * LOG2E.value,
            scale,
            GROUP=hq // hkv,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            PRECISION=dot_precision(q.dtype),
            **bank_cfg,
            **meta,
        )
    return (dpk if need_pk else None), (dpv if need_pv else None)


def _zero_fill(q, k, v, prefix_k, prefix_v, dq, dk, dv, need_pk, need_pv):
    """Gradients when there is nothing to attend (no queries, or no keys at all): zeros."""
    for t in (dq, dk, dv):
        if t is not None:
            t.zero_()
    dpk = torch.zeros_like(prefix_k) if need_pk else None
    dpv = torch.zeros_like(prefix_v) if need_pv else None
    return dq, dk, dv, dpk, dpv


def supports(
    q, k, v, prefix_k, prefix_v, key_padding_mask, causal, scale, prefix_ids=None, prefix_lengths=None
) -> str | None:
    reason = dtype_reason(q.dtype, "the triton kernels take")
    if reason is not None:
        return reason
    if not scale > 0:
        return f"the triton kernels take scale > 0 (the softmax max is taken before scaling), got {scale}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the triton kernels take head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}"
    for name, t in (("q", q), ("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t is not None and t.numel() and (t.shape[-2] * abs(t.stride(-2)) + t.shape[-1] * abs(t.stride(-1))) >= 2**31:
            return f"the triton kernels address one (batch, head) slice of {name} with int32, got strides {tuple(t.stride())}"
    return None


register_impl(OP, "triton", OpImpl(forward=forward, backward=backward, supports=supports))
