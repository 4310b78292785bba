"""peftops.multi_lora_linear: every token with its own adapter, against per-adapter LoRA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

import peftops
from peftops import reference
from peftops.testing import assert_close

from ..strategies import DTYPES, MultiLoraCase, multi_lora_cases
from .helpers import as_float64, assert_matches, backend_params, grads_of, use

OP = "multi_lora_linear"


def make(seed, tokens, in_f, out_f, num, r_max, dtype=torch.float32, ranks=True, bias=True, ids="mixed", device="cpu"):
    case = MultiLoraCase(
        lead=(tokens,), in_f=in_f, out_f=out_f, num=num, r_max=r_max, ranks=ranks, bias=bias, ids=ids,
        layout="contiguous", seed=seed,
    )  # fmt: skip
    return case.inputs(dtype, device)


def op_call(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks):
    return peftops.multi_lora_linear(x, weight, lora_a, lora_b, adapter_ids, scales=scales, bias=bias, ranks=ranks)


def backend_call(backend):
    def fn(**kw):
        with use(backend):
            return op_call(**kw)

    return fn


def per_adapter_truth(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks):
    """Independent formulation: the base layer for every token, then each token's own
    adapter's low-rank term with its rank sliced explicitly, token by token."""
    lead = x.shape[:-1]
    x, adapter_ids = x.reshape(-1, x.shape[-1]), adapter_ids.reshape(-1)
    y = x @ weight.T + (bias if bias is not None else 0)
    rows = []
    for t in range(x.shape[0]):
        a = int(adapter_ids[t])
        if a < 0:
            rows.append(y[t])
            continue
        r = int(ranks[a]) if ranks is not None else lora_a.shape[1]
        delta = (x[t] @ lora_a[a, :r].T) @ lora_b[a, :, :r].T * scales[a]
        rows.append(y[t] + delta)
    # Keep A and B in the graph when no token uses an adapter: their gradient is then zeros.
    y = (torch.stack(rows) if rows else y) + 0 * (lora_a.sum() + lora_b.sum())
    return y.reshape(*lead, -1)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@given(case=multi_lora_cases(), data=st.data())
def test_matches_per_token_adapters_forward_and_gradients(device, backend, case: MultiLoraCase, data):
    dtype = data.draw(st.sampled_from(DTYPES[device]), label="dtype")
    if backend == "reference" and dtype != torch.float32:
        dtype = torch.float32  # the spec is the same at every dtype; its kernels are what vary
    assert_matches(
        backend_call(backend), per_adapter_truth, case.inputs(dtype, device), dtype, what=f"{backend} {case}"
    )


