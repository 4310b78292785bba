"""Offline tuning of the LoRA and adapter kernels' block configurations, written as data.

    python benchmarks/tune.py                      # on a GPU: every Llama-3-8B shape, ranks 16/64
    python benchmarks/tune.py --out DIR --quick    # fewer candidates
    python benchmarks/tune.py --op bottleneck_adapter   # the adapter's row kernels, issue shapes

For each problem ``(tokens, in, out, r)`` and each launch the op makes (the forward GEMM and
down projection, the backward's dx GEMM, down projection and token reductions), every
candidate configuration is timed with ``triton.testing.do_bench`` (median) and the fastest is
kept, keyed by the launch's own ``(n, k, r)`` and the token bucket, in
``<out>/lora_linear/<device>.json`` (default ``peftops/kernels/configs``), which
:mod:`peftops.kernels.block_config` reads (with the GPU's compute capability, so that a GPU of
the same capability without a file of its own uses it). Each candidate reaches its launch
through the launcher's ``cfg=``. Nothing tunes at run time.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from peftops.kernels import block_config
from peftops.kernels import lora_linear as K
from peftops.kernels import lowrank as L

LLAMA = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)


def candidates(kernel: str, quick: bool) -> list[dict]:
    if kernel == "gemm":
        grid = itertools.product((64, 128), (64, 128, 256), (32, 64), (4, 8), (3, 4) if quick else (2, 3, 4, 5))
        return [
            dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
            for m, n, k, w, s in grid
            if not (m == 128 and n == 256 and w == 4)
        ]
    if kernel == "down":
        grid = itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 3, 4))
        return [dict(BLOCK_M=m, BLOCK_K=k, num_warps=w, num_stages=s) for m, k, w, s in grid]
    if kernel == "rows":  # the adapter's row kernels: small row blocks keep x's re-read in L2
        grid = itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (3,) if quick else (2, 3, 4))
        return [dict(BLOCK_M=m, BLOCK_D=d, num_warps=w, num_stages=s) for m, d, w, s in grid]
    if kernel == "tn":
        grid = itertools.product((32, 64, 128), (64, 128), (32, 64, 128), (4, 8), (2, 3))
        return [dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_M=m, num_warps=w, num_stages=s) for p, q, m, w, s in grid]
    raise ValueError(kernel)


def launches(tokens: int, in_f: int, out_f: int, rank: int, dtype, device) -> Iterable[tuple[str, tuple, Callable]]:
    """``(kernel, (m, n, k, r) key, run(cfg))`` for every launch of one training step."""
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    x, w, a, b = rnd(tokens, in_f), rnd(out_f, in_f), rnd(rank, in_f), rnd(out_f, rank)
    grad, u, v = rnd(tokens, out_f), rnd(tokens, rank), rnd(tokens, rank)
    yield "down", (tokens, rank, in_f, rank), lambda cfg: L.down(x, a.T, 1.0, 0.0, None, cfg=cfg)
    yield "gemm", (tokens, out_f, in_f, rank), lambda cfg: K.gemm(x, w.T, u, b.T, None, cfg=cfg)
    yield "down", (tokens, rank, out_f, rank), lambda cfg: L.down(grad, b, 1.0, 0.0, None, cfg=cfg)
    yield "gemm", (tokens, in_f, out_f, rank), lambda cfg: K.gemm(grad, w, v, a, None, cfg=cfg)
    yield "tn", (tokens, rank, in_f, rank), lambda cfg: L.tn(v, x, out_dtype=dtype, cfg=cfg)
    yield "tn", (tokens, out_f, rank, rank), lambda cfg: L.tn(grad, u, out_dtype=dtype, cfg=cfg)


ADAPTER_PROBLEMS = [(16384, 4096, 4096, 64), (16384, 4096, 4096, 16), (4096, 1024, 1024, 64)]


def adapter_launches(tokens: int, d: int, _d: int, rank: int, dtype, device):
    """The adapter's forward (its row kernel; the backward's dx uses the same config)."""
    from peftops.kernels import bottleneck_adapter as AK

    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    x, wd, bd, wu, bu = rnd(tokens, d), rnd(rank, d) * d**-0.5, rnd(rank), rnd(d, rank) * rank**-0.5, rnd(d)
    yield "rows", (tokens, d, d, rank), lambda cfg: AK.forward(x, wd, bd, wu, bu, None, "gelu", 1.0, cfg=cfg)


def do_bench_median(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def tune(
    problems: Iterable[tuple[int, int, int, int]],
    dtype,
    device,
    quick: bool,
    time_fn: Callable[[Callable[[], object]], float] = do_bench_median,
    candidate_fn: Callable[[str, bool], list[dict]] = candidates,
    log=print,
    kernels: Iterable[str] | None = None,
    launches_fn=None,
) -> list[dict]:
    entries = []
    seen = set()
    wanted = None if kernels is None else set(kernels)
    for tokens, in_f, out_f, rank in problems:
        for kernel, (m, n, k, r), run in (launches_fn or launches)(tokens, in_f, out_f, rank, dtype, device):
            key = (kernel, n, k, r, block_config.m_bucket(m))
            if key in seen or (wanted is not None and kernel not in wanted):
                continue
            seen.add(key)
            best: tuple[float, dict] | None = None
            for cfg in candidate_fn(kernel, quick):
                try:
                    ms = time_fn(functools.partial(run, cfg))
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: not a candidate here
                    log(f"  skip {cfg}: {type(exc).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is None:
                raise RuntimeError(f"no candidate ran for {kernel} {(m, n, k, r)}")
            log(f"{kernel} m={m} n={n} k={k} r={r}: {best[0]:.4f} ms with {best[1]}")
            entries.append(
                {
                    "kernel": kernel,
                    "n": n,
                    "k": k,
                    "r": r,
                    "m_bucket": block_config.m_bucket(m),
                    "config": best[1],
                    "ms": best[0],
                }
            )
    return entries


def write(
    entries: list[dict],
    device_name: str,
    out_dir: Path,
    dtype,
    op: str = "lora_linear",
    capability: tuple[int, int] | None = None,
) -> Path:
    """The tuned-config file; with the GPU's ``capability``, other GPUs of that capability
    (an H200 for an H100) use it when they have no file of their own."""
    path = out_dir / op / block_config.file_name(device_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "device": device_name,
        **({"capability": list(capability)} if capability is not None else {}),
        "op": op,
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "entries": entries,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=block_config.CONFIG_DIR)
    parser.add_argument("--quick", action="store_true", help="fewer candidates")
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--op", choices=["lora_linear", "bottleneck_adapter"], default="lora_linear")
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=["gemm", "down", "tn"],
        default=None,
        help="tune only these launches (the others keep their defaults)",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune.py: needs a CUDA device (timings under the interpreter mean nothing)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    if args.op == "bottleneck_adapter":
        entries = tune(ADAPTER_PROBLEMS, torch.bfloat16, device, args.quick, launches_fn=adapter_launches)
    else:
        problems = [(t, i, o, r) for t in args.tokens for i, o in LLAMA for r in args.ranks]
        entries = tune(problems, torch.bfloat16, device, args.quick, kernels=args.kernels)
    path = write(entries, name, args.out, torch.bfloat16, args.op, torch.cuda.get_device_capability(device))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
