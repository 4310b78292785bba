"""The Triton multi-LoRA kernels (peftops.kernels.multi_lora_linear): what the generic op tests in
tests/ops/test_multi_lora_linear.py do not reach. The tile table (tokens grouped by adapter, cut
into tiles that never straddle two adapters) at its edges, bitwise determinism, and 64-bit token
offsets. On CPU they run under TRITON_INTERPRET=1, with small shapes."""

from __future__ import annotations

import pytest
import torch

import peftops
from peftops import reference
from peftops.kernels import multi_lora_linear as kernels
from peftops.testing import assert_close

from ..ops.helpers import assert_matches, grads_of
from ..strategies import MultiLoraCase, adapter_ids, leaf


def triton_call(dropout_p=0.0):
    def fn(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks):
        with peftops.use_backend("triton"):
            return peftops.multi_lora_linear(
                x, weight, lora_a, lora_b, adapter_ids, scales=scales, bias=bias, ranks=ranks, dropout_p=dropout_p
            )

    return fn


def spec(x, weight, lora_a, lora_b, bias, adapter_ids, scales, ranks):
    """The reference (run in float64 by ``assert_matches``) on the flattened tokens."""
    lead = x.shape[:-1]
    y, _ = reference.multi_lora_linear(
        x.reshape(-1, x.shape[-1]), weight, lora_a, lora_b, adapter_ids.reshape(-1), scales, bias=bias, ranks=ranks
    )
    return y.reshape(*lead, -1)


def case_of(tokens, num, ids, in_f=24, out_f=20, r_max=8, seed=0, layout="contiguous"):
    return MultiLoraCase(
        lead=(tokens,), in_f=in_f, out_f=out_f, num=num, r_max=r_max, ranks=True, bias=True, ids=ids, layout=layout,
        seed=seed,
    )  # fmt: skip


# Interpreted, a tile holds at most 16 tokens: 16 and 17 tokens of one adapter fill one tile
# exactly or spill one token into a second.
EDGES = {
    "one token": case_of(1, 3, "mixed"),
    "one token, base-only": case_of(1, 3, "base_only"),
    "all base-only": case_of(37, 4, "base_only"),
    "no slots at all": case_of(9, 0, "base_only"),
    "one adapter, one full tile": case_of(16, 3, "one", seed=1),
    "one adapter, a tile and one token": case_of(17, 3, "one", seed=2),
    "one adapter, many tiles": case_of(50, 2, "one", seed=3, layout="sliced"),
    "each token its own adapter": case_of(13, 13, "distinct", seed=4),
    "more adapters than tokens": case_of(5, 11, "distinct", seed=5),
    "adapters absent from the batch": case_of(40, 7, "few", seed=6, layout="transposed"),
    "N not a power of two": case_of(45, 5, "mixed", seed=7),
    "one slot": case_of(21, 1, "mixed", seed=8),
    "rank 1, r_max 1": case_of(19, 3, "mixed", r_max=1, seed=9),
}


