"""Peak GPU memory of one QLoRA training step (forward + backward of one layer), per provider,
against the same run's baselines (issue 14): peftops' Triton and torch backends, dequantise-then-
cuBLAS, bitsandbytes + peft's LoRA products (where bitsandbytes is installed), and 16-bit LoRA
on the unquantised weight. Also the stored bytes of the 4-bit weight (bits per parameter).

Peak = ``torch.cuda.max_memory_allocated`` during the step minus what was allocated before it
(the inputs, the 4-bit weight, the adapter), so it counts the step's own temporaries: a
dequantised weight buffer shows up as ``2 N K`` bytes.

    python benchmarks/qlora_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("qlora_memory: needs a CUDA device")
    sys.path.insert(0, ".")
    import peftops
    from benchmarks.cases import lora_linear_nf4 as case
    from peftops.reference import nf4

    providers = {
        "peftops[triton]": ("triton", case.public),
        "peftops[torch]": ("torch", case.public),
        "dequant-cublas": (None, case.dequant_cublas),
        "lora-bf16": ("torch", lambda t: peftops.lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], scale=2.0)),
    }
    try:
        import bitsandbytes  # noqa: F401

        providers["bnb-peft"] = (None, case.bnb_peft)
    except ImportError:
        pass
    dev = torch.device("cuda")
    rows = []
    for proj, (k, n) in case.PROJECTIONS.items():
        gen = torch.Generator(device=dev).manual_seed(0)
        t = case._inputs(args.tokens, k, n, case.RANK)(torch.bfloat16, dev, gen)
        stored = t["qweight"].numel() + sum(
            getattr(t["quant_state"], f).numel() * getattr(t["quant_state"], f).element_size()
            for f in ("absmax", "code", "offset", "state2_absmax", "state2_code")
            if getattr(t["quant_state"], f) is not None
        )
        for name, (backend, fn) in providers.items():
            x = t["x"].detach().requires_grad_()
            a, b = t["lora_a"].detach().requires_grad_(), t["lora_b"].detach().requires_grad_()
            inputs = dict(t, x=x, lora_a=a, lora_b=b)
            g = torch.randn(args.tokens, n, device=dev, dtype=torch.bfloat16)
            for _ in range(2):  # the second step is measured: compiles and allocator warm-up out of the way
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                if backend is not None:
                    with peftops.use_backend(backend):
                        y = fn(inputs)
                else:
                    y = fn(inputs)
                y.backward(g)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before
                del y
                x.grad = a.grad = b.grad = None
            rows.append({"case": f"{proj}-{k}x{n}-r{case.RANK}-T{args.tokens}", "provider": name, "peak_bytes": peak})
            print(f"{rows[-1]['case']:<28} {name:<16} peak {peak / 2**20:9.1f} MiB", flush=True)
        rows.append({"case": f"{proj}-{k}x{n}", "provider": "stored 4-bit weight", "bytes": stored,
                     "bits_per_parameter": 8 * stored / (n * k)})  # fmt: skip
        print(f"{proj}: 4-bit weight {stored / 2**20:.1f} MiB, {8 * stored / (n * k):.4f} bits per weight", flush=True)
    with open(args.json, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "nf4": nf4.__name__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
