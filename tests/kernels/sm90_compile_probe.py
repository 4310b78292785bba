"""Compile every shipped LoRA and adapter kernel configuration for sm_90a, without a GPU, and
print one JSON line per compiled kernel: registers, spill stores/loads, stack frame.

Run by ``tests/kernels/test_sm90_compile.py`` in a subprocess (the suite sets
``TRITON_INTERPRET=1``, under which ``triton.jit`` gives interpreted functions that cannot be
compiled); by hand::

    env -u TRITON_INTERPRET TRITON_CACHE_DIR=$(mktemp -d) python -m tests.kernels.sm90_compile_probe

How: the real launchers (``lora_linear.gemm``, ``lowrank.down``/``tn``, the adapter's
``forward``/``_expand_rows``) run on small CPU tensors with each shipped config forced (``cfg=``),
with the kernels swapped for recorders; each recorded launch is specialized as the JIT would
specialize it on a GPU (pointer alignment, ints divisible by 16, ints equal to 1) and compiled
with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``. ptxas is the one triton ships and
picks for sm_90 itself; its ``-v`` report is the source of the spill counts. The shipped configs
are the compute-capability-9 family defaults (``block_config.DEFAULTS``) and every entry of the
tuned files under ``configs/lora_linear`` and ``configs/bottleneck_adapter``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

TARGET = ("cuda", 90, 32)
#: Token count of the recorded launches: a multiple of 16, as real batches are, so that the
#: compiled specialization is the one production runs.
TOKENS = 256
DTYPES = ("bfloat16", "float16")


def _specialize(value):
    """(signature type, divisible-by-16) for one runtime argument, as triton's JIT does it."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        return kind, key == "D"
    except ImportError:  # older triton: the same rules, written out
        import torch

        if isinstance(value, torch.Tensor):
            name = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64"}
            return "*" + name.get(value.dtype, "u8"), value.data_ptr() % 16 == 0
        if isinstance(value, bool):
            return "u1", False
        if isinstance(value, int):
            if value == 1:
                return "constexpr", False
            return ("i32" if -(2**31) <= value < 2**31 else "i64"), value % 16 == 0
        return "fp32", False


#: The jitted kernels, by (module, name): the pool's workers are forked after the launchers'
#: module globals became recorders.
REAL: dict = {}


def _record(module, name, launches):
    real = getattr(module, name)
    REAL[(module.__name__, name)] = real

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((real, args, dict(kwargs)))

            return launch

    setattr(module, name, Recorder())


