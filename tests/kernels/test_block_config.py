"""The one config lookup every Triton launcher uses (:mod:`peftops.kernels.block_config`):
a GPU's own tuned file, else a same-capability GPU's, else family defaults; device properties
read once per device; ``cfg=`` forcing a launch. All on CPU: the lookup is a pure function of
a device name and capability, and the device queries are faked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from peftops.kernels import block_config as B

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def shipped(op: str) -> dict:
    return json.loads((B.CONFIG_DIR / op / B.file_name(H100)).read_text())


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty config folder in place of the shipped one, caches cleared around the test."""
    monkeypatch.setattr(B, "CONFIG_DIR", tmp_path)
    B.clear_caches()
    yield tmp_path
    B.clear_caches()


def write(folder, op, device, capability, entries, dtype="bfloat16"):
    (folder / op).mkdir(exist_ok=True)
    doc = {"device": device, "capability": list(capability), "op": op, "dtype": dtype, "entries": entries}
    (folder / op / B.file_name(device)).write_text(json.dumps(doc))


def gemm_entry(block_m, n=4096, k=4096, r=16, m_bucket=8192):
    cfg = dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return {"kernel": "gemm", "n": n, "k": k, "r": r, "m_bucket": m_bucket, "config": cfg}


def test_shipped_files_record_their_capability():
    for op in ("lora_linear", "bottleneck_adapter", "prefix_attention"):
        assert shipped(op)["capability"] == [9, 0], op


def test_an_h200_without_files_uses_the_h100s_tuned_configs():
    """Issue 10 item 4: same compute capability (9.0) before the family defaults."""
    lora = shipped("lora_linear")["entries"][0]
    got = B.lookup("lora_linear", "gemm", H200, (9, 0), torch.bfloat16, 8192, lora["n"], lora["k"], lora["r"])
    assert got == lora["config"] != B.DEFAULTS["gemm"][9]
    for e in shipped("prefix_attention")["entries"]:
        got = B.lookup("prefix_attention", e["kernel"], H200, (9, 0), torch.bfloat16, block_d=e["block_d"])
        assert got == e["config"], e["kernel"]
    adapter = shipped("bottleneck_adapter")["entries"][0]
    got = B.lookup("bottleneck_adapter", "rows", H200, (9, 0), torch.bfloat16, 16384, 4096, 4096, adapter["r"])
    assert got == adapter["config"]


def test_another_capability_gets_the_family_defaults():
    for name, cap, family in ((H200, (9, 1), 9), ("NVIDIA A100-SXM4-80GB", (8, 0), 8), ("Tesla T4", (7, 5), None)):
        assert (
            B.lookup("lora_linear", "gemm", name, cap, torch.bfloat16, 8192, 4096, 4096, 16)
            == (B.DEFAULTS["gemm"][family])
        )
    # Attention: Hopper's tables on 9.x and 10.x, the small-shared-memory ones elsewhere.
    hopper = B.ATTENTION_DEFAULTS["fwd"][9][128]
    small = B.ATTENTION_DEFAULTS["fwd"][None][128]
    assert hopper != small
    assert B.lookup("prefix_attention", "fwd", "NVIDIA B200", (10, 0), block_d=128) == hopper
    assert B.lookup("prefix_attention", "fwd", "NVIDIA GeForce RTX 5090", (12, 0), block_d=128) == small
    assert (
        B.lookup("prefix_attention", "fwd", "NVIDIA A100-SXM4-80GB", (8, 0), block_d=32)
        == (B.ATTENTION_DEFAULTS["fwd"][None][64])
    )


def test_own_file_first_then_same_capability_in_name_order(config_dir):
    write(config_dir, "lora_linear", "GPU B", (9, 0), [gemm_entry(32)])
    write(config_dir, "lora_linear", "GPU A", (9, 0), [gemm_entry(16)])
    write(config_dir, "lora_linear", "GPU C", (8, 0), [gemm_entry(64)])

    def block_m(name, cap):
        return B.lookup("lora_linear", "gemm", name, cap, torch.bfloat16, 8192, 4096, 4096, 16)["BLOCK_M"]

    assert block_m("GPU B", (9, 0)) == 32  # its own
    assert block_m("GPU D", (9, 0)) == 16  # the first 9.0 file by name, deterministic
    assert block_m("GPU D", (8, 0)) == 64
    assert block_m("GPU D", (8, 6)) == B.DEFAULTS["gemm"][8]["BLOCK_M"]  # capability is exact


def test_own_file_without_the_key_falls_to_the_defaults_not_to_another_gpu(config_dir):
    # The tuner of GPU B left 512 tokens untuned (too far from 8192): the defaults serve there,
    # not GPU A's entry for 512, which was tuned on other hardware.
    write(config_dir, "lora_linear", "GPU A", (9, 0), [gemm_entry(16, m_bucket=512)])
    write(config_dir, "lora_linear", "GPU B", (9, 0), [gemm_entry(32)])
    args = ("lora_linear", "gemm", "GPU B", (9, 0), torch.bfloat16, 512, 4096, 4096, 16)
    assert B.lookup(*args) == B.DEFAULTS["gemm"][9]


