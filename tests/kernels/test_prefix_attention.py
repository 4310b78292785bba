"""The Triton prefix-attention kernels: block boundaries, dead rows, determinism, the saved
log-sum-exp, partial gradients; on a GPU the FlashAttention error rule at real shapes,
compile, CUDA graphs and bitwise-reproducible backward.

The hypothesis test over random cases is ``tests/ops/test_prefix_attention.py``, which runs
the triton backend under the interpreter like every other backend."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import peftops
from peftops import reference
from peftops.testing import assert_close, check_fa_rule

from ..ops.helpers import assert_matches, check_graph_replay, grads_of
from ..ops.test_prefix_attention import loop_truth
from ..strategies import AttentionCase

GRAD_NAMES = ("q", "k", "v", "prefix_k", "prefix_v")


def triton_call(case: AttentionCase):
    def fn(q, k, v, prefix_k, prefix_v, key_padding_mask):
        with peftops.use_backend("triton"):
            return peftops.prefix_attention(
                q, k, v, prefix_k, prefix_v, causal=case.causal, key_padding_mask=key_padding_mask
            )

    return fn


def case_of(
    batch=2,
    hkv=1,
    group=2,
    q_len=5,
    seq_len=7,
    head_dim=16,
    prefix_len=3,
    prefix_mode="shared",
    causal=True,
    padding="none",
    layout="contiguous",
    seed=0,
) -> AttentionCase:
    return AttentionCase(
        batch=batch,
        hkv=hkv,
        group=group,
        q_len=q_len,
        seq_len=seq_len,
        head_dim=head_dim,
        prefix_len=prefix_len,
        prefix_mode=prefix_mode,
        causal=causal,
        padding=padding,
        layout=layout,
        seed=seed,
    )


# The interpreter's blocks are 16 x 16: these cross block edges on both sides of the causal
# diagonal, with prefixes of 0, 1, a whole block and several blocks.
@pytest.mark.parametrize(
    "q_len,seq_len,prefix_len,group,prefix_mode,causal",
    [
        (33, 33, 16, 1, "shared", True),  # L = S on a block edge + 1, a prefix of exactly one block
        (1, 47, 64, 8, "per_row", True),  # a decode step: sees everything; GQA 8
        (48, 17, 0, 2, "shared", True),  # L > S: the first 31 queries see no key at all (P = 0)
        (17, 64, 1, 4, "shared", True),  # L < S, a one-token prefix
        (31, 20, 35, 1, "per_row", False),  # not causal, a prefix spanning three blocks
    ],
)
def test_block_boundaries(q_len, seq_len, prefix_len, group, prefix_mode, causal):
    case = case_of(
        batch=2,
        hkv=2,
        group=group,
        q_len=q_len,
        seq_len=seq_len,
        head_dim=24,
        prefix_len=prefix_len,
        prefix_mode=prefix_mode,
        causal=causal,
        padding="random",
        layout="transposed",
        seed=q_len,
    )
    assert_matches(
        triton_call(case), loop_truth(case), case.inputs(torch.float32, "cpu"), torch.float32, what=str(case)
    )


def test_rows_that_see_nothing_are_zeros_with_zero_gradients():
    case = case_of(
        batch=2,
        hkv=1,
        group=2,
        q_len=19,
        seq_len=5,
        head_dim=8,
        prefix_len=0,
        prefix_mode="none",
        padding="whole_rows",
        seed=5,
    )
    t = case.inputs(torch.float32, "cpu")
    t["key_padding_mask"][1] = True  # row 0 sees nothing; in row 1 only the causal mask hides keys
    out, grads = grads_of(triton_call(case), t)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[1, :, :14]) == 0
    assert torch.count_nonzero(grads["q"][0]) == 0 and torch.count_nonzero(grads["k"][0]) == 0
    with torch.no_grad():
        _, lse = torch.ops.peftops.prefix_attention(
            t["q"], t["k"], t["v"], None, None, t["key_padding_mask"], True, 0.5, "triton"
        )
    assert (
        torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, :, :14]).all() and torch.isfinite(lse[1, :, 14:]).all()
    )


def test_saved_log_sum_exp_is_the_spec():
    case = case_of(batch=2, hkv=2, group=2, q_len=21, seq_len=30, head_dim=33, prefix_len=18, padding="random", seed=6)
    t = case.inputs(torch.float16, "cpu", requires_grad=False)
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], t["key_padding_mask"], True, 0.2)
    _, lse = torch.ops.peftops.prefix_attention(*args, "triton")
    _, ref = reference.prefix_attention(
        t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], True, t["key_padding_mask"], 0.2
    )
    assert lse.dtype == torch.float32
    assert_close(lse, ref, dtype=torch.float16, name="lse")


@pytest.mark.parametrize(
    "mask",
    [
        [True, False, False, False, False],
        [False, True, False, True, False],
        [False, False, True, False, True],
        [False, False, False, True, True],
    ],
)
def test_only_the_requested_gradients(mask):
    case = case_of(batch=3, hkv=2, group=2, q_len=18, seq_len=20, head_dim=16, prefix_len=5, padding="random", seed=7)
    t = case.inputs(torch.float32, "cpu", requires_grad=False)
    with torch.no_grad():
        args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], t["key_padding_mask"])
        out, lse = torch.ops.peftops.prefix_attention(*args, True, 0.25, "triton")
        g = torch.randn_like(out)
        got = torch.ops.peftops.prefix_attention_backward(g, *args, out, lse, True, 0.25, mask, "triton")
    want = reference.prefix_attention_backward(
        g, t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], True, t["key_padding_mask"], 0.25, mask
    )
    for name, need, a, b in zip(GRAD_NAMES, mask, got, want, strict=False):
        assert (a is None) == (not need), name
        if need:
            assert_close(a, b, kind="bwd", name=f"d{name}")


@pytest.mark.parametrize("batch,q_len,seq_len,prefix_len", [(0, 3, 4, 2), (2, 0, 4, 2), (2, 3, 0, 0), (2, 3, 0, 4)])
def test_zero_sizes(batch, q_len, seq_len, prefix_len):
    case = case_of(batch=batch, q_len=q_len, seq_len=seq_len, prefix_len=prefix_len, head_dim=8, seed=8)
    t = case.inputs(torch.float32, "cpu")
    out, grads = grads_of(triton_call(case), t)

    def spec(q, k, v, prefix_k, prefix_v, key_padding_mask):
        return reference.prefix_attention(q, k, v, prefix_k, prefix_v, case.causal, key_padding_mask)[0]

    ref_out, ref_grads = grads_of(spec, t)
    assert_close(out, ref_out)
    for name in grads:
        assert_close(grads[name], ref_grads[name], kind="bwd", name=name)


def test_forward_and_backward_are_bitwise_deterministic():
    case = case_of(batch=3, hkv=2, group=4, q_len=40, seq_len=40, head_dim=16, prefix_len=20, padding="random", seed=9)
    (y0, g0), (y1, g1) = (grads_of(triton_call(case), case.inputs(torch.float32, "cpu")) for _ in range(2))
    assert torch.equal(y0, y1)
    for name in g0:
        assert torch.equal(g0[name], g1[name]), name


def test_shipped_config_files_are_well_formed_and_read():
    from peftops.kernels import block_config

    paths = list((block_config.CONFIG_DIR / "prefix_attention").glob("*.json"))
    for path in paths:
        doc = json.loads(path.read_text())
        assert len(doc["capability"]) == 2 and doc["provenance"], path
        assert doc["entries"], path
        for e in doc["entries"]:
            kernel, block_d, dtype = e["kernel"], e["block_d"], getattr(torch, e["dtype"])
            assert block_d in block_config.ATTENTION_DEFAULTS[kernel][None], path
            assert set(e["config"]) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}, path
            # What the kernels launch with on that GPU, found by its name and capability.
            got = block_config.lookup(
                "prefix_attention", kernel, doc["device"], tuple(doc["capability"]), dtype, block_d=block_d
            )
            assert got == e["config"], path


class _LaunchSpy:
    """Stands in for a ``@triton.jit`` kernel: records the block sizes of each launch."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **meta):
            self.log.append((self.name, meta["BLOCK_M"], meta["BLOCK_N"]))
            return launch(*args, **meta)

        return call


