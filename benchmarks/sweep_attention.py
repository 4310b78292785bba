"""Block-size sweep for the prefix-attention kernels at the issue's headline shape.

    PYTHONPATH=. python benchmarks/sweep_attention.py [--json OUT.json]

Times the forward kernel, then the backward (prep + dK/dV + dq kernels) with each candidate
configuration for head dim 128 (``peftops.kernels.prefix_attention.CONFIGS[kernel][128]``), bf16,
B=4, H=32, L=2048, P=64, causal; SDPA's causal forward without the prefix is timed in the
same run as the yardstick. Medians of ``triton.testing.do_bench``. ``--configs-out`` writes the
winners as the data file the kernels read (``peftops/kernels/configs/prefix_attention/``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

# Run 2 swept a first grid (results/...-attention-sweep-run2.json); these are its winners and
# their neighbours, plus the dK/dV shapes that compile without register spills (a review of
# the sm_90 cubins: 64 x 128 x 8 warps spills 112 B per thread at 2 stages).
CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (128, 64, 8, 3), (64, 128, 4, 3), (64, 32, 4, 4)],
    "dkdv": [(64, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 3), (64, 128, 8, 1), (128, 128, 8, 2), (64, 64, 4, 2)],
    "dq": [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4)],
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
    import triton.testing

    from peftops.kernels import prefix_attention as A

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").bfloat16()  # noqa: E731
    q, k, v, do = r(4, 32, 2048, 128), r(4, 32, 2048, 128), r(4, 32, 2048, 128), r(4, 32, 2048, 128)
    pk, pv = r(32, 64, 128), r(32, 64, 128)
    scale = 128**-0.5
    results = {"sdpa_noprefix_fwd_ms": bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    print(f"sdpa causal fwd, no prefix: {results['sdpa_noprefix_fwd_ms']:.4f} ms")
    out, lse = A.forward(q, k, v, pk, pv, None, True, scale)
    original = {kernel: dict(A.CONFIGS[kernel][128]) for kernel in CANDIDATES}
    runs = {
        "fwd": lambda: A.forward(q, k, v, pk, pv, None, True, scale),
        "dkdv": lambda: A.backward(do, q, k, v, pk, pv, None, out, lse, True, scale, [False, True, True, True, True]),
        "dq": lambda: A.backward(do, q, k, v, pk, pv, None, out, lse, True, scale, [True, False, False, False, False]),
    }
    for kernel, cands in CANDIDATES.items():
        results[kernel] = []
        for bm, bn, warps, stages in cands:
            A.CONFIGS[kernel][128] = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            try:
                ms = bench(runs[kernel])
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: not a candidate here
                print(f"{kernel} {bm}x{bn} w{warps} s{stages}: {type(exc).__name__}")
                continue
            results[kernel].append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages, "ms": ms})
            print(f"{kernel} {bm}x{bn} w{warps} s{stages}: {ms:.4f} ms")
        A.CONFIGS[kernel][128] = original[kernel]
        best = min(results[kernel], key=lambda e: e["ms"])
        print(f"best {kernel}: {best}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.configs_out:
        from pathlib import Path

        from peftops.kernels import block_config

        name = torch.cuda.get_device_name()
        entries = []
        for kernel in CANDIDATES:
            best = dict(min(results[kernel], key=lambda e: e["ms"]))
            ms = best.pop("ms")
            entries.append({"kernel": kernel, "block_d": 128, "dtype": "bfloat16", "config": best, "ms": ms})
        path = Path(args.configs_out) / "prefix_attention" / block_config.file_name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(
                {
                    "device": name,
                    "op": "prefix_attention",
                    "torch": torch.__version__,
                    "shape": "B4 H32 L2048 D128 P64 causal",
                    "entries": entries,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
