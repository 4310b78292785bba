"""peftops.prefix_attention: values and gradients, masking semantics, validation, registration."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import peftops
from peftops import reference
from peftops.testing import assert_close, check_fa_rule

from ..strategies import DTYPES, AttentionCase, attention_cases
from .helpers import assert_matches, backend_params, grads_of, use

OP = "prefix_attention"


def op_call(backend, case: AttentionCase):
    def fn(q, k, v, prefix_k, prefix_v, key_padding_mask):
        with use(backend):
            return peftops.prefix_attention(
                q, k, v, prefix_k, prefix_v, causal=case.causal, key_padding_mask=key_padding_mask
            )

    return fn


def loop_truth(case: AttentionCase):
    """Independent formulation: per (row, head), concatenate the keys explicitly, build the
    mask from index grids, ``torch.softmax``, and zero the rows that see nothing."""

    def fn(q, k, v, prefix_k, prefix_v, key_padding_mask):
        batch, hq, q_len, d = q.shape
        hkv, seq_len = k.shape[1], k.shape[2]
        rows = []
        for b in range(batch):
            heads = []
            for h in range(hq):
                kv_head = h // (hq // hkv)
                keys, values = k[b, kv_head], v[b, kv_head]
                p_len = 0
                if prefix_k is not None:
                    pk = prefix_k[kv_head] if prefix_k.dim() == 3 else prefix_k[b, kv_head]
                    pv = prefix_v[kv_head] if prefix_v.dim() == 3 else prefix_v[b, kv_head]
                    keys, values, p_len = torch.cat([pk, keys]), torch.cat([pv, values]), pk.shape[0]
                i = torch.arange(q_len).view(-1, 1)
                j = torch.arange(p_len + seq_len).view(1, -1)
                allowed = (j < p_len) | ~torch.tensor(case.causal) | (j - p_len <= i + seq_len - q_len)
                if key_padding_mask is not None:
                    pad = torch.cat([torch.ones(p_len, dtype=torch.bool), key_padding_mask[b].cpu()])
                    allowed = allowed & pad.view(1, -1)
                scores = (q[b, h] @ keys.T) / math.sqrt(d)
                probs = torch.softmax(scores.masked_fill(~allowed.to(q.device), -math.inf), dim=-1)
                heads.append(torch.nan_to_num(probs, nan=0.0) @ values)
            rows.append(torch.stack(heads))
        return torch.stack(rows)

    return fn


@pytest.mark.parametrize("device,backend", backend_params(OP))
@given(case=attention_cases(), data=st.data())
def test_matches_explicit_concatenation_forward_and_gradients(device, backend, case: AttentionCase, data):
    dtype = data.draw(st.sampled_from(DTYPES[device]), label="dtype")
    assert_matches(
        op_call(backend, case), loop_truth(case), case.inputs(dtype, device), dtype, what=f"{backend} {case}"
    )


@pytest.mark.parametrize(
    "prefix_mode,padding,group", [("shared", "random", 2), ("per_row", "none", 1), ("none", "whole_rows", 4)]
)
def test_gradcheck_float64(prefix_mode, padding, group):
    case = AttentionCase(
        batch=2,
        hkv=1,
        group=group,
        q_len=4,
        seq_len=5,
        head_dim=3,
        prefix_len=2,
        prefix_mode=prefix_mode,
        causal=True,
        padding=padding,
        layout="transposed",
        seed=1,
    )
    t = case.inputs(torch.float64, "cpu")
    kpm = t.pop("key_padding_mask")
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if t[n] is not None]

    def fn(*args):
        kw = dict(zip(names, args, strict=False))
        return peftops.prefix_attention(
            kw["q"], kw["k"], kw["v"], kw.get("prefix_k"), kw.get("prefix_v"), key_padding_mask=kpm
        )

    assert torch.autograd.gradcheck(fn, [t[n] for n in names])


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("prefix_mode", ["shared", "per_row", "none"])
def test_opcheck(device, backend, prefix_mode):
    case = AttentionCase(
        batch=2,
        hkv=2,
        group=2,
        q_len=5,
        seq_len=7,
        head_dim=8,
        prefix_len=3,
        prefix_mode=prefix_mode,
        causal=True,
        padding="random",
        layout="transposed",
        seed=2,
    )
    t = case.inputs(torch.float32, device)
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], t["key_padding_mask"], True, 0.3)
    opcheck(torch.ops.peftops.prefix_attention.default, (*args, backend))
    with torch.no_grad():
        out, lse = torch.ops.peftops.prefix_attention(*args, backend)
    has_prefix = t["prefix_k"] is not None
    detached = [None if x is None else x.detach() for x in args[:5]]
    opcheck(
        torch.ops.peftops.prefix_attention_backward.default,
        (
            torch.randn_like(out),
            *detached,
            t["key_padding_mask"],
            out,
            lse,
            True,
            0.3,
            [True, True, True, has_prefix, has_prefix],
            backend,
        ),
    )


def test_sdpa_top_left_causal_is_wrong_for_prefixes_and_peftops_is_right():
    """``sdpa(is_causal=True)`` on ``cat(prefix, k)`` aligns the mask top-left: query i sees
    only the first i + 1 keys, i.e. part of the prefix. peftops aligns bottom-right and matches
    SDPA given the right mask explicitly (and ``causal_lower_right``)."""
    from torch.nn.attention.bias import causal_lower_right

    case = AttentionCase(
        batch=2,
        hkv=2,
        group=1,
        q_len=6,
        seq_len=6,
        head_dim=8,
        prefix_len=4,
        prefix_mode="shared",
        causal=True,
        padding="none",
        layout="contiguous",
        seed=3,
    )
    t = case.inputs(torch.float64, "cpu", requires_grad=False)
    ours = peftops.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], causal=True)
    keys = torch.cat([t["prefix_k"].expand(2, -1, -1, -1), t["k"]], dim=2)
    values = torch.cat([t["prefix_v"].expand(2, -1, -1, -1), t["v"]], dim=2)
    top_left = F.scaled_dot_product_attention(t["q"], keys, values, is_causal=True)
    assert (ours - top_left).abs().max() > 0.1, "top-left causal SDPA should differ from prefix attention"
    visible = reference.visible_mask(2, 6, 6, 4, True, None, "cpu")
    assert_close(ours, F.scaled_dot_product_attention(t["q"], keys, values, attn_mask=visible))
    assert_close(ours, F.scaled_dot_product_attention(t["q"], keys, values, attn_mask=causal_lower_right(6, 10)))


def test_decode_step_sees_every_key():
    case = AttentionCase(
        batch=2,
        hkv=1,
        group=4,
        q_len=1,
        seq_len=9,
        head_dim=16,
        prefix_len=5,
        prefix_mode="per_row",
        causal=True,
        padding="none",
        layout="contiguous",
        seed=4,
    )
    t = case.inputs(torch.float32, "cpu", requires_grad=False)
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"])
    torch.testing.assert_close(
        peftops.prefix_attention(*args, causal=True), peftops.prefix_attention(*args, causal=False)
    )


def test_rows_that_see_nothing_are_zeros_with_zero_gradients():
    """Row 0 is fully padded and there is no prefix; with L > S and causal, the first L - S
    queries of every row see no key either. All of these are zeros, never NaN."""
    case = AttentionCase(
        batch=2,
        hkv=1,
        group=2,
        q_len=7,
        seq_len=4,
        head_dim=8,
        prefix_len=0,
        prefix_mode="none",
        causal=True,
        padding="whole_rows",
        layout="contiguous",
        seed=5,
    )
    t = case.inputs(torch.float32, "cpu")
    out = peftops.prefix_attention(t["q"], t["k"], t["v"], key_padding_mask=t["key_padding_mask"], causal=True)
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[0]) == 0
    assert torch.count_nonzero(out[1, :, :3]) == 0
    out.square().sum().backward()
    for name in ("q", "k", "v"):
        assert torch.isfinite(t[name].grad).all()
    assert torch.count_nonzero(t["q"].grad[0]) == 0 and torch.count_nonzero(t["k"].grad[0]) == 0


def test_shared_prefix_gradient_is_the_batch_sum_of_per_row_gradients():
    case = AttentionCase(
        batch=3,
        hkv=2,
        group=2,
        q_len=5,
        seq_len=6,
        head_dim=8,
        prefix_len=3,
        prefix_mode="shared",
        causal=True,
        padding="random",
        layout="contiguous",
        seed=6,
    )
    t = case.inputs(torch.float64, "cpu")
    g = torch.randn(3, 4, 5, 8, dtype=torch.float64)
    shared = peftops.prefix_attention(
        t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], key_padding_mask=t["key_padding_mask"]
    )
    (dpk_shared,) = torch.autograd.grad(shared, t["prefix_k"], g)
    per_row_k = t["prefix_k"].detach().expand(3, -1, -1, -1).clone().requires_grad_(True)
    per_row = peftops.prefix_attention(
        t["q"], t["k"], t["v"], per_row_k, t["prefix_v"].expand(3, -1, -1, -1), key_padding_mask=t["key_padding_mask"]
    )
    assert_close(per_row, shared)
    (dpk_rows,) = torch.autograd.grad(per_row, per_row_k, g)
    assert_close(dpk_shared, dpk_rows.sum(0), kind="bwd")


def test_fa_error_rule_float16():
    """FlashAttention's rule at float16 on CPU: the op's error against a float32 reference is
    at most twice that of the same attention computed by PyTorch in float16."""
    case = AttentionCase(
        batch=2,
        hkv=2,
        group=2,
        q_len=33,
        seq_len=47,
        head_dim=64,
        prefix_len=17,
        prefix_mode="shared",
        causal=True,
        padding="none",
        layout="contiguous",
        seed=7,
    )
    t = case.inputs(torch.float16, "cpu", requires_grad=False)
    ours = peftops.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"])
    ref32, _ = reference.prefix_attention(*(t[n].float() for n in ("q", "k", "v", "prefix_k", "prefix_v")))
    keys = torch.cat([t["prefix_k"].expand(2, -1, -1, -1), t["k"]], dim=2).repeat_interleave(2, dim=1)
    values = torch.cat([t["prefix_v"].expand(2, -1, -1, -1), t["v"]], dim=2).repeat_interleave(2, dim=1)
    visible = reference.visible_mask(2, 33, 47, 17, True, None, "cpu")
    scores = (t["q"] @ keys.transpose(-1, -2)) * (1 / 8)
    lowp = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1) @ values  # all float16
    ok, err, budget = check_fa_rule(ours, ref32, lowp)
    assert ok, f"error {err:.3g} above the FA budget {budget:.3g}"


def test_compile_fullgraph_matches_eager():
    case = AttentionCase(
        batch=2,
        hkv=1,
        group=2,
        q_len=6,
        seq_len=9,
        head_dim=8,
        prefix_len=3,
        prefix_mode="shared",
        causal=True,
        padding="random",
        layout="transposed",
        seed=8,
    )

    def step(q, k, v, prefix_k, prefix_v, key_padding_mask):
        return torch.tanh(peftops.prefix_attention(q, k, v, prefix_k, prefix_v, key_padding_mask=key_padding_mask))

    (y0, g0), (y1, g1) = (
        grads_of(fn, case.inputs(torch.float32, "cpu")) for fn in (step, torch.compile(step, fullgraph=True))
    )
    assert_close(y1, y0, name="compiled output")
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")


@pytest.mark.parametrize("batch,q_len,seq_len", [(0, 3, 4), (2, 0, 4), (2, 3, 0)])
def test_zero_sizes(batch, q_len, seq_len):
    q = torch.randn(batch, 2, q_len, 8, requires_grad=True)
    k = torch.randn(batch, 1, seq_len, 8, requires_grad=True)
    v = torch.randn(batch, 1, seq_len, 8, requires_grad=True)
    out = peftops.prefix_attention(q, k, v)
    assert out.shape == q.shape and torch.count_nonzero(out) == 0
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def _bad(**change):
    args = dict(
        q=torch.randn(2, 4, 5, 8),
        k=torch.randn(2, 2, 6, 8),
        v=torch.randn(2, 2, 6, 8),
        prefix_k=torch.randn(2, 3, 8),
        prefix_v=torch.randn(2, 3, 8),
        causal=True,
        key_padding_mask=None,
        scale=None,
    )
    args.update(change)
    return args


BAD_INPUTS = [
    (_bad(q=torch.randn(4, 5, 8)), ValueError, r"q: expected 4 dims, got 3"),
    (
        _bad(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)),
        ValueError,
        r"k: expected a number of heads Hkv that divides Hq=4.*got Hkv=3",
    ),
    (_bad(k=torch.randn(2, 2, 6, 7)), ValueError, r"k: expected shape \(2, \*, \*, 8\)"),
    (_bad(v=torch.randn(2, 2, 5, 8)), ValueError, r"v: expected shape \(2, 2, 6, 8\)"),
    (_bad(k=torch.randn(3, 2, 6, 8)), ValueError, r"k: expected shape \(2, \*, \*, 8\).*got \(3, 2, 6, 8\)"),
    (_bad(prefix_v=None), ValueError, r"prefix_k, prefix_v: expected both tensors or both None"),
    (_bad(prefix_k=torch.randn(3, 3, 8)), ValueError, r"prefix_k: expected shape \(2, \*, 8\)"),
    (
        _bad(prefix_k=torch.randn(3, 2, 3, 8), prefix_v=torch.randn(3, 2, 3, 8)),
        ValueError,
        r"prefix_k: expected shape \(2, 2, \*, 8\)",
    ),
    (_bad(prefix_v=torch.randn(2, 4, 8)), ValueError, r"prefix_v: expected shape \(2, 3, 8\)"),
    (
        _bad(prefix_k=torch.randn(3, 8), prefix_v=torch.randn(3, 8)),
        ValueError,
        r"prefix_k: expected 3 or 4 dims, got 2",
    ),
    (_bad(key_padding_mask=torch.ones(2, 6)), TypeError, r"key_padding_mask: expected dtype torch.bool"),
    (
        _bad(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)),
        ValueError,
        r"key_padding_mask: expected shape \(2, 6\)",
    ),
    (_bad(v=torch.randn(2, 2, 6, 8, dtype=torch.float16)), TypeError, r"v: expected dtype torch.float32"),
    (_bad(q=torch.randn(2, 4, 5, 8, device="meta")), ValueError, r"k: expected device meta"),
    (_bad(scale=float("nan")), ValueError, r"scale: expected a finite number, got nan"),
    (_bad(causal="yes"), TypeError, r"causal: expected a bool, got str"),
]


@pytest.mark.parametrize("args,exc,match", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_named_argument(args, exc, match):
    with pytest.raises(exc, match=r"prefix_attention: " + match):
        peftops.prefix_attention(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"), args.pop("prefix_v"), **args
        )
