"""The Triton bottleneck-adapter kernels (peftops.kernels.bottleneck_adapter): what the generic op tests
in tests/ops/test_bottleneck_adapter.py do not reach. CPU runs use TRITON_INTERPRET=1."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import peftops
from peftops import reference
from peftops.kernels import bottleneck_adapter as adapter
from peftops.kernels import lowrank
from peftops.testing import assert_close, check_fa_rule

from ..ops.helpers import assert_matches, check_graph_replay, grads_of
from ..ops.test_bottleneck_adapter import eager_truth
from ..ops.test_lora_linear import GradReads
from ..strategies import AdapterCase


def triton_call(case: AdapterCase):
    def fn(x, down_weight, down_bias, up_weight, up_bias, residual):
        with peftops.use_backend("triton"):
            return peftops.bottleneck_adapter(
                x,
                down_weight,
                down_bias,
                up_weight,
                up_bias,
                activation=case.activation,
                scale=case.scale,
                residual=residual,
            )

    return fn


@pytest.mark.parametrize("rank", [1, 100, 256])
@pytest.mark.parametrize("parallel", [False, True])
def test_ranks_up_to_256(rank, parallel):
    """The whole rank sits in one register tile; large ranks shrink the row block."""
    case = AdapterCase(
        lead=(3, 13),
        d=70,
        rank=rank,
        activation="silu",
        parallel=parallel,
        down_bias=True,
        up_bias=True,
        scale=0.5,
        layout="sliced",
        seed=rank,
    )
    assert_matches(
        triton_call(case), eager_truth(case), case.inputs(torch.float32, "cpu"), torch.float32, what=f"r={rank}"
    )


def test_wide_feature_dim():
    case = AdapterCase(
        lead=(5,),
        d=4099,
        rank=16,
        activation="gelu",
        parallel=False,
        down_bias=True,
        up_bias=False,
        scale=1.0,
        layout="contiguous",
        seed=1,
    )
    assert_matches(
        triton_call(case), eager_truth(case), case.inputs(torch.float16, "cpu"), torch.float16, what="d=4099"
    )


def test_saved_pre_activation_is_the_spec():
    case = AdapterCase(
        lead=(9,),
        d=33,
        rank=6,
        activation="relu",
        parallel=True,
        down_bias=True,
        up_bias=True,
        scale=2.0,
        layout="transposed",
        seed=2,
    )
    t = case.inputs(torch.float16, "cpu", requires_grad=False)
    args = (t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["residual"], "relu", 2.0)
    y, hidden = torch.ops.peftops.bottleneck_adapter(*args, "triton")
    assert hidden.dtype == torch.float32 and hidden.shape == (9, 6)
    assert_close(hidden, reference.adapter_hidden(t["x"], t["down_weight"], t["down_bias"]), dtype=torch.float16)


def test_strided_biases():
    case = AdapterCase(
        lead=(11,),
        d=20,
        rank=6,
        activation="gelu",
        parallel=False,
        down_bias=False,
        up_bias=False,
        scale=0.5,
        layout="sliced",
        seed=5,
    )
    t = case.inputs(torch.float32, "cpu")
    t["down_bias"] = torch.randn(12)[::2].detach().requires_grad_(True)
    t["up_bias"] = torch.randn(40)[::2].detach().requires_grad_(True)
    assert_matches(triton_call(case), eager_truth(case), t, torch.float32, what="strided biases")


def test_rank_above_256_is_refused_by_name():
    case = AdapterCase(
        lead=(2,),
        d=8,
        rank=257,
        activation="relu",
        parallel=False,
        down_bias=False,
        up_bias=False,
        scale=1.0,
        layout="contiguous",
        seed=3,
    )
    with pytest.raises(peftops.BackendUnavailableError, match="ranks up to 256, got 257"):
        triton_call(case)(**case.inputs(torch.float32, "cpu"))


def test_forward_and_backward_are_bitwise_deterministic():
    case = AdapterCase(
        lead=(300,),
        d=48,
        rank=16,
        activation="gelu_tanh",
        parallel=True,
        down_bias=True,
        up_bias=True,
        scale=0.5,
        layout="contiguous",
        seed=4,
    )
    (y0, g0), (y1, g1) = (grads_of(triton_call(case), case.inputs(torch.float32, "cpu")) for _ in range(2))
    assert torch.equal(y0, y1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


# -- GPU ---------------------------------------------------------------------------------------


def _real(tokens, d, rank, dtype, parallel=False, seed=0):
    case = AdapterCase(
        lead=(tokens,),
        d=d,
        rank=rank,
        activation="gelu",
        parallel=parallel,
        down_bias=True,
        up_bias=True,
        scale=1.0,
        layout="contiguous",
        seed=seed,
    )
    return case, case.inputs(dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "tokens,d,rank,parallel", [(16384, 4096, 64, False), (16384, 4096, 16, True), (4096, 1024, 64, False)]
)
def test_gpu_real_shapes_fa_error_rule(dtype, tokens, d, rank, parallel):
    case, t = _real(tokens, d, rank, dtype, parallel)
    out, grads = grads_of(triton_call(case), t)
    f32 = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t.items()}
    ref_out, ref_grads = grads_of(eager_truth(case), f32)
    low = {k: (v.detach().requires_grad_() if v is not None else None) for k, v in t.items()}
    low_out, low_grads = grads_of(eager_truth(case), low)
    for name, got, ref, lp in [("y", out, ref_out, low_out)] + [
        (n, grads[n], ref_grads[n], low_grads[n]) for n in grads
    ]:
        ok, err, budget = check_fa_rule(got, ref, lp)
        assert ok, f"{name}: error {err:.3g} above the FA budget {budget:.3g}"


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_cuda_graph():
    from torch.library import opcheck

    case, t = _real(512, 1024, 64, torch.bfloat16, parallel=True, seed=1)
    opcheck(
        torch.ops.peftops.bottleneck_adapter.default,
        (t["x"], t["down_weight"], t["down_bias"], t["up_weight"], t["up_bias"], t["residual"], "gelu", 1.0, "triton"),
    )
    eager_out, eager_grads = grads_of(triton_call(case), t)
    comp_out, comp_grads = grads_of(torch.compile(triton_call(case), fullgraph=True), t)
    assert torch.equal(eager_out, comp_out)
    for name in eager_grads:
        assert torch.equal(eager_grads[name], comp_grads[name]), name
    _, fresh = _real(512, 1024, 64, torch.bfloat16, parallel=True, seed=2)
    check_graph_replay(triton_call(case), t, fresh)


@pytest.mark.gpu
def test_gpu_activation_past_two_to_the_31_elements():
    tokens, d = (2**31) // 1024 + 3, 1024
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    wd = torch.randn(16, d, device="cuda", dtype=torch.bfloat16) / 32
    wu = torch.randn(d, 16, device="cuda", dtype=torch.bfloat16) / 4
    with peftops.use_backend("triton"):
        y = peftops.bottleneck_adapter(x, wd, None, wu, None)
    tail = x[-5:].float()
    want = tail + F.linear(F.gelu(F.linear(tail, wd.float())), wu.float())
    assert_close(y[-5:], want, dtype=torch.bfloat16)


# -- NaN through relu, fp16 range, r = 0 ------------------------------------------------------


def _adapter_args(x, wd, wu, activation):
    return (x, wd, None, wu, None, None, activation, 1.0)


def test_relu_keeps_nan_like_torch():
    """tl.maximum(NaN, 0) is 0; torch.relu(NaN) is NaN, and the backward (computed with torch)
    says NaN: the forward must agree (issue 11, defect 3)."""
    x = torch.randn(5, 16)
    wd, wu = torch.randn(4, 16), torch.randn(16, 4)
    wd[1, 3] = float("nan")  # hidden column 1 is NaN for every token
    with torch.no_grad():
        y, hidden = torch.ops.peftops.bottleneck_adapter(*_adapter_args(x, wd, wu, "relu"), "triton")
    want = x + F.linear(torch.relu(F.linear(x, wd)), wu)
    assert torch.isnan(hidden[:, 1]).all()
    assert torch.isnan(y).all() and torch.isnan(want).all()


def test_fp16_hidden_activation_beyond_fp16_range():
    """act(h) above 65504 with y finite (issue 11, defect 8): forward and every gradient stay
    finite and match the float32 spec."""
    x = torch.full((6, 32), 60.0, dtype=torch.float16)
    x[:, ::3] = 45.0
    wd = torch.full((3, 32), 40.0, dtype=torch.float16)  # h ~ 32 * 55 * 40 = 70400
    wu = torch.full((32, 3), 1e-3, dtype=torch.float16)
    case = AdapterCase(
        lead=(6,),
        d=32,
        rank=3,
        activation="relu",
        parallel=False,
        down_bias=False,
        up_bias=False,
        scale=1.0,
        layout="contiguous",
        seed=0,
    )
    t = {"x": x, "down_weight": wd, "down_bias": None, "up_weight": wu, "up_bias": None, "residual": None}
    t = {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}
    y, grads = grads_of(triton_call(case), t)
    ref = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t.items()}
    want, want_grads = grads_of(eager_truth(case), ref)
    assert torch.isfinite(y).all()
    assert_close(y, want, dtype=torch.float16, name="y")
    for name in ("x", "down_weight"):
        assert torch.isfinite(grads[name]).all(), name
        assert_close(grads[name], want_grads[name], dtype=torch.float16, kind="bwd", name=name)


def test_rank_zero_forward_and_backward():
    from peftops.kernels import bottleneck_adapter as kernels

    x, g = torch.randn(5, 8), torch.randn(5, 8)
    wd, wu = torch.randn(0, 8), torch.randn(8, 0)
    y, hidden = kernels.forward(x, wd, None, wu, None, None, "gelu", 1.0)
    torch.testing.assert_close(y, x)
    dx, dwd, dbd, dwu, dbu = kernels.backward(g, x, wd, None, wu, hidden, "gelu", 1.0, True, [True] * 5)
    torch.testing.assert_close(dx, g)
    assert dwd.shape == (0, 8) and dwu.shape == (8, 0) and dbd.shape == (0,)


# -- the bias gradients share the token reductions (issue 13, BitFit) ------------------------

#: Inputs trained beside the biases: dbu rides on dWu's reduction, else on the pass computing
#: da; dbd on dWd's reduction, else on a sum of the (T x r) dh.
TRAINED_WITH_BIASES = [
    ("x", "down_weight", "up_weight"),
    ("up_weight",),
    ("down_weight",),
    ("x",),
    (),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("trained", TRAINED_WITH_BIASES, ids=lambda t: "+".join(t) or "biases-only")
def test_bias_gradients_beside_every_mask_of_trained_inputs(dtype, trained):
    """Every gradient against the eager adapter in float64 with both biases trained beside each
    mask, over odd sizes and several row blocks."""
    case = AdapterCase(
        lead=(2, 41),
        d=37,
        rank=5,
        activation="gelu",
        parallel=False,
        down_bias=True,
        up_bias=True,
        scale=0.75,
        layout="sliced",
        seed=23,
    )
    inputs = {
        k: v if v is None or k.endswith("bias") or k in trained else v.detach()
        for k, v in case.inputs(dtype, "cpu").items()
    }
    assert_matches(triton_call(case), eager_truth(case), inputs, dtype, what=f"trained {trained}")


@pytest.mark.parametrize("with_bd", [False, True])
@pytest.mark.parametrize("trained", TRAINED_WITH_BIASES, ids=lambda t: "+".join(t) or "biases-only")
def test_up_bias_gradient_makes_no_pass_of_its_own_over_g(trained, with_bd):
    """The backward's passes over g (kernel launches and torch calls) are the same with bu
    trained as without: dbu comes from dWu's reduction or the pass computing da (which dx, dWd
    and dbd need). Where nothing else reads g, its sum is the one pass there is."""
    d, rank, scale = 21, 4, 0.5
    gen = torch.Generator().manual_seed(24)
    x, g = torch.randn(70, d, generator=gen), torch.randn(70, d, generator=gen)
    wd, bd = torch.randn(rank, d, generator=gen) / 4, torch.randn(rank, generator=gen)
    wu, bu = torch.randn(d, rank, generator=gen) / 2, torch.randn(d, generator=gen)
    _, hidden = adapter.forward(x, wd, bd, wu, bu, None, "silu", scale)
    launches = [(lowrank, "_down_kernel"), (lowrank, "_tn_kernel"), (adapter, "_expand_kernel")]
    need_x, need_wd, need_wu = ("x" in trained, "down_weight" in trained, "up_weight" in trained)

    def reads(with_bu):
        output_mask = [need_x, need_wd, with_bd, need_wu, with_bu]
        with GradReads(g, launches) as seen:
            grads = adapter.backward(g, x, wd, bd, wu, hidden, "silu", scale, True, output_mask)
        assert [t is not None for t in grads] == output_mask
        if with_bu:
            assert_close(grads[4], scale * g.double().sum(0), dtype=torch.float32, kind="bwd", name="dbu")
        return seen.reads

    with_bu, without = reads(True), reads(False)
    if trained or with_bd:
        assert without, "the recorder sees no pass over g"
        assert Counter(with_bu) == Counter(without), (with_bu, without)
    else:
        assert with_bu == ["sum"] and without == []
