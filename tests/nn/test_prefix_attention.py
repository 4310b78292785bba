"""``peftops.nn.PrefixSelfAttention``: an attention block that takes a layer's prefix.

Checked against the block written out here in float64: the four projections with
``F.linear``, heads split by hand, keys ``[prefix ; k]`` concatenated explicitly, key/value
heads repeated for grouped-query attention, a bottom-right causal mask and the key padding
mask applied to the scores, softmax, ``o_proj``. Gradients are compared with autograd
through that formulation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peftops.nn import PrefixKV, PrefixSelfAttention
from peftops.testing import assert_close


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def make_block(hidden=16, heads=4, kv_heads=2, head_dim=None, bias=True, causal=True, seed=0):
    torch.manual_seed(seed)
    block = PrefixSelfAttention(hidden, heads, kv_heads, head_dim, bias=bias, causal=causal, dtype=torch.float64)
    if bias:  # nn.Linear's biases are small; make them matter
        with torch.no_grad():
            for proj in (block.q_proj, block.k_proj, block.v_proj, block.o_proj):
                proj.bias.normal_()
    return block


def explicit(block, x, prefix=None, key_padding_mask=None):
    """The block, written out: projections, [prefix ; k], repeated kv heads, masked softmax."""
    b, n, _ = x.shape
    h, hkv, d = block.num_heads, block.num_kv_heads, block.head_dim

    def heads(t, count):  # (B, L, count * D) -> (B, count, L, D)
        return t.reshape(b, n, count, d).permute(0, 2, 1, 3)

    q = heads(F.linear(x, block.q_proj.weight, block.q_proj.bias), h)
    k = heads(F.linear(x, block.k_proj.weight, block.k_proj.bias), hkv)
    v = heads(F.linear(x, block.v_proj.weight, block.v_proj.bias), hkv)
    p = 0
    if prefix is not None:
        pk, pv = prefix
        p = pk.shape[-2]
        k = torch.cat([pk.expand(b, hkv, p, d), k], dim=2)
        v = torch.cat([pv.expand(b, hkv, p, d), v], dim=2)
    group = h // hkv
    k = torch.stack([k[:, i // group] for i in range(h)], dim=1)  # query head i reads kv head i // group
    v = torch.stack([v[:, i // group] for i in range(h)], dim=1)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    visible = torch.ones(b, 1, n, p + n, dtype=torch.bool)
    if block.causal:  # sequence key j (after the prefix) is visible to query i iff j <= i
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        visible[..., p:] &= j <= i
    if key_padding_mask is not None:
        visible[..., p:] &= key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no key: zeros
    o = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, h * d)
    return F.linear(o, block.o_proj.weight, block.o_proj.bias)


PREFIXES = {
    "none": None,
    "shared": lambda hkv, d: (randn(hkv, 3, d, seed=5), randn(hkv, 3, d, seed=6)),
    "per-row": lambda hkv, d: (randn(2, hkv, 3, d, seed=5), randn(2, hkv, 3, d, seed=6)),
}


@pytest.mark.parametrize("prefix_kind", list(PREFIXES))
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_the_explicit_block(prefix_kind, heads, kv_heads, causal):
    block = make_block(heads=heads, kv_heads=kv_heads, causal=causal)
    x = randn(2, 5, 16, seed=1)
    make = PREFIXES[prefix_kind]
    prefix = None if make is None else make(kv_heads, block.head_dim)
    y = block(x, prefix=prefix)
    assert y.shape == (2, 5, 16) and y.dtype == torch.float64
    assert_close(y, explicit(block, x, prefix), name=f"{prefix_kind} prefix")


def test_head_dim_other_than_hidden_over_heads_and_no_bias():
    block = make_block(hidden=12, heads=4, kv_heads=2, head_dim=5, bias=False)
    assert block.q_proj.weight.shape == (20, 12) and block.k_proj.weight.shape == (10, 12)
    assert block.o_proj.weight.shape == (12, 20) and block.q_proj.bias is None
    x = randn(3, 4, 12, seed=1)
    prefix = (randn(2, 2, 5, seed=2), randn(2, 2, 5, seed=3))
    assert_close(block(x, prefix=prefix), explicit(block, x, prefix))
    assert "head_dim=5" in repr(block)


def test_key_padding_mask():
    block = make_block()
    x = randn(2, 6, 16, seed=1)
    mask = torch.tensor([[True] * 6, [False, False, True, True, True, True]])  # row 1 left-padded
    prefix = (randn(2, 3, 4, seed=2), randn(2, 3, 4, seed=3))
    y = block(x, prefix=prefix, key_padding_mask=mask)
    assert_close(y, explicit(block, x, prefix, key_padding_mask=mask))
    # The padded keys are ignored: changing the padded tokens' inputs changes no real token's output.
    x2 = x.clone()
    x2[1, :2] = randn(2, 16, seed=9)
    y2 = block(x2, prefix=prefix, key_padding_mask=mask)
    assert_close(y2[1, 2:], y[1, 2:], name="real tokens of the padded row")
    # Without a prefix, a padded query that sees no key gives zeros before o_proj: o_proj's bias.
    y3 = block(x, key_padding_mask=mask)
    assert_close(y3, explicit(block, x, None, key_padding_mask=mask), name="no prefix")
    assert_close(y3[1, 0], block.o_proj.bias.detach(), name="a query that sees no key")


@pytest.mark.parametrize("prefix_kind", ["shared", "per-row"])
def test_gradients_reach_every_projection_and_the_prefix(prefix_kind):
    block = make_block()
    x = randn(2, 5, 16, seed=1).requires_grad_()
    pk, pv = (t.requires_grad_() for t in PREFIXES[prefix_kind](2, block.head_dim))
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]])
    g = randn(2, 5, 16, seed=7)
    leaves = [x, pk, pv, *block.parameters()]
    (block(x, prefix=(pk, pv), key_padding_mask=mask) * g).sum().backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (explicit(block, x, (pk, pv), key_padding_mask=mask) * g).sum().backward()
    names = ["x", "prefix_k", "prefix_v", *(n for n, _ in block.named_parameters())]
    assert {n.split(".")[0] for n in names[3:]} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    for name, actual, t in zip(names, got, leaves, strict=True):
        assert torch.count_nonzero(actual) > 0, f"{name}: no gradient"
        assert_close(actual, t.grad, kind="bwd", name=name)


def test_runs_the_prefix_of_a_prefix_kv():
    block = make_block()
    pkv = PrefixKV(num_layers=2, num_kv_heads=2, prefix_len=4, head_dim=4, dtype=torch.float64)
    x = randn(2, 3, 16, seed=1)
    prefix = pkv()[1]
    y = block(x, prefix=prefix)
    assert_close(y, explicit(block, x, prefix))
    y.square().sum().backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in pkv.parameters())


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"PrefixSelfAttention: num_kv_heads: expected a divisor of num_heads=4, got 3"
    ):
        PrefixSelfAttention(16, 4, 3)
    with pytest.raises(ValueError, match=r"PrefixSelfAttention: head_dim: expected it given, or hidden=10"):
        PrefixSelfAttention(10, 4)
    for kwargs, name in [({"hidden": 0}, "hidden"), ({"num_heads": 0}, "num_heads"), ({"head_dim": 0}, "head_dim")]:
        with pytest.raises(ValueError, match=rf"PrefixSelfAttention: {name}: expected an int >= 1, got 0"):
            PrefixSelfAttention(**{"hidden": 16, "num_heads": 4, **kwargs})
    with pytest.raises(TypeError, match=r"PrefixSelfAttention: causal: expected a bool"):
        PrefixSelfAttention(16, 4, causal=1)
    block = make_block()
    with pytest.raises(ValueError, match=r"PrefixSelfAttention: x: expected shape \(B, L, 16\), got \(2, 5, 8\)"):
        block(randn(2, 5, 8))
    with pytest.raises(TypeError, match=r"PrefixSelfAttention: prefix: expected a \(prefix_k, prefix_v\) pair"):
        block(randn(2, 5, 16), prefix=randn(2, 3, 4))
