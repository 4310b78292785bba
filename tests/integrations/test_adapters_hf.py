"""Bottleneck adapters inside tiny transformers models (``apply_adapters`` / ``remove_adapters``).

The reference here is the placement written out in plain torch from AdapterHub's algebra
(``Adapter.pre_forward`` / ``forward`` / ``post_forward`` of ``adapters.methods.modeling``
with ``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``): a second copy of the same base
model whose layer forwards are replaced by hand-written ones that call the adapter formula
``s * (act(v Wd^T + bd) Wu^T + bu)`` on tensors copied from the peftops adapters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftops.integrations.adapters import apply_adapters, remove_adapters
from peftops.nn import BottleneckAdapter
from tests.integrations import hf_models

ARCHS = {
    "llama": hf_models.llama,
    "qwen2": hf_models.qwen2,
    "mistral": hf_models.mistral,
    "gpt2": hf_models.gpt2,
    "bert": hf_models.bert,
}
CONFIGS = ("seq_bn", "double_seq_bn", "par_bn")
# AdapterHub's defaults, written out here: (activation, scaling, reduction_factor, locations).
DEFAULTS = {
    "seq_bn": (F.relu, 1.0, 16, ("output_adapter",)),
    "double_seq_bn": (F.silu, 1.0, 16, ("mh_adapter", "output_adapter")),
    "par_bn": (F.relu, 4.0, 2, ("output_adapter",)),
}
HIDDEN = 64  # hf_models' hidden size


def layers_of(model: nn.Module) -> list[nn.Module]:
    for path in ("model.layers", "transformer.h", "bert.encoder.layer"):
        try:
            return list(model.get_submodule(path))
        except AttributeError:
            continue
    raise AssertionError(f"no layer list in {type(model).__name__}")


def randomise(model: nn.Module, seed: int = 3) -> None:
    """Give every adapter a non-zero up projection and biases, so each term is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BottleneckAdapter):
                for p in (m.up.weight, m.up.bias, m.down.bias):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                m.down.weight.mul_(10.0)  # out of the 0.02 init, so the non-linearity bends


def bottleneck(v, p, act):
    wd, bd, wu, bu = p
    return act(v @ wd.T + bd) @ wu.T + bu


def make_reference(arch: str, config: str, params: list[dict], ref: nn.Module | None = None) -> nn.Module:
    """The base model (``ref``, or a new copy) with each layer's forward written out with
    adapters placed as AdapterHub places them; ``params[i][location]`` = (Wd, bd, Wu, bu) of
    layer i."""
    act, s, _, _ = DEFAULTS[config]
    ref = ARCHS[arch]() if ref is None else ref

    def pre_ln(p, x, h):  # pre-LN sublayer: y = x + h without an adapter
        if p is None:
            return x + h
        if config == "seq_bn":
            z = x + h
            return z + s * bottleneck(z, p, act)
        if config == "double_seq_bn":
            return x + h + s * bottleneck(h, p, act)
        return x + h + s * bottleneck(x, p, act)

    def post_ln(p, x, h, ln):  # post-LN sublayer: y = LN(x + h) without an adapter
        if p is None:
            return ln(x + h)
        if config == "seq_bn":
            return ln(x + h + s * bottleneck(ln(x + h), p, act))
        if config == "double_seq_bn":
            return ln(x + h + s * bottleneck(h, p, act))
        return ln(x + h + s * bottleneck(x, p, act))

    for layer, ps in zip(layers_of(ref), params, strict=True):
        mh, out = ps.get("mh_adapter"), ps.get("output_adapter")
        if arch == "bert":
            for module, p in ((layer.attention.output, mh), (layer.output, out)):

                def forward(hidden_states, input_tensor, module=module, p=p):
                    h = module.dropout(module.dense(hidden_states))
                    return post_ln(p, input_tensor, h, module.LayerNorm)

                module.forward = forward
        elif arch == "gpt2":

            def forward(
                hidden_states,
                cache=None,
                attention_mask=None,
                encoder_hidden_states=None,
                encoder_attention_mask=None,
                use_cache=False,
                layer=layer,
                mh=mh,
                out=out,
                **kwargs,
            ):
                x = hidden_states
                h, _ = layer.attn(
                    layer.ln_1(x), cache=cache, attention_mask=attention_mask, use_cache=use_cache, **kwargs
                )
                x = pre_ln(mh, x, h)
                return pre_ln(out, x, layer.mlp(layer.ln_2(x)))

            layer.forward = forward
        else:

            def forward(hidden_states, layer=layer, mh=mh, out=out, **kwargs):
                x = hidden_states
                h, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)
                x = pre_ln(mh, x, h)
                return pre_ln(out, x, layer.mlp(layer.post_attention_layernorm(x)))

            layer.forward = forward
    return ref


