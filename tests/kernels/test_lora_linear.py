"""The Triton LoRA kernels (peftops.kernels.lora_linear): what the generic op tests in
tests/ops/test_lora_linear.py do not reach. On CPU they run under TRITON_INTERPRET=1; the
``gpu`` tests cover bf16, real shapes, CUDA graphs, streams and 64-bit offsets."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import peftops
from peftops import reference
from peftops.kernels import block_config, lowrank
from peftops.kernels import lora_linear as kernels
from peftops.testing import assert_close, check_fa_rule

from ..ops.helpers import assert_matches, check_graph_replay, grads_of
from ..ops.test_lora_linear import TRAINED_WITH_BIAS, backward_reads, merged_truth
from ..strategies import LoraCase


def triton_call(scale, dropout_p=0.0):
    def fn(x, weight, lora_a, lora_b, bias):
        with peftops.use_backend("triton"):
            return peftops.lora_linear(x, weight, lora_a, lora_b, bias=bias, scale=scale, dropout_p=dropout_p)

    return fn


@pytest.mark.parametrize("rank", [1, 129, 200, 256])
def test_ranks_beyond_one_block(rank):
    """Ranks over 128 take several rank blocks in the down projection and several epilogue
    steps in the GEMM."""
    case = LoraCase(lead=(3, 11), in_f=40, out_f=37, rank=rank, bias=True, scale=0.5, layout="sliced", seed=rank)
    assert_matches(
        triton_call(0.5), merged_truth(0.5), case.inputs(torch.float32, "cpu"), torch.float32, what=f"r={rank}"
    )


def test_token_reduction_split_over_programs():
    """Enough tokens that dA, dB and dW are reduced by several programs (float32 partials)."""
    case = LoraCase(lead=(300,), in_f=33, out_f=17, rank=8, bias=False, scale=2.0, layout="transposed", seed=1)
    t = case.inputs(torch.float32, "cpu")
    assert lowrank.tn(t["x"].detach(), t["x"].detach(), out_dtype=torch.float32).shape == (33, 33)
    assert_matches(triton_call(2.0), merged_truth(2.0), t, torch.float32, what="split reduction")


def test_strided_bias_and_transposed_activations():
    case = LoraCase(lead=(19,), in_f=24, out_f=12, rank=4, bias=False, scale=0.5, layout="transposed", seed=9)
    t = case.inputs(torch.float32, "cpu")
    t["bias"] = torch.randn(24)[::2].detach().requires_grad_(True)
    assert t["bias"].stride() == (2,)
    assert_matches(triton_call(0.5), merged_truth(0.5), t, torch.float32, what="strided bias")


def test_rank_above_256_is_refused_by_name():
    case = LoraCase(lead=(2,), in_f=8, out_f=8, rank=257, bias=False, scale=1.0, layout="contiguous", seed=2)
    with pytest.raises(peftops.BackendUnavailableError, match="ranks up to 256, got 257"):
        triton_call(1.0)(**case.inputs(torch.float32, "cpu"))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_and_backward_are_bitwise_deterministic(dropout_p):
    case = LoraCase(lead=(150,), in_f=48, out_f=40, rank=16, bias=True, scale=0.5, layout="contiguous", seed=3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(grads_of(triton_call(0.5, dropout_p), case.inputs(torch.float32, "cpu")))
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_dropout_mask_is_the_one_of_the_forward_in_every_gradient():
    """The backward's packed mask (drawn again from the seed): dx, dA and dB all match the spec's
    formulas evaluated with the mask read off the forward (A = B = I makes it visible)."""
    n, p = 24, 0.4
    x = torch.randn(64, n, dtype=torch.float32, requires_grad=True)
    eye_a = torch.eye(n).requires_grad_(True)
    eye_b = torch.eye(n).requires_grad_(True)
    weight = torch.randn(n, n) / 5
    torch.manual_seed(1)
    with peftops.use_backend("triton"):
        y = peftops.lora_linear(x, weight, eye_a, eye_b, scale=1.0, dropout_p=p)
    keep = ((y - x @ weight.T).detach().abs() > 1e-6) | (x.detach() == 0)
    g = torch.randn_like(y)
    dx, da, db = torch.autograd.grad(y, (x, eye_a, eye_b), g)
    want = reference.lora_linear_backward(
        g, x.detach(), weight, eye_a.detach(), eye_b.detach(), 1.0, keep, p, [True, False, True, True, False]
    )
    for name, got, exp in zip(("dx", "dA", "dB"), (dx, da, db), (want[0], want[2], want[3]), strict=False):
        assert_close(got, exp, kind="bwd", name=name)


def test_config_lookup_nearest_shape_then_nearest_token_bucket():
    entries = [
        {"kernel": "gemm", "n": 4096, "k": 4096, "r": 16, "m_bucket": 512, "config": {"BLOCK_M": 64}},
        {"kernel": "gemm", "n": 4096, "k": 4096, "r": 16, "m_bucket": 8192, "config": {"BLOCK_M": 128}},
        {"kernel": "gemm", "n": 14336, "k": 4096, "r": 16, "m_bucket": 8192, "config": {"BLOCK_M": 256}},
        {"kernel": "down", "n": 16, "k": 4096, "r": 16, "m_bucket": 8192, "config": {"BLOCK_M": 32}},
    ]
    assert block_config.nearest(entries, "gemm", 8000, 4096, 4096, 16) == {"BLOCK_M": 128}
    assert block_config.nearest(entries, "gemm", 300, 4096, 4096, 16) == {"BLOCK_M": 64}
    assert block_config.nearest(entries, "gemm", 8192, 12000, 4096, 16) == {"BLOCK_M": 256}  # nearest (n, k, r)
    assert block_config.nearest(entries, "gemm", 8192, 4096, 4096, 64) == {"BLOCK_M": 128}
    assert block_config.nearest(entries, "tn", 8192, 4096, 4096, 16) is None
    # Tuned at 8192 tokens only: 2048 still uses it, 512 (four octaves away) gets the defaults.
    assert block_config.nearest(entries, "gemm", 2048, 14336, 4096, 16) == {"BLOCK_M": 256}
    assert block_config.nearest(entries, "gemm", 512, 14336, 4096, 16) is None
    assert [block_config.m_bucket(m) for m in (1, 16, 17, 8192, 8193, 10**6)] == [16, 16, 32, 8192, 16384, 65536]


def test_config_files_load_by_device_name(tmp_path, monkeypatch):
    name = "NVIDIA H100 80GB HBM3"
    (tmp_path / "lora_linear").mkdir()
    doc = {
        "device": name,
        "entries": [
            {
                "kernel": "down",
                "n": 16,
                "k": 4096,
                "r": 16,
                "m_bucket": 8192,
                "config": {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
            }
        ],
    }
    (tmp_path / "lora_linear" / block_config.file_name(name)).write_text(json.dumps(doc))
    monkeypatch.setattr(block_config, "CONFIG_DIR", tmp_path)
    block_config._load.cache_clear()
    try:
        assert block_config.file_name(name) == "NVIDIA_H100_80GB_HBM3.json"
        assert (
            block_config.nearest(block_config._load("lora_linear", name), "down", 5000, 16, 4096, 16)["BLOCK_K"] == 128
        )
        assert block_config._load("lora_linear", "some other GPU") == ()
    finally:
        block_config._load.cache_clear()


def test_shipped_config_files_are_well_formed():
    # The shape-keyed files of the LoRA and adapter kernels (attention's are tested with them).
    for path in [
        *block_config.CONFIG_DIR.glob("lora_linear/*.json"),
        *block_config.CONFIG_DIR.glob("bottleneck_adapter/*.json"),
    ]:
        doc = json.loads(path.read_text())
        for e in doc["entries"]:
            assert e["kernel"] in block_config.DEFAULTS and set(e) >= {"n", "k", "r", "m_bucket", "config"}, path


# -- GPU ---------------------------------------------------------------------------------------

LLAMA = [(4096, 4096), (4096, 14336), (14336, 4096)]


def _real_inputs(tokens, in_f, out_f, rank, dtype, seed=0):
    case = LoraCase(
        lead=(tokens,), in_f=in_f, out_f=out_f, rank=rank, bias=False, scale=2.0, layout="contiguous", seed=seed
    )
    return case.inputs(dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f", LLAMA)
def test_gpu_real_shapes_fa_error_rule(dtype, in_f, out_f):
    """Error vs a float32 reference at most twice that of the HF-PEFT-style eager layer run
    in the same low precision, for the output and every gradient."""
    t = _real_inputs(2048, in_f, out_f, 16, dtype)
    out, grads = grads_of(triton_call(2.0), t)
    ref_out, ref_grads = grads_of(
        lambda **kw: reference.lora_linear(**kw, scale=2.0),
        {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t.items()},
    )
    eager = lambda x, weight, lora_a, lora_b, bias: F.linear(x, weight) + 2.0 * F.linear(F.linear(x, lora_a), lora_b)  # noqa: E731
    low_out, low_grads = grads_of(
        eager, {k: (v.detach().requires_grad_() if v is not None else None) for k, v in t.items()}
    )
    for name, got, ref, low in [("y", out, ref_out, low_out)] + [
        (n, grads[n], ref_grads[n], low_grads[n]) for n in grads
    ]:
        ok, err, budget = check_fa_rule(got, ref, low)
        assert ok, f"{name}: error {err:.3g} above the FA budget {budget:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("rank", [1, 33, 65, 129, 256])
def test_gpu_float32_every_rank_fits_and_matches(monkeypatch, allow_tf32, rank):
    """float32 tiles take twice the shared memory of bf16 ones: every rank must still launch.
    With TF32 the products have float16's mantissa, hence that tolerance row."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    t = _real_inputs(512, 1024, 768, rank, torch.float32)
    out, grads = grads_of(triton_call(2.0), t)
    ref_out, ref_grads = grads_of(
        merged_truth(2.0), {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    )
    assert_close(out, ref_out, dtype=torch.float32, tf32=allow_tf32, name="y")
    for name in grads:
        assert_close(grads[name], ref_grads[name], dtype=torch.float32, kind="bwd", tf32=allow_tf32, name=name)


@pytest.mark.gpu
def test_gpu_opcheck_compile_and_cuda_graph():
    from torch.library import opcheck

    t = _real_inputs(256, 512, 384, 16, torch.bfloat16, seed=4)
    seed = torch.tensor(7, device="cuda")
    opcheck(
        torch.ops.peftops.lora_linear.default,
        (t["x"], t["weight"], t["lora_a"], t["lora_b"], None, 2.0, 0.1, seed, "triton"),
    )
    compiled = torch.compile(triton_call(2.0), fullgraph=True)
    eager_out, eager_grads = grads_of(triton_call(2.0), t)
    comp_out, comp_grads = grads_of(compiled, t)
    assert torch.equal(eager_out, comp_out)
    for name in eager_grads:
        assert torch.equal(eager_grads[name], comp_grads[name]), name
    fresh = _real_inputs(256, 512, 384, 16, torch.bfloat16, seed=5)
    check_graph_replay(triton_call(2.0), t, fresh)


@pytest.mark.gpu
def test_gpu_activation_past_two_to_the_31_elements():
    """x with 2**31 + a few elements: token offsets must be 64-bit."""
    tokens, in_f = (2**31) // 1024 + 3, 1024
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, in_f, device="cuda", dtype=torch.bfloat16) / 32
    a = torch.randn(16, in_f, device="cuda", dtype=torch.bfloat16) / 32
    b = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16) / 4
    with peftops.use_backend("triton"):
        y = peftops.lora_linear(x, w, a, b)
    tail = x[-5:].float()
    assert_close(y[-5:], F.linear(tail, w.float() + b.float() @ a.float()), dtype=torch.bfloat16)


