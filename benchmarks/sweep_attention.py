"""Block-size sweep for the prefix-attention kernels at the issue's headline shape.

    PYTHONPATH=. python benchmarks/sweep_attention.py [--json OUT.json] [--configs-out DIR]

Times the forward kernel, then the backward's dK/dV and dq kernels (each with the prep
kernel) with each candidate configuration for head dim 128, bf16, B=4, H=32, L=2048, P=64,
causal; SDPA's causal forward without the prefix is timed in the same run as the yardstick.
Medians of ``triton.testing.do_bench``. Each candidate reaches its kernel through the
launchers' ``cfg=``: a tuned file for this GPU (which the lookup prefers to any default)
cannot stand in for it. ``--configs-out`` writes the winners as the data file the kernels
read (``DIR/prefix_attention/<GPU>.json``, with the GPU's compute capability and the run's
provenance).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from peftops.kernels import block_config

# Run 2 swept a first grid (results/...-attention-sweep-run2.json); these are its winners and
# their neighbours, plus the dK/dV shapes that compile without register spills (a review of
# the sm_90 cubins: 64 x 128 x 8 warps spills 112 B per thread at 2 stages).
# (BLOCK_M, BLOCK_N, num_warps, num_stages)
CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 4, 3), (64, 32, 4, 4)],
    "dkdv": [(64, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 1), (128, 128, 8, 2), (64, 64, 4, 2)],
    "dq": [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
}
#: The swept problem: (batch, heads, length, head dim, prefix length), causal, shared prefix.
SHAPE = (4, 32, 2048, 128, 64)


def as_config(candidate: tuple[int, int, int, int]) -> dict:
    bm, bn, warps, stages = candidate
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)


def launches(
    shape: tuple[int, int, int, int, int], device, dtype=torch.bfloat16, seed: int = 0
) -> dict[str, Callable[[dict], object]]:
    """``{kernel: run(cfg)}``: one call that launches ``kernel`` with ``cfg`` (the backward's
    runs also launch the small prep kernel, with its fixed config)."""
    from peftops.kernels import prefix_attention as A

    batch, heads, length, head_dim, prefix_len = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g, device=device).to(dtype)

    q, k, v, do = (rnd(batch, heads, length, head_dim) for _ in range(4))
    pk, pv = rnd(heads, prefix_len, head_dim), rnd(heads, prefix_len, head_dim)
    scale = head_dim**-0.5
    out, lse = A.forward(q, k, v, pk, pv, None, True, scale)
    no_q, only_q = [False, True, True, True, True], [True, False, False, False, False]
    return {
        "fwd": lambda cfg: A.forward(q, k, v, pk, pv, None, True, scale, cfg=cfg),
        "dkdv": lambda cfg: A.backward(do, q, k, v, pk, pv, None, out, lse, True, scale, no_q, cfg={"dkdv": cfg}),
        "dq": lambda cfg: A.backward(do, q, k, v, pk, pv, None, out, lse, True, scale, only_q, cfg={"dq": cfg}),
    }


def sweep(
    runs: dict[str, Callable[[dict], object]],
    candidates: dict[str, Iterable[tuple[int, int, int, int]]],
    time_fn: Callable[[Callable[[], object]], float],
    log=print,
) -> dict[str, list[dict]]:
    """``{kernel: [config + {"ms": median}]}`` for every candidate that ran."""
    results: dict[str, list[dict]] = {}
    for kernel, cands in candidates.items():
        results[kernel] = []
        for cand in cands:
            cfg = as_config(cand)
            try:
                ms = time_fn(lambda cfg=cfg, kernel=kernel: runs[kernel](cfg))
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: not a candidate here
                log(f"{kernel} {cand}: {type(exc).__name__}")
                continue
            results[kernel].append({**cfg, "ms": ms})
            log(f"{kernel} {cand}: {ms:.4f} ms")
        if results[kernel]:
            log(f"best {kernel}: {min(results[kernel], key=lambda e: e['ms'])}")
    return results


def configs_doc(results: dict[str, list[dict]], device_name: str, capability: tuple[int, int], provenance: str) -> dict:
    """The tuned-config file :mod:`peftops.kernels.block_config` reads: each kernel's winner."""
    entries = []
    for kernel, timed in results.items():
        if not timed:
            continue
        best = dict(min(timed, key=lambda e: e["ms"]))
        ms = best.pop("ms")
        entries.append({"kernel": kernel, "block_d": SHAPE[3], "dtype": "bfloat16", "config": best, "ms": ms})
    batch, heads, length, head_dim, prefix_len = SHAPE
    return {
        "device": device_name,
        "capability": list(capability),
        "op": "prefix_attention",
        "torch": torch.__version__,
        "shape": f"B{batch} H{heads} L{length} D{head_dim} P{prefix_len} causal",
        "provenance": provenance,
        "entries": entries,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument(
        "--configs-out",
        help="also write the winners as DIR/prefix_attention/<GPU>.json, "
        "the file peftops.kernels.prefix_attention reads",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_attention.py: needs a CUDA device", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    runs = launches(SHAPE, "cuda")
    batch, heads, length, head_dim, _ = SHAPE
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g, device="cuda").bfloat16() for _ in range(3))
    results: dict = {"sdpa_noprefix_fwd_ms": bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    print(f"sdpa causal fwd, no prefix: {results['sdpa_noprefix_fwd_ms']:.4f} ms")
    swept = sweep(runs, CANDIDATES, bench)
    results.update(swept)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.configs_out:
        name = torch.cuda.get_device_name()
        provenance = (
            f"benchmarks/sweep_attention.py --configs-out on {name} (torch {torch.__version__}, triton "
            f"{triton.__version__}): each kernel's fastest candidate by do_bench median, every candidate "
            "launched through the launchers' cfg=; keep the run's --json under benchmarks/results/ and "
            "name it here"
        )
        doc = configs_doc(swept, name, torch.cuda.get_device_capability(), provenance)
        path = Path(args.configs_out) / "prefix_attention" / block_config.file_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