def test_launchers_take_a_forced_config(monkeypatch):
    """Every attention launcher takes ``cfg=`` (how the sweep times its candidates) and the
    kernels launch with it, not with the looked-up config; the results do not change."""
    from peftops.kernels import prefix_attention as A

    log = []
    for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        monkeypatch.setattr(A, name, _LaunchSpy(name, getattr(A, name), log))
    case = case_of(batch=1, hkv=1, group=2, q_len=40, seq_len=40, head_dim=16, prefix_len=5, seed=19)
    t = case.inputs(torch.float32, "cpu", requires_grad=False)
    args = (t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], None, True, 0.25)
    big = dict(BLOCK_M=32, BLOCK_N=32, num_warps=1, num_stages=1)
    out, lse = A.forward(*args)
    g = torch.randn_like(out)
    mask = [True, True, True, True, True]
    want = A.backward(g, *args[:6], out, lse, True, 0.25, mask)
    assert {(m, n) for _, m, n in log} == {(16, 16)}  # the interpreter's defaults
    log.clear()
    out32, lse32 = A.forward(*args, cfg=big)
    got = A.backward(g, *args[:6], out, lse, True, 0.25, mask, cfg={"dkdv": big, "dq": big})
    # dK/dV of the 5 prefix keys: BLOCK_N cut to the prefix (16, the smallest tile).
    assert log == [("_fwd_kernel", 32, 32), ("_dkdv_kernel", 32, 32), ("_dkdv_kernel", 32, 16), ("_dq_kernel", 32, 32)]
    assert_close(out32, out, name="out")
    assert_close(lse32, lse, name="lse")
    for name, a, b in zip(GRAD_NAMES, got, want, strict=True):
        assert_close(a, b, kind="bwd", name=f"d{name}")