@pytest.mark.parametrize("path", ["segmented", "gathered"])
@pytest.mark.parametrize("name", list(EDGES))
def test_tile_table_edges_forward_and_gradients(monkeypatch, name, path):
    """Every token's output, dx, dW, db and every slot's dA and dB (zeros for absent
    adapters) against the spec in float64, with either forward (the backward is segmented)."""
    monkeypatch.setitem(kernels.FORWARD_PATH, "forward", path)
    case = EDGES[name]
    assert_matches(triton_call(), spec, case.inputs(torch.float32, "cpu"), torch.float32, what=f"{name}: {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gathered_forward_is_the_segmented_one(monkeypatch, dtype, dropout_p):
    """Same y and u (up to summation order), the same dropout mask, heterogeneous ranks in
    larger slots, ids in any order with base-only rows."""
    case = case_of(29, 6, "mixed", r_max=16, seed=12)
    t = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.inputs(dtype, "cpu").items()}
    args = (t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"], t["scales"], t["bias"], t["ranks"])
    seed = torch.tensor(9) if dropout_p else None
    out = {}
    for path in ("segmented", "gathered"):
        monkeypatch.setitem(kernels.FORWARD_PATH, "forward", path)
        out[path] = kernels.forward(*args, dropout_p, seed)
    for got, want, name in zip(out["gathered"], out["segmented"], ["y", "u"], strict=True):
        assert_close(got, want.double(), dtype=dtype, name=name)


def test_auto_forward_path_is_gathered_for_decode_sizes_only(monkeypatch):
    calls = []
    real = kernels._gathered_forward
    monkeypatch.setattr(kernels, "_gathered_forward", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for tokens in (5, kernels.GATHER_MAX_TOKENS + 1):
        case = case_of(tokens, 3, "mixed", seed=13)
        t = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.inputs(torch.float32, "cpu").items()}
        kernels.forward(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"], t["scales"], t["bias"],
                        t["ranks"], 0.0, None)  # fmt: skip
    assert calls == [5]
    monkeypatch.setitem(kernels.FORWARD_PATH, "forward", "fastest")
    with pytest.raises(ValueError, match="FORWARD_PATH: expected 'auto', 'segmented' or 'gathered'"):
        kernels.forward(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"], t["scales"], t["bias"],
                        t["ranks"], 0.0, None)  # fmt: skip


@pytest.mark.parametrize(
    "tokens,num,pattern,block_m",
    [
        (1, 3, "mixed", 16),
        (16, 3, "one", 16),
        (17, 3, "one", 16),
        (37, 4, "base_only", 16),
        (9, 0, "base_only", 4),
        (13, 13, "distinct", 16),
        (40, 7, "few", 8),
        (45, 5, "mixed", 4),
    ],
)
def test_tile_table_covers_every_token_once_within_its_group(tokens, num, pattern, block_m):
    """The table the kernels walk: every token in exactly one live tile, a tile's tokens all
    of one group (an adapter, or the base-only group N), at most block_m of them, no more tiles
    than the fixed bound the grid is launched with; the tiles past the last do nothing."""
    ids = adapter_ids(pattern, tokens, num, torch.Generator().manual_seed(tokens))
    perm, start, count, tile_seg, tile_start, max_tiles = kernels._tiles(ids, num, block_m)
    assert tile_seg.numel() == max_tiles == -(-tokens // block_m) + num + 1
    group = torch.where(ids >= 0, ids, num)
    assert torch.equal(count, torch.bincount(group, minlength=num + 1))
    seen = torch.zeros(tokens, dtype=torch.int64)
    for seg, first in zip(tile_seg.tolist(), tile_start.tolist(), strict=True):
        if seg > num:
            continue  # past the last tile
        end = min(first + block_m, int(start[seg] + count[seg]))
        assert start[seg] <= first < end, "an empty or misplaced live tile"
        rows = perm[first:end]
        assert (group[rows] == seg).all(), "a tile straddles two groups"
        seen[rows] += 1
    assert (seen == 1).all(), "a token in no tile, or in two"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_forward_and_backward_are_bitwise_deterministic(dropout_p):
    """Per-adapter reductions walk each adapter's tokens in a fixed order (no atomics): a rerun
    gives the same bits, dropout mask included."""
    case = case_of(70, 5, "mixed", seed=10)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(grads_of(triton_call(dropout_p), case.inputs(torch.float32, "cpu")))
    (y0, g0), (y1, g1) = runs
    assert torch.equal(y0, y1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_token_offsets_past_two_to_the_31_elements():
    """x as a strided view whose rows lie 2**30 elements apart: the third row starts past
    element 2**31, so its offset overflows 32 bits. Cheap: the 4 GiB buffer is only reserved,
    the three rows are the only pages ever touched. Forward (down projection and GEMM) and the
    backward's per-adapter reduction over x (dA) read those rows."""
    stride, in_f = 2**30 + 64, 16
    buffer = torch.empty(2 * stride + in_f, dtype=torch.float16)
    x = buffer.as_strided((3, in_f), (stride, 1))
    gen = torch.Generator().manual_seed(11)
    x.copy_(torch.randn(3, in_f, generator=gen))
    x = leaf(x)
    assert x.stride(0) == stride and 2 * x.stride(0) >= 2**31
    weight = torch.randn(8, in_f, generator=gen).half() / 4
    lora_a = (torch.randn(2, 4, in_f, generator=gen) / 4).half().requires_grad_()
    lora_b = (torch.randn(2, 8, 4, generator=gen) / 2).half().requires_grad_()
    ids, scales = torch.tensor([1, -1, 1]), torch.tensor([0.5, 2.0])
    y = triton_call()(x, weight, lora_a, lora_b, None, ids, scales, None)
    g = torch.randn(3, 8, generator=gen).half()
    dx, da = torch.autograd.grad(y, (x, lora_a), g)

    rows = x.detach().clone().double().requires_grad_()
    a64 = lora_a.detach().double().requires_grad_()
    want = spec(rows, weight.double(), a64, lora_b.detach().double(), None, ids, scales.double(), None)
    want_dx, want_da = torch.autograd.grad(want, (rows, a64), g.double())
    assert_close(y, want, dtype=torch.float16, name="y")
    assert_close(dx, want_dx, dtype=torch.float16, kind="bwd", name="dx")
    assert_close(da, want_da, dtype=torch.float16, kind="bwd", name="dA")


@pytest.mark.parametrize(
    "mask",
    [
        [False, False, False, True, True],
        [False, True, False, False, True],
        [False, False, False, False, True],
        [True, True, True, True, True],
    ],  # fmt: skip
    ids=["dB+db", "dW+db", "db alone", "all"],
)
@pytest.mark.parametrize("pattern", ["mixed", "base_only", "few"])
def test_bias_gradient_rides_on_the_reductions_over_g(monkeypatch, mask, pattern):
    """db is the column sum of g over every token, base-only ones included, whichever pass
    carries it (dB's per-group reduction, dW's, or its own when neither trains: the only case
    with a ``g.sum`` of its own)."""
    case = case_of(37, 5, pattern, seed=11)
    t = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.inputs(torch.float32, "cpu").items()}
    x, w, a, b, ids = t["x"], t["weight"], t["lora_a"], t["lora_b"], t["adapter_ids"]
    scales, ranks, bias = t["scales"], t["ranks"], t["bias"]
    y, u = kernels.forward(x, w, a, b, ids, scales, bias, ranks, 0.0, None)
    g = torch.randn_like(y)
    sums_of_g = []
    real_sum = torch.Tensor.sum

    def spy(self, *args, **kwargs):
        if self.data_ptr() == g.data_ptr():
            sums_of_g.append(args)
        return real_sum(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", spy)
    got = kernels.backward(g, x, w, a, b, ids, scales, ranks, u, 0.0, None, mask)
    monkeypatch.undo()
    assert len(sums_of_g) == (0 if mask[1] or mask[3] else 1), sums_of_g
    want = kernels.backward(g, x, w, a, b, ids, scales, ranks, u, 0.0, None, [True] * 5)
    assert_close(got[4], g.double().sum(0), kind="bwd", name="db")
    for name, need, got_t, want_t in zip(["dx", "dW", "dA", "dB"], mask, got, want, strict=False):
        if need:
            assert torch.equal(got_t, want_t), name  # the sums ride along without changing the rest
        else:
            assert got_t is None, name
