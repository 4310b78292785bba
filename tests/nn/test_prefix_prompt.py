"""``peftops.nn.PrefixKV`` (prefix tuning) and ``peftops.nn.PromptEmbedding`` (prompt tuning).

The prefixes are checked where they are used: through :func:`peftops.prefix_attention`
against attention written out here in float64 (keys ``[prefix ; sequence]``, grouped-query
heads, bottom-right causal alignment), gradients included.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftops
from peftops.nn import PrefixKV, PromptEmbedding
from peftops.testing import assert_close

HYP = settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])


def randn(*shape, dtype=torch.float64, device="cpu", seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device)


def attention_formula(q, k, v, pk, pv, causal=True, key_padding_mask=None):
    """softmax(q K^T / sqrt(D) + mask) V with K = [pk ; k], V = [pv ; v], in float64."""
    b, hq, n_q, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    p = pk.shape[-2]
    keys = torch.cat([pk.expand(b, hkv, p, d), k], dim=2).double().repeat_interleave(hq // hkv, dim=1)
    vals = torch.cat([pv.expand(b, hkv, p, d), v], dim=2).double().repeat_interleave(hq // hkv, dim=1)
    scores = q.double() @ keys.transpose(-1, -2) / math.sqrt(d)
    i = torch.arange(n_q, device=q.device)[:, None]
    j = torch.arange(n_k, device=q.device)[None, :]
    seq_visible = (j <= i + (n_k - n_q)) if causal else torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
    seq_visible = seq_visible.expand(b, 1, n_q, n_k)
    if key_padding_mask is not None:
        seq_visible = seq_visible & key_padding_mask[:, None, None, :]
    visible = torch.cat([torch.ones(b, 1, n_q, p, dtype=torch.bool, device=q.device), seq_visible], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vals


# == PrefixKV ==============================================================================


@pytest.mark.parametrize("reparam_hidden", [None, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prefix_shapes_dtype_device(device, reparam_hidden, dtype):
    pkv = PrefixKV(3, 2, 5, 4, reparam_hidden=reparam_hidden, dtype=dtype, device=device)
    out = pkv()
    assert isinstance(out, list) and len(out) == 3
    for k, v in out:
        assert k.shape == (2, 5, 4) and v.shape == (2, 5, 4)
        assert k.dtype == dtype and v.dtype == dtype
        assert k.device.type == device.type and v.device.type == device.type
    assert all(p.requires_grad for p in pkv.parameters())


def test_prefix_without_reparam_gives_each_layer_its_own_keys_and_values():
    """Every (layer, k/v) block is a separate slice of the parameters: its gradient touches
    exactly Hkv * P * D entries, the blocks are disjoint, and together they cover everything."""
    layers, hkv, p, d = 3, 2, 4, 5
    torch.manual_seed(0)
    pkv = PrefixKV(layers, hkv, p, d, dtype=torch.float64)
    params = list(pkv.parameters())
    total = sum(t.numel() for t in params)
    assert total == layers * 2 * hkv * p * d
    seen = [torch.zeros_like(t, dtype=torch.bool) for t in params]
    out = pkv()
    for layer in range(layers):
        for kv in range(2):
            grads = torch.autograd.grad(out[layer][kv].sum(), params, retain_graph=True, allow_unused=True)
            touched = [torch.zeros_like(s) if g is None else g != 0 for g, s in zip(grads, seen, strict=False)]
            assert sum(int(t.sum()) for t in touched) == hkv * p * d
            assert not any((t & s).any() for t, s in zip(touched, seen, strict=False)), (
                f"layer {layer} kv {kv} overlaps another block"
            )
            seen = [s | t for s, t in zip(seen, touched, strict=False)]
    assert all(s.all() for s in seen)
    # Unit-variance init (as HF PEFT's prefix embedding): 120 draws, std within 25%.
    values = torch.cat([t.flatten() for t in params])
    assert 0.75 < values.std().item() < 1.25


def test_prefix_reparam_is_the_li_liang_mlp_with_hf_peft_layout():
    """[k; v] = W2 tanh(W1 E + b1) + b2, a (P, layers * 2 * Hkv * D) output read as
    (P, layers * 2, Hkv, D): layer l's keys are block 2l and its values block 2l + 1
    (HF PEFT's ``past_key_values`` split)."""
    layers, hkv, p, d, hidden = 2, 3, 4, 5, 7
    torch.manual_seed(0)
    pkv = PrefixKV(layers, hkv, p, d, reparam_hidden=hidden, dtype=torch.float64)
    emb = pkv.embedding
    lin1, lin2 = pkv.reparam[0], pkv.reparam[2]
    assert emb.shape == (p, hkv * d)
    assert lin1.weight.shape == (hidden, hkv * d) and lin2.weight.shape == (layers * 2 * hkv * d, hidden)
    flat = torch.tanh(emb @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    blocks = flat.reshape(p, layers * 2, hkv, d).permute(1, 2, 0, 3)  # (layers*2, Hkv, P, D)
    for layer, (k, v) in enumerate(pkv()):
        assert_close(k, blocks[2 * layer], name=f"layer {layer} keys")
        assert_close(v, blocks[2 * layer + 1], name=f"layer {layer} values")


def test_merge_reparam_keeps_the_prefixes_and_drops_the_mlp(device):
    torch.manual_seed(0)
    pkv = PrefixKV(2, 2, 3, 4, reparam_hidden=8, device=device)
    before = [(k.detach().clone(), v.detach().clone()) for k, v in pkv()]
    pkv.merge_reparam()
    assert pkv.reparam_hidden is None
    assert [n for n, _ in pkv.named_parameters()] == ["prefix"]
    for (k0, v0), (k1, v1) in zip(before, pkv(), strict=False):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    # The merged prefix is a trainable leaf, and its checkpoint loads into a plain PrefixKV.
    sum(k.sum() + v.sum() for k, v in pkv()).backward()
    assert pkv.prefix.grad is not None and torch.count_nonzero(pkv.prefix.grad) == pkv.prefix.numel()
    plain = PrefixKV(2, 2, 3, 4, device=device)
    plain.load_state_dict(pkv.state_dict())
    for (k0, v0), (k1, v1) in zip(before, plain(), strict=False):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    with pytest.raises(RuntimeError, match="no reparameterisation"):
        pkv.merge_reparam()


def test_merge_reparam_without_reparam_raises():
    with pytest.raises(RuntimeError, match=r"PrefixKV.merge_reparam: .*no reparameterisation"):
        PrefixKV(1, 1, 2, 2).merge_reparam()


@HYP
@given(
    batch=st.integers(1, 3),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    q_len=st.integers(1, 7),
    extra_keys=st.integers(0, 3),
    prefix_len=st.integers(1, 5),
    head_dim=st.sampled_from([1, 3, 8, 11]),
    reparam_hidden=st.sampled_from([None, 6]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_prefixes_through_prefix_attention_match_the_attention_formula(
    device, batch, hkv, group, q_len, extra_keys, prefix_len, head_dim, reparam_hidden, causal, seed
):
    layers = 2
    torch.manual_seed(seed)
    pkv = PrefixKV(layers, hkv, prefix_len, head_dim, reparam_hidden=reparam_hidden, dtype=torch.float64).to(device)
    n_k = q_len + extra_keys
    q = randn(batch, hkv * group, q_len, head_dim, device=device, seed=seed + 1)
    k = randn(batch, hkv, n_k, head_dim, device=device, seed=seed + 2)
    v = randn(batch, hkv, n_k, head_dim, device=device, seed=seed + 3)
    g = randn(layers, batch, hkv * group, q_len, head_dim, device=device, seed=seed + 4)
    params = list(pkv.parameters())

    def run(attn):
        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        outs = [attn(*qkv, pk, pv) for pk, pv in pkv()]
        grads = torch.autograd.grad(sum((o * g[i]).sum() for i, o in enumerate(outs)), qkv + params)
        return torch.stack(outs).detach(), grads

    out, grads = run(lambda q_, k_, v_, pk, pv: peftops.prefix_attention(q_, k_, v_, pk, pv, causal=causal))
    out_ref, grads_ref = run(lambda q_, k_, v_, pk, pv: attention_formula(q_, k_, v_, pk, pv, causal=causal))
    assert_close(out, out_ref, name="attention output")
    names = ["dq", "dk", "dv"] + [f"d{n}" for n, _ in pkv.named_parameters()]
    for name, a, b in zip(names, grads, grads_ref, strict=False):
        assert_close(a, b, kind="bwd", name=name)
        assert torch.count_nonzero(a) > 0, f"{name} is all zeros"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_layers": 0}, ValueError, r"num_layers: expected an int >= 1"),
        ({"num_kv_heads": 0}, ValueError, r"num_kv_heads: expected an int >= 1"),
        ({"prefix_len": -1}, ValueError, r"prefix_len: expected an int >= 1"),
        ({"head_dim": 0}, ValueError, r"head_dim: expected an int >= 1"),
        ({"reparam_hidden": 0}, ValueError, r"reparam_hidden: expected an int >= 1"),
        ({"num_layers": 2.0}, TypeError, r"num_layers: expected an int"),
        ({"head_dim": "8"}, TypeError, r"head_dim: expected an int"),
        ({"reparam_hidden": 1.5}, TypeError, r"reparam_hidden: expected an int"),
    ],
)
def test_prefix_bad_arguments(kwargs, exc, match):
    args = {"num_layers": 2, "num_kv_heads": 2, "prefix_len": 3, "head_dim": 4, **kwargs}
    with pytest.raises(exc, match=match):
        PrefixKV(**args)


@pytest.mark.parametrize("reparam_hidden", [None, 8])
def test_prefix_state_dict_round_trip_and_to_dtype(reparam_hidden):
    torch.manual_seed(0)
    src = PrefixKV(2, 2, 3, 4, reparam_hidden=reparam_hidden)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    dst = PrefixKV(2, 2, 3, 4, reparam_hidden=reparam_hidden)
    dst.load_state_dict(torch.load(buf))
    for (k0, v0), (k1, v1) in zip(src(), dst(), strict=False):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    dst.to(torch.float64)
    for (k0, v0), (k1, v1) in zip(src(), dst(), strict=False):
        assert k1.dtype == torch.float64
        assert_close(k1, k0.double(), dtype=torch.float32)
        assert_close(v1, v0.double(), dtype=torch.float32)


# == PromptEmbedding ======================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prompt_prepends_the_learned_embeddings(device, dtype):
    torch.manual_seed(0)
    prompt = PromptEmbedding(4, 6, dtype=dtype).to(device)
    x = randn(3, 5, 6, device=device, seed=1).to(dtype).requires_grad_()
    y = prompt(x)
    assert y.shape == (3, 9, 6) and y.dtype == dtype
    for b in range(3):
        assert torch.equal(y[b, :4], prompt.weight)
    assert torch.equal(y[:, 4:], x)
    g = randn(3, 9, 6, device=device, seed=2).to(dtype)
    y.backward(g)
    assert_close(prompt.weight.grad, g[:, :4].double().sum(0), dtype=dtype, kind="bwd", name="prompt grad")
    assert torch.equal(x.grad, g[:, 4:])


def test_prompt_init_is_uniform_half():
    torch.manual_seed(0)
    w = PromptEmbedding(64, 64).weight.detach()
    assert w.min() >= -0.5 and w.max() <= 0.5
    assert w.min() < -0.49 and w.max() > 0.49
    assert abs(w.std().item() / (1 / math.sqrt(12)) - 1) < 0.05


def test_prompt_zero_size_inputs():
    prompt = PromptEmbedding(2, 4)
    assert prompt(torch.zeros(0, 3, 4)).shape == (0, 5, 4)
    y = prompt(torch.zeros(2, 0, 4))
    assert y.shape == (2, 2, 4) and torch.equal(y[0], prompt.weight)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.float32])
