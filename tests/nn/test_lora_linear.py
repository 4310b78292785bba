"""``peftops.nn.LoRALinear``: a drop-in ``nn.Linear`` with a LoRA adapter.

Every numeric check compares against an independent formulation written here,
``F.linear(x, W + scale * B @ A, b)`` in float64 (the merged-weight form, which shares no
code or evaluation order with the op's ``x W^T + s (x A^T) B^T``), through
:func:`peftops.testing.assert_close` and its per-dtype tolerance table.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from peftops.nn import LoRALinear
from peftops.testing import assert_close

# The ``device`` fixture is function-scoped but stateless, so hypothesis may reuse it.
HYP = settings(suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture])


# -- helpers ------------------------------------------------------------------------------


def make_layer(
    in_f,
    out_f,
    *,
    r=4,
    alpha=8.0,
    bias=True,
    dropout=0.0,
    use_rslora=False,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    random_b=True,
):
    """A LoRALinear whose B is random (a fresh B is zero, which would hide every bug in A)."""
    torch.manual_seed(seed)
    layer = LoRALinear(in_f, out_f, bias=bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, dtype=dtype)
    if random_b:
        with torch.no_grad():
            layer.lora_B.weight.copy_(torch.randn(out_f, r, dtype=dtype) / math.sqrt(r))
            if bias:
                layer.bias.copy_(torch.randn(out_f, dtype=dtype) * 0.1)
    return layer.to(device)


def formula(x, weight, bias, lora_a, lora_b, scale):
    """The merged-weight form of LoRA, in float64."""
    f64 = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    return F.linear(f64(x), f64(weight) + scale * (f64(lora_b) @ f64(lora_a)), f64(bias))


def formula_with_grads(layer, x, grad_out, scale):
    """Output and gradients (x, weight, bias, A, B) of :func:`formula` by float64 autograd."""
    leaves = [
        t.detach().to(torch.float64).requires_grad_() if t is not None else None
        for t in (x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight)
    ]
    y = formula(*leaves, scale)
    y.backward(grad_out.to(torch.float64))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def randn(*shape, dtype=torch.float32, device="cpu", seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, generator=gen, dtype=dtype).to(device)


# -- drop-in ------------------------------------------------------------------------------


def test_from_linear_shares_the_parameters_and_keeps_the_linear_interface(device):
    lin = nn.Linear(12, 7).to(device)
    layer = LoRALinear.from_linear(lin, r=3, alpha=6)
    assert layer.weight is lin.weight and layer.bias is lin.bias  # no copy
    assert (layer.in_features, layer.out_features) == (12, 7)
    assert layer.weight.shape == (7, 12) and layer.bias.shape == (7,)
    # Shared, so an in-place update of the original is seen by the wrapper.
    with torch.no_grad():
        lin.weight.add_(1.0)
    assert torch.equal(layer.weight, lin.weight)
    # Same forward signature as nn.Linear (the argument is called ``input``).
    x = randn(5, 12, device=device, seed=0)
    assert_close(layer(input=x), lin(input=x), name="fresh LoRALinear vs its base")


def test_from_linear_without_bias(device):
    lin = nn.Linear(6, 4, bias=False).to(device)
    layer = LoRALinear.from_linear(lin, r=2)
    assert layer.bias is None
    assert set(dict(layer.named_parameters())) == {"weight", "lora_A.weight", "lora_B.weight"}
    x = randn(3, 6, device=device, seed=0)
    assert_close(layer(x), lin(x))


@pytest.mark.parametrize("bias", [True, False])
def test_constructor_matches_nn_linear_layout(bias):
    layer = LoRALinear(10, 6, bias=bias, r=4, alpha=4, dtype=torch.float64)
    assert layer.weight.shape == (6, 10) and layer.weight.dtype == torch.float64
    assert (layer.bias is None) == (not bias)
    # Base init as nn.Linear: U(-1/sqrt(in), 1/sqrt(in)).
    assert layer.weight.abs().max() <= 1 / math.sqrt(10)


def test_parameter_names_and_shapes_follow_hf_peft():
    layer = LoRALinear.from_linear(nn.Linear(9, 5), r=3, alpha=6)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"weight": (5, 9), "bias": (5,), "lora_A.weight": (3, 9), "lora_B.weight": (5, 3)}


def test_init_is_hf_peft_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    in_f, r = 256, 16
    layer = LoRALinear.from_linear(nn.Linear(in_f, 8), r=r, alpha=32)
    a = layer.lora_A.weight.detach()
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in).
    bound = 1 / math.sqrt(in_f)
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.98 * bound  # 4096 uniform draws reach the edge
    # Uniform on [-bound, bound]: std bound/sqrt(3); 4096 samples put it within 5%.
    assert abs(a.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert abs(a.mean().item()) < 5 * bound / math.sqrt(3) / math.sqrt(a.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fresh_layer_equals_base_layer(device, dtype):
    lin = nn.Linear(17, 11, dtype=dtype).to(device)
    expected = lin(randn(4, 3, 17, dtype=dtype, device=device, seed=1))
    layer = LoRALinear.from_linear(lin, r=5, alpha=10)
    assert_close(layer(randn(4, 3, 17, dtype=dtype, device=device, seed=1)), expected)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("r,alpha", [(1, 1.0), (4, 16.0), (16, 8.0)])
def test_scaling(r, alpha, use_rslora):
    layer = LoRALinear.from_linear(nn.Linear(8, 8), r=r, alpha=alpha, use_rslora=use_rslora)
    expected = alpha / math.sqrt(r) if use_rslora else alpha / r
    assert layer.scaling == pytest.approx(expected, rel=1e-15)


# -- values and gradients against the independent formula ----------------------------


@HYP
@given(
    lead=st.lists(st.integers(0, 5), max_size=2),
    in_f=st.integers(1, 40),
    out_f=st.integers(1, 40),
    r=st.integers(1, 8),
    alpha=st.floats(0.25, 32.0),
    bias=st.booleans(),
    use_rslora=st.booleans(),
    train_base=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_forward_and_backward_match_merged_formula(
    device, lead, in_f, out_f, r, alpha, bias, use_rslora, train_base, dtype, seed
):
    layer = make_layer(
        in_f, out_f, r=r, alpha=alpha, bias=bias, use_rslora=use_rslora, dtype=dtype, device=device, seed=seed
    )
    layer.weight.requires_grad_(train_base)
    if bias:
        layer.bias.requires_grad_(train_base)
    scale = alpha / math.sqrt(r) if use_rslora else alpha / r  # computed here, not read from the layer
    x = randn(*lead, in_f, dtype=dtype, device=device, seed=seed + 1).requires_grad_()
    y = layer(x)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    g = randn(*lead, out_f, dtype=dtype, device=device, seed=seed + 2)
    y.backward(g)

    y_ref, (dx, dw, db, da, dB) = formula_with_grads(layer, x, g, scale)
    assert_close(y, y_ref, dtype=dtype, name="y")
    assert_close(x.grad, dx, dtype=dtype, kind="bwd", name="dx")
    assert_close(layer.lora_A.weight.grad, da, dtype=dtype, kind="bwd", name="dA")
    assert_close(layer.lora_B.weight.grad, dB, dtype=dtype, kind="bwd", name="dB")
    if train_base:
        assert_close(layer.weight.grad, dw, dtype=dtype, kind="bwd", name="dW")
        if bias:
            assert_close(layer.bias.grad, db, dtype=dtype, kind="bwd", name="db")
    else:
        assert layer.weight.grad is None
        assert not bias or layer.bias.grad is None


def test_non_contiguous_input_and_sum_backward(device):
    """A transposed input, and ``y.sum().backward()`` (an expanded, stride-0 gradient)."""
    layer = make_layer(16, 12, r=4, dtype=torch.float64, device=device)
    x = randn(16, 6, dtype=torch.float64, device=device, seed=3).t().requires_grad_()
    assert not x.is_contiguous()
    y = layer(x)
    y.sum().backward()
    y_ref, (dx, _, _, da, dB) = formula_with_grads(layer, x, torch.ones_like(y), layer.scaling)
    assert_close(y, y_ref)
    assert_close(x.grad, dx, kind="bwd", name="dx")
    assert_close(layer.lora_A.weight.grad, da, kind="bwd", name="dA")
    assert_close(layer.lora_B.weight.grad, dB, kind="bwd", name="dB")


# -- training: gradients reach the adapter, not the frozen base ---------------------------


def test_gradients_reach_lora_a_and_b_and_training_moves_them(device):
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(10, 6), r=4, alpha=8).to(device)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    a0, bb0 = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)  # frozen parameters included on purpose
    x = randn(32, 10, device=device, seed=1)
    target = randn(32, 6, device=device, seed=2)
    losses = []
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        losses.append(loss.item())
        ga, gb = layer.lora_A.weight.grad, layer.lora_B.weight.grad
        assert ga is not None and gb is not None, f"step {step}: an adapter gradient is None"
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
        assert torch.count_nonzero(gb) == gb.numel(), f"step {step}: dB has zeros"
        if step == 0:
            assert torch.count_nonzero(ga) == 0  # B = 0 at init, so dA = s * (g B)^T x = 0
        else:
            assert torch.count_nonzero(ga) == ga.numel(), f"step {step}: dA has zeros once B is non-zero"
        assert layer.weight.grad is None and layer.bias.grad is None
        opt.step()
    assert losses[-1] < losses[0]
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)
    assert not torch.equal(layer.lora_A.weight, a0) and not torch.equal(layer.lora_B.weight, bb0)


def test_frozen_base_gets_no_gradient_but_input_does(device):
    layer = make_layer(8, 5, r=2, dtype=torch.float64, device=device)
    layer.weight.requires_grad_(False)
    x = randn(4, 8, dtype=torch.float64, device=device, seed=1).requires_grad_()
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert layer.bias.grad is not None  # the bias was left trainable
    assert_close(layer.bias.grad, torch.full((5,), 4.0, dtype=torch.float64, device=device), kind="bwd")
    assert x.grad is not None


# -- merge / unmerge ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_merge_and_unmerge(device, dtype):
    layer = make_layer(24, 20, r=6, alpha=12, dtype=dtype, device=device, seed=3).eval()
    x = randn(7, 24, dtype=dtype, device=device, seed=4)
    w0 = layer.weight.detach().clone()
    delta = layer.scaling * (layer.lora_B.weight.double() @ layer.lora_A.weight.double())
    y0 = layer(x)

    layer.merge()
    assert layer.merged
    # One rounding of W + s B A to the weight's dtype.
    assert_close(layer.weight, w0.double() + delta, dtype=dtype, name="merged weight")
    assert_close(layer(x), y0, dtype=dtype, name="merged output")
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()

    layer.unmerge()
    assert not layer.merged
    # Back to W up to two roundings: |W' - W| <= eps * (|W + d| + |W|) element-wise.
    eps = torch.finfo(dtype).eps
    bound = eps * ((w0.double() + delta).abs() + w0.double().abs())
    err = (layer.weight.double() - w0.double()).abs()
    assert (err <= bound).all(), f"unmerge drifted by {err.max().item():.3g} (bound {bound.max().item():.3g})"
    assert_close(layer(x), y0, dtype=dtype, name="output after unmerge")
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_merged_layer_is_differentiable_in_its_input(device):
    layer = make_layer(6, 4, r=2, dtype=torch.float64, device=device)
    x = randn(3, 6, dtype=torch.float64, device=device, seed=0).requires_grad_()
    layer.merge()
    layer.eval()  # a merged adapter cannot train: see test_training_a_merged_layer_is_an_error
    layer(x).sum().backward()
    _, (dx, *_) = formula_with_grads(layer, x, torch.ones(3, 4, dtype=torch.float64, device=device), 0.0)
    # Merged: the weight already holds W + sBA, so the reference uses scale 0 on top of it.
    assert_close(x.grad, dx, kind="bwd")


def test_training_a_merged_layer_is_an_error():
    """A merged adapter would silently get no gradient; say so instead."""
    layer = make_layer(6, 4, r=2)
    layer.merge()
    x = randn(3, 6, seed=0)
    with pytest.raises(RuntimeError, match=r"merged into the weight and would get no gradient; call unmerge\(\)"):
        layer(x)
    with torch.no_grad():
        layer(x)
    layer.lora_A.weight.requires_grad_(False)
    layer.lora_B.weight.requires_grad_(False)
    layer(x)  # a frozen adapter loses nothing


# -- dropout ------------------------------------------------------------------------------


def identity_adapter(n, p, *, alpha, device, dtype=torch.float64, seed=0):
    """A = B = I (r = n), random W and b: the low-rank path is ``s * dropout(x)``, so the
    dropout mask can be read off the output."""
    layer = make_layer(n, n, r=n, alpha=alpha, dropout=p, dtype=dtype, device=device, seed=seed)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(n, dtype=dtype))
        layer.lora_B.weight.copy_(torch.eye(n, dtype=dtype))
    return layer


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_on_the_low_rank_path_only_with_one_mask_for_forward_and_backward(device, p):
    n, alpha = 32, 16.0
    layer = identity_adapter(n, p, alpha=alpha, device=device)
    s = alpha / n
    x = randn(256, n, dtype=torch.float64, device=device, seed=5).requires_grad_()
    torch.manual_seed(7)
    y = layer(x)
    base = F.linear(x.detach(), layer.weight.detach(), layer.bias.detach())
    # y - base = s * x * m / (1 - p) with m a 0/1 mask: read m off (each entry is either
    # ~0 or ~s|x|/(1-p)), then check that the whole output is exactly that.
    lowrank = (y.detach() - base).abs()
    mask = (lowrank > 0.5 * s * x.detach().abs() / (1 - p)).to(torch.float64)
    assert_close(y, base + s * x.detach() * mask / (1 - p), name="y = xW^T + b + s * x * m / (1 - p)")
    dropped = 1 - mask.mean().item()
    sd = math.sqrt(p * (1 - p) / mask.numel())
    assert abs(dropped - p) < 5 * sd, f"dropped fraction {dropped:.4f}, expected {p} +- {5 * sd:.4f}"
    # The backward applies the same mask: compare all gradients with the formula on x * m / (1 - p).
    g = randn(256, n, dtype=torch.float64, device=device, seed=6)
    y.backward(g)
    xd = (x.detach() * mask / (1 - p)).requires_grad_()
    a = layer.lora_A.weight.detach().clone().requires_grad_()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    ref = F.linear(x.detach(), layer.weight.detach(), layer.bias.detach()) + s * F.linear(F.linear(xd, a), b)
    ref.backward(g)
    assert_close(y, ref, name="y with dropout")
    assert_close(x.grad, g @ layer.weight.detach() + xd.grad * mask / (1 - p), kind="bwd", name="dx")
    assert_close(layer.lora_A.weight.grad, a.grad, kind="bwd", name="dA")
    assert_close(layer.lora_B.weight.grad, b.grad, kind="bwd", name="dB")


def test_dropout_same_seed_same_output_other_seed_other_output(device):
    layer = make_layer(16, 8, r=4, dropout=0.3, device=device)
    x = randn(64, 16, device=device, seed=1)
    torch.manual_seed(123)
    y1 = layer(x)
    torch.manual_seed(123)
    y2 = layer(x)
    torch.manual_seed(124)
    y3 = layer(x)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_dropout_is_off_in_eval_mode(device):
    layer = make_layer(16, 8, r=4, dropout=0.5, dtype=torch.float64, device=device)
    x = randn(64, 16, dtype=torch.float64, device=device, seed=1)
    layer.eval()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert torch.equal(y1, y2)
    assert_close(y1, formula(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling))
    layer.train()
    assert not torch.equal(layer(x), y1)


# -- autocast -----------------------------------------------------------------------------


@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_bf16_with_float32_parameters(device, backward_inside):
    """Float32 parameters, float32 input, run inside bfloat16 autocast: forward and backward
    run (the bug class behind PEFT/Unsloth's mixed-dtype LoRA failures), the output is
    bfloat16, the gradients come back in each parameter's float32, and they match the
    formula evaluated on the bfloat16-rounded operands."""
    layer = make_layer(48, 40, r=8, alpha=16, device=device, seed=2)
    layer.weight.requires_grad_(False)
    x = randn(6, 48, device=device, seed=3).requires_grad_()
    g = randn(6, 40, device=device, seed=4)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16
        if backward_inside:
            y.backward(g.to(torch.bfloat16))
    if not backward_inside:
        y.backward(g.to(torch.bfloat16))
    for name, t in (("x", x), ("lora_A", layer.lora_A.weight), ("lora_B", layer.lora_B.weight), ("bias", layer.bias)):
        assert t.grad is not None, f"{name}: gradient is None under autocast"
        assert t.grad.dtype == torch.float32, f"{name}: gradient dtype {t.grad.dtype}"
        assert torch.isfinite(t.grad).all()
    assert layer.weight.grad is None

    bf = lambda t: t.detach().to(torch.bfloat16)  # noqa: E731
    leaves = [bf(t).to(torch.float64).requires_grad_() for t in (x, layer.lora_A.weight, layer.lora_B.weight)]
    ref = formula(leaves[0], bf(layer.weight), bf(layer.bias), leaves[1], leaves[2], layer.scaling)
    ref.backward(bf(g).to(torch.float64))
    assert_close(y, ref, dtype=torch.bfloat16, name="y")
    for name, t, r in zip(("dx", "dA", "dB"), (x, layer.lora_A.weight, layer.lora_B.weight), leaves, strict=False):
        assert_close(t.grad, r.grad, dtype=torch.bfloat16, kind="bwd", name=name)


def test_autocast_training_step_and_merged_forward(device):
    layer = make_layer(16, 16, r=4, device=device)
    layer.weight.requires_grad_(False)
    opt = torch.optim.SGD([layer.lora_A.weight, layer.lora_B.weight], lr=0.1)
    a0 = layer.lora_A.weight.detach().clone()
    x = randn(8, 16, device=device, seed=1)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = layer(x).float().pow(2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(layer.lora_A.weight, a0)
    assert layer.lora_A.weight.dtype == torch.float32
    layer.merge()
    layer.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


# -- torch.compile ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_compile_fullgraph_matches_eager(device, backend, bias):
    torch._dynamo.reset()
    layer = make_layer(20, 12, r=4, bias=bias, device=device, seed=1)
    layer.weight.requires_grad_(False)
    x = randn(2, 5, 20, device=device, seed=2)
    g = randn(2, 5, 12, device=device, seed=3)

    def run(fn):
        layer.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_()
        y = fn(xx)
        y.backward(g)
        grads = [xx.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad] + ([layer.bias.grad] if bias else [])
        return y.detach(), [t.clone() for t in grads]

    y_eager, g_eager = run(layer)
    y_comp, g_comp = run(torch.compile(layer, fullgraph=True, backend=backend))
    assert_close(y_comp, y_eager, name="compiled y")
    for name, a, b in zip(("dx", "dA", "dB", "db"), g_comp, g_eager, strict=False):
        assert_close(a, b, kind="bwd", name=f"compiled {name}")
    assert layer.weight.grad is None


def test_torch_compile_fullgraph_with_dropout_follows_the_seed(device):
    """Under ``aot_eager`` the seed is drawn by eager torch RNG, so compiled and eager agree."""
    torch._dynamo.reset()
    layer = make_layer(16, 8, r=4, dropout=0.25, device=device, seed=1)
    x = randn(32, 16, device=device, seed=2)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    y_comp = compiled(x)
    torch.manual_seed(5)
    y_eager = layer(x)
    assert_close(y_comp, y_eager)
    layer.eval()
    assert_close(
        compiled(x),
        formula(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling),
        dtype=torch.float32,
    )


# -- state dict, dtype, odd shapes ---------------------------------------------------------


def test_state_dict_round_trip_and_loading_an_nn_linear_state_dict():
    src = make_layer(9, 7, r=3, alpha=6, seed=1)
    sd = src.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    dst = LoRALinear(9, 7, r=3, alpha=6)
    dst.load_state_dict(torch.load(buf))
    x = randn(4, 9, seed=2)
    assert torch.equal(dst(x), src(x))

    # An original nn.Linear checkpoint loads with strict=False; only the LoRA keys are missing.
    lin = nn.Linear(9, 7)
    fresh = LoRALinear(9, 7, r=3, alpha=6)
    result = fresh.load_state_dict(lin.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["lora_A.weight", "lora_B.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(fresh.weight, lin.weight) and torch.equal(fresh.bias, lin.bias)
    assert_close(fresh(x), lin(x))


def test_state_dict_round_trip_of_a_merged_layer():
    """Saving a merged layer and loading it into a new LoRALinear must give the same function
    (not W + 2 s B A: the checkpoint's weight already holds the update)."""
    src = make_layer(9, 7, r=3, alpha=6, dtype=torch.float64, seed=1)
    x = randn(4, 9, dtype=torch.float64, seed=2)
    expected = src(x)
    src.merge()
    dst = LoRALinear(9, 7, r=3, alpha=6, dtype=torch.float64)
    dst.load_state_dict(src.state_dict())
    assert_close(dst(x), expected, name="merged checkpoint reloaded")
    # ... and into a merged layer, which re-merges what it loaded.
    other = make_layer(9, 7, r=3, alpha=6, dtype=torch.float64, seed=5).eval()
    other.merge()
    other.load_state_dict(src.state_dict())
    assert other.merged
    assert_close(other(x), expected, name="merged checkpoint into a merged layer")


# Loading into a merged layer: whatever the state dict holds, the layer afterwards holds the
# base weight (loaded or kept) plus s B A (loaded or kept), and unmerge() gives that base back.


def merged_pair(seed=1):
    """A merged float64 layer, its base weight before merging, and another adapter's state dict."""
    layer = make_layer(9, 7, r=3, alpha=6, dtype=torch.float64, seed=seed)
    base = layer.weight.detach().clone()
    other = make_layer(9, 7, r=3, alpha=6, dtype=torch.float64, seed=seed + 10)
    layer.merge()
    return layer, base, other


def adapter_only(layer):
    return {k: v for k, v in layer.state_dict().items() if k.startswith("lora_")}


def assert_holds(layer, base, lora_a, lora_b, what):
    expected = base.double() + layer.scaling * (lora_b.double() @ lora_a.double())
    assert layer.merged
    assert_close(layer.weight, expected, dtype=torch.float64, name=f"{what}: merged weight")
    layer.unmerge()
    assert_close(layer.weight, base, dtype=torch.float64, name=f"{what}: base weight after unmerge")


def test_loading_an_adapter_into_a_merged_layer_merges_it_once():
    # The usual adapter checkpoint: A and B only, loaded with strict=False.
    layer, base, other = merged_pair()
    result = layer.load_state_dict(adapter_only(other), strict=False)
    assert sorted(result.missing_keys) == ["bias", "weight"]
    assert_holds(layer, base, other.lora_A.weight, other.lora_B.weight, "another adapter")
    # Reloading the layer's own adapter changes nothing.
    layer, base, _ = merged_pair()
    a, b = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    layer.load_state_dict(adapter_only(layer), strict=False)
    assert_holds(layer, base, a, b, "its own adapter")


def test_loading_a_full_state_dict_into_a_merged_layer():
    layer, _, other = merged_pair()
    layer.load_state_dict(other.state_dict())
    assert_holds(layer, other.weight, other.lora_A.weight, other.lora_B.weight, "full state dict")
    # A merged checkpoint holds the unmerged weight, so it loads the same.
    layer, _, other = merged_pair()
    other_base = other.weight.detach().clone()
    other.merge()
    layer.load_state_dict(other.state_dict())
    assert_holds(layer, other_base, other.lora_A.weight, other.lora_B.weight, "merged checkpoint")


def test_a_strict_load_that_raises_leaves_the_merged_layer_consistent():
    # The hooks run before load_state_dict raises: what was copied stays, merged once.
    layer, base, other = merged_pair()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*weight"):
        layer.load_state_dict(adapter_only(other))
    assert_holds(layer, base, other.lora_A.weight, other.lora_B.weight, "adapter-only, strict")
    layer, base, other = merged_pair()
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*junk"):
        layer.load_state_dict({**adapter_only(other), "weight": base, "bias": other.bias, "junk": torch.zeros(1)})
    assert_holds(layer, base, other.lora_A.weight, other.lora_B.weight, "unexpected key")
    # A shape mismatch: weight and B load, A is kept.
    layer, base, other = merged_pair()
    a = layer.lora_A.weight.detach().clone()
    new_base = other.weight.detach().clone()
    sd = {**other.state_dict(), "lora_A.weight": torch.zeros(2, 9, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=r"size mismatch for lora_A.weight"):
        layer.load_state_dict(sd)
    assert_holds(layer, new_base, a, other.lora_B.weight, "size mismatch")


def test_loading_into_a_merged_layer_keeps_the_wrapped_linear_intact():
    """``from_linear`` shares the Parameter: the original layer must get its base weight back."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16, dtype=torch.float64)
    base = lin.weight.detach().clone()
    layer = LoRALinear.from_linear(lin, r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    sd = adapter_only(layer)
    layer.merge()
    for _ in range(3):
        layer.load_state_dict(sd, strict=False)
    layer.unmerge()
    assert_close(lin.weight, base, dtype=torch.float64, name="wrapped nn.Linear weight")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_to_dtype(device, dtype):
    layer = make_layer(12, 10, r=4, device=device, seed=1).to(dtype)
    assert all(p.dtype == dtype for p in layer.parameters())
    x = randn(5, 12, device=device, seed=2).to(dtype).requires_grad_()
    y = layer(x)
    assert y.dtype == dtype
    y.sum().backward()
    assert layer.lora_A.weight.grad.dtype == dtype and x.grad.dtype == dtype
    assert_close(
        y, formula(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling), dtype=dtype
    )


@pytest.mark.parametrize("shape", [(0, 10), (3, 0, 10), (0, 0, 10)])
def test_zero_size_batch(device, shape):
    layer = make_layer(10, 6, r=3, device=device)
    x = torch.zeros(shape, device=device, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 6)
    y.sum().backward()
    assert x.grad.shape == shape
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: gradient is None for an empty batch"
        assert p.grad.shape == p.shape and torch.count_nonzero(p.grad) == 0, name


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"r": 0}, ValueError, r"\br: expected an int >= 1"),
        ({"r": -2}, ValueError, r"\br: expected an int >= 1"),
        ({"r": 2.0}, TypeError, r"\br: expected an int"),
        ({"r": True}, TypeError, r"\br: expected an int"),
        ({"alpha": float("nan")}, ValueError, r"alpha: expected a finite"),
        ({"alpha": "16"}, TypeError, r"alpha: expected a real"),
        ({"dropout": 1.0}, ValueError, r"dropout: expected a value in \[0, 1\)"),
        ({"dropout": -0.1}, ValueError, r"dropout: expected a value in \[0, 1\)"),
        ({"dropout": None}, TypeError, r"dropout: expected a real"),
        # A string from a config file must not silently turn rsLoRA on (bool("False") is True).
        ({"use_rslora": "False"}, TypeError, r"use_rslora"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        LoRALinear(8, 4, **kwargs)
    with pytest.raises(exc, match=match):
        LoRALinear.from_linear(nn.Linear(8, 4), **kwargs)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("in_f, out_f, name", [(0, 4, "in_features"), (4, 0, "out_features"), (0, 0, "in_features")])
def test_zero_features_are_rejected(in_f, out_f, name):
    with pytest.raises(ValueError, match=rf"LoRALinear: {name}: expected an int >= 1, got 0"):
        LoRALinear(in_f, out_f)
    with pytest.raises(ValueError, match=rf"LoRALinear.from_linear: linear: expected {name} >= 1, got 0"):
        LoRALinear.from_linear(nn.Linear(in_f, out_f))


def test_from_linear_rejects_non_linear():
    with pytest.raises(TypeError, match=r"linear: expected an nn.Linear, got Conv1d"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match=r"linear: expected an nn.Linear, got LoRALinear"):
        LoRALinear.from_linear(LoRALinear(4, 4))


def test_bad_forward_inputs():
    layer = LoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"weight: expected shape \(\*, 7\).*from x"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match=r"x: expected a floating-point tensor"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x: expected a torch.Tensor, got list"):
        layer([[0.0] * 8])
    with pytest.raises(TypeError, match=r"weight: expected dtype torch.float64"):
        layer(torch.randn(3, 8, dtype=torch.float64))
