"""IA3Linear and apply_ia3: init, merge/unmerge as peft's, Conv1D, surgery errors, peft's defaults."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peftops.nn import IA3Linear, apply_ia3, count_trainable, ia3_layers
from peftops.nn.ia3 import IA3_FEEDFORWARD_MODULES, IA3_TARGET_MODULES

peft = pytest.importorskip("peft", reason="the hf extra (peft) is part of the test extra")
from peft.tuners.ia3 import layer as peft_ia3  # noqa: E402


def _linear(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(9, 6, bias=bias)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_fresh_layer_is_its_base_and_vector_shaped_as_peft(is_feedforward):
    base = _linear()
    layer = IA3Linear.from_linear(base, is_feedforward=is_feedforward)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.ia3_l.shape == ((1, 9) if is_feedforward else (6, 1))
    x = torch.randn(4, 9)
    torch.testing.assert_close(layer(x), base(x))
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "ia3_l"]


def _peft_layer(base, is_feedforward, fan_in_fan_out=False):
    config = peft.IA3Config(target_modules=["x"], feedforward_modules=["x"] if is_feedforward else [])
    config.fan_in_fan_out = fan_in_fan_out
    return peft_ia3.Linear(base, "default", config, is_feedforward=is_feedforward)


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_forward_merge_unmerge_match_peft(is_feedforward):
    mine = IA3Linear.from_linear(_linear(), is_feedforward=is_feedforward)
    ref = _peft_layer(_linear(), is_feedforward)
    v = torch.rand(mine.ia3_l.shape) + 0.5
    mine.ia3_l.data.copy_(v)
    ref.ia3_l["default"].data.copy_(v)
    x = torch.randn(2, 3, 9)
    torch.testing.assert_close(mine(x), ref(x))
    mine.merge()
    ref.merge()
    torch.testing.assert_close(mine.weight, ref.base_layer.weight)
    torch.testing.assert_close(mine.bias, ref.base_layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), ref(x))
    mine.unmerge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that unmerging IA3 is inexact
        ref.unmerge()
    torch.testing.assert_close(mine.weight, ref.base_layer.weight)
    torch.testing.assert_close(mine.bias, ref.base_layer.bias)
    torch.testing.assert_close(mine.weight, _linear().weight, rtol=1e-6, atol=1e-6)


def test_merged_layer_refuses_to_train_and_double_merge():
    layer = IA3Linear.from_linear(_linear())
    layer.merge()
    with pytest.raises(RuntimeError, match="merged into the weight"):
        layer(torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("is_feedforward", [False, True])
def test_conv1d_matches_peft(is_feedforward):
    from transformers.pytorch_utils import Conv1D

    def conv():
        torch.manual_seed(1)
        c = Conv1D(6, 9)  # nf=out, nx=in: weight (9, 6)
        nn.init.normal_(c.bias)
        return c

    mine = IA3Linear.from_conv1d(conv(), is_feedforward=is_feedforward)
    ref = _peft_layer(conv(), is_feedforward, fan_in_fan_out=True)
    assert mine.ia3_l.shape == ref.ia3_l["default"].shape
    v = torch.rand(mine.ia3_l.shape) + 0.5
    mine.ia3_l.data.copy_(v)
    ref.ia3_l["default"].data.copy_(v)
    x = torch.randn(4, 9, requires_grad=True)
    y0, y1 = ref(x), mine(x)
    torch.testing.assert_close(y1, y0)
    (g0,) = torch.autograd.grad(y0.square().sum(), ref.ia3_l["default"])
    (g1,) = torch.autograd.grad(y1.square().sum(), mine.ia3_l)
    torch.testing.assert_close(g1, g0)
    mine.merge()
    ref.merge()
    torch.testing.assert_close(mine.weight, ref.base_layer.weight)
    assert isinstance(mine.unwrap(), Conv1D)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.k_proj = nn.Linear(8, 8)
        self.down_proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def test_apply_ia3_named_targets_feedforward_and_freezing():
    model = nn.Sequential(_Block(), _Block())
    apply_ia3(model, ["k_proj", "down_proj"], ["down_proj"])
    layers = ia3_layers(model)
    assert sorted(layers) == ["0.down_proj", "0.k_proj", "1.down_proj", "1.k_proj"]
    assert [n for n, layer in layers.items() if layer.is_feedforward] == ["0.down_proj", "1.down_proj"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"{n}.ia3_l" for n in layers]
    assert count_trainable(model).trainable == 4 * 8


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(target_modules=["norm"], feedforward_modules=[]),
            TypeError,
            r"target_modules: '0.norm' expected an nn.Linear .* got LayerNorm",
        ),
        (
            dict(target_modules=["nothing"], feedforward_modules=[]),
            ValueError,
            r"target_modules: expected names that match",
        ),
        (
            dict(target_modules=["k_proj"], feedforward_modules=["down_proj"]),
            ValueError,
            r"feedforward_modules: expected a subset",
        ),
        (dict(target_modules=["k_proj"]), ValueError, r"feedforward_modules: expected module names, or a model whose"),
        (dict(), ValueError, r"target_modules: expected module names, or a model whose config.model_type"),
        (
            dict(target_modules=3, feedforward_modules=[]),
            TypeError,
            r"target_modules: expected a regex str or a list of str",
        ),
    ],
)
def test_apply_ia3_errors_name_the_argument(kwargs, exc, match):
    model = nn.Sequential(_Block())
    with pytest.raises(exc, match="apply_ia3: " + match):
        apply_ia3(model, **kwargs)
    assert not ia3_layers(model)  # nothing swapped before the error


def test_defaults_are_peft_defaults():
    from peft.utils import constants

    assert IA3_TARGET_MODULES == constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING
    assert IA3_FEEDFORWARD_MODULES == constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING


def test_module_in_float16_runs_the_op():
    layer = IA3Linear(9, 6, is_feedforward=True, dtype=torch.float16)
    x = torch.randn(3, 9, dtype=torch.float16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
