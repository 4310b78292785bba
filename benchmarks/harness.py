"""The peftops microbenchmark harness: registry, timing, ceilings, checks, table, JSON, compare, plots.

Vocabulary:

* **op**: a function under test (a peftops public op, or a synthetic one in the tests), with
  its float32 *reference* that every checked provider is compared against.
* **case**: one problem size of an op (Llama-3-8B shapes), with its work: flops and the minimal
  number of elements a pass must read and write, so TFLOP/s and GB/s can be derived.
* **provider**: one implementation timed on a case: ``peftops[<backend>]``, ``reference``,
  ``compile(reference)`` and the baselines users have today. Each case names its *base*
  provider, the denominator of the ratio column.
* **mode**: ``fwd`` (under ``torch.no_grad()``), ``bwd`` (``torch.autograd.grad`` on a graph built
  once, untimed) or ``fwd+bwd``.

Every provider of a case must return one tensor of the reference output's shape, because the
gradient fed to the backward (``grad_out``) is drawn once per case from that shape.

Run it as ``python -m benchmarks`` (see :func:`build_parser` for the options). Case files in
:mod:`benchmarks.cases` register the real ops; tests build their own :class:`Registry`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import functools
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from peftops.testing import close_report, tolerance

SCHEMA_VERSION = 1
MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)  # median first, as triton.testing.do_bench returns them in the order asked
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Suites a case can belong to. ``quick`` is the one small real-shape case per op used by
# ``--quick`` on a GPU; on a CPU ``--quick`` runs the scaled-down ``quick-cpu`` cases instead,
# where a Llama-shaped call takes seconds.
FULL, QUICK, QUICK_CPU = "full", "quick", "quick-cpu"
ALL_SUITES = frozenset({FULL, QUICK, QUICK_CPU})

# Regression thresholds on the median (the rule is in classify; the reasons in NOTES.md).
DEFAULT_THRESHOLD = {"cuda": 0.10, "cpu": 0.25}

# GPU-only knobs.
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device properties do not report it
MAX_ROTATION_SETS = 32  # a tiny case needs many copies to exceed 2x L2; this caps the count
GRAPH_BELOW_MS = 0.1  # cases whose ideal forward time is below this are timed with CUDA graphs
GRAPH_WARMUP_CALLS = 2  # eager calls on the capture stream before capturing (cuBLAS workspaces, compile)

GRAD_OUT_SEED = 10_000  # input set i is drawn with seed i, its grad_out with GRAD_OUT_SEED + i

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "out"

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command line or input file: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Registry: ops, cases, providers
# ---------------------------------------------------------------------------------------------

Inputs = dict  # name -> Tensor (or a Python constant such as a scale), made by Case.make_inputs


@dataclass(frozen=True)
class Work:
    """What one pass must do at least: ``flops``, and ``elems`` read plus written once each.

    ``elems`` counts the pass's interface (its inputs and outputs), never intermediates that an
    implementation may keep or recompute; bytes are ``elems * itemsize`` of the run's dtype.
    """

    flops: float
    elems: float

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.elems + other.elems)


@dataclass(frozen=True)
class Provider:
    """One implementation of an op, timed on every case of the op.

    ``fn(inputs) -> Tensor`` computes the forward; autograd gives the backward.
    ``checked=False`` marks a provider that computes something else on purpose (a base layer
    or a memory floor): it is timed but not compared with the reference.
    ``work(case, direction)``, if given, replaces the case's work for this provider (a base
    that does less than the op should not be credited with the op's flops).
    """

    name: str
    fn: Callable[[Inputs], torch.Tensor]
    checked: bool = True
    work: Optional[Callable[["Case", str], Work]] = None


@dataclass(frozen=True)
class Op:
    """An op: its float32 reference (``reference(inputs) -> Tensor``) and its providers.

    ``providers(device)`` lists the providers that can run on ``device`` (the peftops backends
    available there differ by device).
    """

    name: str
    reference: Callable[[Inputs], torch.Tensor]
    providers: Callable[[torch.device], list[Provider]]


@dataclass(frozen=True)
class Case:
    """One problem size of an op.

    ``make_inputs(dtype, device, generator)`` returns fresh random inputs (never zeros);
    ``grad_inputs`` names the inputs that receive gradients (frozen weights are left out);
    ``work(direction)`` gives the :class:`Work` of ``"fwd"`` or ``"bwd"`` (``fwd+bwd`` is their
    sum); ``base`` names the provider of the ratio column; ``params`` describes the shape
    (written to the JSON).
    """

    op: str
    name: str
    make_inputs: Callable[[torch.dtype, torch.device, torch.Generator], Inputs]
    grad_inputs: tuple[str, ...]
    work: Callable[[str], Work]
    base: str
    params: dict = field(default_factory=dict)
    suites: frozenset = frozenset({FULL})


class Registry:
    """Ops and their cases. Case files call :meth:`add_op` and :meth:`add_case`."""

    def __init__(self) -> None:
        self.ops: dict[str, Op] = {}
        self.cases: list[Case] = []

    def add_op(self, op: Op) -> None:
        if op.name in self.ops:
            raise ValueError(f"op {op.name!r} is already registered")
        self.ops[op.name] = op

    def add_case(self, case: Case) -> None:
        if case.op not in self.ops:
            raise ValueError(f"case {case.name!r}: register op {case.op!r} first")
        if any(c.op == case.op and c.name == case.name for c in self.cases):
            raise ValueError(f"case {case.op}/{case.name} is already registered")
        unknown = set(case.suites) - ALL_SUITES
        if unknown:
            raise ValueError(f"case {case.name!r}: unknown suites {sorted(unknown)}; expected {sorted(ALL_SUITES)}")
        self.cases.append(case)

    def add_provider(self, op: str, provider: Provider) -> None:
        """Add a provider to an already registered op (tests add deliberately wrong ones)."""
        old = self.ops[op]
        self.ops[op] = dataclasses.replace(old, providers=lambda device: [*old.providers(device), provider])


# ---------------------------------------------------------------------------------------------
# Devices, versions, provenance
# ---------------------------------------------------------------------------------------------

def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """The name runs are matched on by ``--compare``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs)"