def test_extend_attention_mask(device, dtype):
    prompt = PromptEmbedding(3, 4)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]], device=device).to(dtype)
    out = prompt.extend_attention_mask(mask)
    assert out.shape == (2, 7) and out.dtype == dtype and out.device == mask.device
    assert torch.equal(out[:, 3:], mask)
    assert torch.equal(out[:, :3], torch.ones(2, 3, dtype=dtype, device=device))
    empty = prompt.extend_attention_mask(torch.zeros(2, 0, dtype=dtype, device=device))
    assert torch.equal(empty, torch.ones(2, 3, dtype=dtype, device=device))


def test_prompt_with_extended_mask_through_prefix_attention_matches_formula():
    """The extended mask marks prompt positions as keys every query may attend to."""
    torch.manual_seed(0)
    prompt = PromptEmbedding(2, 8, dtype=torch.float64)
    x = randn(2, 4, 8, seed=1)
    mask = torch.tensor([[False, True, True, True], [True, True, False, True]])
    h = prompt(x)  # (2, 6, 8), one head of dim 8
    full_mask = prompt.extend_attention_mask(mask)
    q = k = v = h.unsqueeze(1)
    out = peftops.prefix_attention(q, k, v, causal=True, key_padding_mask=full_mask)
    empty = torch.zeros(1, 0, 8, dtype=torch.float64)
    assert_close(out, attention_formula(q, k, v, empty, empty, causal=True, key_padding_mask=full_mask))
    out.sum().backward()
    assert torch.count_nonzero(prompt.weight.grad) == prompt.weight.numel()


