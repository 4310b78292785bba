"""The prefix-attention spec (peftops.reference.prefix_attention): the written-out backward against
autograd (the forward is checked against an explicit per-head loop in tests/ops)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peftops import reference
from peftops.testing import assert_close

from ..ops.helpers import grads_of
from ..strategies import AttentionCase, attention_cases


@given(case=attention_cases(max_len=20), need=st.lists(st.booleans(), min_size=5, max_size=5))
@settings(max_examples=15)
def test_reference_explicit_backward_matches_autograd(case: AttentionCase, need):
    t = case.inputs(torch.float64, "cpu")
    kpm = t.pop("key_padding_mask")
    scale = 1 / math.sqrt(case.head_dim)
    fwd = lambda **kw: reference.prefix_attention(**kw, causal=case.causal, key_padding_mask=kpm, scale=scale)[0]  # noqa: E731
    out, want = grads_of(fwd, t)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    has_prefix = t["prefix_k"] is not None
    need[3] &= has_prefix
    need[4] &= has_prefix
    detached = [None if t[n] is None else t[n].detach() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    got = reference.prefix_attention_backward(
        g, *detached, causal=case.causal, key_padding_mask=kpm, scale=scale, output_mask=need
    )
    for name, grad, needed in zip(("q", "k", "v", "prefix_k", "prefix_v"), got, need, strict=False):
        if needed:
            assert_close(grad, want[name], kind="bwd", name=f"explicit d{name}")
        else:
            assert grad is None, f"d{name} computed although not requested"