def test_head_dim_above_256_is_refused_by_name():
    case = case_of(head_dim=257, seed=10)
    with pytest.raises(peftops.BackendUnavailableError, match="head dims up to 256, got 257"):
        triton_call(case)(**case.inputs(torch.float32, "cpu"))


# -- GPU ---------------------------------------------------------------------------------------


def lowp_truth(case: AttentionCase):
    """The same attention written in plain PyTorch at the inputs' dtype (explicit concatenation,
    mask, softmax): the FlashAttention rule's low-precision baseline."""

    def fn(q, k, v, prefix_k, prefix_v, key_padding_mask):
        batch, hq, q_len, d = q.shape
        group = hq // k.shape[1]
        keys, values, p_len = k, v, 0
        if prefix_k is not None:
            pk = prefix_k.expand(batch, -1, -1, -1) if prefix_k.dim() == 3 else prefix_k
            pv = prefix_v.expand(batch, -1, -1, -1) if prefix_v.dim() == 3 else prefix_v
            keys, values, p_len = torch.cat([pk, k], 2), torch.cat([pv, v], 2), pk.shape[2]
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        visible = reference.visible_mask(batch, q_len, k.shape[2], p_len, case.causal, key_padding_mask, q.device)
        scores = (q @ keys.transpose(-1, -2)) * (1 / math.sqrt(d))
        # A row that sees no key: softmax over nothing is NaN, and so would be its gradient.
        alive = visible.any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~visible, -math.inf).masked_fill(~alive, 0.0), dim=-1)
        return (probs * alive) @ values

    return fn


