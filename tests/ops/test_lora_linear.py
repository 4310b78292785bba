"""peftops.lora_linear: values and gradients, dropout, validation, registration, compile."""

from __future__ import annotations

import importlib
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.library import opcheck
from torch.overrides import TorchFunctionMode

import peftops
from peftops.testing import assert_close

from ..strategies import DTYPES, LoraCase, lora_cases
from .helpers import assert_matches, backend_params, grads_of, use

OP = "lora_linear"
# The module (peftops.ops.lora_linear is also the name of the function it exports).
lora_linear_op = importlib.import_module("peftops.ops.lora_linear")


def op_call(backend, **kw):
    def fn(x, weight, lora_a, lora_b, bias):
        with use(backend):
            return peftops.lora_linear(x, weight, lora_a, lora_b, bias=bias, **kw)

    return fn


def merged_truth(scale):
    """Independent formulation: one linear layer with the merged weight ``W + s B A``."""

    def fn(x, weight, lora_a, lora_b, bias):
        return F.linear(x, weight + scale * lora_b @ lora_a, bias)

    return fn


@pytest.mark.parametrize("device,backend", backend_params(OP))
@given(case=lora_cases(), data=st.data())
def test_matches_merged_weight_forward_and_gradients(device, backend, case: LoraCase, data):
    dtype = data.draw(st.sampled_from(DTYPES[device]), label="dtype")
    inputs = case.inputs(dtype, device)
    assert_matches(
        op_call(backend, scale=case.scale), merged_truth(case.scale), inputs, dtype, what=f"{backend} {case}"
    )


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gradcheck_float64(dropout_p, with_bias):
    case = LoraCase(lead=(2, 3), in_f=7, out_f=5, rank=3, bias=with_bias, scale=0.7, layout="sliced", seed=1)
    t = case.inputs(torch.float64, "cpu")

    def fn(x, weight, lora_a, lora_b, *bias):
        torch.manual_seed(1234)  # the same dropout seed on every evaluation
        return peftops.lora_linear(
            x, weight, lora_a, lora_b, bias=bias[0] if bias else None, scale=0.7, dropout_p=dropout_p
        )

    args = [t["x"], t["weight"], t["lora_a"], t["lora_b"]] + ([t["bias"]] if with_bias else [])
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dropout_p,with_bias", [(0.0, True), (0.25, False)])
def test_opcheck(device, backend, dropout_p, with_bias):
    case = LoraCase(lead=(3,), in_f=17, out_f=9, rank=4, bias=with_bias, scale=0.5, layout="transposed", seed=2)
    t = case.inputs(torch.float32, device)
    seed = torch.tensor(77, device=device) if dropout_p else None
    args = (t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], 0.5, dropout_p, seed, backend)
    opcheck(torch.ops.peftops.lora_linear.default, args)
    with torch.no_grad():
        _, lora_u, keep = torch.ops.peftops.lora_linear(*args)
    g = torch.randn(3, 9, device=device)
    detached = [t[k].detach() for k in ("x", "weight", "lora_a", "lora_b")]
    opcheck(
        torch.ops.peftops.lora_linear_backward.default,
        (g, *detached, lora_u, keep, 0.5, dropout_p, seed, [True, False, True, True, with_bias], backend),
    )


