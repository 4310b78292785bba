"""Compacter, Compacter++ and MAM inside tiny transformers models (``apply_adapters``).

Compacter is checked against the hand-written AdapterHub placement of ``test_adapters_hf``
(``double_seq_bn`` for ``"compacter"``, ``seq_bn`` for ``"compacter++"``, their classes' bases),
fed with weights built from copies of the PHM parameters, so the gradients reaching the shared
rule and the factors are compared too. MAM is checked against its two parts composed by hand:
``apply_prefix_tuning`` and ``apply_adapters(..., "par_bn")``, with the same weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftops.integrations.adapters import apply_adapters, remove_adapters
from peftops.integrations.prefix_tuning import apply_prefix_tuning
from peftops.nn import BottleneckAdapter, CompacterAdapter, PHMRule, PrefixKV
from peftops.nn.compacter import phm_weight
from tests.integrations import hf_models
from tests.integrations import test_adapters_hf as placement

ARCHS = {"llama": hf_models.llama, "bert": hf_models.bert}
# (peftops config, AdapterHub base class placed the same way, locations)
COMPACTERS = {
    "compacter": ("double_seq_bn", ("mh_adapter", "output_adapter")),
    "compacter++": ("seq_bn", ("output_adapter",)),
}
HIDDEN, REDUCTION = 64, 8  # width 8: the default 32 gives 2, not a multiple of phm_dim 4
PHM_NAMES = ("down_left", "down_right", "down_bias", "up_left", "up_right", "up_bias")


def compacters(model: nn.Module) -> list[dict[str, CompacterAdapter]]:
    return [dict(layer.bottleneck_adapters) for layer in placement.layers_of(model)]


def randomise_phm(model: nn.Module, seed: int = 5) -> None:
    """Every PHM tensor non-zero and O(1)-ish, so each term of the weights is live."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PHMRule):
                m.rule.copy_(torch.randn(m.rule.shape, generator=g))
            elif isinstance(m, CompacterAdapter):
                for name in PHM_NAMES:
                    p = getattr(m, name)
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("config", list(COMPACTERS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_compacter_matches_hand_written_placement_with_phm_gradients(arch, config, monkeypatch):
    base_config, locations = COMPACTERS[config]
    ids = hf_models.token_ids()
    base = ARCHS[arch]()
    base_logits = base(ids).logits.detach()
    model = apply_adapters(ARCHS[arch](), config, reduction_factor=REDUCTION)
    # Fresh: the identity (the up factors start at zero), AdapterHub's PHM shapes and defaults.
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    per_layer = compacters(model)
    rules = {id(a.phm_rule.rule) for layer in per_layer for a in layer.values()}
    assert len(rules) == 1  # one shared Parameter for every layer, down and up alike
    rule = per_layer[0][locations[0]].phm_rule.rule
    assert rule.shape == (4, 4, 4) and rule.std() < 1e-3  # N(0, phm_init_range=1e-4)
    for layer in per_layer:
        assert sorted(layer) == sorted(locations)
        for a in layer.values():
            assert (a.d, a.r, a.phm_dim, a.phm_rank, a.activation, a.scale) == (HIDDEN, 8, 4, 1, "gelu", 1.0)
            assert a.parallel == (config == "compacter++")
    n_adapters = len(per_layer) * len(locations)
    d, r = HIDDEN, HIDDEN // REDUCTION
    per_adapter = d + r + r + d + r + d  # L, R of down and up (rank 1), then the biases
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == 4**3 + n_adapters * per_adapter

    randomise_phm(model)
    # The reference: the same placement written by hand, its weights built from leaf copies of the
    # PHM parameters (one copy of the shared rule), so their gradients can be compared.
    rule_copy = rule.detach().clone().requires_grad_(True)
    copies, params = [], []
    for layer in per_layer:
        c, ps = {}, {}
        for loc, a in layer.items():
            c[loc] = {n: getattr(a, n).detach().clone().requires_grad_(True) for n in PHM_NAMES}
            wd = phm_weight(rule_copy, c[loc]["down_left"], c[loc]["down_right"])
            wu = phm_weight(rule_copy, c[loc]["up_left"], c[loc]["up_right"])
            ps[loc] = (wd, c[loc]["down_bias"], wu, c[loc]["up_bias"])
        copies.append(c)
        params.append(ps)
    monkeypatch.setitem(placement.DEFAULTS, base_config, (F.gelu, 1.0, REDUCTION, locations))
    ref = placement.make_reference(arch, base_config, params, base)

    out = model(ids, labels=ids)
    expected = ref(ids, labels=ids)
    assert not torch.allclose(out.logits, base_logits, atol=1e-3)  # the adapters are live
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    expected.loss.backward()
    torch.testing.assert_close(rule.grad, rule_copy.grad, rtol=1e-4, atol=1e-5)
    for layer, c in zip(per_layer, copies, strict=True):
        for loc, a in layer.items():
            for n in PHM_NAMES:
                torch.testing.assert_close(getattr(a, n).grad, c[loc][n].grad, rtol=1e-4, atol=1e-5, msg=n)


def test_compacter_trains_only_phm_parameters_and_removes_cleanly():
    base = hf_models.llama()
    ids = hf_models.token_ids()
    base_logits = base(ids).logits.detach()
    base_sd = base.state_dict()
    model = apply_adapters(hf_models.llama(), "compacter", reduction_factor=REDUCTION)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".bottleneck_adapters." in n for n in changed)
    assert any(n.endswith("phm_rule.rule") for n in changed)  # the shared rule learns
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base_sd.items())

    remove_adapters(model)
    assert set(model.state_dict()) == set(base_sd)
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)