GPU_CASES = {
    # name: (batch, hkv, group, q_len, seq_len, head_dim, prefix_len, prefix_mode, causal, padding)
    "gqa4-D128-P64-shared": (2, 2, 4, 1000, 1000, 128, 64, "shared", True, "none"),
    "D64-P33-per_row-padded": (2, 4, 1, 777, 1537, 64, 33, "per_row", True, "random"),
    "decode-L1-P256": (4, 8, 1, 1, 2049, 128, 256, "shared", True, "none"),
    "noncausal-D80-P0-whole_rows": (3, 2, 2, 300, 300, 80, 0, "shared", False, "whole_rows"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_real_shapes_fa_error_rule(name, dtype):
    batch, hkv, group, q_len, seq_len, head_dim, prefix_len, prefix_mode, causal, padding = GPU_CASES[name]
    case = case_of(
        batch=batch,
        hkv=hkv,
        group=group,
        q_len=q_len,
        seq_len=seq_len,
        head_dim=head_dim,
        prefix_len=prefix_len,
        prefix_mode=prefix_mode,
        causal=causal,
        padding=padding,
        seed=11,
    )
    t = case.inputs(dtype, "cuda")
    out, grads = grads_of(triton_call(case), t)

    def fresh(dt):
        return {
            k: (v.detach().to(dt).requires_grad_(v.requires_grad) if v is not None and v.is_floating_point() else v)
            for k, v in t.items()
        }

    ref_out, ref_grads = grads_of(loop_truth(case) if q_len == 1 else lowp_truth(case), fresh(torch.float32))
    low_out, low_grads = grads_of(lowp_truth(case), fresh(dtype))
    for what, got, ref, low in [("out", out, ref_out, low_out)] + [
        (n, grads[n], ref_grads[n], low_grads[n]) for n in grads
    ]:
        ok, err, budget = check_fa_rule(got, ref, low)
        assert ok, f"{name} {dtype} {what}: error {err:.3g} above the FA budget {budget:.3g}"


@pytest.mark.gpu
def test_gpu_sdpa_top_left_causal_is_wrong_and_peftops_is_right():
    case = case_of(batch=2, hkv=4, group=1, q_len=256, seq_len=256, head_dim=64, prefix_len=32, seed=12)
    t = case.inputs(torch.bfloat16, "cuda", requires_grad=False)
    ours = triton_call(case)(**t)
    keys = torch.cat([t["prefix_k"].expand(2, -1, -1, -1), t["k"]], dim=2)
    values = torch.cat([t["prefix_v"].expand(2, -1, -1, -1), t["v"]], dim=2)
    top_left = F.scaled_dot_product_attention(t["q"], keys, values, is_causal=True)
    f32 = {k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in t.items()}
    truth = lowp_truth(case)(**f32)
    assert (top_left.float() - truth).abs().max() > 0.1, "SDPA is_causal on the concatenation should be wrong"
    ok, err, budget = check_fa_rule(ours, truth, lowp_truth(case)(**t))
    assert ok, f"error {err:.3g} above the FA budget {budget:.3g}"


@pytest.mark.gpu
def test_gpu_compile_and_cuda_graph():
    case = case_of(
        batch=2,
        hkv=2,
        group=2,
        q_len=300,
        seq_len=300,
        head_dim=64,
        prefix_len=40,
        padding="random",
        layout="transposed",
        seed=13,
    )
    t = case.inputs(torch.bfloat16, "cuda")
    eager_out, eager_grads = grads_of(triton_call(case), t)
    comp_out, comp_grads = grads_of(torch.compile(triton_call(case), fullgraph=True), t)
    assert torch.equal(eager_out, comp_out)
    for name in eager_grads:
        assert torch.equal(eager_grads[name], comp_grads[name]), name
    fresh = dataclasses.replace(case, seed=14).inputs(torch.bfloat16, "cuda")
    fresh["key_padding_mask"] = t["key_padding_mask"]  # copied in place: same dtype and shape
    check_graph_replay(triton_call(case), t, fresh)


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_mode", ["shared", "per_row"])
def test_gpu_backward_is_bitwise_reproducible(prefix_mode):
    """No atomics: the key-block programs own their dK/dV, the query-block programs their dq,
    and a shared prefix's batch sum runs in a fixed order."""
    case = case_of(
        batch=4, hkv=4, group=2, q_len=1024, seq_len=1024, head_dim=128, prefix_len=64, prefix_mode=prefix_mode, seed=15
    )
    t = case.inputs(torch.bfloat16, "cuda")
    runs = [grads_of(triton_call(case), t, seed=1) for _ in range(3)]
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for name in grads:
            assert torch.equal(grads[name], runs[0][1][name]), name


def test_non_positive_scale_is_refused_by_name():
    case = case_of(seed=16)
    t = case.inputs(torch.float32, "cpu")
    with peftops.use_backend("triton"), pytest.raises(peftops.BackendUnavailableError, match="scale > 0"):
        peftops.prefix_attention(t["q"], t["k"], t["v"], t["prefix_k"], t["prefix_v"], scale=-0.5)


# numpy (the interpreter) warns about the overflowing probabilities the kernels then discard.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal,prefix_len", [(True, 3), (False, 0)])
def test_very_negative_scores_past_the_key_bound_give_no_nan(dtype, causal, prefix_len):
    """Every score about -100 (lse about -100): a key past the bound of a partial block loads
    k = v = 0 and gets p = 2^(-lse2) = inf unless masked, and inf * 0 = NaN in dq."""
    case = case_of(
        batch=1, hkv=1, group=1, q_len=5, seq_len=5, head_dim=16, prefix_len=prefix_len, causal=causal, seed=17
    )
    t = case.inputs(dtype, "cpu")
    with torch.no_grad():
        t["q"].copy_(torch.ones_like(t["q"]) + 0.01 * t["q"])
        t["k"].copy_(-torch.ones_like(t["k"]) + 0.01 * t["k"])
        if t["prefix_k"] is not None:
            t["prefix_k"].copy_(-torch.ones_like(t["prefix_k"]))

    def fn(**kw):
        with peftops.use_backend("triton"):
            return peftops.prefix_attention(
                kw["q"],
                kw["k"],
                kw["v"],
                kw["prefix_k"],
                kw["prefix_v"],
                causal=causal,
                scale=6.25 if dtype == torch.float32 else 0.75,
            )

    out, grads = grads_of(fn, t)
    assert torch.isfinite(out).all()
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name


def test_strided_key_padding_mask():
    case = case_of(batch=3, hkv=1, group=2, q_len=9, seq_len=21, head_dim=16, prefix_len=4, padding="random", seed=18)
    t = case.inputs(torch.float32, "cpu")
    strided = t["key_padding_mask"].t().contiguous().t()
    assert not strided.is_contiguous()
    t_strided = dict(t, key_padding_mask=strided)
    assert_matches(triton_call(case), loop_truth(case), t_strided, torch.float32, what="strided mask")


# numpy (the interpreter) warns about the NaN arithmetic.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["q row 3", "k key 2, a larger max later", "k key 18", "prefix key 1"])
def test_nan_scores_give_nan_rows_as_in_the_reference(where):
    """The online softmax's running max is ``tl.maximum`` (maxnum: it ignores a NaN score), so
    m stays finite; the NaN must still reach the row through that score's own probability,
    ``2^(NaN - m)``, into l and the accumulator, whatever the max does in later blocks. Rows
    that cannot see a NaN key stay finite (it is masked to -inf, as in the reference)."""
    g = torch.Generator().manual_seed(20)
    q, k, v = (torch.randn(1, 1, 20, 16, generator=g) for _ in range(3))
    pk, pv = torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g)
    if where == "q row 3":
        q[0, 0, 3, 5] = math.nan
    elif where == "k key 18":
        k[0, 0, 18, 5] = math.nan  # seen by rows 18 and 19 only, in a masked block
    elif where == "prefix key 1":
        pk[0, 1, 5] = math.nan
    else:
        # Rows 16-19 meet the NaN in an unmasked block, then key 17's large score raises m.
        k[0, 0, 2, 5] = math.nan
        k[0, 0, 17] = 20 * q[0, 0, 17]
    out, lse = torch.ops.peftops.prefix_attention(q, k, v, pk, pv, None, True, 0.25, "triton")
    ref_out, ref_lse = reference.prefix_attention(q, k, v, pk, pv, True, None, 0.25)
    assert ref_out.isnan().any()
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())
    assert_close(out.nan_to_num(), ref_out.nan_to_num(), name="out")
    assert_close(lse.nan_to_num(), ref_lse.nan_to_num(), name="lse")