@pytest.mark.gpu
def test_gpu_non_default_stream_and_second_device_context():
    t = _real_inputs(512, 1024, 512, 16, torch.bfloat16, seed=6)
    want, _ = grads_of(triton_call(2.0), t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, _ = grads_of(triton_call(2.0), t)
    side.synchronize()
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_auto_and_lora_linear_module_use_the_kernels():
    calls = []
    real = kernels.forward
    layer = peftops.nn.LoRALinear(256, 128, r=8, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    args = (x, layer.weight, layer.lora_A.weight, layer.lora_B.weight, layer.bias, 2.0, 0.0, None)
    assert peftops.backends.resolve_backend("lora_linear", x.device, args) == "triton"
    impl = peftops.backends.implementation("lora_linear", "triton")
    spy = peftops.backends.OpImpl(
        forward=lambda *a: calls.append(1) or real(*a), backward=impl.backward, supports=impl.supports
    )
    peftops.backends.register_impl("lora_linear", "triton", spy, replace=True)
    try:
        layer(x).float().sum().backward()
    finally:
        peftops.backends.register_impl("lora_linear", "triton", impl, replace=True)
    assert calls == [1] and layer.lora_B.weight.grad is not None


# -- the packed dropout mask, fp16 range, r = 0 -----------------------------------------------


def _mask_bits(packed: torch.Tensor, features: int) -> torch.Tensor:
    bits = (packed.long()[:, :, None] >> torch.arange(8)) & 1
    return bits.reshape(packed.shape[0], -1)[:, :features].bool()


def test_packed_mask_is_the_forwards_and_keeps_at_the_stated_rate():
    """The backward's packed mask (drawn by the down pass over g) is bit for bit the mask the
    forward applied (seen through A = B = I); its keep rate is within 6 binomial sigmas of
    1 - p, the 16-bit threshold adding at most 2**-17."""
    n, rows, p = 40, 500, 0.3
    x = torch.ones(rows, n)
    eye = torch.eye(n)
    seed = torch.tensor(12345)
    u = lowrank.down(x, eye, 1.0, p, seed, out_dtype=torch.float32)
    seen = u != 0
    packed = lowrank.empty_mask(rows, n, x.device)
    lowrank.down(torch.ones(rows, 3), torch.ones(3, 2), 1.0, 0.0, seed, mask_out=packed, mask_p=p)
    assert packed.shape == (rows, 5) and packed.dtype == torch.uint8
    assert torch.equal(_mask_bits(packed, n), seen)
    torch.testing.assert_close(u[seen], torch.full_like(u[seen], 1 / (1 - p)))
    draws = seen.numel()
    sigma = (p * (1 - p) / draws) ** 0.5
    assert abs(seen.float().mean().item() - (1 - p)) < 6 * sigma + 2**-17
    other = lowrank.down(x, eye, 1.0, p, torch.tensor(54321), out_dtype=torch.float32) != 0
    assert not torch.equal(other, seen)


def test_dropout_backward_against_the_spec_given_the_kernels_mask():
    """Every gradient with dropout, on odd shapes, against the spec evaluated with the very
    mask the kernels draw (read back through lowrank.down)."""
    case = LoraCase(lead=(37,), in_f=29, out_f=19, rank=5, bias=True, scale=0.7, layout="sliced", seed=8)
    t = case.inputs(torch.float32, "cpu")
    p = 0.35
    torch.manual_seed(3)
    y, grads = grads_of(triton_call(0.7, p), t)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (), dtype=torch.int64)  # what the op draws
    packed = lowrank.empty_mask(37, 29, torch.device("cpu"))
    lowrank.down(torch.ones(37, 1), torch.ones(1, 1), 1.0, 0.0, seed, mask_out=packed, mask_p=p)
    keep = _mask_bits(packed, 29)
    ref = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in t.items()}
    want, want_grads = grads_of(
        lambda x, weight, lora_a, lora_b, bias: reference.lora_linear(
            x, weight, lora_a, lora_b, scale=0.7, bias=bias, keep=keep, dropout_p=p
        ),
        ref,
    )
    assert_close(y, want, dtype=torch.float32, name="y")
    for name in grads:
        assert_close(grads[name], want_grads[name], dtype=torch.float32, kind="bwd", name=name)


