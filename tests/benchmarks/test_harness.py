"""The benchmark harness: checks catch wrong answers, compare catches a planted regression,
the JSON holds what the contract lists, and the quick suite of every real op passes its checks.

Runs go through ``benchmarks.main`` in-process, with ``--quick`` (short timing budget) and
``--json`` into a temporary directory. On a CPU each run also measures its ceilings (under a
second), so the tests keep runs few and small.

No test depends on how fast this machine is: the synthetic op's runs are timed with a
:class:`FakeClock` that its provider advances by a planted cost, so a 2x slower provider
measures exactly 2x slower (a wall-clock version of the planted regression failed 1 run in 5 on
the shared 2-core machine).
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

import peftops
from benchmarks import Case, Op, Provider, Registry, Work, main
from benchmarks.cases import default_registry, lora_linear, prefix_attention
from benchmarks.harness import Selection, plan, run
from benchmarks.inputs import make_input_set
from benchmarks.registry import ALL_SUITES, AUTO_PROVIDER, QUICK_CPU
from benchmarks.report import auto_check_text, auto_checks, classify
from benchmarks.timing import QUICK_BUDGET, Budget, time_cpu

SIZE = 64
COST_MS = 20.0  # the planted cost of one synthetic call at factor 1
JITTER = (1.0, 0.96, 1.04, 0.98, 1.02)  # a spread, so the quantiles differ from the median


class FakeClock:
    """A wall clock in seconds (``time.perf_counter``'s contract) that moves only when told:
    every read moves it on by ``tick`` (a clock that never moved would keep the warmup loop
    spinning), and :meth:`spend` moves it by a call's planted cost."""

    def __init__(self, tick_ms: float = 5.0) -> None:
        self.now = 0.0
        self.tick = tick_ms / 1e3

    def __call__(self) -> float:
        now = self.now
        self.now += self.tick
        return now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


def synthetic_registry(factor: float, clock: FakeClock, auto_factor: float | None = None) -> Registry:
    """A test-only op ``y = x @ w`` whose ``matmuls`` provider costs ``COST_MS * factor`` on
    ``clock`` (times a small jitter): its time scales with the factor, its answer does not.

    With ``auto_factor``, the op also gets an ``auto`` provider of that cost, with ``matmuls``
    as its rival."""

    def reference(t):
        return t["x"].float() @ t["w"].float()

    def costing(factor: float):
        jitter = itertools.cycle(JITTER)

        def fn(t):
            clock.spend(COST_MS * factor * next(jitter))
            return t["x"] @ t["w"]

        return fn

    providers = [Provider("matmuls", costing(factor))]
    if auto_factor is not None:
        providers.append(Provider(AUTO_PROVIDER, costing(auto_factor)))

    def make_inputs(dtype, device, gen):
        return {
            "x": torch.randn(SIZE, SIZE, generator=gen, device=device).to(dtype),
            "w": (torch.randn(SIZE, SIZE, generator=gen, device=device) * SIZE**-0.5).to(dtype),
        }

    registry = Registry()
    rivals = ("matmuls",) if auto_factor is not None else ()
    registry.add_op(
        Op("synthetic", reference, lambda device: providers, auto_rivals=rivals, auto_pick=lambda t: "fake")
    )
    registry.add_case(
        Case(
            op="synthetic",
            name="planted-64",
            make_inputs=make_inputs,
            grad_inputs=("x",),
            work=lambda direction: Work(2 * SIZE**3, 3 * SIZE * SIZE),
            base="matmuls",
            params={"size": SIZE},
            suites=ALL_SUITES,
        )
    )
    return registry


def run_synthetic(path, factor: float, *extra: str, auto_factor: float | None = None) -> int:
    argv = ["--quick", "--device", "cpu", "--modes", "fwd", "--json", str(path), *extra]
    clock = FakeClock()
    return main(argv, registry=synthetic_registry(factor, clock, auto_factor), clock=clock)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One synthetic run at factor 1, with a plot: (exit code, JSON path, plot dir)."""
    out = tmp_path_factory.mktemp("baseline")
    code = run_synthetic(out / "old.json", 1, "--plot", str(out / "plots"))
    return code, out / "old.json", out / "plots"


# -- timer --------------------------------------------------------------------------------


def test_cpu_timer_reads_the_injected_clock():
    """Every sample is one call's planted cost plus the one tick of the closing read."""
    clock = FakeClock(tick_ms=1.0)
    costs = itertools.cycle((3.0, 5.0, 4.0))
    timing = time_cpu(lambda: [lambda: clock.spend(next(costs))], Budget(0, 0, 6, 6), clock)
    # The untimed first call costs 3, then the timed ones 5, 4, 3, 5, 4, 3 (+1 each).
    assert (timing.median_ms, timing.p20_ms, timing.p80_ms) == pytest.approx((5.0, 4.0, 6.0))
    assert timing.timer == "cpu-wall"


# -- JSON, plot ---------------------------------------------------------------------------


def test_run_writes_the_contract_fields(baseline):
    code, path, _ = baseline
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == 1
    assert doc["device"]["kind"] == "cpu" and doc["device"]["name"]
    assert doc["versions"]["torch"] == torch.__version__
    assert {"triton", "python", "peftops"} <= set(doc["versions"])
    assert "git_commit" in doc and doc["timestamp"] and "CPU" in doc["timer"]
    assert doc["ceilings"]["gemm"]["tflops"] > 0 and doc["ceilings"]["copy"]["gbps"] > 0
    [result] = doc["results"]
    assert (result["op"], result["case"], result["mode"], result["provider"], result["dtype"]) == (
        "synthetic",
        "planted-64",
        "fwd",
        "matmuls",
        "float32",
    )
    assert 0 < result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]
    assert result["timer"] == "cpu-wall" and result["check"] == "ok"
    assert result["tflops"] == pytest.approx(result["flops"] / result["median_ms"] / 1e9)
    assert result["gbps"] == pytest.approx(result["bytes"] / result["median_ms"] / 1e6)
    assert result["pct_gemm"] == pytest.approx(100 * result["tflops"] / doc["ceilings"]["gemm"]["tflops"])
    assert result["pct_copy"] == pytest.approx(100 * result["gbps"] / doc["ceilings"]["copy"]["gbps"])
    assert result["ratio_to_base"] == pytest.approx(1.0)  # the provider is its own base
    # The planted cost (20 ms x jitter) plus the closing read's 5 ms tick, exactly.
    assert result["median_ms"] == pytest.approx(COST_MS + 5.0)
    assert doc["complete"] is True and doc["auto_rule"] == {} and doc["auto_check"] == []