def _launches():
    """Every (kernel, args, kwargs) the shipped configs launch, deduplicated by specialization."""
    import torch

    from peftops.kernels import block_config, lowrank
    from peftops.kernels import bottleneck_adapter as adapter
    from peftops.kernels import lora_linear as lora
    from peftops.kernels import lora_linear_nf4 as qlora
    from peftops.kernels import multi_lora_linear as multi

    launches: list = []
    for module, name in ((lora, "_gemm_kernel"), (lowrank, "_down_kernel"), (lowrank, "_tn_kernel")):
        _record(module, name, launches)
    for name in ("_forward_kernel", "_expand_kernel"):
        _record(adapter, name, launches)
    _record(qlora, "_nf4_gemm_kernel", launches)
    for name in ("_gather_down_kernel", "_gather_up_kernel"):
        _record(multi, name, launches)

    def configs(op, kernel, rank_for_defaults):
        """(cfg, n, k, r) for the family-9 default and each tuned entry of ``kernel``."""
        out = [(dict(block_config.DEFAULTS[kernel][9]), 512, 512, rank_for_defaults)]
        for path in sorted((block_config.CONFIG_DIR / op).glob("*.json")):
            for e in json.loads(path.read_text())["entries"]:
                if e["kernel"] == kernel:
                    out.append((dict(e["config"]), 512, 512, e["r"]))
        return out

    m = TOKENS
    for dtype in (getattr(torch, d) for d in DTYPES):
        seed = torch.zeros((), dtype=torch.int64)
        for cfg, n, k, r in configs("lora_linear", "gemm", 16):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
            u, b = torch.randn(m, r, dtype=torch.float32), torch.randn(n, r, dtype=dtype)
            a = torch.randn(r, k, dtype=dtype)
            bias = torch.randn(n, dtype=dtype)
            lora.gemm(x, w.T, u, b.T, bias, cfg=cfg)  # the forward
            g = torch.randn(m, n, dtype=dtype)
            mask = lowrank.empty_mask(m, k, x.device)
            lora.gemm(g, w, u, a, None, epi_scale=2.0, cfg=cfg)  # dx without dropout
            lora.gemm(g, w, u, a, None, epi_scale=2.0, mask=mask, cfg=cfg)  # dx with dropout
            col = torch.rand(n, dtype=torch.float32)
            lora.gemm_col_scaled(x, w.T, u, b.T, bias, col, epi_scale=2.0, save_pre=True, cfg=cfg)  # DoRA
        for cfg, n, k, r in [*configs("lora_linear_nf4", "gemm", 16), (dict(qlora.DECODE_CONFIG), 512, 512, 16)]:
            # QLoRA: the 4-bit weight dequantised in the load path, forward and dx (with and
            # without the dropout mask), rounded through the activations' dtype.
            x, g = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
            u, b, a = torch.randn(m, r), torch.randn(n, r, dtype=dtype), torch.randn(r, k, dtype=dtype)
            bias, mask = torch.randn(n, dtype=dtype), lowrank.empty_mask(m, k, x.device)
            packed, absmax, code = torch.zeros(n * k // 2, dtype=torch.uint8), torch.rand(n * k // 64), torch.rand(16)
            for transposed, xx, bb, mm in ((True, x, b.T, None), (False, g, a, None), (False, g, a, mask)):
                qlora.nf4_gemm(xx, packed, absmax, code, 64, (n, k), weight_dtype=dtype, transposed=transposed,
                               u=u, b_rn=bb, bias=bias if transposed else None, mask=mm, cfg=cfg)  # fmt: skip
        # Multi-LoRA's gathered decode forward: 64 tokens over 64 adapters, rank-16 and rank-64 slots.
        for r_max in (16, 64):
            x, w = torch.randn(64, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
            a, b = torch.randn(64, r_max, 4096, dtype=dtype), torch.randn(64, 4096, r_max, dtype=dtype)
            ranks = torch.full((64,), r_max, dtype=torch.int32)
            ids = torch.arange(64)
            multi.FORWARD_PATH["forward"] = "gathered"
            for p, s in ((0.0, None), (0.1, seed)):
                multi.forward(x, w, a, b, ids, torch.rand(64), None, ranks, p, s)
            multi.FORWARD_PATH["forward"] = "auto"
        for cfg, n, k, r in configs("lora_linear", "down", 16):
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(r, k, dtype=dtype)
            lowrank.down(x, w.T, 0.5, 0.0, None, cfg=cfg, out_dtype=torch.float32)
            lowrank.down(x, w.T, 0.5, 0.1, seed, cfg=cfg, out_dtype=torch.float32)  # forward, dropout
            mask = lowrank.empty_mask(m, k, x.device)
            g, bmat = torch.randn(m, n, dtype=dtype), torch.randn(n, r, dtype=dtype)
            lowrank.down(g, bmat, 0.5, 0.0, seed, cfg=cfg, out_dtype=torch.float32, mask_out=mask, mask_p=0.1)
            # With the bias gradient's column sums (BitFit with A, B and W frozen), with and without the mask.
            lowrank.down_sums(g, bmat, 0.5, seed, cfg=cfg, out_dtype=torch.float32, mask_out=mask, mask_p=0.1)
            lowrank.down_sums(g, bmat, 0.5, None, cfg=cfg, out_dtype=torch.float32)
        for cfg, n, k, r in configs("lora_linear", "tn", 16):
            x, g = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
            v, u = torch.randn(m, r, dtype=torch.float32), torch.randn(m, r, dtype=dtype)
            mask = lowrank.empty_mask(m, k, x.device)
            lowrank.tn(v, x, scale=2.0, out_dtype=dtype, cfg=cfg)  # dA
            lowrank.tn(v, x, scale=2.0, mask=mask, out_dtype=dtype, cfg=cfg)  # dA with dropout
            lowrank.tn(g, u, out_dtype=dtype, cfg=cfg)  # dB
            lowrank.tn(g, x, out_dtype=dtype, cfg=cfg)  # dW
            lowrank.tn_sums(g, u, out_dtype=dtype, cfg=cfg)  # dB and the bias gradient
            lowrank.tn_sums(g, x, out_dtype=dtype, cfg=cfg)  # dW and the bias gradient
            # DoRA: dB, dm (sum_T g * z) and the bias gradient from one pass over g.
            lowrank.tn_dot_sums(g, u, torch.randn(m, n, dtype=dtype), col_sums=True, out_dtype=dtype, cfg=cfg)
        for cfg, n, _k, r in configs("bottleneck_adapter", "rows", 64):
            d = n
            x, wd, wu = torch.randn(m, d, dtype=dtype), torch.randn(r, d, dtype=dtype), torch.randn(d, r, dtype=dtype)
            bd, bu = torch.randn(r, dtype=dtype), torch.randn(d, dtype=dtype)
            adapter.forward(x, wd, bd, wu, bu, None, "gelu", 1.0, cfg=cfg)
            adapter.forward(x, wd, bd, wu, bu, x, "relu", 1.0, cfg=cfg)
            adapter._expand_rows(torch.randn(m, r), wd.T, x, dtype, cfg=cfg)
    seen, unique = set(), []
    for fn, args, kwargs in launches:
        spec = _signature(fn, args, kwargs)
        key = (fn.__name__, json.dumps([spec[0], sorted(spec[1].items()), sorted(map(str, spec[2])), spec[3]]))
        if key not in seen:
            seen.add(key)
            unique.append((fn.__name__, fn.__module__, spec))
    return unique


def _signature(fn, args, kwargs):
    """(signature, constexprs, divisible argument indices, options) for one recorded launch."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update(kwargs)
    signature, constexprs, divisible = {}, {}, []
    for i, param in enumerate(fn.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, div = _specialize(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif div:
            divisible.append(i)
    return signature, constexprs, divisible, options


def _compile(job):
    name, module, (signature, constexprs, divisible, options) = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = REAL[(module, name)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(
            ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget(*TARGET),
            options=options,
        )
    text = log.getvalue()
    props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if props is None or regs is None:
        raise RuntimeError(f"{name}: no ptxas -v report in the compile log:\n{text}")
    return {
        "kernel": name,
        "constexprs": {k: v for k, v in constexprs.items() if not k.startswith("stride")},
        "options": options,
        "types": sorted({t for t in signature.values() if t.startswith("*")}),
        "registers": int(regs.group(1)),
        "stack": int(props.group(1)),
        "spill_stores": int(props.group(2)),
        "spill_loads": int(props.group(3)),
    }


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("sm90_compile_probe: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    jobs = _launches()
    only = os.environ.get("PEFTOPS_PROBE_KERNELS")  # e.g. "_gemm_kernel,_tn_kernel" while iterating
    if only:
        jobs = [j for j in jobs if j[0] in only.split(",")]
    workers = int(os.environ.get("PEFTOPS_COMPILE_WORKERS", str(min(4, os.cpu_count() or 1))))
    # Heaviest first, so the pool's tail is short.
    jobs.sort(key=lambda j: j[0] != "_gemm_kernel")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