def test_fp16_rank_r_intermediate_beyond_fp16_range():
    """u = s x A^T above 65504 with y finite (issue 11, defect 8): y, dx and dA stay finite and
    match the float32 spec (u was rounded to fp16 and overflowed to inf)."""
    x = torch.full((6, 32), 60.0, dtype=torch.float16)
    x[:, 1::2] = 50.0
    weight = torch.randn(8, 32, dtype=torch.float16) / 8
    lora_a = torch.full((2, 32), 40.0, dtype=torch.float16)  # u ~ 32 * 55 * 40 = 70400
    lora_b = torch.full((8, 2), 1e-3, dtype=torch.float16)
    t = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b, "bias": None}
    t = {k: (v.requires_grad_() if v is not None else None) for k, v in t.items()}
    (y, grads) = grads_of(triton_call(1.0), t)
    ref = {k: (v.detach().float().requires_grad_() if v is not None else None) for k, v in t.items()}
    want, want_grads = grads_of(merged_truth(1.0), ref)
    assert torch.isfinite(y).all(), y
    assert_close(y, want, dtype=torch.float16, name="y")
    for name in ("x", "lora_a", "weight"):
        if name in grads:
            assert_close(grads[name], want_grads[name], dtype=torch.float16, kind="bwd", name=name)