def l2_cache_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def release_memory(device: torch.device) -> None:
    """On a GPU, drop what the last provider left (cycles too) and return the cached blocks, so that
    one provider's graphs never crowd out the next. On a CPU refcounting frees the tensors, and
    ``gc.collect`` (0.15 s here once dynamo is loaded) would cost more than a quick case's timing."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment(device: torch.device) -> dict:
    """Where and with what the run happened (the JSON header)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    info = {"name": device_name(device), "kind": device.type}
    if device.type == "cuda":
        info["l2_cache_bytes"] = l2_cache_bytes(device)
    else:
        info["torch_threads"] = torch.get_num_threads()
    return {
        "device": info,
        "versions": {
            "torch": torch.__version__,
            "triton": _package_version("triton"),
            "python": platform.python_version(),
            "peftops": _package_version("peftops"),
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """How long to time. GPU: do_bench's warmup/rep in ms. CPU: the same times, plus bounds on
    the number of timed calls (a slow call still gets ``min_calls`` samples)."""

    warmup_ms: float
    rep_ms: float
    min_calls: int
    max_calls: int


FULL_BUDGET = Budget(warmup_ms=25, rep_ms=100, min_calls=10, max_calls=1000)
QUICK_BUDGET = Budget(warmup_ms=10, rep_ms=40, min_calls=5, max_calls=200)

Step = Callable[[], Any]
StepMaker = Callable[[], list[Step]]  # builds one step per input set; run where the timer says


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str


def _quantiles(samples_ms: Sequence[float]) -> list[float]:
    # Linear interpolation, as do_bench computes its quantiles (torch.quantile).
    t = torch.tensor(samples_ms, dtype=torch.float64)
    return t.quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def time_cpu(make_steps: StepMaker, budget: Budget) -> Timing:
    """Wall clock (``time.perf_counter``) around each call, after warmup; gc off while timing."""
    steps = itertools.cycle(make_steps())
    start = time.perf_counter()
    next(steps)()  # the first call compiles / allocates: never timed
    while time.perf_counter() - start < budget.warmup_ms / 1e3:
        next(steps)()
    samples: list[float] = []
    spent_ms = 0.0
    gc.disable()
    try:
        while len(samples) < budget.max_calls and (len(samples) < budget.min_calls or spent_ms < budget.rep_ms):
            t0 = time.perf_counter()
            next(steps)()
            samples.append((time.perf_counter() - t0) * 1e3)
            spent_ms += samples[-1]
    finally:
        gc.enable()
    median, p20, p80 = _quantiles(samples)
    return Timing(median, p20, p80, "cpu-wall")


def time_cuda_events(make_steps: StepMaker, budget: Budget) -> Timing:
    """``triton.testing.do_bench`` (CUDA events, L2 flushed before each call), rotating input sets."""
    import triton.testing

    steps = itertools.cycle(make_steps())
    median, p20, p80 = triton.testing.do_bench(
        lambda: next(steps)(), warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=list(QUANTILES)
    )
    return Timing(median, p20, p80, "cuda-events")


def time_cuda_graph(make_steps: StepMaker, budget: Budget) -> Timing:
    """Capture one CUDA graph that runs the step of every input set, time its replay with
    ``do_bench`` and divide by the number of sets: the launch overhead of eager PyTorch is
    removed, so small shapes show the kernels' time.

    The steps are built and warmed up on the capture stream: autograd runs each backward op on
    the stream of its forward op, so a ``bwd`` step whose forward ran on another stream could
    not be captured.
    """
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        steps = make_steps()
        for _ in range(GRAPH_WARMUP_CALLS):
            for step in steps:
                step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for step in steps:
            step()
    median, p20, p80 = triton.testing.do_bench(
        graph.replay, warmup=budget.warmup_ms, rep=budget.rep_ms, quantiles=list(QUANTILES)
    )
    n = len(steps)
    return Timing(median / n, p20 / n, p80 / n, "cuda-graph")


def time_steps(make_steps: StepMaker, device: torch.device, budget: Budget, cuda_graph: bool) -> Timing:
    """Time on ``device``; a graph that cannot be captured falls back to eager events, labelled."""
    if device.type != "cuda":
        return time_cpu(make_steps, budget)
    if not cuda_graph:
        return time_cuda_events(make_steps, budget)
    try:
        return time_cuda_graph(make_steps, budget)
    except Exception as exc:  # noqa: BLE001 - e.g. a provider that synchronizes cannot be captured
        torch.cuda.synchronize()
        release_memory(device)
        timing = time_cuda_events(make_steps, budget)
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return dataclasses.replace(timing, timer=f"cuda-events (graph capture failed: {reason})")


def timer_description(device: torch.device) -> str:
    if device.type == "cuda":
        return (
            "GPU: triton.testing.do_bench (CUDA events; L2 flushed before each call), quantiles "
            f"{list(QUANTILES)}; inputs rotated over enough copies to exceed 2x L2 (at most "
            f"{MAX_ROTATION_SETS}); cases whose ideal forward time is under {GRAPH_BELOW_MS} ms are "
            "timed as one CUDA graph over all copies, divided by the number of copies"
        )
    return (
        "CPU: wall clock (time.perf_counter) around each call after warmup, gc disabled while timing; "
        f"quantiles {list(QUANTILES)} of the per-call times; one input set (no cache rotation). "
        "Indicative only: shared cores, no frequency control"
    )


# ---------------------------------------------------------------------------------------------
# Inputs and the steps of each mode
# ---------------------------------------------------------------------------------------------

def _tensors(inputs: Inputs) -> Iterable[torch.Tensor]:
    return (v for v in inputs.values() if isinstance(v, torch.Tensor))


def nbytes(inputs: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(inputs))


def make_input_set(case: Case, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    inputs = case.make_inputs(dtype, device, gen)
    for name in case.grad_inputs:
        inputs[name].requires_grad_(True)
    return inputs


def make_grad_out(like: torch.Tensor, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def rotation_sets(set_bytes: int, device: torch.device) -> int:
    """How many input copies to rotate over: enough to exceed 2x L2 on a GPU, so that each call
    reads its inputs from memory as in a model; one on a CPU, whose figures are a first look."""
    if device.type != "cuda":
        return 1
    return max(1, min(MAX_ROTATION_SETS, math.ceil(2 * l2_cache_bytes(device) / max(set_bytes, 1))))


def _grad_args(inputs: Inputs, names: Sequence[str]) -> list[torch.Tensor]:
    return [inputs[n] for n in names]


def _forward(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return fn(inputs)


def _forward_backward(fn: Callable[[Inputs], torch.Tensor], inputs: Inputs, grad_names: Sequence[str],
                      grad_out: torch.Tensor) -> tuple:
    out = fn(inputs)
    return torch.autograd.grad(out, _grad_args(inputs, grad_names), grad_out, allow_unused=True)


def mode_steps(fn: Callable[[Inputs], torch.Tensor], sets: Sequence[Inputs], grad_outs: Sequence[torch.Tensor],
               grad_names: Sequence[str], mode: str) -> list[Step]:
    """One zero-argument call per input set doing the timed work of ``mode``.

    ``bwd`` runs each forward here, once and untimed, and keeps its graph for repeated backwards.
    ``allow_unused``: a base provider does not touch the adapter's parameters.
    """
    if mode == "fwd":
        return [functools.partial(_forward, fn, t) for t in sets]
    if mode == "fwd+bwd":
        return [functools.partial(_forward_backward, fn, t, grad_names, g) for t, g in zip(sets, grad_outs)]
    if mode == "bwd":
        backward = functools.partial(torch.autograd.grad, retain_graph=True, allow_unused=True)
        return [functools.partial(backward, fn(t), _grad_args(t, grad_names), g) for t, g in zip(sets, grad_outs)]
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def _gemm_ceiling(device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    n = 8192 if device.type == "cuda" else 1024  # 8192^3 takes seconds per call on a CPU
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    timing = time_steps(lambda: [functools.partial(torch.mm, a, b)], device, budget, cuda_graph=False)
    return {
        "what": f"{str(dtype).removeprefix('torch.')} matmul {n}x{n}x{n}",
        "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "tflops": 2 * n**3 / (timing.median_ms * 1e-3) / 1e12,
    }


def _copy_ceiling(device: torch.device, budget: Budget) -> dict:
    size = 2**30 if device.type == "cuda" else 2**28  # far beyond the last-level cache
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_steps(lambda: [functools.partial(dst.copy_, src)], device, budget, cuda_graph=False)
    return {
        "what": f"copy of a {size // 2**20} MiB buffer (GB/s counts read + write)",
        "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "gbps": 2 * size / (timing.median_ms * 1e-3) / 1e9,
    }


def measure_ceilings(device: torch.device, dtype: torch.dtype, budget: Budget) -> dict:
    """A large GEMM and a large copy on this device, timed like everything else.

    The GEMM uses the run's dtype (bf16 8192^3 on a GPU; 1024^3 on a CPU), so "% of GEMM
    ceiling" compares like with like. The copy is ``dst.copy_(src)`` into a preallocated buffer:
    a clone without the allocation, which on a CPU would time page faults rather than bandwidth.
    """
    ceilings = {"gemm": _gemm_ceiling(device, dtype, budget), "copy": _copy_ceiling(device, budget)}
    release_memory(device)
    return ceilings


# ---------------------------------------------------------------------------------------------
# Correctness checks
# ---------------------------------------------------------------------------------------------

@dataclass
class Expected:
    """The reference evaluated in float32 on input set 0: output and gradients."""

    out: torch.Tensor
    grads: Optional[list[torch.Tensor]]


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def evaluate_reference(op: Op, inputs: Inputs, grad_names: Sequence[str], grad_out_seed: int,
                       dtype: torch.dtype, device: torch.device, need_grad: bool) -> tuple[Expected, torch.Tensor]:
    """Run the reference on float32 copies of ``inputs``; return it and the run-dtype ``grad_out``
    (drawn here because its shape is the reference output's)."""
    acc = reference_dtype(dtype)
    upcast = {
        k: v.detach().to(acc).requires_grad_(k in grad_names) if torch.is_tensor(v) and v.is_floating_point() else v
        for k, v in inputs.items()
    }
    with torch.set_grad_enabled(need_grad):
        out = op.reference(upcast)
    grad_out = make_grad_out(out, dtype, device, grad_out_seed)
    grads = None
    if need_grad:
        grads = list(torch.autograd.grad(out, _grad_args(upcast, grad_names), grad_out.to(acc)))
    return Expected(out.detach(), grads), grad_out


def check_provider(provider: Provider, inputs: Inputs, grad_out: torch.Tensor, grad_names: Sequence[str],
                   expected: Expected, dtype: torch.dtype, device: torch.device) -> tuple[list[str], list[str]]:
    """Compare the provider's output (and gradients, when the reference has them) with the
    reference under the tolerance policy. Returns the forward and the backward problems."""
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    need_grad = expected.grads is not None
    with torch.set_grad_enabled(need_grad):
        out = provider.fn(inputs)
    fwd_problems, bwd_problems = [], []
    report = close_report(out, expected.out, tolerance(dtype, "fwd", tf32=tf32))
    if report:
        fwd_problems.append(f"output: {report}")
    if not need_grad:
        return fwd_problems, bwd_problems
    if not out.requires_grad:
        return fwd_problems, ["output: does not require grad (no gradient reaches any input)"]
    grads = torch.autograd.grad(out, _grad_args(inputs, grad_names), grad_out, allow_unused=True)
    for name, got, want in zip(grad_names, grads, expected.grads):
        if got is None:
            bwd_problems.append(f"d{name}: None (the output does not depend on it)")
            continue
        report = close_report(got, want, tolerance(dtype, "bwd", tf32=tf32))
        if report:
            bwd_problems.append(f"d{name}: {report}")
    return fwd_problems, bwd_problems


def verdict(problems: Sequence[str]) -> str:
    return "ok" if not problems else "fail: " + "; ".join(problems)


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """What the command line asked for; ``None`` selects everything. A case runs if its op is
    selected, it belongs to ``suite`` and its name contains one of ``cases``."""

    ops: Optional[Sequence[str]] = None
    cases: Optional[Sequence[str]] = None  # substrings
    providers: Optional[Sequence[str]] = None  # exact names or fnmatch globs
    modes: Sequence[str] = MODES
    suite: str = FULL


def _provider_selected(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return patterns is None or any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(registry: Registry, selection: Selection, device: torch.device) -> list[tuple[Case, list[Provider]]]:
    """The (case, providers) pairs that the selection asks for, in registration order."""
    if selection.ops is not None:
        unknown = sorted(set(selection.ops) - set(registry.ops))
        if unknown:
            raise UsageError(f"--ops: unknown {unknown}; registered: {sorted(registry.ops)}")
    providers = {name: op.providers(device) for name, op in registry.ops.items()
                 if selection.ops is None or name in selection.ops}
    work = []
    for case in registry.cases:
        if case.op not in providers or selection.suite not in case.suites:
            continue
        if selection.cases is not None and not any(s in case.name for s in selection.cases):
            continue
        chosen = [p for p in providers[case.op] if _provider_selected(p.name, selection.providers)]
        if chosen:
            work.append((case, chosen))
    if not work:
        raise UsageError("no benchmark matches the selection (see --list)")
    return work


def case_work(case: Case, provider: Provider, mode: str) -> Work:
    """Flops and elements of ``mode`` for this provider on this case (fwd+bwd is the sum)."""
    def one(direction: str) -> Work:
        return provider.work(case, direction) if provider.work is not None else case.work(direction)
    if mode == "fwd+bwd":
        return one("fwd") + one("bwd")
    return one(mode)


def ideal_ms(work: Work, itemsize: int, ceilings: dict) -> float:
    """The time the work would take at the measured ceilings (the roofline bound)."""
    compute_ms = work.flops / (ceilings["gemm"]["tflops"] * 1e9)
    memory_ms = work.elems * itemsize / (ceilings["copy"]["gbps"] * 1e6)
    return max(compute_ms, memory_ms)


def derive(result: dict, ceilings: dict) -> None:
    """Fill TFLOP/s, GB/s and the percentages of the ceilings from the median."""
    ms = result["median_ms"]
    if ms is None or ms <= 0:
        return
    result["tflops"] = result["flops"] / (ms * 1e-3) / 1e12
    result["gbps"] = result["bytes"] / (ms * 1e-3) / 1e9
    result["pct_gemm"] = 100.0 * result["tflops"] / ceilings["gemm"]["tflops"]
    result["pct_copy"] = 100.0 * result["gbps"] / ceilings["copy"]["gbps"]


def add_ratios(results: list[dict]) -> None:
    """``ratio_to_base`` = median / the median of the case's base provider in the same mode."""
    base = {(r["op"], r["case"], r["mode"]): r["median_ms"] for r in results if r["provider"] == r["base"]}
    for r in results:
        b = base.get((r["op"], r["case"], r["mode"]))
        if b and r["median_ms"] is not None:
            r["ratio_to_base"] = r["median_ms"] / b


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]


def _new_result(case: Case, provider: Provider, mode: str, dtype: torch.dtype) -> dict:
    return {
        "op": case.op, "case": case.name, "mode": mode, "provider": provider.name,
        "dtype": str(dtype).removeprefix("torch."), "params": case.params, "base": case.base,
        "median_ms": None, "p20_ms": None, "p80_ms": None, "timer": None, "n_sets": None,
        "flops": None, "bytes": None, "tflops": None, "gbps": None, "pct_gemm": None, "pct_copy": None,
        "ratio_to_base": None, "check": None,
    }


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _checks(provider: Provider, inputs: Inputs, grad_out: torch.Tensor, case: Case, expected: Expected,
            modes: Sequence[str], dtype: torch.dtype, device: torch.device) -> dict[str, str]:
    """The check column of each mode: the forward's problems for ``fwd``, the forward's and the
    gradients' for the others; ``n/a`` for an unchecked provider; ``error: ...`` if it raised."""
    if not provider.checked:
        return dict.fromkeys(modes, "n/a")
    try:
        fwd, bwd = check_provider(provider, inputs, grad_out, case.grad_inputs, expected, dtype, device)
    except Exception as exc:  # noqa: BLE001 - a broken provider is a result, not a crash
        return dict.fromkeys(modes, _error(exc))
    return {m: verdict(fwd if m == "fwd" else fwd + bwd) for m in modes}


def run_case(registry: Registry, case: Case, providers: list[Provider], modes: Sequence[str], device: torch.device,
             dtype: torch.dtype, budget: Budget, ceilings: dict, graph_policy: str,
             counter: Iterable[str]) -> list[dict]:
    """Check and time every (provider, mode) of one case; never raises for a provider's fault."""
    op = registry.ops[case.op]
    need_grad = any(m != "fwd" for m in modes)
    # Each case compiles afresh: dynamo's per-function recompile limit would otherwise be hit
    # after a few cases and silently fall back to eager.
    torch._dynamo.reset()

    first = make_input_set(case, dtype, device, seed=0)
    expected, first_grad = evaluate_reference(op, first, case.grad_inputs, GRAD_OUT_SEED, dtype, device, need_grad)
    n_sets = rotation_sets(nbytes(first) + first_grad.numel() * first_grad.element_size(), device)
    sets = [first] + [make_input_set(case, dtype, device, seed=i) for i in range(1, n_sets)]
    grad_outs = [first_grad] + [make_grad_out(first_grad, dtype, device, GRAD_OUT_SEED + i) for i in range(1, n_sets)]

    itemsize = torch.empty((), dtype=dtype).element_size()
    cuda_graph = device.type == "cuda" and (
        graph_policy == "on"
        or (graph_policy == "auto" and ideal_ms(case.work("fwd"), itemsize, ceilings) < GRAPH_BELOW_MS)
    )

    results = []
    for provider in providers:
        checks = _checks(provider, first, first_grad, case, expected, modes, dtype, device)
        for mode in modes:
            result = _new_result(case, provider, mode, dtype)
            work = case_work(case, provider, mode)
            result.update(check=checks[mode], flops=work.flops, bytes=work.elems * itemsize)
            if not checks[mode].startswith("error"):
                make_steps = functools.partial(mode_steps, provider.fn, sets, grad_outs, case.grad_inputs, mode)
                try:
                    timing = time_steps(make_steps, device, budget, cuda_graph)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported, the run goes on
                    result["check"] = _error(exc)
                else:
                    result.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                                  timer=timing.timer, n_sets=n_sets)
                    derive(result, ceilings)
            results.append(result)
            ms = "-" if result["median_ms"] is None else f"{result['median_ms']:.4g} ms"
            _progress(f"[{next(counter)}] {case.op} {case.name} {mode} {provider.name}: {ms}, {result['check'][:60]}")
        release_memory(device)
    add_ratios(results)
    return results


@contextlib.contextmanager
def _run_settings(device: torch.device, cpu_threads: int):
    """Process settings for the run, restored after it.

    * On a CPU, ``cpu_threads`` intra-op threads (default 1). On a shared 2-core machine, two
      OpenMP threads stall at every barrier while another process holds one core: a 256x512x512
      matmul measured 0.9 ms at p20 but 8 to 16 ms at the median, while with one thread its
      p20-p80 stayed within 3% of 1.45 ms (same machine, minutes apart).
    * No donated buffers: ``bwd`` calls ``autograd.grad(..., retain_graph=True)`` on one graph
      again and again, which a compiled backward with donated buffers refuses; donating only
      saves memory.
    * On a CPU, compile in this process: inductor's first compile otherwise starts a pool of
      worker processes, one per core, which compete with the timed calls for the cores.
    """
    with contextlib.ExitStack() as stack:
        if device.type == "cpu":
            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(cpu_threads)
            import torch._inductor.config as inductor_config

            stack.enter_context(inductor_config.patch(compile_threads=1))
        functorch_config = torch._functorch.config
        if hasattr(functorch_config, "donated_buffer"):
            stack.enter_context(functorch_config.patch(donated_buffer=False))
        yield


def run(registry: Registry, work: list[tuple[Case, list[Provider]]], selection: Selection, device: torch.device,
        dtype: torch.dtype, budget: Budget, graph_policy: str = "auto", cpu_threads: int = 1) -> dict:
    """Measure the ceilings, then check and time every (case, provider) of ``work`` (from
    :func:`plan`) in the selection's modes. Returns the run as the JSON document (:func:`write_json`)."""
    total = sum(len(providers) for _, providers in work) * len(selection.modes)
    counter = (f"{i}/{total}" for i in itertools.count(1))
    started = datetime.datetime.now(datetime.timezone.utc)
    with _run_settings(device, cpu_threads):
        _progress(f"measuring ceilings on {device_name(device)} ...")
        ceilings = measure_ceilings(device, dtype, budget)
        results = []
        for case, providers in work:
            results += run_case(registry, case, providers, selection.modes, device, dtype, budget, ceilings,
                                graph_policy, counter)
        env = environment(device)
    return {
        "schema": SCHEMA_VERSION,
        **env,
        "timestamp": started.isoformat(timespec="seconds"),
        "timer": timer_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "suite": selection.suite,
        "ceilings": ceilings,
        "results": results,
    }


# ---------------------------------------------------------------------------------------------
# Output: table and JSON
# ---------------------------------------------------------------------------------------------

def _fmt(x: Optional[float], spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _ceiling_cell(r: dict) -> str:
    """The nearer ceiling: a kernel is bound by whichever of GEMM rate and bandwidth it is closer to."""
    if r["pct_gemm"] is None:
        return "-"
    if r["pct_gemm"] >= r["pct_copy"]:
        return f"{r['pct_gemm']:.0f}% gemm"
    return f"{r['pct_copy']:.0f}% copy"


def format_table(rows: list[list[str]], header: Sequence[str]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def results_table(run_doc: dict, check_width: int = 48) -> str:
    device = run_doc["device"]
    kind = "CPU" if device["kind"] == "cpu" else "GPU"
    ceil = run_doc["ceilings"]
    head = [
        f"{kind}: {device['name']}, dtype {run_doc['dtype']}",
        f"timer: {run_doc['timer']}",
        (f"ceilings: {ceil['gemm']['what']}: {ceil['gemm']['tflops']:.4g} TFLOP/s; "
         f"{ceil['copy']['what']}: {ceil['copy']['gbps']:.4g} GB/s"),
    ]
    rows = []
    for r in run_doc["results"]:
        check = r["check"] if len(r["check"]) <= check_width else r["check"][: check_width - 3] + "..."
        rows.append([
            r["op"], r["case"], r["mode"], r["provider"], _fmt(r["median_ms"]), _fmt(r["p20_ms"]), _fmt(r["p80_ms"]),
            _fmt(r["tflops"], ".3g"), _fmt(r["gbps"], ".3g"), _ceiling_cell(r),
            "-" if r["ratio_to_base"] is None else f"{r['ratio_to_base']:.2f}x", check,
        ])
    header = ["op", "case", "mode", "provider", f"median ms ({kind})", "p20", "p80", "TFLOP/s", "GB/s", "%ceiling",
              "x base", "check"]
    return "\n".join(head) + "\n\n" + format_table(rows, header)


def default_json_path(run_doc: dict) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", run_doc["device"]["name"]).strip("-")
    stamp = datetime.datetime.fromisoformat(run_doc["timestamp"]).strftime("%Y%m%dT%H%M%SZ")
    return DEFAULT_OUT_DIR / f"{slug}-{stamp}.json"


def write_json(run_doc: dict, path: Path) -> None:
    """The run document: schema, device (name, kind), versions (torch, triton, python, peftops),
    git_commit (None outside a checkout), git_dirty, timestamp, timer, dtype, suite, ceilings and
    results (every quantile and derived figure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run_doc, indent=1) + "\n")


def load_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read run {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise UsageError(f"{path}: not a benchmark run of schema {SCHEMA_VERSION}")
    return doc


# ---------------------------------------------------------------------------------------------
# Compare
# ---------------------------------------------------------------------------------------------

def _key(r: dict) -> tuple:
    return (r["op"], r["case"], r["mode"], r["provider"], r["dtype"])


def classify(old: dict, new: dict, threshold: float) -> str:
    """``regression``, ``improvement`` or ``same`` for one matched result.

    A regression needs both a median beyond the threshold and disjoint inter-quantile ranges
    (new p20 above old p80), so one noisy run does not fail the comparison; improvements mirror it.
    """
    if new["median_ms"] > old["median_ms"] * (1 + threshold) and new["p20_ms"] > old["p80_ms"]:
        return "regression"
    if new["median_ms"] * (1 + threshold) < old["median_ms"] and new["p80_ms"] < old["p20_ms"]:
        return "improvement"
    return "same"


def check_same_device(old_name: str, new_name: str, force: bool) -> None:
    if old_name != new_name and not force:
        raise UsageError(
            f"refusing to compare runs from different devices: {old_name!r} vs {new_name!r} "
            "(pass --force to compare anyway)"
        )


def compare_runs(old: dict, new: dict, threshold: Optional[float], force: bool) -> tuple[str, int]:
    """Match results by (op, case, mode, provider, dtype); return a report and the number of
    regressions. Refuses runs from different devices unless ``force``."""
    check_same_device(old["device"]["name"], new["device"]["name"], force)
    if threshold is None:
        threshold = DEFAULT_THRESHOLD.get(new["device"]["kind"], DEFAULT_THRESHOLD["cpu"])
    old_by_key = {_key(r): r for r in old["results"] if r["median_ms"] is not None}
    new_by_key = {_key(r): r for r in new["results"] if r["median_ms"] is not None}
    rows, notable = [], {"regression": [], "improvement": []}
    for key, r in new_by_key.items():
        o = old_by_key.get(key)
        if o is None:
            continue
        kind = classify(o, r, threshold)
        change = f"{o['median_ms']:.4g} -> {r['median_ms']:.4g} ms ({r['median_ms'] / o['median_ms']:.3f}x)"
        if r["timer"] != o["timer"]:  # e.g. a graph capture that failed in one run only
            change += f" [timer {o['timer']} -> {r['timer']}]"
        if kind != "same":
            notable[kind].append(f"{kind.upper()}: {' / '.join(key)}: {change}")
        rows.append([*key, f"{o['median_ms']:.4g}", f"{r['median_ms']:.4g}", f"{r['median_ms'] / o['median_ms']:.3f}",
                     "" if kind == "same" else kind])
    only_new, only_old = len(new_by_key.keys() - old_by_key.keys()), len(old_by_key.keys() - new_by_key.keys())
    summary = (
        f"compared {len(rows)} results (threshold {threshold:.0%} on the median, and disjoint p20-p80 ranges): "
        f"{len(notable['regression'])} regressions, {len(notable['improvement'])} improvements"
        + (f"; {only_new} only in the new run, {only_old} only in the old run" if only_new or only_old else "")
    )
    header = ["op", "case", "mode", "provider", "dtype", "old ms", "new ms", "new/old", "verdict"]
    text = "\n".join([
        f"old: {old['timestamp']} {old['device']['name']} (commit {old.get('git_commit')})",
        f"new: {new['timestamp']} {new['device']['name']} (commit {new.get('git_commit')})",
        "", format_table(rows, header), "", summary, *notable["regression"], *notable["improvement"],
    ])
    return text, len(notable["regression"])


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------

def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from None
    return matplotlib


def write_plots(run_doc: dict, out_dir: Path) -> list[Path]:
    """One PNG per op: a panel per mode, a group of bars per case, one bar per provider, p20-p80
    as the error bar. Bars show time relative to the case's base provider when every bar has a
    base in the run (cases of very different sizes then share one linear axis), else median ms."""
    matplotlib = _require_matplotlib()
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    timed = [r for r in run_doc["results"] if r["median_ms"] is not None]
    for op in dict.fromkeys(r["op"] for r in timed):
        rows = [r for r in timed if r["op"] == op]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        cases = list(dict.fromkeys(r["case"] for r in rows))
        providers = list(dict.fromkeys(r["provider"] for r in rows))
        relative = all(r["ratio_to_base"] is not None for r in rows)
        fig, axes = plt.subplots(1, len(modes), figsize=(max(6, 2 + 1.6 * len(cases)) * len(modes), 4.5), squeeze=False)
        width = 0.8 / len(providers)
        for ax, mode in zip(axes[0], modes):
            for i, provider in enumerate(providers):
                xs, ys, lo, hi = [], [], [], []
                for j, case in enumerate(cases):
                    r = next((r for r in rows if (r["mode"], r["case"], r["provider"]) == (mode, case, provider)), None)
                    if r is None:
                        continue
                    unit = r["median_ms"] / r["ratio_to_base"] if relative else 1.0  # the base's median
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(r["median_ms"] / unit)
                    lo.append((r["median_ms"] - r["p20_ms"]) / unit)
                    hi.append((r["p80_ms"] - r["median_ms"]) / unit)
                ax.bar(xs, ys, width, yerr=[lo, hi], label=provider, capsize=2)
            if relative:
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("time / base provider's time" if relative else "median ms")
            ax.set_title(mode)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{op} on {run_doc['device']['name']} ({run_doc['dtype']}, {run_doc['timestamp']})", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    """``--ops a,b c`` -> ``[a, b, c]``."""
    if values is None:
        return None
    return [v for value in values for v in value.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Check every peftops backend and baseline against the reference, then time them "
        "(fwd, bwd, fwd+bwd) at Llama-3-8B shapes, with the device's GEMM and copy ceilings.",
        epilog="Exit codes: 0 ok; 1 a check failed or a regression was found; 2 usage error.",
    )
    p.add_argument("--quick", action="store_true", help="one small case per op (scaled down on CPU), short timing")
    p.add_argument("--ops", nargs="+", metavar="OP", help="ops to run (comma or space separated)")
    p.add_argument("--cases", nargs="+", metavar="SUBSTR", help="run the cases whose name contains one of these")
    p.add_argument("--providers", nargs="+", metavar="NAME", help="provider names or globs, e.g. 'peftops*' reference")
    p.add_argument("--modes", nargs="+", metavar="MODE", help=f"some of {', '.join(MODES)}")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help=f"time with CUDA graphs (auto: cases whose ideal forward time is under {GRAPH_BELOW_MS} ms)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="CPU only: torch intra-op threads while timing (default 1: steadier on shared cores)")
    p.add_argument("--json", type=Path, metavar="PATH",
                   help="where to write the run (default benchmarks/out/<device>-<time>.json)")
    p.add_argument("--plot", type=Path, metavar="DIR", help="write a PNG bar chart per op into DIR (needs matplotlib)")
    p.add_argument("--compare", nargs="+", type=Path, metavar="RUN.json",
                   help="OLD.json: run, then compare with OLD; OLD.json NEW.json: compare two saved runs, run nothing")
    p.add_argument("--threshold", type=float, help="regression threshold on the median, as a fraction "
                   f"(default {DEFAULT_THRESHOLD['cuda']} on CUDA, {DEFAULT_THRESHOLD['cpu']} on CPU)")
    p.add_argument("--force", action="store_true", help="compare runs from different devices anyway")
    p.add_argument("--list", action="store_true", help="list the selected cases and providers, run nothing")
    return p


def _selection(args: argparse.Namespace, device: torch.device) -> Selection:
    modes = _split(args.modes) or list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UsageError(f"--modes: unknown {bad}; expected some of {list(MODES)}")
    suite = FULL if not args.quick else (QUICK if device.type == "cuda" else QUICK_CPU)
    return Selection(ops=_split(args.ops), cases=_split(args.cases), providers=_split(args.providers),
                     modes=tuple(dict.fromkeys(modes)), suite=suite)


def _run_and_report(args, registry: Registry) -> int:
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    selection = _selection(args, device)
    work = plan(registry, selection, device)
    if args.list:
        for case, providers in work:
            names = ", ".join(p.name for p in providers)
            print(f"{case.op:20} {case.name:34} base={case.base:16} providers: {names}")
        return EXIT_OK
    # Refuse what would fail after the run before spending it.
    old = load_json(args.compare[0]) if args.compare else None
    if old is not None:
        check_same_device(old["device"]["name"], device_name(device), args.force)
    if args.plot is not None:
        _require_matplotlib()
    if args.threads < 1:
        raise UsageError(f"--threads: expected a positive count, got {args.threads}")
    if device.type == "cpu" and not args.quick:
        _progress("warning: the full suite at Llama-3-8B shapes on a CPU takes hours; try --quick")

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    run_doc = run(registry, work, selection, device, dtype, budget, args.cuda_graph, args.threads)
    print(results_table(run_doc))
    path = args.json or default_json_path(run_doc)
    write_json(run_doc, path)
    print(f"\nwrote {path}")
    if args.plot is not None:
        for png in write_plots(run_doc, args.plot):
            print(f"wrote {png}")

    code = EXIT_OK
    failed = [r for r in run_doc["results"] if r["check"] not in ("ok", "n/a")]
    if failed:
        print(f"\n{len(failed)} results failed their check:")
        for r in failed:
            print(f"  {r['op']} {r['case']} {r['mode']} {r['provider']}: {r['check']}")
        code = EXIT_FAIL
    if old is not None:
        text, regressions = compare_runs(old, run_doc, args.threshold, args.force)
        print("\n" + text)
        if regressions:
            code = EXIT_FAIL
    return code


def main(argv: Optional[Sequence[str]] = None, registry: Optional[Registry] = None) -> int:
    """The command line, callable in-process: returns the exit code (0 ok, 1 fail, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return int(exc.code or 0)
    try:
        if args.compare and len(args.compare) > 2:
            raise UsageError("--compare takes OLD.json, or OLD.json NEW.json")
        if args.threshold is not None and args.threshold < 0:
            raise UsageError(f"--threshold: expected a fraction >= 0, got {args.threshold}")
        if args.compare and len(args.compare) == 2:
            old, new = (load_json(path) for path in args.compare)
            text, regressions = compare_runs(old, new, args.threshold, args.force)
            print(text)
            return EXIT_FAIL if regressions else EXIT_OK
        if registry is None:
            from .cases import default_registry
            registry = default_registry()
        return _run_and_report(args, registry)
    except UsageError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
