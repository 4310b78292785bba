"""Where and how the benchmarks are timed: the device and its environment (the JSON header), the
timers (CPU wall clock, CUDA events, CUDA graphs) with their budgets, and the GEMM and copy ceilings.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.metadata
import itertools
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QUANTILES = (0.5, 0.2, 0.8)  # median first, as triton.testing.do_bench returns them in the order asked

# GPU-only knobs.
DEFAULT_L2_BYTES = 50 * 2**20  # H100's L2, used when the device properties do not report it
MAX_ROTATION_SETS = 32  # a tiny case needs many copies to exceed 2x L2; this caps the count
GRAPH_BELOW_MS = 0.1  # cases whose ideal forward time is below this are timed with CUDA graphs
GRAPH_WARMUP_CALLS = 2  # eager calls on the capture stream before capturing (cuBLAS workspaces, compile)

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
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
# A wall clock in seconds, as ``time.perf_counter``. The CPU timer takes it as an argument so
# that tests can drive it with a fake clock: wall time on a shared machine makes any assertion
# on measured times flaky.
Clock = Callable[[], float]


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


def time_cpu(make_steps: StepMaker, budget: Budget, clock: Clock = time.perf_counter) -> Timing:
    """Wall clock (``clock``, by default ``time.perf_counter``) around each call, after warmup;
    gc off while timing."""
    steps = itertools.cycle(make_steps())
    start = clock()
    next(steps)()  # the first call compiles / allocates: never timed
    while clock() - start < budget.warmup_ms / 1e3:
        next(steps)()
    samples: list[float] = []
    spent_ms = 0.0
    gc.disable()
    try:
        while len(samples) < budget.max_calls and (len(samples) < budget.min_calls or spent_ms < budget.rep_ms):
            t0 = clock()
            next(steps)()
            samples.append((clock() - t0) * 1e3)
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


def time_steps(
    make_steps: StepMaker, device: torch.device, budget: Budget, cuda_graph: bool, clock: Clock = time.perf_counter
) -> Timing:
    """Time on ``device``; a graph that cannot be captured falls back to eager events, labelled.
    ``clock`` is the CPU timer's wall clock (GPUs time with CUDA events)."""
    if device.type != "cuda":
        return time_cpu(make_steps, budget, clock)
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
# Ceilings
# ---------------------------------------------------------------------------------------------


def _gemm_ceiling(device: torch.device, dtype: torch.dtype, budget: Budget, clock: Clock) -> dict:
    n = 8192 if device.type == "cuda" else 1024  # 8192^3 takes seconds per call on a CPU
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    a = torch.randn(n, n, generator=gen, device=device).to(dtype)
    b = torch.randn(n, n, generator=gen, device=device).to(dtype)
    timing = time_steps(lambda: [functools.partial(torch.mm, a, b)], device, budget, False, clock)
    return {
        "what": f"{str(dtype).removeprefix('torch.')} matmul {n}x{n}x{n}",
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "tflops": 2 * n**3 / (timing.median_ms * 1e-3) / 1e12,
    }


def _copy_ceiling(device: torch.device, budget: Budget, clock: Clock) -> dict:
    size = 2**30 if device.type == "cuda" else 2**28  # far beyond the last-level cache
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = time_steps(lambda: [functools.partial(dst.copy_, src)], device, budget, False, clock)
    return {
        "what": f"copy of a {size // 2**20} MiB buffer (GB/s counts read + write)",
        "median_ms": timing.median_ms,
        "p20_ms": timing.p20_ms,
        "p80_ms": timing.p80_ms,
        "gbps": 2 * size / (timing.median_ms * 1e-3) / 1e9,
    }


def measure_ceilings(
    device: torch.device, dtype: torch.dtype, budget: Budget, clock: Clock = time.perf_counter
) -> dict:
    """A large GEMM and a large copy on this device, timed like everything else.

    The GEMM uses the run's dtype (bf16 8192^3 on a GPU; 1024^3 on a CPU), so "% of GEMM
    ceiling" compares like with like. The copy is ``dst.copy_(src)`` into a preallocated buffer:
    a clone without the allocation, which on a CPU would time page faults rather than bandwidth.
    """
    ceilings = {"gemm": _gemm_ceiling(device, dtype, budget, clock), "copy": _copy_ceiling(device, budget, clock)}
    release_memory(device)
    return ceilings
