"""The persistent TMA GEMM for Hopper (peftops.kernels.lora_linear_tma).

On CPU the kernel runs under TRITON_INTERPRET=1 (whose tensor descriptors zero-fill loads
past the edges and clip stores, as TMA does), in float32 and float16; its predicate, grid and
configs are plain Python. The sm_90a compile test needs no GPU: it compiles in a subprocess,
without the interpreter, with the ptxas and cuobjdump Triton ships. The ``gpu`` tests run the
kernel in bf16 at a real shape."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from peftops.kernels import lora_linear as pointer
from peftops.kernels import lora_linear_tma as T
from peftops.testing import assert_close

#: Small tiles, and a persistent grid of 3 programs, so that every program walks several tiles.
SMALL = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1, NUM_SMS=3)


def _operands(m, n, k, r, dtype, *, trans_w, bias, seed, device="cpu"):
    """x, the stored w, u, B' (r, N) and bias at unit scale, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)

    x = draw(m, k)
    w_nk = draw(n, k, scale=k**-0.5)  # W'^T, as the forward's weight is stored
    u = draw(m, r)
    b = draw(r, n, scale=max(r, 1) ** -0.5)
    w = w_nk if trans_w else w_nk.T.contiguous()
    return x, w, u, b, (draw(n) if bias else None)


def _truth(x, w, u, b, bias, *, trans_w, epi_scale=1.0):
    d = torch.float64
    w_kn = w.to(d).T if trans_w else w.to(d)
    out = x.to(d) @ w_kn + epi_scale * (u.to(d) @ b.to(d))
    return out + bias.to(d) if bias is not None else out


# -- the kernel, under the interpreter -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("trans_w", [True, False], ids=["forward", "dx"])
@pytest.mark.parametrize("rank", [1, 16, 64])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64_truth_on_partial_tiles(dtype, trans_w, rank, bias):
    """M, N and K are no multiples of the 32-wide tiles (N and K are of 8, as TMA needs), so
    every tile edge relies on the descriptors' zero fill and clipped stores; the output starts
    as NaN (PEFTOPS_POISON_OUTPUTS), so an element no program wrote fails."""
    m, n, k = 77, 40, 56
    ops = _operands(m, n, k, rank, dtype, trans_w=trans_w, bias=bias, seed=rank + 100 * trans_w + 7 * bias)
    out = T.gemm_tma(*ops, trans_w=trans_w, cfg=SMALL)
    assert out.shape == (m, n) and out.dtype == dtype and out.is_contiguous()
    assert_close(out, _truth(*ops, trans_w=trans_w), dtype=dtype, name=f"gemm_tma r={rank}")


@pytest.mark.parametrize("trans_w", [True, False], ids=["forward", "dx"])
@pytest.mark.parametrize("epi_scale", [0.5, 3.0, 0.0])
@pytest.mark.parametrize("rank", [0, 100])
def test_epi_scale_and_ranks_over_one_step(trans_w, epi_scale, rank):
    """epi_scale scales the rank-r term only; rank 100 takes two unrolled steps of 64, rank 0
    none; epi_scale 0 drops the term."""
    ops = _operands(45, 24, 40, rank, torch.float32, trans_w=trans_w, bias=True, seed=rank + 1)
    out = T.gemm_tma(*ops, epi_scale=epi_scale, trans_w=trans_w, cfg=SMALL)
    assert_close(out, _truth(*ops, trans_w=trans_w, epi_scale=epi_scale), dtype=torch.float32)


def test_strided_operands():
    """x a row slice of a wider buffer (TMA row stride != K), u and B' transposed views, bias
    strided: the descriptors take x's stride, the rank-r pointers any strides."""
    m, n, k, r = 33, 24, 40, 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k + 16, generator=g)[:, :k]
    w = torch.randn(n, k, generator=g) / k**0.5
    u = torch.randn(r, m, generator=g).T
    b = torch.randn(n, r, generator=g).T
    bias = torch.randn(2 * n, generator=g)[::2]
    out = T.gemm_tma(x, w, u, b, bias, trans_w=True, cfg=SMALL)
    assert_close(out, _truth(x, w, u, b, bias, trans_w=True), dtype=torch.float32)