def test_entries_serve_their_own_dtype_only(config_dir):
    write(config_dir, "lora_linear", "GPU A", (9, 0), [gemm_entry(16)], dtype="bfloat16")
    got = B.lookup("lora_linear", "gemm", "GPU A", (9, 0), torch.float32, 8192, 4096, 4096, 16)
    want = dict(B.DEFAULTS["gemm"][9], BLOCK_K=B.DEFAULTS["gemm"][9]["BLOCK_K"] // 2)
    assert got == want
    # Attention entries carry their dtype each; float32 defaults halve BLOCK_N and drop a stage.
    (config_dir / "prefix_attention").mkdir()
    doc = {
        "device": "GPU A",
        "capability": [9, 0],
        "entries": [
            {"kernel": "fwd", "block_d": 128, "dtype": "float16", "config": dict(BLOCK_M=16, BLOCK_N=16)},
        ],
    }
    (config_dir / "prefix_attention" / B.file_name("GPU A")).write_text(json.dumps(doc))
    assert B.lookup("prefix_attention", "fwd", "GPU A", (9, 0), torch.float16, block_d=128)["BLOCK_M"] == 16
    hopper = B.ATTENTION_DEFAULTS["fwd"][9][128]
    assert B.lookup("prefix_attention", "fwd", "GPU A", (9, 0), torch.float32, block_d=128) == dict(
        hopper, BLOCK_N=hopper["BLOCK_N"] // 2, num_stages=hopper["num_stages"] - 1
    )


def test_device_properties_are_read_once_per_device(monkeypatch):
    """Every launch looks up its config and fits its stages: the CUDA queries behind them cost
    host time per call unless cached per device."""
    calls = []

    def props(index):
        calls.append(index)
        return SimpleNamespace(
            name=H200, major=9, minor=0, shared_memory_per_block_optin=100 * 1024, multi_processor_count=132
        )

    def forbidden(*args, **kwargs):
        raise AssertionError("queried per call")

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "get_device_name", forbidden)
    monkeypatch.setattr(torch.cuda, "get_device_capability", forbidden)
    monkeypatch.setattr(B, "interpreting", lambda: False)
    B._device_info.cache_clear()
    try:
        for index in (0, 1, 0, 1):
            dev = torch.device("cuda", index)
            cfg = B.config("lora_linear", "gemm", dev, 8192, 4096, 4096, 16, torch.bfloat16)
            assert cfg["BLOCK_N"] == 256  # the H100's tuned entry, found by capability
            # 128 x 256 x 64 bf16 tiles: 48 KB a stage, two fit in 100 KB with the 10% margin.
            opts = B.fit_stages({"num_stages": 4}, (128 + 256) * 64 * 2, dev)
            assert opts["num_stages"] == 1
            assert B.fit_stages({"num_stages": 4}, 16 * 1024, dev)["num_stages"] == 4
        assert calls == [0, 1]
        assert B.device_info(torch.device("cuda", 1)).sms == 132
    finally:
        B._device_info.cache_clear()


def test_off_gpu_and_under_the_interpreter_every_kernel_has_small_blocks():
    for kernel in ("gemm", "down", "rows", "tn", "seg", "fwd", "dkdv", "dq"):
        assert B.config("any", kernel, torch.device("cpu")) == B.INTERPRETER[kernel]
        assert B.config("any", kernel, torch.device("cpu")) is not B.INTERPRETER[kernel]  # a copy


class _LaunchSpy:
    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **meta):
            self.log.append(meta["BLOCK_M"])
            return launch(*args, **meta)

        return call


def test_multi_lora_launchers_take_a_forced_config(monkeypatch):
    from peftops.kernels import multi_lora_linear as M

    log = []
    for name in ("_seg_down_kernel", "_seg_gemm_kernel", "_seg_tn_kernel"):
        monkeypatch.setattr(M, name, _LaunchSpy(getattr(M, name), log))
    g = torch.Generator().manual_seed(0)
    t, d_in, d_out, n, r = 37, 24, 20, 3, 4
    x, w = torch.randn(t, d_in, generator=g), torch.randn(d_out, d_in, generator=g)
    a, b = torch.randn(n, r, d_in, generator=g), torch.randn(n, d_out, r, generator=g)
    ids = torch.randint(-1, n, (t,), generator=g)
    scales = torch.tensor([0.5, 1.0, 2.0])
    args = (x, w, a, b, ids, scales, None, None, 0.0, None)
    y, u = M.forward(*args)
    grad = torch.randn(t, d_out, generator=g)
    bwd = (grad, x, w, a, b, ids, scales, None, u, 0.0, None, [True, True, True, True, False])
    want = M.backward(*bwd)
    assert set(log) == {B.INTERPRETER["seg"]["BLOCK_M"]}
    log.clear()
    forced = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=1, num_stages=1)
    y2, u2 = M.forward(*args, cfg=forced)
    got = M.backward(*bwd, cfg=forced)
    assert set(log) == {32} and len(log) == 6  # down + GEMM; down + dx GEMM + dA + dB
    torch.testing.assert_close(y2, y)
    torch.testing.assert_close(u2, u)
    for a_, b_ in zip(got, want, strict=True):
        if b_ is not None:
            torch.testing.assert_close(a_, b_)