def _keep_rate_setup(n_rows, width, p, device):
    """With A = B = I, W = 0 and x = 1, y is the dropout of ones: (mask / (1 - p))."""
    x = torch.ones(n_rows, width, device=device, requires_grad=True)
    eye = torch.eye(width, device=device)
    y = peftops.lora_linear(x, torch.zeros(width, width, device=device), eye, eye, scale=1.0, dropout_p=p)
    return x, y


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate_and_mask_consistency(device, backend, p):
    torch.manual_seed(0)
    n_rows, width = 2000, 50  # 100k Bernoulli draws
    with use(backend):
        x, y = _keep_rate_setup(n_rows, width, p, device)
    kept = y != 0
    # Kept entries are scaled by 1 / (1 - p), dropped ones are exactly zero.
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    # Keep rate within 5 standard deviations of 1 - p (a false alarm about once in 3.5 million runs).
    n = kept.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma
    # The backward regenerates the same mask: dx = mask / (1 - p) for g = 1.
    (dx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(dx, y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_dropout_follows_manual_seed_and_training_flag(device, backend):
    case = LoraCase(lead=(4,), in_f=32, out_f=16, rank=8, bias=True, scale=1.0, layout="contiguous", seed=3)
    t = case.inputs(torch.float32, device, requires_grad=False)

    def call(**kw):
        with use(backend):
            return peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], bias=t["bias"], **kw)

    torch.manual_seed(5)
    a = call(dropout_p=0.5)
    torch.manual_seed(5)
    b = call(dropout_p=0.5)
    c = call(dropout_p=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c), "a fresh draw gave the same dropout mask"
    torch.testing.assert_close(call(dropout_p=0.5, training=False), call(dropout_p=0.0), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_stride_zero_incoming_gradient(device, backend):
    """``loss.sum()`` hands the backward an expanded (stride 0) gradient."""
    case = LoraCase(lead=(5,), in_f=9, out_f=6, rank=2, bias=True, scale=1.0, layout="contiguous", seed=4)
    t = case.inputs(torch.float64 if backend == "reference" else torch.float32, device)
    with use(backend):
        peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], bias=t["bias"]).sum().backward()
    ones = torch.ones(5, 6, dtype=t["x"].dtype, device=device)
    assert_close(t["x"].grad, ones @ (t["weight"] + t["lora_b"] @ t["lora_a"]).detach(), kind="bwd")
    assert_close(t["lora_a"].grad, (t["lora_b"].T @ ones.T @ t["x"]).detach(), kind="bwd")
    assert_close(t["lora_b"].grad, (ones.T @ t["x"] @ t["lora_a"].T).detach(), kind="bwd")
    assert_close(t["bias"].grad, torch.full((6,), 5.0, dtype=t["x"].dtype, device=device), kind="bwd")


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_zero_size_batch(device, backend, lead):
    case = LoraCase(lead=lead, in_f=5, out_f=4, rank=2, bias=True, scale=1.0, layout="contiguous", seed=5)
    t = case.inputs(torch.float32, device)
    with use(backend):
        y = peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], bias=t["bias"], dropout_p=0.1)
        assert y.shape == (*lead, 4)
        y.sum().backward()
    assert t["x"].grad.shape == t["x"].shape
    assert torch.count_nonzero(t["lora_a"].grad) == 0 and torch.count_nonzero(t["lora_b"].grad) == 0


def test_frozen_base_gets_no_gradient_and_is_not_computed():
    case = LoraCase(lead=(3,), in_f=6, out_f=4, rank=2, bias=True, scale=1.0, layout="contiguous", seed=6)
    t = case.inputs(torch.float32, "cpu")
    t["weight"].requires_grad_(False)
    t["bias"].requires_grad_(False)
    peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], bias=t["bias"]).square().sum().backward()
    assert t["weight"].grad is None and t["bias"].grad is None
    assert t["lora_a"].grad is not None and t["lora_b"].grad is not None and t["x"].grad is not None


def test_autocast_mixed_dtypes_forward_and_backward():
    """float32 activations and a bfloat16 frozen weight under autocast (a bug class seen in
    other LoRA libraries): runs, returns the autocast dtype, gradients in the leaves' dtypes."""
    case = LoraCase(lead=(4,), in_f=16, out_f=8, rank=4, bias=False, scale=1.0, layout="contiguous", seed=7)
    t = case.inputs(torch.float32, "cpu")
    weight = t["weight"].detach().to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = peftops.lora_linear(t["x"], weight, t["lora_a"], t["lora_b"])
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert t["lora_a"].grad.dtype == torch.float32 and t["x"].grad.dtype == torch.float32
    want = F.linear(t["x"].detach(), weight.float() + t["lora_b"].detach() @ t["lora_a"].detach())
    assert_close(y, want, dtype=torch.bfloat16)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_compile_fullgraph_matches_eager(device, backend, dropout_p):
    """Same values and gradients under ``torch.compile(fullgraph=True)``; with dropout the
    seed is drawn from torch's generator inside the graph, so with inductor's
    ``fallback_random`` the masks match eager's exactly."""
    import torch._inductor.config as inductor_config

    case = LoraCase(lead=(2, 5), in_f=24, out_f=12, rank=4, bias=True, scale=0.5, layout="transposed", seed=8)

    def step(x, weight, lora_a, lora_b, bias):
        with use(backend):
            y = peftops.lora_linear(x, weight, lora_a, lora_b, bias=bias, scale=0.5, dropout_p=dropout_p)
        return torch.tanh(y)

    results = []
    # config.patch, not monkeypatch: newer pytest deletes a module attribute it did not find
    # in the module's __dict__ on undo, which removes the option from inductor's config.
    with inductor_config.patch(fallback_random=True):
        for fn in (step, torch.compile(step, fullgraph=True)):
            t = case.inputs(torch.float32, device)
            torch.manual_seed(11)
            results.append(grads_of(fn, t))
    (y0, g0), (y1, g1) = results
    assert_close(y1, y0, name="compiled output")
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")


