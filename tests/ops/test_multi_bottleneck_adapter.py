"""peftops.bottleneck_adapter(..., adapter_ids=...): per-row adapter banks, against the
single-adapter op run once per adapter on that adapter's rows."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import peftops
from peftops.reference.bottleneck_adapter import multi_bottleneck_adapter, multi_bottleneck_adapter_backward
from peftops.testing import assert_close

from .helpers import assert_matches, backend_params, grads_of, use

OP = "multi_bottleneck_adapter"


def make(seed, lead=(9,), d=6, num=4, r_max=5, dtype=torch.float32, ranks=(5, 2, 1, 3), bias=True, parallel=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(dtype).requires_grad_()

    return {
        "x": rnd(*lead, d),
        "down_weight": rnd(num, r_max, d, s=0.5),
        "down_bias": rnd(num, r_max, s=0.5) if bias else None,
        "up_weight": rnd(num, d, r_max, s=0.5),
        "up_bias": rnd(num, d, s=0.5) if bias else None,
        "residual": rnd(*lead, d) if parallel else None,
        "ranks": None if ranks is None else torch.tensor(ranks, dtype=torch.int64),
    }


def op_call(x, down_weight, down_bias, up_weight, up_bias, residual, ranks, adapter_ids, activation="gelu", scale=0.7):
    return peftops.bottleneck_adapter(
        x,
        down_weight,
        down_bias,
        up_weight,
        up_bias,
        activation=activation,
        scale=scale,
        residual=residual,
        adapter_ids=adapter_ids,
        ranks=ranks,
    )


def backend_call(backend, **fixed):
    def fn(**kw):
        with use(backend):
            return op_call(**kw, **fixed)

    return fn


def per_adapter_truth(
    x, down_weight, down_bias, up_weight, up_bias, residual, ranks, adapter_ids, activation="gelu", scale=0.7
):
    """Independent formulation: for each adapter, the single-adapter op (reference backend) on
    that adapter's rows alone, with its weights cut to its rank; the other rows keep the
    residual. Ids per row of a 3-D x are expanded here, by hand."""
    d = x.shape[-1]
    ids = adapter_ids
    if ids.shape != x.shape[:-1]:
        ids = ids.reshape(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1])
    xf, ids = x.reshape(-1, d), ids.reshape(-1)
    res = xf if residual is None else residual.reshape(-1, d)
    y = res
    for a in range(down_weight.shape[0]):
        rows = (ids == a).nonzero()[:, 0]
        if rows.numel() == 0:
            continue
        r = down_weight.shape[1] if ranks is None else int(ranks[a])
        with use("reference"):
            ya = peftops.bottleneck_adapter(
                xf[rows],
                down_weight[a, :r],
                None if down_bias is None else down_bias[a, :r],
                up_weight[a, :, :r],
                None if up_bias is None else up_bias[a],
                activation=activation,
                scale=scale,
                residual=None if residual is None else res[rows],
            )
        y = y.index_copy(0, rows, ya)
    # Keep every input in the graph when no row uses it: its gradient is then zeros.
    keep = sum(0 * t.sum() for t in (x, down_weight, down_bias, up_weight, up_bias) if t is not None)
    return (y + keep).reshape(x.shape)


IDS = {
    # name: (lead dims of x, ids)
    "any_order": ((9,), [2, 0, -1, 3, 0, 1, -1, 2, 0]),
    "all_minus_one": ((9,), [-1] * 9),
    "one_for_all": ((9,), [1] * 9),
    "every_row_different": ((4,), [3, 1, 0, 2]),
    "per_row_3d": ((3, 4), [2, -1, 0]),
    "per_token_3d": ((2, 3), [[0, 3, -1], [3, 3, 1]]),
}


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("pattern", sorted(IDS))
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_matches_per_adapter_runs_forward_and_gradients(device, backend, pattern, parallel):
    lead, ids = IDS[pattern]
    t = make(1, lead=lead, parallel=parallel)
    t["adapter_ids"] = torch.tensor(ids)
    t = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    assert_matches(backend_call(backend), per_adapter_truth, t, torch.float32, what=f"{backend} {pattern}")


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh", "silu"])
def test_every_activation_without_biases_and_full_rank(device, backend, activation):
    t = make(2, lead=(2, 5), bias=False, ranks=None)
    t["adapter_ids"] = torch.tensor([[1, 0, 3, 3, -1], [2, 2, 0, 1, 3]])
    call = backend_call(backend, activation=activation, scale=-1.5)

    def truth(**kw):
        return per_adapter_truth(**kw, activation=activation, scale=-1.5)

    assert_matches(call, truth, t, torch.float32, what=f"{backend} {activation}")


@pytest.mark.parametrize("device,backend", [p for p in backend_params(OP) if "reference" not in p.id])
def test_half_precision(device, backend):
    t = make(3, lead=(4, 3), dtype=torch.float16, parallel=True)
    t["adapter_ids"] = torch.tensor([3, 0, -1, 0])
    assert_matches(backend_call(backend), per_adapter_truth, t, torch.float16, what=f"{backend} float16")


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_absent_adapters_and_rank_padding_get_exactly_zero_and_are_not_read(device, backend):
    """Slot 1 is named by no row and holds NaN; so does every slot's rank padding. Nothing of
    them reaches the output or another gradient, and their gradients are exactly zero."""
    t = make(4, lead=(7,), parallel=True)
    ranks = t["ranks"]
    with torch.no_grad():
        for name in ("down_weight", "down_bias", "up_weight"):
            t[name][1] = float("nan")
        for a, r in enumerate(ranks.tolist()):
            t["down_weight"][a, r:] = float("nan")
            t["down_bias"][a, r:] = float("inf")
            t["up_weight"][a, :, r:] = float("-inf")
        t["up_bias"][1] = float("nan")
    t["adapter_ids"] = torch.tensor([0, 2, -1, 3, 0, 2, 3])
    out, grads = grads_of(backend_call(backend), t)
    assert torch.isfinite(out).all()
    for name, g in grads.items():
        if name in ("x", "residual"):
            assert torch.isfinite(g).all(), name
            continue
        assert torch.equal(g[1], torch.zeros_like(g[1])), f"d{name} of the absent slot"
        for a, r in enumerate(ranks.tolist()):
            if name in ("down_weight", "down_bias", "up_weight"):
                pad = g[a, :, r:] if name == "up_weight" else g[a, r:]
                assert torch.equal(pad, torch.zeros_like(pad)), f"d{name} padding of slot {a}"
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_empty_bank(device, backend, parallel):
    t = make(5, lead=(2, 3), num=0, ranks=(), parallel=parallel)
    t["adapter_ids"] = torch.full((2,), -1)
    out, grads = grads_of(backend_call(backend), t)
    assert torch.equal(out, t["x"] if not parallel else t["residual"])
    _, want = grads_of(per_adapter_truth, t)
    for name in want:
        assert grads[name].shape == t[name].shape
        assert torch.equal(grads[name], want[name]), name


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_every_signed_integer_dtype_of_ids(device, backend, dtype):
    t = make(6, lead=(5,))
    ids = torch.tensor([3, -1, 0, 3, 1])
    want = backend_call(backend)(**t, adapter_ids=ids)
    assert torch.equal(backend_call(backend)(**t, adapter_ids=ids.to(dtype)), want)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_unchecked_values_have_one_meaning_in_every_backend(device, backend, monkeypatch):
    """Under torch.compile or CUDA graph capture nothing is read back to check (simulated here:
    the op sees itself traced). An id outside [-1, N) then means no adapter, a rank above
    r_max means r_max: never an error, an out-of-bounds access or a NaN."""
    t = make(7, lead=(8,), ranks=(5, 9, 1, 3))
    ids = torch.tensor([1, 4, -2, 2, 77, -1, 1, -100])
    valid = torch.where((ids >= 0) & (ids < 4), ids, -1)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        got, got_grads = grads_of(backend_call(backend), dict(t, adapter_ids=ids))
    want, want_grads = grads_of(backend_call(backend), dict(t, adapter_ids=valid, ranks=t["ranks"].clamp(max=5)))
    assert torch.isfinite(got).all()
    assert_close(got, want, name="output")
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], kind="bwd", name=f"d{name}")
    with pytest.raises(
        ValueError, match=r"bottleneck_adapter: adapter_ids: expected adapter ids .* in \[-1, 3\], got 4"
    ):
        op_call(**dict(t, ranks=t["ranks"].clamp(max=5)), adapter_ids=ids)  # checked once not traced


def test_explicit_backward_is_autograd_of_the_spec():
    t = make(8, lead=(7,), dtype=torch.float64)
    ids = torch.tensor([0, 3, -1, 2, 0, 9, 1])  # 9: the spec's meaning of an unchecked id
    for serial in (True, False):
        res = None if serial else torch.randn(7, 6, dtype=torch.float64)
        leaves = [t[k] for k in ("x", "down_weight", "down_bias", "up_weight", "up_bias")]
        y, _ = multi_bottleneck_adapter(*leaves, ids, t["ranks"], "silu", 0.3, res)
        g = torch.randn_like(y)
        want = torch.autograd.grad(y, leaves, g)
        got = multi_bottleneck_adapter_backward(
            g,
            t["x"],
            t["down_weight"],
            t["down_bias"],
            t["up_weight"],
            ids,
            t["ranks"],
            "silu",
            0.3,
            serial,
            [True] * 5,
        )
        for name, a, b in zip(("x", "Wd", "bd", "Wu", "bu"), got, want, strict=True):
            torch.testing.assert_close(a, b, msg=f"d{name}")


def _bad(**change):
    t = make(9, lead=(2, 3), num=3, r_max=2, ranks=(2, 1, 2))
    args = dict(t, adapter_ids=torch.tensor([0, -1]))
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,error,match",
    [
        ({"adapter_ids": torch.tensor([0, 3])}, ValueError, r"adapter_ids: expected adapter ids .* got 3"),
        ({"adapter_ids": torch.tensor([-2, 0])}, ValueError, r"adapter_ids: expected adapter ids .* got -2"),
        ({"adapter_ids": torch.tensor([0, 1, 2])}, ValueError, r"adapter_ids: expected shape \(2, 3\)"),
        ({"adapter_ids": torch.tensor([0.0, 1.0])}, TypeError, "adapter_ids: expected an integer tensor"),
        ({"adapter_ids": torch.tensor([0, 1], dtype=torch.uint8)}, TypeError, "adapter_ids: expected a signed"),
        ({"adapter_ids": [0, 1]}, TypeError, "adapter_ids: expected a torch.Tensor"),
        ({"ranks": torch.tensor([2, 3, 1])}, ValueError, r"ranks: expected ranks in \[1, 2\], got 3"),
        ({"ranks": torch.tensor([2, 0, 1])}, ValueError, r"ranks: expected ranks in \[1, 2\], got 0"),
        ({"ranks": torch.tensor([2, 1])}, ValueError, r"ranks: expected shape \(3,\)"),
        ({"ranks": torch.tensor([2.0, 1.0, 1.0])}, TypeError, "ranks: expected an integer tensor"),
        ({"down_weight": torch.randn(2, 6)}, ValueError, "down_weight: expected 3 dims"),
        ({"down_weight": torch.randn(3, 0, 6)}, ValueError, "down_weight: expected r_max >= 1"),
        ({"up_weight": torch.randn(3, 6, 3)}, ValueError, r"up_weight: expected shape \(3, 6, 2\)"),
        ({"down_bias": torch.randn(3, 3)}, ValueError, r"down_bias: expected shape \(3, 2\)"),
        ({"up_bias": torch.randn(2, 6)}, ValueError, r"up_bias: expected shape \(3, 6\)"),
        ({"up_bias": torch.randn(3, 6, dtype=torch.float64)}, TypeError, "up_bias: expected dtype torch.float32"),
    ],
)
def test_bad_input_is_refused_by_name(change, error, match):
    with pytest.raises(error, match=f"bottleneck_adapter: {match}"):
        op_call(**_bad(**change))


def test_ranks_without_adapter_ids_are_refused():
    x, wd, wu = torch.randn(3, 4), torch.randn(2, 4), torch.randn(4, 2)
    with pytest.raises(ValueError, match="bottleneck_adapter: ranks: expected None without adapter_ids"):
        peftops.bottleneck_adapter(x, wd, None, wu, None, ranks=torch.tensor([2]))


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_opcheck(backend):
    # float64 where the backend takes it (gradcheck in float64); the kernels take float32.
    t = make(10, lead=(7,), dtype=torch.float32 if backend == "triton" else torch.float64, parallel=True)
    ids = torch.tensor([1, 3, -1, 1, 0, 2, 3])
    args = (
        t["x"],
        t["down_weight"],
        t["down_bias"],
        t["up_weight"],
        t["up_bias"],
        ids,
        t["ranks"],
        t["residual"],
        "gelu",
        0.5,
        backend,
    )
    opcheck(torch.ops.peftops.multi_bottleneck_adapter.default, args)
    serial = (*args[:7], None, *args[8:])
    opcheck(torch.ops.peftops.multi_bottleneck_adapter.default, serial)


def test_compile_fullgraph_matches_eager():
    t = make(11, lead=(2, 4))
    t["adapter_ids"] = torch.tensor([3, 0])

    def step(**kw):
        return torch.tanh(op_call(**kw))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    (y0, g0), (y1, g1) = (grads_of(fn, t) for fn in (step, compiled))
    assert_close(y1, y0, name="compiled output")
    for name in g0:
        assert_close(g1[name], g0[name], kind="bwd", name=f"compiled d{name}")
    # Compiled, the ids are not checked: one outside [-1, N) means no adapter, as documented.
    assert_close(
        compiled(**dict(t, adapter_ids=torch.tensor([9, 0]))),
        step(**dict(t, adapter_ids=torch.tensor([-1, 0]))),
        name="unchecked ids",
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gpu_cuda_graph_capture_and_replay(backend):
    """No host synchronisation (tile table built on the device, the eager range check skipped
    while capturing): forward and backward replay from a CUDA graph, bitwise equal to eager
    with other ids. Every adapter fits one tile of either backend, so no per-slot sum depends
    on the order of atomics."""
    from .helpers import check_graph_replay

    def inputs(seed):
        t = make(seed, lead=(64,), d=48, r_max=16, ranks=(16, 5, 9, 1), parallel=True)
        ids = torch.cat([torch.arange(4).repeat_interleave(12), torch.full((16,), -1)])
        t["adapter_ids"] = ids[torch.randperm(64, generator=torch.Generator().manual_seed(seed))]
        return {k: v.detach().cuda().requires_grad_(v.requires_grad) for k, v in t.items() if v is not None} | {
            k: None for k, v in t.items() if v is None
        }

    with use(backend):
        check_graph_replay(op_call, inputs(12), inputs(13))
