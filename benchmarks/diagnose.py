"""Why a peftops op's benchmark median sits above the sum of its kernels: one launch at a time.

    PYTHONPATH=. python benchmarks/diagnose.py

LoRA at 8192 x 4096 x 4096, r16 and prefix attention at B4 H32 L2048 D128 P64 (bf16): the
bare Triton launchers, the backend functions, the public op eagerly and replayed from a CUDA
graph (no CPU work inside the timed region), forward and backward; the host time per call
of each eager path (synchronised once after N calls); and the SM clock and power around the
run. Medians of ``triton.testing.do_bench``.
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def clocks(tag: str) -> None:
    q = "clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
    print(f"[{tag}] {q}: {out.stdout.strip()}")


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def host_us(fn, n=50) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> int:
    import triton.testing

    import peftops
    from peftops.kernels import block_config
    from peftops.kernels import lora_linear as LK
    from peftops.kernels import prefix_attention as AK

    bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731
    dev, bf = torch.device("cuda"), torch.bfloat16
    clocks("start")
    gen = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s, std=1.0: (torch.randn(*s, generator=gen, device=dev) * std).to(bf)  # noqa: E731
    x, w = r(8192, 4096), r(4096, 4096, std=4096**-0.5)
    a, b = r(16, 4096, std=4096**-0.5), r(4096, 16, std=0.25)
    u, g = r(8192, 16), r(8192, 4096)
    print("gemm config:", block_config.config("lora_linear", "gemm", dev, 8192, 4096, 4096, 16, bf))
    xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
    y = peftops.lora_linear(xg, w, ag, bg, scale=2.0)
    rows = {
        "F.linear fwd": lambda: F.linear(x, w),
        "gemm kernel alone": lambda: LK.gemm(x, w.T, u, b.T, None),
        "lora backend fwd (no custom op)": lambda: LK.forward(x, w, a, b, None, 2.0, 0.0, None),
        "lora public fwd (no grad)": lambda: peftops.lora_linear(x, w, a, b, scale=2.0),
        "lora backend bwd (no autograd)": lambda: LK.backward(
            g, x, w, a, b, u, 2.0, 0.0, None, [True, False, True, True, False]
        ),
        "lora autograd bwd": lambda: torch.autograd.grad(y, (xg, ag, bg), g, retain_graph=True),
    }
    for name, fn in rows.items():
        ctx = torch.no_grad() if "bwd" not in name else torch.enable_grad()
        with ctx:
            eager = bench(fn)
            host = host_us(fn)
            try:
                replay = bench(graphed(fn))
            except Exception as exc:  # noqa: BLE001
                replay = float("nan")
                print(f"  (no graph for {name}: {type(exc).__name__})")
        print(f"{name:34s} eager {eager:.4f} ms  graph {replay:.4f} ms  host {host:7.1f} us/call")
    clocks("after lora")

    q, k, v = r(4, 32, 2048, 128), r(4, 32, 2048, 128), r(4, 32, 2048, 128)
    pk, pv = r(32, 64, 128), r(32, 64, 128)
    scale = 128**-0.5
    attn = {
        "sdpa causal fwd (no prefix)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "attention kernel fwd": lambda: AK.forward(q, k, v, pk, pv, None, True, scale),
        "attention public fwd": lambda: peftops.prefix_attention(q, k, v, pk, pv),
    }
    with torch.no_grad():
        for name, fn in attn.items():
            eager, host, replay = bench(fn), host_us(fn), bench(graphed(fn))
            print(f"{name:34s} eager {eager:.4f} ms  graph {replay:.4f} ms  host {host:7.1f} us/call")
    clocks("end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