def test_rank_zero_backward_does_not_divide_by_zero():
    x, g = torch.randn(5, 7), torch.randn(5, 4)
    weight, a, b = torch.randn(4, 7), torch.randn(0, 7), torch.randn(4, 0)
    y, u = kernels.forward(x, weight, a, b, None, 1.0, 0.2, torch.tensor(3))
    assert u.shape == (5, 0)
    torch.testing.assert_close(y, x @ weight.T)
    dx, dw, da, db, dbias = kernels.backward(g, x, weight, a, b, u, 1.0, 0.2, torch.tensor(3), [True] * 5)
    torch.testing.assert_close(dx, g @ weight)
    assert da.shape == (0, 7) and db.shape == (4, 0)
    torch.testing.assert_close(dw, g.T @ x)


# -- column sums in the token reductions (issue 13, BitFit's db) -----------------------------

#: Small blocks so that odd shapes span several P, Q and rank blocks, row blocks and splits.
SMALL_TN = dict(BLOCK_P=16, BLOCK_Q=16, BLOCK_M=16, num_warps=4, num_stages=1)
SMALL_DOWN = dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize(
    "left_dtype,right_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),  # dB: g beside the float32 u (SCALE_R)
        (torch.float32, torch.float16),  # the adapter's dWd: float32 dh beside x (SCALE_L)
    ],
)
@pytest.mark.parametrize("dropout", [False, True])
def test_tn_column_sums_of_left_at_odd_shapes(left_dtype, right_dtype, dropout):
    """``tn_sums``: the product bit for bit as ``tn`` gives it, and the column sums of the left
    operand over 101 tokens (7 row blocks, split over programs) for 37 columns (3 P blocks),
    written once though 2 Q blocks load the same tiles; the dropout mask applies to the
    product's right operand only."""
    m, p_dim, q_dim = 101, 37, 19
    gen = torch.Generator().manual_seed(21)
    left = torch.randn(m, p_dim, generator=gen).to(left_dtype)
    right = torch.randn(m, q_dim, generator=gen).to(right_dtype)
    mask = None
    if dropout:
        mask = lowrank.empty_mask(m, q_dim, left.device)
        lowrank.down(torch.ones(m, 1), torch.ones(1, 1), 1.0, 0.0, torch.tensor(5), mask_out=mask, mask_p=0.3)
    kw = dict(scale=0.5, mask=mask, out_dtype=left_dtype, cfg=SMALL_TN)
    product, sums = lowrank.tn_sums(left, right, **kw)
    assert torch.equal(product, lowrank.tn(left, right, **kw))
    assert sums.dtype == torch.float32 and sums.shape == (p_dim,)
    assert_close(sums, left.double().sum(0), dtype=torch.float32, kind="bwd", name="column sums")
    empty_product, empty_sums = lowrank.tn_sums(left[:0], right[:0], out_dtype=left_dtype)
    assert torch.equal(empty_sums, torch.zeros(p_dim)) and torch.equal(empty_product, torch.zeros_like(product))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rank", [3, 130])
