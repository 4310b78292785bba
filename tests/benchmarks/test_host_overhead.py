"""``python -m benchmarks --host-overhead``: a smoke run of the CLI and the JSON it writes, and
the per-call arithmetic on a fake clock. No assertion depends on how fast this machine is."""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
import torch

import peftops
from benchmarks import main
from benchmarks.host_overhead import MODES, SCHEMA, TARGETS, Job, run, time_round_robin
from benchmarks.registry import UsageError
from benchmarks.report import load_json


def _expected_subjects(device: str) -> dict[str, tuple[str, str, str | None]]:
    """subject -> (group, role, backend)."""
    backends = ["auto", *peftops.available_backends("lora_linear", device)]
    subjects = {f"peftops.lora_linear[{b}]": ("lora_linear", "peftops", b) for b in backends}
    subjects |= {f"peftops.nn.LoRALinear[{b}]": ("LoRALinear", "peftops", b) for b in backends}
    return subjects | {
        "3-line LoRA": ("lora_linear", "baseline", None),
        "F.linear": ("lora_linear", "floor", None),
        "3-line LoRA module": ("LoRALinear", "baseline", None),
        "nn.Linear": ("LoRALinear", "floor", None),
    }


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    path = tmp_path_factory.mktemp("host") / "host.json"
    threads = torch.get_num_threads()
    code = main(["--host-overhead", "--device", "cpu", "--repeats", "2", "--calls", "1", "--json", str(path)])
    return code, json.loads(path.read_text()), threads


def test_cli_writes_every_subject_and_mode(smoke):
    code, doc, threads = smoke
    assert code == 0
    assert torch.get_num_threads() == threads  # the run's single thread is not left behind
    assert doc["schema"] == SCHEMA and doc["device"]["kind"] == "cpu" and doc["device"]["name"]
    assert doc["versions"]["torch"] == torch.__version__ and doc["host_cpu"]
    assert doc["device"]["torch_threads"] == 1 and doc["threads"] == 1
    assert (doc["repeats"], doc["calls_per_repeat"], doc["dtype"]) == (2, 1, "float32")
    assert doc["shape"] == {"tokens": 4, "in": 16, "out": 16, "rank": 4, "scale": 2.0, "bias": False}

    expected = _expected_subjects("cpu")
    got = {(r["subject"], r["mode"]): r for r in doc["results"]}
    assert set(got) == {(s, m) for s in expected for m in MODES}
    picked = {r["picked"] for r in doc["results"] if r["backend"] == "auto"}
    assert len(picked) == 1 and picked <= set(peftops.available_backends("lora_linear", "cpu"))
    for (subject, _), r in got.items():
        assert (r["group"], r["role"], r["backend"]) == expected[subject]
        assert r["error"] is None, r
        if r["backend"] == "triton":  # the interpreter on a CPU: skipped, with the reason
            assert r["skipped"].startswith("Triton interpreter") and r["min_us"] is None
        else:
            assert r["skipped"] is None
            assert 0 < r["min_us"] <= r["p20_us"] <= r["median_us"] <= r["p80_us"]


def test_cli_ratios_name_the_baseline_and_the_issue_targets(smoke):
    _, doc, _ = smoke
    timed = {r["subject"] for r in doc["results"] if r["role"] == "peftops" and r["min_us"] is not None}
    rows = {(r["subject"], r["mode"]): r for r in doc["ratios"]}
    assert set(rows) == {(s, m) for s in timed for m in MODES}
    for (subject, mode), row in rows.items():
        group = "lora_linear" if subject.startswith("peftops.lora_linear") else "LoRALinear"
        assert row["baseline"] == ("3-line LoRA" if group == "lora_linear" else "3-line LoRA module")
        assert row["floor"] == ("F.linear" if group == "lora_linear" else "nn.Linear")
        assert row["ratio_min"] > 0 and row["ratio_median"] > 0 and row["ratio_to_floor_min"] > 0
        assert row["target"] == TARGETS.get((group, mode))
        assert row["meets_target"] == (None if row["target"] is None else row["ratio_min"] <= row["target"])


def test_compare_refuses_a_host_overhead_file(smoke, tmp_path):
    _, doc, _ = smoke
    path = tmp_path / "host.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="not a benchmark run"):
        load_json(path)


def test_batches_are_timed_per_call_on_the_clock_given_taking_turns():
    """Each batch's clock difference over the number of calls, in microseconds; the warmup
    round, the synchronisation after each batch and the context entered around it are outside
    the timed region; the jobs take turns; a job that raises drops out with its error."""
    now = [0]
    order = []

    def clock_ns() -> int:
        return now[0]

    def costing(name: str, costs_ns: tuple[int, ...]):
        costs = itertools.cycle(costs_ns)

        def step() -> None:
            order.append(name)
            now[0] += next(costs)

        return step

    @contextlib.contextmanager
    def around():
        now[0] += 7_000_000  # never counted
        yield

    def broken() -> None:
        order.append("broken")
        raise RuntimeError("no kernel")

    def sync() -> None:
        now[0] += 1_000_000  # never counted

    jobs = [
        Job(around, costing("a", (3_000, 5_000))),
        Job(contextlib.nullcontext, broken),
        Job(contextlib.nullcontext, costing("b", (10_000,))),
    ]
    time_round_robin(jobs, calls=2, repeats=3, sync=sync, clock_ns=clock_ns, warmup=1)
    assert jobs[0].samples == [4.0, 4.0, 4.0] and jobs[0].error is None
    assert jobs[1].samples == [] and jobs[1].error == "RuntimeError: no kernel"
    assert jobs[2].samples == [10.0, 10.0, 10.0]
    assert order == ["a", "a", "broken", "b", "b"] + ["a", "a", "b", "b"] * 3


def test_run_on_a_fake_clock_gives_exact_figures_and_ratios():
    """A clock that moves 1000 ns per read: every batch measures one tick, so every subject
    costs 1000 ns / 2 calls = 0.5 us per call and every ratio is exactly 1."""
    now = [0]

    def clock_ns() -> int:
        now[0] += 1000
        return now[0]

    doc = run(torch.device("cpu"), torch.float32, repeats=3, calls=2, clock_ns=clock_ns)
    timed = [r for r in doc["results"] if r["skipped"] is None]
    assert timed and all((r["min_us"], r["median_us"]) == (0.5, 0.5) for r in timed)
    assert doc["ratios"] and all(r["ratio_min"] == 1.0 and r["ratio_median"] == 1.0 for r in doc["ratios"])
    assert all(r["meets_target"] in (True, None) for r in doc["ratios"])