@pytest.mark.parametrize("device,backend", [p for p in backend_params(OP) if "reference" not in p.id])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_dropout_is_the_same_mask_in_forward_and_backward(device, backend, dtype):
    """With every A the identity (in = r_max), ``u = s * x_d`` reveals the kernel's mask; the spec
    with that mask must then give the kernel's output and every gradient."""
    t = make(11, 45, 12, 9, 3, 12, device=device, dtype=dtype, ranks=False)
    with torch.no_grad():
        t["lora_a"].copy_(torch.eye(12, dtype=dtype, device=device).expand(3, 12, 12))
        t["x"].copy_(t["x"].sign() * (t["x"].abs() + 0.5))  # no zeros in x: u = 0 only where dropped
    args = (
        t["x"],
        t["weight"],
        t["lora_a"],
        t["lora_b"],
        t["adapter_ids"],
        t["scales"],
        t["bias"],
        None,
        0.4,
        torch.tensor(1234, device=device),
    )
    y, u = torch.ops.peftops.multi_lora_linear(*args, backend)
    has = t["adapter_ids"] >= 0
    keep = (u != 0) | ~has[:, None]
    rate = keep[has].float().mean().item()
    assert 0.45 < rate < 0.75, f"keep rate {rate:.2f}, expected about 0.6"
    want_y, want_u = reference.multi_lora_linear(
        t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"], t["scales"], bias=t["bias"], keep=keep,
        dropout_p=0.4,
    )  # fmt: skip
    assert_close(y, want_y, dtype=dtype)
    g = torch.randn_like(y)
    got = torch.ops.peftops.multi_lora_linear_backward(
        g,
        t["x"],
        t["weight"],
        t["lora_a"],
        t["lora_b"],
        t["adapter_ids"],
        t["scales"],
        None,
        u,
        0.4,
        args[-1],
        [True, False, True, True, False],
        backend,
    )
    want = reference.multi_lora_linear_backward(
        g,
        t["x"],
        t["weight"],
        t["lora_a"],
        t["lora_b"],
        t["adapter_ids"],
        t["scales"],
        ranks=None,
        keep=keep,
        dropout_p=0.4,
        output_mask=[True, False, True, True, False],
    )
    for name, a, b in zip(("dx", "dW", "dA", "dB"), got, want, strict=False):
        if b is not None:
            assert_close(a, b, dtype=dtype, kind="bwd", name=name)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_each_adapter_gets_exactly_the_gradient_of_its_own_rows(device, backend):
    """A mixed batch against separate per-adapter runs of ``peftops.lora_linear`` (each on its
    own rows only): the same dA and dB per adapter, zeros for the adapters absent from the batch."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    t = make(3, 40, 16, 12, 6, 8, dtype=dtype, device=device)
    ids = t["adapter_ids"]
    ids[ids == 5] = 2  # adapter 5 is absent from the batch
    g = torch.randn(40, 12, dtype=dtype, device=device)
    y = backend_call(backend)(**t)
    da, db = torch.autograd.grad(y, (t["lora_a"], t["lora_b"]), g)
    for a in range(6):
        rows = ids == a
        r = int(t["ranks"][a])
        if not rows.any():
            assert torch.count_nonzero(da[a]) == 0 and torch.count_nonzero(db[a]) == 0, f"absent adapter {a}"
            continue
        a_own = t["lora_a"][a, :r].detach().clone().requires_grad_()
        b_own = t["lora_b"][a, :, :r].detach().clone().requires_grad_()
        with use("reference"):
            own = peftops.lora_linear(
                t["x"][rows].detach(),
                t["weight"].detach(),
                a_own,
                b_own,
                scale=float(t["scales"][a]),
                bias=t["bias"].detach(),
            )
        want_a, want_b = torch.autograd.grad(own, (a_own, b_own), g[rows])
        assert_close(da[a, :r], want_a, kind="bwd", name=f"dA[{a}]")
        assert_close(db[a, :, :r], want_b, kind="bwd", name=f"dB[{a}]")
        assert torch.count_nonzero(da[a, r:]) == 0 and torch.count_nonzero(db[a, :, r:]) == 0, "rank padding"


def test_one_adapter_for_every_token_is_lora_linear():
    t = make(4, 17, 9, 7, 3, 4, ranks=False)
    t["adapter_ids"] = torch.full((17,), 1)
    want = peftops.lora_linear(
        t["x"], t["weight"], t["lora_a"][1], t["lora_b"][1], scale=float(t["scales"][1]), bias=t["bias"]
    )
    assert_close(op_call(**t), want)


def test_per_row_ids_for_batched_input():
    t = make(5, 12, 8, 6, 3, 4)
    x3 = t["x"].detach().reshape(3, 4, 8)
    row_ids = torch.tensor([2, -1, 0])
    got = peftops.multi_lora_linear(
        x3, t["weight"], t["lora_a"], t["lora_b"], row_ids, scales=t["scales"], bias=t["bias"], ranks=t["ranks"]
    )
    per_token = row_ids.repeat_interleave(4)
    want = peftops.multi_lora_linear(
        x3.reshape(12, 8),
        t["weight"],
        t["lora_a"],
        t["lora_b"],
        per_token,
        scales=t["scales"],
        bias=t["bias"],
        ranks=t["ranks"],
    )
    assert torch.equal(got.reshape(12, -1), want)


def test_dropout_eval_is_exact_and_gradcheck_with_dropout():
    t = make(6, 9, 5, 4, 3, 3, dtype=torch.float64)
    args = {k: v for k, v in t.items()}
    no_drop = op_call(**args)
    evald = peftops.multi_lora_linear(
        t["x"],
        t["weight"],
        t["lora_a"],
        t["lora_b"],
        t["adapter_ids"],
        scales=t["scales"],
        bias=t["bias"],
        ranks=t["ranks"],
        dropout_p=0.5,
        training=False,
    )
    assert torch.equal(no_drop, evald)

    def fn(x, lora_a, lora_b):
        torch.manual_seed(0)  # the same mask on every call gradcheck makes
        return peftops.multi_lora_linear(
            x, t["weight"], lora_a, lora_b, t["adapter_ids"], scales=t["scales"], ranks=t["ranks"], dropout_p=0.4
        )

    assert torch.autograd.gradcheck(fn, (t["x"], t["lora_a"], t["lora_b"]))


@pytest.mark.parametrize(
    "ids,match",
    [
        (torch.tensor([0, 3]), r"adapter_ids: expected adapter ids \(-1 = base layer only\) in \[-1, 2\], got 3"),
        (torch.tensor([-2, 0]), r"adapter_ids: .* got -2"),
        (torch.tensor([0.0, 1.0]), "adapter_ids: expected an integer tensor"),
        (torch.tensor([0, 1, 2]), r"adapter_ids: expected shape \(2,\)"),
    ],
)
def test_bad_adapter_ids_are_refused_by_name(ids, match):
    t = make(7, 2, 4, 3, 3, 2)
    t["adapter_ids"] = ids
    with pytest.raises((ValueError, TypeError), match=match):
        op_call(**t)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_adapter_ids_are_refused_by_name(dtype):
    """-1 (base layer only) does not exist unsigned: uint8 -1 arrives as 255, once reported as
    out of range although the caller wrote a valid id."""
    t = make(7, 2, 4, 3, 3, 2)
    t["adapter_ids"] = torch.tensor([1, 0]).to(dtype)
    with pytest.raises(TypeError, match=rf"{OP}: adapter_ids: expected a signed integer dtype .*got {dtype}"):
        op_call(**t)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_every_signed_integer_dtype_of_ids(device, backend, dtype):
    """130 slots, more than int8 holds: ids compared with N in int8 would wrap (129 -> -127)
    and every id would be refused, or grouped wrongly."""
    t = make(14, 20, 6, 5, 130, 2, device=device)
    ids = torch.tensor([127, -1, 0, 5, 127, 64] * 3 + [-1, 100], device=device)
    want = backend_call(backend)(**dict(t, adapter_ids=ids))
    got = backend_call(backend)(**dict(t, adapter_ids=ids.to(dtype)))
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scales_are_refused_by_name(bad):
    """As a non-finite scalar ``scale`` is for lora_linear: checked with the ids, in the same
    single read-back."""
    t = make(8, 4, 4, 3, 3, 2)
    scales = t["scales"].clone()
    scales[1] = bad
    with pytest.raises(ValueError, match=rf"{OP}: scales: expected finite values, got {bad} at index 1"):
        op_call(**dict(t, scales=scales))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(lora_a=torch.zeros(3, 0, 4), lora_b=torch.zeros(3, 3, 0), ranks=None), r"lora_a: expected r_max >= 1"),
        (
            dict(x=torch.zeros(4, 0), weight=torch.zeros(3, 0), lora_a=torch.zeros(3, 2, 0)),
            r"x: expected in_features >= 1 \(the last dim\), got shape \(4, 0\)",
        ),
    ],
)
def test_empty_feature_or_rank_dims_are_refused_by_name(change, match):
    """r_max = 0 and in = 0 were accepted, then failed inside a backend (a reshape error) or
    ran a kernel with nothing to reduce over."""
    t = make(8, 4, 4, 3, 3, 2)
    with pytest.raises(ValueError, match=f"{OP}: {match}"):
        op_call(**dict(t, **change))


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_unchecked_values_have_one_meaning_in_every_backend(device, backend, monkeypatch):
    """Under torch.compile or CUDA graph capture the op cannot read values back to check them
    (simulated here: the op sees itself traced). Then, in every backend, an id outside
    [-1, N) is the base layer only and reads no slot (slot 0 holds NaN and no valid id names
    it), and a rank above r_max is r_max: never an error, an out-of-bounds access or a NaN."""
    t = make(15, 12, 6, 5, 3, 4, device=device)
    with torch.no_grad():
        t["lora_a"][0] = float("nan")
    ids = torch.tensor([1, 3, -2, 2, 7, -1, 1, -100, 2, 2, 3, 1], device=device)
    valid = torch.where((ids >= 0) & (ids < 3), ids, -1)
    ranks = torch.tensor([2, 9, 4], device=device)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        got, got_grads = grads_of(backend_call(backend), dict(t, adapter_ids=ids, ranks=ranks))
    want, want_grads = grads_of(backend_call(backend), dict(t, adapter_ids=valid, ranks=ranks.clamp(max=4)))
    assert torch.isfinite(got).all()
    assert_close(got, want, name="output")
    for name in want_grads:
        assert torch.isfinite(got_grads[name]).all(), f"d{name}"
        assert_close(got_grads[name], want_grads[name], kind="bwd", name=f"d{name}")
    with pytest.raises(ValueError, match="adapter_ids: expected adapter ids"):
        op_call(**dict(t, adapter_ids=ids))  # checked again once not traced


def test_bad_ranks_scales_and_shapes_are_refused_by_name():
    t = make(8, 4, 4, 3, 3, 2)
    with pytest.raises(ValueError, match=r"ranks: expected ranks in \[1, 2\], got 3"):
        op_call(**dict(t, ranks=torch.tensor([1, 3, 2])))
    with pytest.raises(ValueError, match="scales: expected a constant tensor"):
        op_call(**dict(t, scales=t["scales"].clone().requires_grad_()))
    with pytest.raises(ValueError, match=r"lora_b: expected shape \(3, 3, 2\)"):
        op_call(**dict(t, lora_b=torch.randn(3, 3, 5)))


def test_opcheck():
    t = make(9, 6, 5, 4, 3, 3)
    d = as_float64(t)
    args = (
        d["x"],
        d["weight"],
        d["lora_a"],
        d["lora_b"],
        t["adapter_ids"],
        t["scales"].double(),
        d["bias"],
        t["ranks"],
        0.0,
        None,
        "reference",
    )
    opcheck(torch.ops.peftops.multi_lora_linear.default, args)


def test_compile_fullgraph_matches_eager():
    t = make(10, 11, 6, 5, 4, 3)

    def step(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks):
        return torch.tanh(op_call(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks))

    compiled = torch.compile(step, fullgraph=True)
    (y0, g0), (y1, g1) = (grads_of(fn, t) for fn in (step, compiled))
    assert_close(y1, y0, name="compiled output")
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")
    # Compiled, the ids are not checked (no read-back in the graph): one outside [-1, N) is
    # the base layer only, as the docstring says. The same shapes: no recompilation.
    outside = t["adapter_ids"].clone()
    outside[:3] = torch.tensor([4, -2, 99])
    inside = torch.where((outside >= 0) & (outside < 4), outside, -1)
    assert_close(compiled(**dict(t, adapter_ids=outside)), step(**dict(t, adapter_ids=inside)), name="unchecked ids")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    """No host synchronisation in the triton path (tile table built on the device, the ids'
    range check skipped while capturing): forward and backward replay from a CUDA graph."""
    from .helpers import check_graph_replay

    t = make(12, 300, 64, 48, 8, 16, device="cuda")
    fresh = make(13, 300, 64, 48, 8, 16, device="cuda")
    with use("triton"):
        check_graph_replay(op_call, t, fresh)
