"""The benchmark harness: checks catch wrong answers, compare catches a planted regression,
the JSON holds what the contract lists, and the quick suite of every real op passes its checks.

Runs go through ``benchmarks.main`` in-process, with ``--quick`` (short timing budget) and
``--json`` into a temporary directory. On a CPU each run also measures its ceilings (under a
second), so the tests keep runs few and small.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import peftops
from benchmarks import Case, Op, Provider, Registry, Work, main
from benchmarks.cases import default_registry, lora_linear, prefix_attention
from benchmarks.inputs import make_input_set
from benchmarks.registry import ALL_SUITES
from benchmarks.report import classify

SIZE, MATMULS = 256, 6  # a few ms of single-threaded matmuls per call at factor 1


def synthetic_registry(factor: int) -> Registry:
    """A test-only op ``y = x @ w`` whose ``matmuls`` provider repeats the product
    ``MATMULS * factor`` times: its time scales with the factor, its answer does not."""

    def reference(t):
        return t["x"].float() @ t["w"].float()

    def matmuls(t):
        for _ in range(MATMULS * factor - 1):
            t["x"] @ t["w"]
        return t["x"] @ t["w"]

    def make_inputs(dtype, device, gen):
        return {
            "x": torch.randn(SIZE, SIZE, generator=gen, device=device).to(dtype),
            "w": (torch.randn(SIZE, SIZE, generator=gen, device=device) * SIZE**-0.5).to(dtype),
        }

    registry = Registry()
    registry.add_op(Op("synthetic", reference, lambda device: [Provider("matmuls", matmuls)]))
    registry.add_case(
        Case(
            op="synthetic",
            name="planted-256",
            make_inputs=make_inputs,
            grad_inputs=("x",),
            work=lambda direction: Work(2 * SIZE**3 * MATMULS, 3 * SIZE * SIZE),
            base="matmuls",
            params={"size": SIZE},
            suites=ALL_SUITES,
        )
    )
    return registry


def run_synthetic(path, factor: int, *extra: str) -> int:
    argv = ["--quick", "--device", "cpu", "--modes", "fwd", "--json", str(path), *extra]
    return main(argv, registry=synthetic_registry(factor))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One synthetic run at factor 1, with a plot: (exit code, JSON path, plot dir)."""
    out = tmp_path_factory.mktemp("baseline")
    code = run_synthetic(out / "old.json", 1, "--plot", str(out / "plots"))
    return code, out / "old.json", out / "plots"


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
        "planted-256",
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


def test_plot_writes_a_png(baseline):
    _, _, plots = baseline
    assert (plots / "synthetic.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- compare ------------------------------------------------------------------------------


def test_planted_regression_fails_compare_and_is_named(baseline, tmp_path, capsys):
    _, old, _ = baseline
    capsys.readouterr()
    assert run_synthetic(tmp_path / "new.json", 2, "--compare", str(old)) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: synthetic / planted-256 / fwd / matmuls" in out


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

    registry = synthetic_registry(1)
    registry.add_provider("synthetic", Provider("broken", broken))
    path = tmp_path / "run.json"
    assert main(["--quick", "--device", "cpu", "--modes", "fwd", "--json", str(path)], registry=registry) == 1
    check = {r["provider"]: r for r in json.loads(path.read_text())["results"]}
    assert check["broken"]["check"] == "error: RuntimeError: kernel launch failed"
    assert check["broken"]["median_ms"] is None
    assert check["matmuls"]["check"] == "ok" and check["matmuls"]["median_ms"] > 0


@pytest.mark.parametrize("op", ["lora_linear", "bottleneck_adapter", "prefix_attention"])
def test_quick_suite_checks_pass(op, tmp_path):
    """Every provider of the op (peftops backends, reference, compile(reference), baselines)
    against the reference, forward and gradients. One mode keeps it fast: fwd+bwd checks both."""
    path = tmp_path / "run.json"
    assert main(["--quick", "--device", "cpu", "--ops", op, "--modes", "fwd+bwd", "--json", str(path)]) == 0
    results = json.loads(path.read_text())["results"]
    providers = {r["provider"] for r in results}
    expected = {f"peftops[{b}]" for b in peftops.available_backends(op, "cpu")} | {"reference", "compile(reference)"}
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
    ],
)
def test_usage_errors_exit_2(argv):
    assert main(["--device", "cpu", *argv]) == 2