def adapter_params(model: nn.Module) -> list[dict]:
    """Leaf copies of each layer's adapter tensors, for the reference."""
    out = []
    for layer in layers_of(model):
        ps = {}
        for loc, a in layer.bottleneck_adapters.items():
            ps[loc] = tuple(
                t.detach().clone().requires_grad_(True) for t in (a.down.weight, a.down.bias, a.up.weight, a.up.bias)
            )
        out.append(ps)
    return out


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_fresh_adapters_are_the_identity_and_keep_the_base_state_dict(arch, config):
    base = ARCHS[arch]()
    ids = hf_models.token_ids()
    expected = base(ids).logits
    base_sd = base.state_dict()

    model = ARCHS[arch]()
    assert apply_adapters(model, config) is model
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)

    # The base keys are untouched (same names, same tensors); the adapters add their own.
    sd = model.state_dict()
    assert set(base_sd) <= set(sd)
    for k, v in base_sd.items():
        assert torch.equal(sd[k], v), k
    added = set(sd) - set(base_sd)
    act, s, reduction, locations = DEFAULTS[config]
    assert added == {
        f"{prefix}.bottleneck_adapters.{loc}.{p}"
        for prefix in {k.split(".bottleneck_adapters.")[0] for k in added}
        for loc in locations
        for p in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    assert len(added) == 4 * len(locations) * len(layers_of(model))

    # AdapterHub's defaults, on peftops' module; only the adapters train.
    for layer in layers_of(model):
        assert sorted(layer.bottleneck_adapters) == sorted(locations)
        for a in layer.bottleneck_adapters.values():
            assert isinstance(a, BottleneckAdapter)
            assert (a.r, a.scale) == (HIDDEN // reduction, s)
            assert a.activation == {F.relu: "relu", F.silu: "silu"}[act]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in added}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_matches_hand_written_placement_with_gradients(arch, config):
    model = apply_adapters(ARCHS[arch](), config)
    randomise(model)
    params = adapter_params(model)
    ids = hf_models.token_ids()
    ref = ARCHS[arch]()
    base_logits = ref(ids).logits
    ref = make_reference(arch, config, params, ref)

    calls = []
    for m in model.modules():
        if isinstance(m, BottleneckAdapter):
            m.register_forward_hook(lambda *_: calls.append(1))
    out = model(ids, labels=ids)
    expected = ref(ids, labels=ids)
    assert len(calls) == len(DEFAULTS[config][3]) * len(layers_of(model))  # every adapter ran, once
    assert (out.logits - base_logits).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)

    out.loss.backward()
    expected.loss.backward()
    for layer, ps in zip(layers_of(model), params, strict=True):
        for loc, a in layer.bottleneck_adapters.items():
            for got, want in zip((a.down.weight, a.down.bias, a.up.weight, a.up.bias), ps[loc], strict=True):
                assert got.grad is not None and want.grad is not None
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for n, p in model.named_parameters() if "bottleneck_adapters" not in n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_kv_cache_matches_reference(arch):
    model = apply_adapters(ARCHS[arch](), "double_seq_bn")
    randomise(model)
    ref = make_reference(arch, "double_seq_bn", adapter_params(model))
    ids = hf_models.token_ids(batch=2, seq=5)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    got = model.generate(ids, **kw)
    assert torch.equal(got, ref.generate(ids, **kw))
    assert torch.equal(got, model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize(("arch", "config"), [("llama", "seq_bn"), ("gpt2", "par_bn"), ("bert", "double_seq_bn")])
def test_training_changes_only_adapters_and_round_trips_through_state_dict(arch, config):
    model = apply_adapters(ARCHS[arch](), config)
    base_keys = set(ARCHS[arch]().state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = hf_models.token_ids()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # frozen parameters given too: never touched
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    after = model.state_dict()
    for k in base_keys:
        assert torch.equal(after[k], before[k]), k
    changed = {k for k in after if k not in base_keys and not torch.equal(after[k], before[k])}
    assert {k.rsplit(".", 2)[-2] for k in changed} >= {"up", "down"}

    # Save: only the adapter keys; load into a freshly built model after apply_adapters.
    model.eval()
    adapter_sd = {k: v for k, v in model.state_dict().items() if k not in base_keys}
    fresh = apply_adapters(ARCHS[arch](), config)
    fresh.eval()
    assert not torch.equal(fresh(ids).logits, model(ids).logits)
    result = fresh.load_state_dict(adapter_sd, strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == base_keys
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_remove_adapters_restores_the_base_model(arch):
    base = ARCHS[arch]()
    ids = hf_models.token_ids()
    expected = base(ids).logits
    model = ARCHS[arch]()
    next(model.parameters()).requires_grad_(False)  # a flag apply_adapters must give back as it was
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_adapters(model, "double_seq_bn")
    randomise(model)
    assert not torch.equal(model(ids).logits, expected)
    assert remove_adapters(model) is model
    assert set(model.state_dict()) == set(base.state_dict())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    apply_adapters(model, "par_bn")  # and it can take adapters again
    with pytest.raises(ValueError, match="remove_adapters"):
        apply_adapters(model, "seq_bn")


def test_explicit_arguments_override_the_config():
    model = apply_adapters(hf_models.gpt2(), "par_bn", reduction_factor=16, non_linearity="swish", scaling=2.0)
    adapters = [a for a in model.modules() if isinstance(a, BottleneckAdapter)]
    assert adapters and all((a.r, a.activation, a.scale, a.parallel) == (4, "silu", 2.0, True) for a in adapters)
    model = apply_adapters(hf_models.bert(head="cls"), "double_seq_bn", non_linearity="gelu_new")
    adapters = [a for a in model.modules() if isinstance(a, BottleneckAdapter)]
    assert adapters and all((a.r, a.activation, a.scale) == (4, "gelu_tanh", 1.0) for a in adapters)


def test_bad_input_is_refused_before_anything_changes():
    model = hf_models.llama()
    keys = set(model.state_dict())
    with pytest.raises(
        ValueError, match=r"apply_adapters: config: expected one of .*'double_seq_bn'.*'par_bn'.*'seq_bn'.*'pfeiffer'"
    ):
        apply_adapters(model, "pfeiffer")
    with pytest.raises(TypeError, match="apply_adapters: config: .*got int"):
        apply_adapters(model, 3)
    with pytest.raises(ValueError, match="apply_adapters: reduction_factor: expected a number > 0, got 0"):
        apply_adapters(model, reduction_factor=0)
    with pytest.raises(TypeError, match="apply_adapters: reduction_factor: expected a real number, got str"):
        apply_adapters(model, reduction_factor="16")
    with pytest.raises(ValueError, match="apply_adapters: non_linearity: expected one of .*'swish'.*got 'tanh'"):
        apply_adapters(model, non_linearity="tanh")
    with pytest.raises(ValueError, match="apply_adapters: scaling: expected a finite number, got inf"):
        apply_adapters(model, scaling=float("inf"))
    with pytest.raises(TypeError, match="apply_adapters: model: expected a torch.nn.Module, got str"):
        apply_adapters("llama")
    with pytest.raises(ValueError, match="remove_adapters: model: .*without adapters"):
        remove_adapters(model)
    assert set(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_unknown_architecture_is_a_type_error_naming_it():
    with pytest.raises(
        TypeError, match=r"apply_adapters: model: Sequential has no transformer layer .*LlamaDecoderLayer"
    ):
        apply_adapters(nn.Sequential(nn.Linear(4, 4)))
    model = hf_models.gpt2()
    del model.transformer.h[1].ln_2
    with pytest.raises(
        TypeError, match=r"GPT2LMHeadModel: layer 'transformer.h.1' \(GPT2Block\) has no submodule 'ln_2'"
    ):
        apply_adapters(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_gradient_checkpointing_recomputes_through_the_hooks():
    # The recomputed forward must see its residual again (the pre-hook fires on each run).
    grads = []
    for checkpointing in (False, True):
        model = apply_adapters(hf_models.llama(), "seq_bn")
        randomise(model)
        if checkpointing:  # renamed activation_checkpointing_enable in later transformers 5.x
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        ids = hf_models.token_ids()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
