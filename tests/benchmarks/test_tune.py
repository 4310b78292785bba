"""benchmarks/tune.py: the tuner's output is what the kernels' config lookup reads."""

from __future__ import annotations

import itertools
import json

import torch

from benchmarks import tune
from peftops.kernels import block_config


def test_tuner_keeps_the_fastest_candidate_per_launch_and_writes_loadable_json(tmp_path, monkeypatch):
    # Two interpreter-sized candidates per kernel; a fake clock makes the second one faster.
    def candidates(kernel, quick):
        small = dict(block_config.INTERPRETER[kernel])
        other = {k: (16 if k.startswith("BLOCK_") else v) for k, v in small.items()}
        return [small, other]

    ticks = itertools.cycle([2.0, 1.0])

    def fake_time(fn):
        fn()  # every candidate really launches (under the interpreter here)
        return next(ticks)

    entries = tune.tune(
        [(40, 48, 36, 8)],
        torch.float32,
        torch.device("cpu"),
        quick=True,
        time_fn=fake_time,
        candidate_fn=candidates,
        log=lambda *a: None,
    )
    assert {e["kernel"] for e in entries} == {"down", "gemm", "tn"}
    assert len(entries) == 6  # forward down + GEMM, backward down + dx GEMM + two reductions
    assert all(e["config"]["BLOCK_M"] == 16 and e["ms"] == 1.0 for e in entries)

    path = tune.write(entries, "Test GPU 80GB", tmp_path, torch.float32, capability=(9, 0))
    assert path == tmp_path / "lora_linear" / "Test_GPU_80GB.json"
    doc = json.loads(path.read_text())
    assert doc["device"] == "Test GPU 80GB" and doc["dtype"] == "float32" and doc["capability"] == [9, 0]
    want = next(e["config"] for e in entries if e["kernel"] == "gemm" and (e["n"], e["k"]) == (36, 48))
    assert block_config.nearest(doc["entries"], "gemm", 40, 36, 48, 8) == want  # the forward GEMM: n = out, k = in
    # What the kernels will launch with, on this GPU and on another of its capability.
    monkeypatch.setattr(block_config, "CONFIG_DIR", tmp_path)
    block_config.clear_caches()
    try:
        for name in ("Test GPU 80GB", "Test GPU 141GB"):
            assert block_config.lookup("lora_linear", "gemm", name, (9, 0), torch.float32, 40, 36, 48, 8) == want
    finally:
        block_config.clear_caches()


def test_tuner_refuses_to_run_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert tune.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_adapter_tuning_runs_the_row_kernel_with_each_candidate_and_writes_its_op(tmp_path):
    seen = []

    def candidates(kernel, quick):
        assert kernel == "rows"
        return [
            dict(BLOCK_M=32, BLOCK_D=32, num_warps=1, num_stages=1),
            dict(BLOCK_M=16, BLOCK_D=16, num_warps=1, num_stages=1),
        ]

    def fake_time(fn):
        y, h = fn()
        seen.append((y.shape, h.shape))
        return float(len(seen))  # the first candidate is the fastest

    entries = tune.tune(
        [(40, 24, 24, 4)],
        torch.float32,
        torch.device("cpu"),
        quick=True,
        time_fn=fake_time,
        candidate_fn=candidates,
        log=lambda *a: None,
        launches_fn=tune.adapter_launches,
    )
    assert seen == [((40, 24), (40, 4))] * 2
    assert [(e["kernel"], e["n"], e["k"], e["r"], e["config"]["BLOCK_M"]) for e in entries] == [("rows", 24, 24, 4, 32)]
    path = tune.write(entries, "Test GPU", tmp_path, torch.float32, "bottleneck_adapter")
    assert json.loads(path.read_text())["op"] == "bottleneck_adapter" and path.parent.name == "bottleneck_adapter"


def test_attention_sweep_launches_every_candidate_through_cfg(monkeypatch):
    # The old sweep set a module-global default table, which a shipped file for the GPU
    # overrides: on an H100 every candidate would have timed that file's config. Record what
    # the kernels' launchers actually receive, under the interpreter, with a fake clock.
    from benchmarks import sweep_attention as S
    from peftops.kernels import prefix_attention as A

    received = []
    real = A.launch_config

    def spy(kernel, block_d, q, cfg):
        received.append((kernel, None if cfg is None else dict(cfg)))
        return real(kernel, block_d, q, cfg)

    monkeypatch.setattr(A, "launch_config", spy)
    candidates = {
        "fwd": [(16, 16, 1, 1), (32, 16, 1, 1)],
        "dkdv": [(16, 16, 1, 1), (16, 32, 1, 1)],
        "dq": [(32, 16, 1, 1), (16, 16, 1, 1)],
    }
    runs = S.launches((1, 2, 20, 16, 5), "cpu", torch.float32)
    received.clear()  # launches() runs one forward for the backward's saved output
    ticks = itertools.count(3.0, -1.0)  # later candidates are faster
    results = S.sweep(runs, candidates, lambda fn: (fn(), next(ticks))[1], log=lambda *a: None)

    want = []
    for kernel, cands in candidates.items():
        for cand in cands:
            # The backward runs launch dK/dV twice (sequence keys, then the prefix's).
            want += [(kernel, S.as_config(cand))] * (2 if kernel == "dkdv" else 1)
    assert received == want
    assert [e["ms"] for k in candidates for e in results[k]] == [3.0, 2.0, 1.0, 0.0, -1.0, -2.0]
    doc = S.configs_doc(results, "Test GPU", (9, 0), "a test")
    assert doc["capability"] == [9, 0] and doc["provenance"] == "a test"
    assert [(e["kernel"], e["config"]) for e in doc["entries"]] == [
        (k, S.as_config(cands[-1])) for k, cands in candidates.items()
    ]