def test_compacter_options():
    model = apply_adapters(
        hf_models.llama(), "compacter++", reduction_factor=4, phm_dim=8, phm_rank=2, factorized_phm_rule=True
    )
    a = compacters(model)[0]["output_adapter"]
    assert (a.r, a.phm_dim, a.phm_rank) == (16, 8, 2) and a.phm_rule.factorized
    assert a.down_left.shape == (8, 8, 2) and a.phm_rule.left.shape == (8, 8, 1)
    own = apply_adapters(hf_models.llama(), "compacter", reduction_factor=REDUCTION, shared_phm_rule=False)
    rules = {id(a.phm_rule) for layer in compacters(own) for a in layer.values()}
    assert len(rules) == 4  # 2 layers x 2 locations, each with its own


def test_mam_defaults():
    model = apply_adapters(hf_models.llama(), "mam")
    prefix = model.peftops_prefix
    assert isinstance(prefix, PrefixKV) and (prefix.prefix_len, prefix.reparam_hidden) == (30, 800)
    for layer in compacters(model):
        assert sorted(layer) == ["output_adapter"]
        a = layer["output_adapter"]
        assert isinstance(a, BottleneckAdapter)
        assert (a.r, a.scale, a.activation, a.parallel) == (512, 4.0, "relu", True)
    remove_adapters(model)
    assert not hasattr(model, "peftops_prefix")


def test_mam_is_prefix_tuning_plus_parallel_adapter_trains_and_removes():
    ids = hf_models.token_ids()
    base = hf_models.llama()
    base_logits = base(ids).logits.detach()
    base_sd = base.state_dict()
    base_attn = base.config._attn_implementation
    model = apply_adapters(hf_models.llama(), "mam", reduction_factor=REDUCTION, prefix_length=5, prefix_hidden=16)
    # The two parts composed by hand, with the same weights.
    ref = apply_prefix_tuning(hf_models.llama(), 5, reparam_hidden=16)
    ref.peftops_prefix.load_state_dict(model.peftops_prefix.state_dict())
    # At init the adapter adds exactly nothing: the model is its prefix-tuned base.
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert not torch.allclose(model(ids).logits, base_logits, atol=1e-4)  # the prefix acts from the start

    ref = apply_adapters(ref, "par_bn", reduction_factor=REDUCTION)
    placement.randomise(model)
    for mine, theirs in zip(compacters(model), compacters(ref), strict=True):
        theirs["output_adapter"].load_state_dict(mine["output_adapter"].state_dict())
    torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("peftops_prefix.") or ".bottleneck_adapters." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("peftops_prefix.") for n in changed)
    assert any(".bottleneck_adapters." in n for n in changed)
    assert changed <= trainable

    remove_adapters(model)
    assert set(model.state_dict()) == set(base_sd)
    assert model.config._attn_implementation == base_attn
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)


def test_bad_options_are_named_before_anything_changes():
    model = hf_models.llama()
    keys = set(model.state_dict())
    with pytest.raises(
        ValueError, match=r"apply_adapters: reduction_factor: .*phm_dim=4, got 32 \(width 64 // 32 = 2\)"
    ):
        apply_adapters(model, "compacter")
    with pytest.raises(ValueError, match=r"apply_adapters: phm_dim: expected a divisor of the hidden size 64, got 3"):
        apply_adapters(model, "compacter", phm_dim=3)
    with pytest.raises(ValueError, match=r"apply_adapters: phm_dim: expected None for config 'mam'"):
        apply_adapters(model, "mam", phm_dim=4)
    with pytest.raises(ValueError, match=r"apply_adapters: prefix_length: expected None for config 'compacter'"):
        apply_adapters(model, "compacter", reduction_factor=REDUCTION, prefix_length=4)
    with pytest.raises(TypeError, match=r"apply_adapters: phm_rank: expected an int, got str"):
        apply_adapters(model, "compacter", reduction_factor=REDUCTION, phm_rank="1")
    with pytest.raises(TypeError, match=r"apply_adapters: shared_phm_rule: expected a bool, got int"):
        apply_adapters(model, "compacter", reduction_factor=REDUCTION, shared_phm_rule=1)
    with pytest.raises(ValueError, match=r"apply_adapters: prefix_length: expected an int >= 1, got 0"):
        apply_adapters(model, "mam", prefix_length=0)
    assert set(model.state_dict()) == keys and not hasattr(model, "peftops_prefix")
    assert all(p.requires_grad for p in model.parameters())
