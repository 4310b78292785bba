"""The peftops microbenchmark harness: selection, the run loop, the command line and :func:`main`.

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

The harness is split by concern:

* :mod:`benchmarks.registry`: ops, cases, providers, modes, suites and the :class:`Registry`;
* :mod:`benchmarks.timing`: the device and its environment, the timers and the ceilings;
* :mod:`benchmarks.inputs`: input sets, cache rotation and the timed step of each mode;
* :mod:`benchmarks.checks`: every checked provider against the float32 reference;
* :mod:`benchmarks.report`: the table, the JSON run, compare and plots;
* this module: what to run, the run loop and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import Expected, check_provider, evaluate_reference, verdict
from .inputs import GRAD_OUT_SEED, make_grad_out, make_input_set, mode_steps, nbytes, rotation_sets
from .registry import AUTO_PROVIDER, FULL, MODES, QUICK, QUICK_CPU, Case, Inputs, Provider, Registry, UsageError, Work
from .report import (
    DEFAULT_THRESHOLD,
    SCHEMA_VERSION,
    _require_matplotlib,
    auto_check_text,
    auto_checks,
    check_same_device,
    compare_runs,
    default_json_path,
    load_json,
    results_table,
    write_json,
    write_plots,
)
from .timing import (
    FULL_BUDGET,
    GRAPH_BELOW_MS,
    QUICK_BUDGET,
    Budget,
    Clock,
    default_device,
    device_name,
    environment,
    measure_ceilings,
    release_memory,
    time_steps,
    timer_description,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """What the command line asked for; ``None`` selects everything. A case runs if its op is
    selected, it belongs to ``suite`` and its name contains one of ``cases``."""

    ops: Sequence[str] | None = None
    cases: Sequence[str] | None = None  # substrings
    providers: Sequence[str] | None = None  # exact names or fnmatch globs
    modes: Sequence[str] = MODES
    suite: str = FULL


def _provider_selected(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def plan(registry: Registry, selection: Selection, device: torch.device) -> list[tuple[Case, list[Provider]]]:
    """The (case, providers) pairs that the selection asks for, in registration order."""
    if selection.ops is not None:
        unknown = sorted(set(selection.ops) - set(registry.ops))
        if unknown:
            raise UsageError(f"--ops: unknown {unknown}; registered: {sorted(registry.ops)}")
    providers = {
        name: op.providers(device)
        for name, op in registry.ops.items()
        if selection.ops is None or name in selection.ops
    }
    offered = {p.name for ps in providers.values() for p in ps}
    for pattern in selection.providers or ():
        if not any(_provider_selected(name, [pattern]) for name in offered):
            # Not an error: a session script may name a backend that this build lacks.
            _progress(f"warning: --providers {pattern!r} matches no provider here ({', '.join(sorted(offered))})")
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
        "op": case.op,
        "case": case.name,
        "mode": mode,
        "provider": provider.name,
        "dtype": str(dtype).removeprefix("torch."),
        "params": case.params,
        "base": case.base,
        "median_ms": None,
        "p20_ms": None,
        "p80_ms": None,
        "timer": None,
        "n_sets": None,
        "flops": None,
        "bytes": None,
        "tflops": None,
        "gbps": None,
        "pct_gemm": None,
        "pct_copy": None,
        "ratio_to_base": None,
        "check": None,
        "picked": None,  # the auto provider only: the backend auto resolved to
    }


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _checks(
    provider: Provider,
    inputs: Inputs,
    grad_out: torch.Tensor,
    case: Case,
    expected: Expected,
    modes: Sequence[str],
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, str]:
    """The check column of each mode: the forward's problems for ``fwd``, the forward's and the
    gradients' for the others; ``n/a`` for an unchecked provider; ``error: ...`` if it raised."""
    if not provider.checked:
        return dict.fromkeys(modes, "n/a")
    if case.unchecked is not None:
        return dict.fromkeys(modes, f"n/a: {case.unchecked}")
    try:
        fwd, bwd = check_provider(provider, inputs, grad_out, case.grad_inputs, expected, dtype, device)
    except Exception as exc:  # noqa: BLE001 - a broken provider is a result, not a crash
        return dict.fromkeys(modes, _error(exc))
    return {m: verdict(fwd if m == "fwd" else fwd + bwd) for m in modes}


def run_case(
    registry: Registry,
    case: Case,
    providers: list[Provider],
    modes: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    ceilings: dict,
    graph_policy: str,
    counter: Iterable[str],
    clock: Clock = time.perf_counter,
) -> list[dict]:
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
        picked = op.auto_pick(first) if provider.name == AUTO_PROVIDER and op.auto_pick is not None else None
        for mode in modes:
            result = _new_result(case, provider, mode, dtype)
            work = case_work(case, provider, mode)
            result.update(check=checks[mode], flops=work.flops, bytes=work.elems * itemsize, picked=picked)
            if provider.untimed is not None:
                result["timer"] = f"not timed: {provider.untimed}"
            elif not checks[mode].startswith("error"):
                make_steps = functools.partial(mode_steps, provider.fn, sets, grad_outs, case.grad_inputs, mode)
                try:
                    timing = time_steps(make_steps, device, budget, cuda_graph, clock)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported, the run goes on
                    result["check"] = _error(exc)
                else:
                    result.update(
                        median_ms=timing.median_ms,
                        p20_ms=timing.p20_ms,
                        p80_ms=timing.p80_ms,
                        timer=timing.timer,
                        n_sets=n_sets,
                    )
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