@pytest.mark.parametrize("trans_w", [True, False], ids=["forward", "dx"])
def test_same_result_as_the_pointer_kernel_at_its_call_sites(trans_w):
    """The arguments lora_linear's forward and dx GEMMs pass, in both launchers: the forward
    ``gemm(x, weight.T, u, lora_b.T, bias)`` is ``gemm_tma(x, weight, u, lora_b.T, bias,
    trans_w=True)``, the dx ``gemm(g, weight, v, lora_a, None)`` is ``gemm_tma(g, weight, v,
    lora_a, None, trans_w=False)``."""
    tokens, in_f, out_f, r = 50, 48, 40, 16
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    lora_a = torch.randn(r, in_f, generator=g) / in_f**0.5
    lora_b = torch.randn(out_f, r, generator=g) / r**0.5
    if trans_w:
        x, u, bias = torch.randn(tokens, in_f, generator=g), torch.randn(tokens, r, generator=g), torch.randn(out_f)
        want = pointer.gemm(x, weight.T, u, lora_b.T, bias)
        got = T.gemm_tma(x, weight, u, lora_b.T, bias, trans_w=True, cfg=SMALL)
    else:
        grad, v = torch.randn(tokens, out_f, generator=g), torch.randn(tokens, r, generator=g)
        want = pointer.gemm(grad, weight, v, lora_a, None)
        got = T.gemm_tma(grad, weight, v, lora_a, None, trans_w=False, cfg=SMALL)
    assert_close(got, want, dtype=torch.float32)


def test_empty_output_launches_nothing():
    x, w, u, b, _ = _operands(0, 16, 8, 4, torch.float16, trans_w=True, bias=False, seed=0)
    assert T.gemm_tma(x, w, u, b, None, trans_w=True).shape == (0, 16)


@pytest.mark.parametrize("bad", [math.inf, math.nan, 1e-30, -1e30])
def test_epi_scale_out_of_range_is_refused_by_name(bad):
    ops = _operands(4, 8, 8, 2, torch.float32, trans_w=True, bias=False, seed=0)
    with pytest.raises(ValueError, match="gemm_tma: epi_scale"):
        T.gemm_tma(*ops, epi_scale=bad, trans_w=True, cfg=SMALL)


# -- the predicate ------------------------------------------------------------------------------


def _fp16(m=64, n=40, k=48, r=16, trans_w=True, bias=True):
    return _operands(m, n, k, r, torch.float16, trans_w=trans_w, bias=bias, seed=0)


@pytest.mark.parametrize("trans_w", [True, False], ids=["forward", "dx"])
def test_layout_accepts_aligned_16_bit_operands(trans_w):
    for dtype in (torch.float16, torch.bfloat16):
        x, w, u, b, bias = _operands(77, 40, 56, 3, dtype, trans_w=trans_w, bias=True, seed=0)
        assert T.layout_reason(x, w, u, b, bias, trans_w=trans_w) is None


def test_layout_reasons():
    x, w, u, b, bias = _fp16()
    f32 = [t.float() for t in (x, w, u, b, bias)]
    cases = {
        "float16 or bfloat16, got torch.float32": (f32, True),
        "one dtype, got x torch.float16 and bias torch.bfloat16": ((x, w, u, b, bias.bfloat16()), True),
        # x column-major: its feature dimension is not the contiguous one.
        "x's last dimension contiguous": ((x.T.contiguous().T, w, u, b, bias), True),
        # 2 bytes past an aligned base (the row stride, 112 bytes, is fine).
        "x's base address and row stride": ((torch.empty(64, 56, dtype=torch.float16)[:, 1:49], w, u, b, bias), True),
        # K = 44 halves: x a slice with 96-byte rows is fine, w's own 88-byte rows are not.
        "w's base address and row stride": ((x[:, :44], torch.empty(40, 44, dtype=torch.float16), u, b, bias), True),
        # N = 36 halves: the output's 72-byte rows cannot be stored by descriptor.
        "N = 36 (72 bytes)": ((x, w[:36], u, b[:, :36], bias[:36]), True),
        "x's rows not to overlap": ((x[:1].expand(64, 48), w, u, b, bias), True),
        "K > 0": ((x[:, :0], w[:, :0], u, b, bias), True),
        "ranks up to 256, got 257": ((x, w, torch.zeros(64, 257, dtype=torch.float16), b, bias), True),
        "w's reduction dimension to be x's 48": ((x, w, u, b, bias), False),
    }
    for want, (ops, trans_w) in cases.items():
        reason = T.layout_reason(*ops, trans_w=trans_w)
        assert reason is not None and want in reason, (want, reason)


def test_supports_tma_refuses_cpu_and_the_interpreter():
    reason = T.supports_tma(*_fp16(), trans_w=True)
    assert reason is not None and "TMA needs a CUDA device" in reason


# -- configs and grid ---------------------------------------------------------------------------


def test_sm90_config_fills_the_waves():
    big, mid, small = (dict(c) for c in T.SM90_CONFIGS)
    assert T.pick_sm90(8192, 4096, 132) == big  # 1024 tiles of 128 x 256
    assert T.pick_sm90(8192, 14336, 132) == big
    assert T.pick_sm90(512, 4096, 132) == mid  # 64 tiles of 128 x 256 leave half the SMs idle
    assert T.pick_sm90(64, 512, 132) == small  # nothing fills the chip: the smallest tile
    assert T.default_config(8192, 4096, torch.device("cpu")) == T.INTERPRETER_CONFIG