def test_plot_writes_a_png(baseline):
    _, _, plots = baseline
    assert (plots / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- compare ------------------------------------------------------------------------------


def test_planted_regression_fails_compare_and_is_named(baseline, tmp_path, capsys):
    _, old, _ = baseline
    capsys.readouterr()
    assert run_synthetic(tmp_path / "new.json", 2, "--compare", str(old)) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: synthetic / planted-64 / fwd / matmuls" in out


def test_a_rerun_of_the_same_cost_is_not_a_regression(baseline, tmp_path, capsys):
    _, old, _ = baseline
    capsys.readouterr()
    assert run_synthetic(tmp_path / "new.json", 1, "--compare", str(old)) == 0
    assert "0 regressions, 0 improvements" in capsys.readouterr().out


def test_a_faster_run_is_an_improvement(baseline, tmp_path, capsys):
    _, old, _ = baseline
    capsys.readouterr()
    assert run_synthetic(tmp_path / "new.json", 0.5, "--compare", str(old)) == 0
    assert "IMPROVEMENT: synthetic / planted-64 / fwd / matmuls" in capsys.readouterr().out


def test_a_run_compared_with_itself_passes(baseline, capsys):
    _, old, _ = baseline
    assert main(["--compare", str(old), str(old)]) == 0
    assert "0 regressions" in capsys.readouterr().out


def test_compare_refuses_another_device(baseline, tmp_path, capsys):
    _, old, _ = baseline
    doc = json.loads(old.read_text())
    doc["device"]["name"] = "NVIDIA H100 80GB HBM3"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert main(["--compare", str(old), str(other)]) == 2
    assert "different devices" in capsys.readouterr().err
    assert main(["--compare", str(old), str(other), "--force"]) == 0
    # Running first and comparing after is refused before the run.
    assert run_synthetic(tmp_path / "unused.json", 1, "--compare", str(other)) == 2
    assert not (tmp_path / "unused.json").exists()


@pytest.mark.parametrize(
    "new, verdict",
    [
        ((13.0, 12.5, 13.5), "regression"),  # +30%, ranges disjoint
        ((13.0, 10.5, 13.5), "same"),  # +30% at the median, but the ranges overlap: noise
        ((10.9, 10.8, 11.0), "same"),  # within the threshold
        ((7.0, 6.8, 7.2), "improvement"),
    ],
)
def test_regression_rule(new, verdict):
    old = {"median_ms": 10.0, "p20_ms": 9.5, "p80_ms": 10.5}
    assert classify(old, dict(zip(("median_ms", "p20_ms", "p80_ms"), new, strict=False)), threshold=0.25) == verdict


# -- checks -------------------------------------------------------------------------------


def _forgot_scale(t):
    x = t["x"]
    return F.linear(x, t["weight"]) + F.linear(F.linear(x, t["lora_a"]), t["lora_b"])


def _detached_b(t):
    x = t["x"]
    return F.linear(x, t["weight"]) + F.linear(F.linear(x, t["lora_a"]), t["lora_b"].detach()) * t["scale"]


def test_wrong_answers_are_caught(tmp_path):
    registry = default_registry()
    registry.add_provider("lora_linear", Provider("forgot-scale", _forgot_scale))
    registry.add_provider("lora_linear", Provider("detached-b", _detached_b))
    path = tmp_path / "run.json"
    argv = [
        "--quick",
        "--device",
        "cpu",
        "--ops",
        "lora_linear",
        "--providers",
        "forgot-scale",
        "detached-b",
        "--modes",
        "fwd",
        "bwd",
        "--json",
        str(path),
    ]
    assert main(argv, registry=registry) == 1
    results = json.loads(path.read_text())["results"]
    check = {(r["provider"], r["mode"]): r["check"] for r in results if r["case"] == "small-512x512-r16-T256"}
    assert check[("forgot-scale", "fwd")].startswith("fail: output:")
    assert check[("detached-b", "fwd")] == "ok"  # right forward...
    assert check[("detached-b", "bwd")] == "fail: dlora_b: None (the output does not depend on it)"  # ...no dB


def test_a_provider_that_raises_is_reported_and_the_run_goes_on(tmp_path):
    def broken(t):
        raise RuntimeError("kernel launch failed")

    clock = FakeClock()
    registry = synthetic_registry(1, clock)
    registry.add_provider("synthetic", Provider("broken", broken))
    path = tmp_path / "run.json"
    argv = ["--quick", "--device", "cpu", "--modes", "fwd", "--json", str(path)]
    assert main(argv, registry=registry, clock=clock) == 1
    check = {r["provider"]: r for r in json.loads(path.read_text())["results"]}
    assert check["broken"]["check"] == "error: RuntimeError: kernel launch failed"
    assert check["broken"]["median_ms"] is None
    assert check["matmuls"]["check"] == "ok" and check["matmuls"]["median_ms"] > 0


# -- auto rule ----------------------------------------------------------------------------


def _timed(provider: str, median: float, p20: float, p80: float, case: str = "c", mode: str = "fwd") -> dict:
    return {
        "op": "op",
        "case": case,
        "mode": mode,
        "provider": provider,
        "median_ms": median,
        "p20_ms": p20,
        "p80_ms": p80,
        "picked": "torch" if provider == AUTO_PROVIDER else None,
        "timer": "cuda-graph",
    }


@pytest.mark.parametrize(
    "auto, verdict",
    [
        ((1.0, 0.9, 1.1), "ok"),  # faster than the better rival
        ((1.2, 1.2, 1.25), "ok"),  # ties the better rival
        ((1.5, 1.45, 1.55), "slower"),  # ranges disjoint
        ((1.3, 1.15, 1.4), "slower (p20-p80 ranges overlap)"),
    ],
)
def test_auto_rule_compares_with_the_better_rival(auto, verdict):
    results = [
        _timed(AUTO_PROVIDER, *auto),
        _timed("addmm", 1.2, 1.1, 1.25),
        _timed("hf-peft", 1.4, 1.3, 1.5),
        _timed("linear", 0.5, 0.4, 0.6),  # faster, but not a rival
    ]
    [row] = auto_checks(results, {"op": ["addmm", "hf-peft"]})
    assert (row["best_rival"], row["best_rival_ms"], row["rivals"]) == ("addmm", 1.2, ["addmm", "hf-peft"])
    assert row["ratio"] == pytest.approx(auto[0] / 1.2)
    assert (row["verdict"], row["picked"], row["case"], row["mode"]) == (verdict, "torch", "c", "fwd")
    assert row["timers_differ"] is False


def test_auto_rule_marks_a_comparison_across_timers():
    eager = {**_timed(AUTO_PROVIDER, 1.5, 1.45, 1.55), "timer": "cuda-events (graph capture failed: ...)"}
    [row] = auto_checks([eager, _timed("addmm", 1.2, 1.1, 1.25)], {"op": ["addmm"]})
    assert row["timers_differ"] is True and row["verdict"] == "slower"
    assert auto_check_text([row]).endswith("(1.250x), timed with different timers")


def test_auto_rule_uses_the_rivals_that_were_timed():
    results = [
        _timed(AUTO_PROVIDER, 1.0, 0.9, 1.1),
        _timed("addmm", None, None, None),  # failed or not timed
        _timed("hf-peft", 0.8, 0.7, 0.85),
        _timed(AUTO_PROVIDER, 1.0, 0.9, 1.1, case="alone"),  # no rival in this case: no row
        _timed(AUTO_PROVIDER, None, None, None, case="c", mode="bwd"),  # auto not timed: no row
    ]
    [row] = auto_checks(results, {"op": ["addmm", "hf-peft"]})
    assert (row["rivals"], row["best_rival"], row["verdict"]) == (["hf-peft"], "hf-peft", "slower")
    assert auto_checks(results, {}) == []  # an op without rivals is not judged


def test_a_slower_auto_is_flagged_in_the_report_and_json(tmp_path, capsys):
    path = tmp_path / "run.json"
    capsys.readouterr()
    assert run_synthetic(path, 1, auto_factor=1.5) == 0  # a target, not a failed check
    out = capsys.readouterr().out
    assert "AUTO SLOWER: synthetic / planted-64 / fwd: peftops (picked fake)" in out
    doc = json.loads(path.read_text())
    assert doc["auto_rule"] == {"synthetic": ["matmuls"]}
    [row] = doc["auto_check"]
    assert (row["verdict"], row["picked"], row["best_rival"]) == ("slower", "fake", "matmuls")
    assert row["ratio"] == pytest.approx((1.5 * COST_MS + 5) / (COST_MS + 5))
    auto = next(r for r in doc["results"] if r["provider"] == AUTO_PROVIDER)
    assert auto["picked"] == "fake"

    assert run_synthetic(path, 1, auto_factor=0.5) == 0
    assert "AUTO SLOWER" not in capsys.readouterr().out
    assert [r["verdict"] for r in json.loads(path.read_text())["auto_check"]] == ["ok"]


def test_each_finished_case_is_written_before_the_run_ends():
    """A run killed by a session's time limit keeps the cases it finished."""
    clock = FakeClock()
    registry = synthetic_registry(1, clock)
    first = registry.cases[0]
    registry.add_case(dataclasses.replace(first, name="planted-64-again"))
    selection = Selection(modes=("fwd",), suite=QUICK_CPU)
    work = plan(registry, selection, torch.device("cpu"))
    docs = []
    final = run(
        registry, work, selection, torch.device("cpu"), torch.float32, QUICK_BUDGET, clock=clock, checkpoint=docs.append
    )
    assert [[r["case"] for r in d["results"]] for d in docs] == [["planted-64"], ["planted-64", "planted-64-again"]]
    assert [d["complete"] for d in docs] == [False, False] and final["complete"] is True
    assert final["results"] == docs[-1]["results"]


@pytest.mark.parametrize("op", ["lora_linear", "bottleneck_adapter", "prefix_attention"])
def test_quick_suite_checks_pass(op, tmp_path):
    """Every provider of the op (peftops backends, reference, compile(reference), baselines)
    against the reference, forward and gradients. One mode keeps it fast: fwd+bwd checks both."""
    path = tmp_path / "run.json"
    assert main(["--quick", "--device", "cpu", "--ops", op, "--modes", "fwd+bwd", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    providers = {r["provider"] for r in results}
    expected = {f"peftops[{b}]" for b in peftops.available_backends(op, "cpu")} | {
        AUTO_PROVIDER,
        "reference",
        "compile(reference)",
    }
    assert expected <= providers and len(providers) > len(expected)  # the baselines ran too
    for r in results:
        if r["params"].get("dropout_p"):  # each implementation draws its own mask: timed, not checked
            assert r["check"] == ("n/a" if r["provider"] == r["base"] else "n/a: random dropout mask"), r
        else:
            assert r["check"] == ("n/a" if r["provider"] == r["base"] else "ok"), r
        if r["timer"].startswith("not timed"):  # Triton under the CPU interpreter: checked only
            assert r["provider"] == "peftops[triton]" and r["median_ms"] is None
        else:
            assert r["median_ms"] > 0 and r["ratio_to_base"] is not None
    doc = json.loads(path.read_text())
    if op == "lora_linear":  # issue 10's rule: auto against the better of addmm and hf-peft
        assert doc["auto_rule"] == {"lora_linear": ["addmm", "hf-peft"]}
        auto = {(r["case"], r["mode"]): r["picked"] for r in results if r["provider"] == AUTO_PROVIDER}
        assert {(r["case"], r["mode"]) for r in doc["auto_check"]} == set(auto)
        for row in doc["auto_check"]:
            assert row["picked"] == auto[(row["case"], row["mode"])]
            assert row["picked"] in peftops.available_backends(op, "cpu")
            assert row["rivals"] == ["addmm", "hf-peft"] and row["verdict"]
    else:
        assert doc["auto_rule"] == {} and doc["auto_check"] == []


# -- cases --------------------------------------------------------------------------------


def test_inputs_are_random_not_zero():
    registry = default_registry()
    for case in registry.cases:
        if "quick-cpu" not in case.suites:
            continue
        for name, t in make_input_set(case, torch.float32, torch.device("cpu"), seed=0).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                assert t.std() > 0.01, (case.name, name)
            elif isinstance(t, torch.Tensor):  # integer inputs (adapter ids): not all the same
                assert t.unique().numel() > 1, (case.name, name)


def test_attention_flops_count_the_visible_pairs():
    batch, heads, kv_heads, seq_len, head_dim, prefix_len = 2, 4, 2, 37, 8, 5
    visible = peftops.reference.visible_mask(batch, seq_len, seq_len, prefix_len, True, None, torch.device("cpu"))
    pairs = int(visible[0, 0].sum())
    work = prefix_attention.work(batch, heads, kv_heads, seq_len, head_dim, prefix_len, "fwd")
    assert work.flops == 4 * batch * heads * head_dim * pairs


def test_lora_cases_cover_issue_10s_targets():
    """Every shape issue 10 sets a target for is a LoRA case of the full suite."""
    full = {c.name: c.params for c in default_registry().cases if c.op == "lora_linear" and "full" in c.suites}
    wanted = [
        (8192, 4096, 4096, 16, 0.0),
        (8192, 4096, 14336, 16, 0.0),
        (8192, 4096, 14336, 64, 0.0),
        (8192, 14336, 4096, 16, 0.0),
        (8192, 14336, 4096, 64, 0.0),
        (8192, 4096, 4096, 16, 0.1),
        (512, 4096, 4096, 16, 0.0),
    ]
    have = {(p["tokens"], p["in"], p["out"], p["rank"], p["dropout_p"]) for p in full.values()}
    assert set(wanted) <= have
    assert all(p["scale"] == 2.0 for p in full.values())


def test_lora_base_work_is_the_plain_linear():
    tokens, k, n = 64, 32, 48
    fwd = lora_linear.work(tokens, k, n, 0, "fwd")
    bwd = lora_linear.work(tokens, k, n, 0, "bwd")
    assert (fwd.flops, fwd.elems) == (2 * tokens * k * n, tokens * k + n * k + tokens * n)
    assert (bwd.flops, bwd.elems) == (2 * tokens * k * n, tokens * n + n * k + tokens * k)  # dx = g W only


# -- usage --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--ops", "no_such_op"],
        ["--modes", "sideways"],
        ["--quick", "--cases", "no-such-case"],
        ["--compare", "a.json", "b.json", "c.json"],
        ["--no-such-flag"],
        ["--repeats", "3"],  # only with --host-overhead
        ["--host-overhead", "--repeats", "0"],
    ],
)
def test_usage_errors_exit_2(argv):
    assert main(["--device", "cpu", *argv]) == 2