def test_down_column_sums_at_odd_shapes(dtype, rank):
    """``down_sums``: ``down``'s output bit for bit, with the packed mask drawn in the same
    launch, and the column sums of x over 53 tokens (4 row blocks) for 45 features (3 k tiles),
    written by the first of the rank blocks only (rank 130 takes two)."""
    m, k = 53, 45
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(k, rank, generator=gen).to(dtype)
    seed = torch.tensor(9)
    masks = [lowrank.empty_mask(m, k, x.device) for _ in range(2)]
    out, sums = lowrank.down_sums(
        x, w, 0.5, seed, out_dtype=torch.float32, mask_out=masks[0], mask_p=0.2, cfg=SMALL_DOWN
    )
    want = lowrank.down(x, w, 0.5, 0.0, seed, out_dtype=torch.float32, mask_out=masks[1], mask_p=0.2, cfg=SMALL_DOWN)
    assert torch.equal(out, want) and torch.equal(masks[0], masks[1])
    assert sums.dtype == torch.float32 and sums.shape == (k,)
    assert_close(sums, x.double().sum(0), dtype=torch.float32, kind="bwd", name="column sums")


@pytest.mark.parametrize("trained", TRAINED_WITH_BIAS, ids=lambda t: "+".join(t) or "bias-only")
def test_bias_gradient_makes_no_pass_of_its_own_over_g(trained):
    """The backward's passes over g (kernel launches and torch calls) are the same with the
    bias trained as without: db comes from dB's reduction, dW's, or the pass computing v.
    Only the bias trained: its sum is the one pass there is."""
    launches = [(lowrank, "_down_kernel"), (lowrank, "_tn_kernel"), (kernels, "_gemm_kernel")]
    with_bias = backward_reads("triton", trained, True, 0.5, launches)
    without = backward_reads("triton", trained, False, 0.5, launches)
    if trained:
        assert without, "the recorder sees no pass over g"
        assert Counter(with_bias) == Counter(without), (with_bias, without)
    else:
        assert with_bias == ["sum"] and without == []
