"""Where a training step's time goes, kernel by kernel (``torch.profiler``, CUDA activity).

    PYTHONPATH=. python benchmarks/profile_ops.py [--json OUT.json]

For each op at its issue's headline shape, runs forward + backward a few times on the chosen
backend and prints the CUDA kernels' total and per-call times, largest first. The numbers
are the profiler's (each kernel timed in isolation, with profiling overhead between launches),
so they explain a ``python -m benchmarks`` median; they do not replace it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import peftops


def _lora():
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, device="cuda") * std).bfloat16()  # noqa: E731
    x = r(8192, 4096).requires_grad_()
    w = r(4096, 4096, std=4096**-0.5)
    a = r(16, 4096, std=4096**-0.5).requires_grad_()
    b = r(4096, 16, std=0.25).requires_grad_()
    return lambda: peftops.lora_linear(x, w, a, b, scale=2.0)


def _adapter():
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=g, device="cuda") * std).bfloat16()  # noqa: E731
    x = r(16384, 4096).requires_grad_()
    wd, bd = r(64, 4096, std=4096**-0.5).requires_grad_(), r(64, std=0.1).requires_grad_()
    wu, bu = r(4096, 64, std=0.125).requires_grad_(), r(4096, std=0.1).requires_grad_()
    return lambda: peftops.bottleneck_adapter(x, wd, bd, wu, bu, activation="gelu", scale=1.0)


def _attention():
    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda").bfloat16().requires_grad_()  # noqa: E731
    q, k, v = r(4, 32, 2048, 128), r(4, 32, 2048, 128), r(4, 32, 2048, 128)
    pk, pv = r(32, 64, 128), r(32, 64, 128)
    return lambda: peftops.prefix_attention(q, k, v, pk, pv, causal=True)


CASES = {
    "lora_linear T8192 4096x4096 r16": _lora,
    "bottleneck_adapter T16384 d4096 r64": _adapter,
    "prefix_attention B4 H32 L2048 D128 P64": _attention,
}


def profile(fn, steps: int = 5) -> list[dict]:
    grad = None
    for _ in range(3):  # compile and warm up
        y = fn()
        grad = torch.randn_like(y) if grad is None else grad
        y.backward(grad)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn().backward(grad)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if total and e.count:
            rows.append({"kernel": e.key, "calls_per_step": e.count / steps, "ms_per_step": total / 1e3 / steps})
    return sorted(rows, key=lambda row: -row["ms_per_step"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="triton")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_ops.py: needs a CUDA device", file=sys.stderr)
        return 2
    out = {}
    with peftops.use_backend(args.backend):
        for name, make in CASES.items():
            rows = profile(make())
            out[name] = rows
            print(f"\n{name} ({args.backend}), fwd+bwd per step: {sum(r['ms_per_step'] for r in rows):.4f} ms")
            for row in rows[:12]:
                print(f"  {row['ms_per_step']:8.4f} ms  x{row['calls_per_step']:.0f}  {row['kernel'][:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