def run(
    registry: Registry,
    work: list[tuple[Case, list[Provider]]],
    selection: Selection,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    graph_policy: str = "auto",
    cpu_threads: int = 1,
    clock: Clock = time.perf_counter,
    checkpoint: Callable[[dict], None] | None = None,
) -> dict:
    """Measure the ceilings, then check and time every (case, provider) of ``work`` (from
    :func:`plan`) in the selection's modes. Returns the run as the JSON document (:func:`write_json`).

    ``clock`` is the CPU timer's wall clock (tests pass a fake one). ``checkpoint(doc)``, if
    given, receives the document so far after each case, marked ``complete: false``: a run
    killed by a time limit still leaves the cases it finished.
    """
    total = sum(len(providers) for _, providers in work) * len(selection.modes)
    counter = (f"{i}/{total}" for i in itertools.count(1))
    started = datetime.datetime.now(datetime.timezone.utc)
    rivals = {case.op: list(registry.ops[case.op].auto_rivals) for case, _ in work if registry.ops[case.op].auto_rivals}

    def document(results: list[dict], complete: bool) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            **env,
            "timestamp": started.isoformat(timespec="seconds"),
            "timer": timer_description(device),
            "dtype": str(dtype).removeprefix("torch."),
            "suite": selection.suite,
            "ceilings": ceilings,
            "results": results,
            "auto_rule": rivals,
            "auto_check": auto_checks(results, rivals),
            "complete": complete,
        }

    with _run_settings(device, cpu_threads):
        env = environment(device)
        _progress(f"measuring ceilings on {device_name(device)} ...")
        ceilings = measure_ceilings(device, dtype, budget, clock)
        results = []
        for case, providers in work:
            results += run_case(
                registry,
                case,
                providers,
                selection.modes,
                device,
                dtype,
                budget,
                ceilings,
                graph_policy,
                counter,
                clock,
            )
            if checkpoint is not None:
                checkpoint(document(list(results), complete=False))
    return document(results, complete=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _split(values: list[str] | None) -> list[str] | None:
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
    p.add_argument(
        "--cuda-graph",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"time with CUDA graphs (auto: cases whose ideal forward time is under {GRAPH_BELOW_MS} ms)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="CPU only: torch intra-op threads while timing (default 1: steadier on shared cores)",
    )
    p.add_argument(
        "--json", type=Path, metavar="PATH", help="where to write the run (default benchmarks/out/<device>-<time>.json)"
    )
    p.add_argument("--plot", type=Path, metavar="DIR", help="write a PNG bar chart per op into DIR (needs matplotlib)")
    p.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        metavar="RUN.json",
        help="OLD.json: run, then compare with OLD; OLD.json NEW.json: compare two saved runs, run nothing",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="regression threshold on the median, as a fraction "
        f"(default {DEFAULT_THRESHOLD['cuda']} on CUDA, {DEFAULT_THRESHOLD['cpu']} on CPU)",
    )
    p.add_argument("--force", action="store_true", help="compare runs from different devices anyway")
    p.add_argument("--list", action="store_true", help="list the selected cases and providers, run nothing")
    host = p.add_argument_group(
        "host overhead",
        "--host-overhead replaces the benchmark run: host time per eager call on tiny shapes (one CPU "
        "thread) of peftops.lora_linear and peftops.nn.LoRALinear (auto and every available backend) against "
        "the 3-line LoRA function and module, F.linear and nn.Linear, in the same run "
        "(benchmarks/host_overhead.py). It honours --device, --dtype, --json and --quick.",
    )
    host.add_argument("--host-overhead", action="store_true", help="time host overhead per call instead")
    host.add_argument(
        "--repeats", type=int, metavar="N", help="timed batches per call and mode (default 200, quick 30)"
    )
    host.add_argument("--calls", type=int, metavar="N", help="calls per timed batch (default 20, quick 10)")
    return p


def _selection(args: argparse.Namespace, device: torch.device) -> Selection:
    modes = _split(args.modes) or list(MODES)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise UsageError(f"--modes: unknown {bad}; expected some of {list(MODES)}")
    suite = FULL if not args.quick else (QUICK if device.type == "cuda" else QUICK_CPU)
    return Selection(
        ops=_split(args.ops),
        cases=_split(args.cases),
        providers=_split(args.providers),
        modes=tuple(dict.fromkeys(modes)),
        suite=suite,
    )


def _run_and_report(args, registry: Registry, clock: Clock) -> int:
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.host_overhead:
        from . import host_overhead

        return host_overhead.run_and_report(device, dtype, args.quick, args.repeats, args.calls, args.json)
    if args.repeats is not None or args.calls is not None:
        raise UsageError("--repeats and --calls go with --host-overhead")
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

    budget = QUICK_BUDGET if args.quick else FULL_BUDGET

    def checkpoint(doc: dict) -> None:
        write_json(doc, args.json or default_json_path(doc))

    run_doc = run(registry, work, selection, device, dtype, budget, args.cuda_graph, args.threads, clock, checkpoint)
    print(results_table(run_doc))
    if run_doc["auto_check"]:
        print("\n" + auto_check_text(run_doc["auto_check"]))
    path = args.json or default_json_path(run_doc)
    write_json(run_doc, path)
    print(f"\nwrote {path}")
    if args.plot is not None:
        for png in write_plots(run_doc, args.plot):
            print(f"wrote {png}")

    code = EXIT_OK
    failed = [r for r in run_doc["results"] if not (r["check"] == "ok" or r["check"].startswith("n/a"))]
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


def main(argv: Sequence[str] | None = None, registry: Registry | None = None, clock: Clock | None = None) -> int:
    """The command line, callable in-process: returns the exit code (0 ok, 1 fail, 2 usage).
    ``clock`` replaces the CPU timer's wall clock (``time.perf_counter``), for tests."""
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
        return _run_and_report(args, registry, clock or time.perf_counter)
    except UsageError as exc:
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