def test_shipped_configs_are_valid_and_fit_shared_memory():
    for cfg in T.SM90_CONFIGS:
        full = T.check_config(dict(cfg), 16)
        stage = (full["BLOCK_M"] + full["BLOCK_N"]) * full["BLOCK_K"] * 2
        store = full["BLOCK_M"] * full["BLOCK_N"] // 2 * 2
        assert full["num_stages"] * stage + store <= 227 * 1024, cfg


def test_check_config_completes_and_refuses_by_name():
    full = T.check_config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 33)
    assert full["FLATTEN"] is True and full["EPI_SUBTILE"] is True and full["BLOCK_R"] == 64
    assert T.check_config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), 1)["BLOCK_R"] == 16
    assert [T.rank_block(r, 64, 64, 8) for r in (0, 1, 16, 17, 64, 65, 256)] == [16, 16, 16, 32, 64, 64, 64]
    # At most 32 tile elements of u and B' per thread: 128 x 256 over 8 warps takes 16 ranks a step.
    assert [T.rank_block(r, 128, 256, 8) for r in (1, 16, 64, 256)] == [16, 16, 16, 16]
    assert [T.rank_block(64, *shape) for shape in ((128, 128, 8), (64, 128, 4))] == [32, 16]
    base = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    bad = {
        "unknown keys ['BLOCK_Q']": dict(base, BLOCK_Q=4),
        "missing ['BLOCK_K']": dict(BLOCK_M=64, BLOCK_N=64),
        "BLOCK_M: expected a power of two in [16, 256], got 48": dict(base, BLOCK_M=48),
        "BLOCK_N: expected a power of two in [16, 256], got 512": dict(base, BLOCK_N=512),
        "BLOCK_N: EPI_SUBTILE halves it, so expected >= 32, got 16": dict(base, BLOCK_N=16),
        "num_warps: expected a positive int, got 0": dict(base, num_warps=0),
        "FLATTEN: expected a bool, got 1": dict(base, FLATTEN=1),
    }
    for want, cfg in bad.items():
        with pytest.raises(ValueError, match=f"gemm_tma: cfg: {want}".replace("[", r"\[").replace("]", r"\]")):
            T.check_config(cfg, 16)
    assert T.check_config(dict(base, BLOCK_N=16, EPI_SUBTILE=False), 16)["BLOCK_N"] == 16


def test_bad_config_is_refused_before_launch():
    with pytest.raises(ValueError, match="gemm_tma: cfg: unknown keys"):
        T.gemm_tma(*_fp16(), trans_w=True, cfg=dict(SMALL, BLOCK_Q=1))


def test_persistent_grid():
    cfg = dict(BLOCK_M=128, BLOCK_N=256)
    assert T.grid_size(8192, 4096, cfg, 132) == (132, 132)  # one program per SM
    assert T.grid_size(256, 512, cfg, 132) == (4, 132)  # never more programs than tiles
    assert T.grid_size(8192, 4096, dict(cfg, NUM_SMS=3), 132) == (3, 3)
    assert T.grid_size(1, 1, cfg, 1) == (1, 1)


# -- sm_90a, compiled ahead of time -------------------------------------------------------------

COMPILE_SCRIPT = Path(__file__).with_name("compile_lora_linear_tma.py")
#: H100 / H200: 227 KB of shared memory per block, opted in.
SM90_SHARED_LIMIT = 232448