BAD_INPUTS = [
    # (what to change, exception, message regex)
    (dict(x=torch.randn(4, 3)), ValueError, r"weight: expected shape \(\*, 3\)"),
    (dict(lora_a=torch.randn(2, 9)), ValueError, r"lora_a: expected shape \(\*, 8\).*got \(2, 9\)"),
    (dict(lora_b=torch.randn(6, 3)), ValueError, r"lora_b: expected shape \(6, 2\).*got \(6, 3\)"),
    (dict(weight=torch.randn(6, 8, 1)), ValueError, r"weight: expected 2 dims, got 3"),
    (dict(x=torch.randn(())), ValueError, r"x: expected at least 1 dim"),
    (dict(bias=torch.randn(5)), ValueError, r"bias: expected shape \(6,\)"),
    (
        dict(lora_a=torch.randn(2, 8, dtype=torch.float64)),
        TypeError,
        r"lora_a: expected dtype torch.float32.*got torch.float64",
    ),
    (dict(x=torch.ones(4, 8, dtype=torch.int64)), TypeError, r"x: expected a floating-point tensor"),
    (dict(x=[[1.0] * 8]), TypeError, r"x: expected a torch.Tensor, got list"),
    (dict(x=torch.randn(4, 8, device="meta")), ValueError, r"weight: expected device meta"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a value in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p: expected a value in \[0, 1\)"),
    (dict(scale=float("nan")), ValueError, r"scale: expected a finite number, got nan"),
    (dict(scale=float("inf")), ValueError, r"scale: expected a finite number"),
    (dict(scale="2"), TypeError, r"scale: expected a real number, got str"),
    (dict(training=1), TypeError, r"training: expected a bool, got int"),
]


@pytest.mark.parametrize("change,exc,match", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_named_argument(change, exc, match):
    args = dict(
        x=torch.randn(4, 8),
        weight=torch.randn(6, 8),
        lora_a=torch.randn(2, 8),
        lora_b=torch.randn(6, 2),
        bias=None,
        scale=1.0,
        dropout_p=0.0,
        training=True,
    )
    args.update(change)
    with pytest.raises(exc, match=r"lora_linear: " + match):
        peftops.lora_linear(args.pop("x"), args.pop("weight"), args.pop("lora_a"), args.pop("lora_b"), **args)


# -- the bias gradient shares a pass over g (issue 13, BitFit) -------------------------------

#: Inputs trained beside the bias: each sends db through a different pass over g (dB's token
#: reduction, dW's, the pass computing v, or, with nothing else, a pass of its own).
TRAINED_WITH_BIAS = [
    ("x", "weight", "lora_a", "lora_b"),
    ("lora_b",),
    ("lora_a", "lora_b"),
    ("weight",),
    ("x", "weight"),
    ("x",),
    ("lora_a",),
    (),
]
#: Calls that touch a tensor's storage without reading its values.
METADATA_CALLS = frozenset(
    {"__get__", "dim", "size", "stride", "element_size", "storage_offset", "untyped_storage", "data_ptr"}
    | {"numel", "new_empty", "reshape", "view", "t", "transpose", "is_contiguous"}
)


def frozen_except(inputs: dict, trained) -> dict:
    """``inputs`` with every tensor but the bias and ``trained`` detached (frozen)."""
    return {k: v if v is None or k == "bias" or k in trained else v.detach() for k, v in inputs.items()}


class GradReads(TorchFunctionMode):
    """The passes a backward makes over ``grad``: the torch calls that read its storage
    (metadata and views excepted) and the Triton launches given it, by name. Torch calls made
    inside a launch (the interpreter's) are not counted."""

    def __init__(self, grad: Tensor, kernels=()):
        super().__init__()
        self.storage = grad.untyped_storage().data_ptr()
        self.reads: list[str] = []
        self.launching = 0
        self.kernels = [(module, name, getattr(module, name)) for module, name in kernels]

    def __enter__(self):
        for module, name, kernel in self.kernels:
            setattr(module, name, self._recorder(kernel, name))
        return super().__enter__()

    def __exit__(self, *exc):
        for module, name, kernel in self.kernels:
            setattr(module, name, kernel)
        return super().__exit__(*exc)

    def _touches(self, values) -> bool:
        return any(isinstance(v, Tensor) and v.untyped_storage().data_ptr() == self.storage for v in values)

    def _recorder(self, kernel, name):
        reads = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if reads._touches(args):
                        reads.reads.append(name)
                    reads.launching += 1
                    try:
                        return kernel[grid](*args, **kwargs)
                    finally:
                        reads.launching -= 1

                return launch

        return Launcher()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", repr(func))
        if not self.launching and name not in METADATA_CALLS and self._touches([*args, *kwargs.values()]):
            self.reads.append(name)
        return func(*args, **kwargs)


def backward_reads(backend: str, trained, with_bias: bool, scale: float, kernels=()) -> list[str]:
    """:class:`GradReads` of one backend's backward with ``trained`` (and the bias, if
    ``with_bias``) needing gradients, on a fresh incoming gradient."""
    case = LoraCase(lead=(70,), in_f=12, out_f=10, rank=3, bias=True, scale=scale, layout="contiguous", seed=12)
    t = case.inputs(torch.float32, "cpu", requires_grad=False)
    args = (t["x"], t["weight"], t["lora_a"], t["lora_b"])
    y, lora_u, keep = lora_linear_op._run_forward(backend, *args, t["bias"], scale, 0.0, None)
    grad = torch.randn_like(y)
    mask = [k in trained for k in ("x", "weight", "lora_a", "lora_b")] + [with_bias]
    with GradReads(grad, kernels) as reads:
        grads = lora_linear_op._run_backward(backend, grad, *args, lora_u, keep, scale, 0.0, None, mask)
    assert [g is not None for g in grads] == mask
    if with_bias:
        assert_close(grads[4], grad.double().sum(0), dtype=torch.float32, kind="bwd", name=f"{backend} dbias")
    return reads.reads


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("trained", TRAINED_WITH_BIAS, ids=lambda t: "+".join(t) or "bias-only")
def test_bias_gradient_beside_every_mask_of_trained_inputs(device, backend, dtype, trained):
    """Every gradient against the merged weight in float64, with the bias trained beside each
    mask; odd sizes over several token blocks and reduction splits, and a scale that is a power
    of two (db straight from the shared GEMM) or not (db corrected in float32)."""
    scale = -0.75 if len(trained) % 2 else 2.0
    case = LoraCase(lead=(3, 47), in_f=21, out_f=37, rank=3, bias=True, scale=scale, layout="sliced", seed=13)
    inputs = frozen_except(case.inputs(dtype, device), trained)
    assert_matches(op_call(backend, scale=scale), merged_truth(scale), inputs, dtype, what=f"{backend} {trained}")


@pytest.mark.parametrize("scale", [2.0, -0.375, 0.0, 2.0**-20])
def test_torch_backend_bias_gradient_reads_g_no_more_than_db_does(scale):
    """With dB trained, db is a column of dB's GEMM (``s g^T [u | c]``): the backward reads g
    just as often with the bias trained as without. A scale too small for an exact ``c`` (0,
    2**-20) takes a pass of its own, and says so here."""
    trained = ("x", "lora_a", "lora_b")
    with_bias = backward_reads("torch", trained, True, scale)
    without = backward_reads("torch", trained, False, scale)
    assert without.count("addmm") >= 2, without  # the mode sees the GEMMs over g
    if scale in (0.0, 2.0**-20):
        assert Counter(with_bias) - Counter(without) == Counter({"sum": 1})
    else:
        assert Counter(with_bias) == Counter(without), (with_bias, without)


@pytest.mark.parametrize("scale", [4.0, 0.7, -3.0])
def test_torch_backend_db_and_dbias_from_one_gemm_match_separate_ones(scale):
    """The shared GEMM changes neither dB (same alpha, same operands) nor, beyond one more
    rounding when the scale is not a power of two, db: bf16 and fp16 against the two-pass
    results."""
    for dtype in (torch.bfloat16, torch.float16):
        case = LoraCase(lead=(53,), in_f=9, out_f=29, rank=5, bias=True, scale=scale, layout="contiguous", seed=14)
        t = case.inputs(dtype, "cpu", requires_grad=False)
        args = (t["x"], t["weight"], t["lora_a"], t["lora_b"])
        y, lora_u, keep = lora_linear_op._run_forward("torch", *args, t["bias"], scale, 0.0, None)
        grad = torch.randn_like(y)
        mask = [False, False, False, True, True]
        _, _, _, db_, dbias = lora_linear_op._run_backward("torch", grad, *args, lora_u, keep, scale, 0.0, None, mask)
        assert db_.is_contiguous() and dbias.is_contiguous() and db_.dtype == dbias.dtype == dtype
        assert torch.equal(db_, torch.addmm(torch.empty_like(db_), grad.t(), lora_u, beta=0, alpha=scale))
        two_pass = grad.sum(0, dtype=torch.float32).to(dtype)
        if math.log2(abs(scale)).is_integer():
            assert torch.equal(dbias, two_pass)
        else:
            ulp = torch.finfo(dtype).eps * two_pass.float().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((dbias.float() - two_pass.float()).abs() <= ulp).all()