def test_prompt_bad_inputs():
    prompt = PromptEmbedding(2, 4)
    with pytest.raises(TypeError, match=r"inputs_embeds: expected a torch.Tensor, got list"):
        prompt([[0.0] * 4])
    with pytest.raises(ValueError, match=r"inputs_embeds: expected shape \(B, L, 4\), got \(2, 3, 5\)"):
        prompt(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"inputs_embeds: expected shape \(B, L, 4\), got \(3, 4\)"):
        prompt(torch.zeros(3, 4))
    with pytest.raises(TypeError, match=r"inputs_embeds: expected dtype torch.float32, got torch.float64"):
        prompt(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(B, L\), got \(4,\)"):
        prompt.extend_attention_mask(torch.ones(4))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(B, L\), got \(1, 2, 4\)"):
        prompt.extend_attention_mask(torch.ones(1, 2, 4))


def test_prompt_mask_that_is_not_a_tensor_is_a_type_error():
    """A list is the wrong kind of thing: TypeError, as ``forward`` raises for ``inputs_embeds``."""
    with pytest.raises(TypeError, match=r"attention_mask: expected a torch.Tensor"):
        PromptEmbedding(2, 4).extend_attention_mask([[1, 1]])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"num_tokens": 0}, ValueError, r"num_tokens: expected an int >= 1"),
        ({"hidden": -3}, ValueError, r"hidden: expected an int >= 1"),
        ({"num_tokens": 2.5}, TypeError, r"num_tokens: expected an int"),
        ({"hidden": None}, TypeError, r"hidden: expected an int"),
    ],
)
def test_prompt_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PromptEmbedding(**{"num_tokens": 2, "hidden": 4, **kwargs})


def test_prompt_state_dict_and_to_dtype():
    torch.manual_seed(0)
    src = PromptEmbedding(3, 5)
    assert list(src.state_dict()) == ["weight"]
    dst = PromptEmbedding(3, 5)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.weight, src.weight)
    dst.to(torch.bfloat16)
    y = dst(torch.zeros(1, 2, 5, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.equal(y[0, :3], src.weight.detach().to(torch.bfloat16))