@pytest.mark.slow
def test_compiles_for_sm90a_with_wgmma_tma_and_no_spills():
    """The default config, bf16, forward (with bias), dx and DoRA's forward (column scale, the
    unscaled output stored too), r = 16: wgmma (HGMMA in SASS, no HMMA fallback), TMA loads and
    stores, no spills, no stack frame, shared memory in bounds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, str(COMPILE_SCRIPT)], capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(row["trans_w"], row["bias"], row["dora"]) for row in rows] == [
        (True, True, False),
        (False, False, False),
        (True, True, True),
    ]
    for row in rows:
        assert row["target"] == "sm_90a", row
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0 and row["stack_frame"] == 0, row
        assert row["ptx_wgmma"] > 0 and row["sass_hgmma"] > 0 and row["sass_hmma"] == 0, row
        assert row["ptx_tma"] > 0 and row["sass_utma"] > 0, row
        assert 0 < row["shared_bytes"] <= SM90_SHARED_LIMIT, row


# -- GPU ----------------------------------------------------------------------------------------


def _hopper() -> bool:
    return torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.parametrize("trans_w", [True, False], ids=["forward", "dx"])
def test_gpu_bf16_real_shape(trans_w):
    """1024 tokens, 4096 x 4096, r = 16, in bf16 against float64 truth, with the default
    (tuned or sm_90) config."""
    ops = _operands(1024, 4096, 4096, 16, torch.bfloat16, trans_w=trans_w, bias=trans_w, seed=5, device="cuda")
    if _hopper():
        assert T.supports_tma(*ops, trans_w=trans_w) is None
    out = T.gemm_tma(*ops, trans_w=trans_w)
    assert_close(out, _truth(*ops, trans_w=trans_w), dtype=torch.bfloat16, name="gemm_tma bf16")


@pytest.mark.gpu
def test_gpu_every_shipped_config_and_partial_tiles():
    """Each sm_90 config, flattened and not, on a shape with partial tiles in M, N and K, and
    rank 100 (two rank steps), with epi_scale != 1."""
    ops = _operands(1000, 1064, 776, 100, torch.bfloat16, trans_w=False, bias=True, seed=6, device="cuda")
    truth = _truth(*ops, trans_w=False, epi_scale=1.25)
    for cfg in T.SM90_CONFIGS:
        for flatten in (True, False):
            out = T.gemm_tma(*ops, epi_scale=1.25, trans_w=False, cfg=dict(cfg, FLATTEN=flatten))
            assert_close(out, truth, dtype=torch.bfloat16, name=f"{cfg} FLATTEN={flatten}")


@pytest.mark.gpu
def test_gpu_other_thread_and_cuda_graph():
    """Triton's scratch allocator is per thread (a ContextVar): a thread that never launched
    (as autograd's backward threads) must still get one; and a CUDA graph replays the kernel
    on fresh inputs copied into the captured ones."""
    ops = _operands(512, 1024, 1024, 16, torch.bfloat16, trans_w=True, bias=True, seed=7, device="cuda")
    want = T.gemm_tma(*ops, trans_w=True)
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", T.gemm_tma(*ops, trans_w=True)))
    worker.start()
    worker.join()
    assert torch.equal(box["out"], want)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        T.gemm_tma(*ops, trans_w=True)  # warm up (compile) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = T.gemm_tma(*ops, trans_w=True)
    fresh = _operands(512, 1024, 1024, 16, torch.bfloat16, trans_w=True, bias=True, seed=8, device="cuda")
    for dst, src in zip(ops, fresh, strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, T.gemm_tma(*fresh, trans_w=True))


def test_float32_u_is_taken_with_bfloat16_only():
    """The ops save u in float32; the kernel rounds it to bfloat16 in registers (float32's
    range), while in float16 that could overflow, so the pointer kernel keeps float16."""
    x, w = torch.randn(16, 32).bfloat16(), torch.randn(24, 32).bfloat16()
    u, b = torch.randn(16, 4), torch.randn(4, 24).bfloat16()
    assert T.layout_reason(x, w, u, b, trans_w=True) is None
    reason = T.layout_reason(x.half(), w.half(), u, b.half(), trans_w=True)
    assert reason is not None and "u torch.float32" in reason


def test_lora_gemm_routes_to_the_tma_kernel_where_it_applies(monkeypatch):
    """lora_linear's gemm hands dropout-free calls to gemm_tma when supports_tma says yes, with the
    weight's stored orientation: the forward (weight.T) as trans_w=True, dx (weight) as False."""
    seen = []
    monkeypatch.setattr(T, "supports_tma", lambda *a, **k: None)
    monkeypatch.setattr(T, "gemm_tma_pre", lambda x, w, u, b, bias, **k: (seen.append((w, k)) or "tma", None))
    weight = torch.randn(24, 32)
    x, u, a, lora_b = torch.randn(5, 32), torch.randn(5, 4), torch.randn(4, 32), torch.randn(24, 4)
    assert pointer.gemm(x, weight.T, u, lora_b.T, None) == "tma"
    assert seen[-1][0] is not None and seen[-1][0].data_ptr() == weight.data_ptr() and seen[-1][1]["trans_w"]
    g = torch.randn(5, 24)
    assert pointer.gemm(g, weight, u, a, None, epi_scale=2.0) == "tma"
    assert not seen[-1][1]["trans_w"] and seen[-1][1]["epi_scale"] == 2.0
    # DoRA's epilogue goes the same way, its column scale and saved output passed along.
    col = torch.rand(24)
    assert pointer.gemm_col_scaled(x, weight.T, u, lora_b.T, None, col, save_pre=True)[0] == "tma"
    assert seen[-1][1]["col_scale"] is not None and seen[-1][1]["save_pre"]
    # A packed dropout mask (or a forced config) keeps the pointer kernel.
    out = pointer.gemm(x, weight.T, u, lora_b.T, None, cfg=dict(pointer.block_config.INTERPRETER["gemm"]))
    assert isinstance(out, torch.Tensor) and len(seen) == 3
