"""Compile the shipped configurations of every Triton kernel for sm_90a, without a GPU, and
print one JSON line per compiled kernel: registers, spill stores/loads, stack frame, and
whether its dots became tensor-core instructions (``wgmma``, ``mma``) in the PTX.

Run by ``tests/kernels/test_sm90_compile.py`` in a subprocess (the suite sets
``TRITON_INTERPRET=1``, under which ``triton.jit`` gives interpreted functions that cannot be
compiled); by hand::

    env -u TRITON_INTERPRET TRITON_CACHE_DIR=$(mktemp -d) python -m tests.kernels.sm90_compile_probe

How: the real launchers (``lora_linear.gemm``, ``lowrank.down``/``tn``, the adapter's
``forward``/``_expand_rows``, ``nf4_gemm``, multi-LoRA's and the adapter banks' ``forward`` and
``backward``, IA3's ``forward_2d``/``backward_2d``, ``gemm_tma_pre``, prefix attention's
``forward`` and ``backward``) run on small CPU tensors with each shipped config forced
(``cfg=``; the adapter banks' lookup, which takes none, is replaced by the single adapter's
block computation with the config forced), with the kernels swapped for recorders; each
recorded launch is specialized as the JIT would specialize it on a GPU (pointer alignment, ints
divisible by 16, ints equal to 1) and compiled with ``triton.compile`` for ``GPUTarget("cuda",
90, 32)``. ptxas is the one triton ships and picks for sm_90 itself; its ``-v`` report is the
source of the spill counts. Launch arguments a launcher sets by device type rather than by
config are set as on a GPU (:func:`_on_cuda`), and the TMA GEMM's persistent-grid stride is an
H100's SM count (:data:`SMS`). The TMA GEMM needs no GPU to compile: its tensor descriptors are
made inside the kernel from plain pointers (``tl.make_tensor_descriptor``).

The shipped configs are the compute-capability-9 family defaults (``block_config.DEFAULTS``,
``ATTENTION_DEFAULTS``, the TMA GEMM's ``SM90_CONFIGS``, QLoRA's decode config) and every entry
of the tuned files under ``configs/``. By default the LoRA, adapter and QLoRA kernels compile
each in both 16-bit dtypes and with each launch variant, and the kernels added for issue 15
each config once (:func:`_plan`: dtypes alternating, tuned entries in their own dtype) with
their heaviest variants: compiles of attention kernels take seconds each, and the test runs in
CI on two cores. ``PEFTOPS_PROBE_FULL=1`` compiles all of them in both dtypes with every
variant; ``PEFTOPS_PROBE_KERNELS`` (names, comma-separated) narrows the run and
``PEFTOPS_PROBE_LIST=1`` prints what would compile.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

TARGET = ("cuda", 90, 32)
#: Token count of the recorded launches: a multiple of 16, as real batches are, so that the
#: compiled specialization is the one production runs.
TOKENS = 256
DTYPES = ("bfloat16", "float16")
#: Every shipped config in both dtypes with every launch variant (by hand: several minutes on
#: two cores); without it, the subset sized for CI (see ``_plan``).
FULL = os.environ.get("PEFTOPS_PROBE_FULL", "0") == "1"


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
#: While set, the recorders keep only these kernels' launches: a backward launches several
#: kernels, of which a plan item may want one config of one.
ONLY: set | None = None


@contextlib.contextmanager
def _only(*names):
    global ONLY
    ONLY = set(names)
    try:
        yield
    finally:
        ONLY = None


def _record(module, name, launches):
    real = getattr(module, name)
    # Keyed by the kernel's own module: a kernel imported by another launcher module (the
    # multi-LoRA segmented kernels in the adapter banks' module) is one kernel.
    REAL[(real.__module__, real.__name__)] = real
    via = module.__name__.rsplit(".", 1)[-1]

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if ONLY is None or name in ONLY:
                    launches.append((real, args, dict(kwargs), via))

            return launch

    setattr(module, name, Recorder())


#: The SM count of an H100 SXM (and an H200): the TMA GEMM's persistent grid stride, a
#: constexpr, is the launching GPU's; on CPU it would be 1.
SMS = 132


#: Launch arguments the launchers choose by device type rather than by config, as a GPU run
#: sets them (the recorded launches run on CPU tensors): the gathered multi-LoRA up kernel's
#: columns per program, read from the launcher's module so the two cannot drift apart.
def _on_cuda() -> dict[str, dict[str, int]]:
    from peftops.kernels.multi_lora_linear import GATHER_UP_BLOCK_N

    return {"_gather_up_kernel": {"BLOCK_N": GATHER_UP_BLOCK_N["cuda"]}}


#: Kernels that run on CUDA cores by design (a token's matrix-vector products, a row reduction):
#: the others must compile to tensor-core instructions.
NO_TENSOR_CORES = frozenset({"_gather_down_kernel", "_gather_up_kernel", "_prep_kernel"})


def _family_default(kernel):
    from peftops.kernels import block_config

    table = block_config.DEFAULTS[kernel]
    return dict(table.get(9, table[None]))


def _tuned(op, kernel):
    """Every tuned entry of ``kernel`` in the files under ``configs/<op>``."""
    from peftops.kernels import block_config

    out = []
    for path in sorted((block_config.CONFIG_DIR / op).glob("*.json")):
        out += [e for e in json.loads(path.read_text())["entries"] if e["kernel"] == kernel]
    return out


def _configs(op, kernel, rank_for_defaults):
    """(cfg, n, k, r) for the family-9 default and each tuned entry of ``kernel``."""
    out = [(_family_default(kernel), 512, 512, rank_for_defaults)]
    return out + [(dict(e["config"]), 512, 512, e["r"]) for e in _tuned(op, kernel)]


def _launches():
    """Every (kernel, module, spec, launchers) the shipped configs launch, deduplicated by
    specialization (``launchers``: the modules whose launchers recorded it)."""
    import torch

    from peftops.kernels import bottleneck_adapter as adapter
    from peftops.kernels import ia3_linear as ia3
    from peftops.kernels import lora_linear as lora
    from peftops.kernels import lora_linear_nf4 as qlora
    from peftops.kernels import lora_linear_tma as tma
    from peftops.kernels import lowrank
    from peftops.kernels import multi_bottleneck_adapter as banks
    from peftops.kernels import multi_lora_linear as multi
    from peftops.kernels import prefix_attention as attention

    launches: list = []
    for module, names in (
        (lora, ("_gemm_kernel",)),
        (lowrank, ("_down_kernel", "_tn_kernel")),
        (adapter, ("_forward_kernel", "_expand_kernel")),
        (qlora, ("_nf4_gemm_kernel",)),
        (multi, ("_gather_down_kernel", "_gather_up_kernel", "_seg_down_kernel", "_seg_gemm_kernel", "_seg_tn_kernel")),
        (banks, ("_seg_down_kernel", "_bank_up_kernel", "_seg_tn_kernel")),
        (ia3, ("_fwd_kernel", "_bwd_kernel")),
        (tma, ("_gemm_tma_kernel",)),
        (attention, ("_fwd_kernel", "_prep_kernel", "_dkdv_kernel", "_dkdv_bank_kernel", "_dq_kernel")),
    ):
        for name in names:
            _record(module, name, launches)
    # The bank launchers look their config up by device (interpreter blocks on CPU) and take no
    # cfg=: the lookup is replaced by the real block computation with each shipped config forced.
    forced: dict = {}
    banks._config = lambda x, r_max: adapter._blocks(r_max, x.device, x.shape[0], x.shape[1], x.dtype, forced["cfg"])

    for dtype in (getattr(torch, d) for d in DTYPES):
        _lora_launches(torch, dtype, lora, lowrank, adapter, qlora, multi)
    _multi_launches(torch, multi)
    _bank_launches(torch, banks, forced)
    _ia3_launches(torch, ia3)
    _tma_launches(torch, tma)
    _attention_launches(torch, attention)
    seen: dict = {}
    for fn, args, kwargs, via in launches:
        kwargs.update(_on_cuda().get(fn.__name__, {}))
        spec = _signature(fn, args, kwargs)
        key = (
            fn.__module__,
            fn.__name__,
            json.dumps([spec[0], sorted(spec[1].items()), sorted(map(str, spec[2])), spec[3]]),
        )
        if key not in seen:
            seen[key] = (fn.__name__, fn.__module__, spec, set())
        seen[key][3].add(via)
    return [(name, module, spec, sorted(vias)) for name, module, spec, vias in seen.values()]


def _lora_launches(torch, dtype, lora, lowrank, adapter, qlora, multi):
    """LoRA's pointer GEMM, down and tn kernels (DoRA's too: its backend launches these with its
    epilogue and reduction flags), QLoRA's NF4 GEMM, the multi-LoRA gathered decode kernels and
    the bottleneck adapter's row kernels."""
    m = TOKENS
    seed = torch.zeros((), dtype=torch.int64)
    for cfg, n, k, r in _configs("lora_linear", "gemm", 16):
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
    for cfg, n, k, r in [*_configs("lora_linear_nf4", "gemm", 16), (dict(qlora.DECODE_CONFIG), 512, 512, 16)]:
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
    # 512 features give the specialization of 4096 (BLOCK_K caps at 128, the rest are runtime
    # ints divisible by 16) without a 4096 x 4096 base GEMM on the CPU.
    for r_max in (16, 64):
        x, w = torch.randn(64, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a, b = torch.randn(64, r_max, 512, dtype=dtype), torch.randn(64, 512, r_max, dtype=dtype)
        ranks = torch.full((64,), r_max, dtype=torch.int32)
        ids = torch.arange(64)
        multi.FORWARD_PATH["forward"] = "gathered"
        for p, s in ((0.0, None), (0.1, seed)):
            multi.forward(x, w, a, b, ids, torch.rand(64), None, ranks, p, s)
        multi.FORWARD_PATH["forward"] = "auto"
    for cfg, n, k, r in _configs("lora_linear", "down", 16):
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(r, k, dtype=dtype)
        lowrank.down(x, w.T, 0.5, 0.0, None, cfg=cfg, out_dtype=torch.float32)
        lowrank.down(x, w.T, 0.5, 0.1, seed, cfg=cfg, out_dtype=torch.float32)  # forward, dropout
        mask = lowrank.empty_mask(m, k, x.device)
        g, bmat = torch.randn(m, n, dtype=dtype), torch.randn(n, r, dtype=dtype)
        lowrank.down(g, bmat, 0.5, 0.0, seed, cfg=cfg, out_dtype=torch.float32, mask_out=mask, mask_p=0.1)
        # With the bias gradient's column sums (BitFit with A, B and W frozen), with and without the mask.
        lowrank.down_sums(g, bmat, 0.5, seed, cfg=cfg, out_dtype=torch.float32, mask_out=mask, mask_p=0.1)
        lowrank.down_sums(g, bmat, 0.5, None, cfg=cfg, out_dtype=torch.float32)
    for cfg, n, k, r in _configs("lora_linear", "tn", 16):
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
    for cfg, n, _k, r in _configs("bottleneck_adapter", "rows", 64):
        d = n
        x, wd, wu = torch.randn(m, d, dtype=dtype), torch.randn(r, d, dtype=dtype), torch.randn(d, r, dtype=dtype)
        bd, bu = torch.randn(r, dtype=dtype), torch.randn(d, dtype=dtype)
        adapter.forward(x, wd, bd, wu, bu, None, "gelu", 1.0, cfg=cfg)
        adapter.forward(x, wd, bd, wu, bu, x, "relu", 1.0, cfg=cfg)
        adapter._expand_rows(torch.randn(m, r), wd.T, x, dtype, cfg=cfg)


def _plan(torch, items):
    """(item, dtype) pairs for ``items``, ``(item, dtypes it serves)`` each (a tuned entry serves
    its own dtype, a family default both). FULL: every item in both dtypes (as the LoRA configs
    compile). Else each item once, in a dtype it serves, alternating, and each dtype at least
    once: what fits CI's time."""
    merged: list = []  # a tuned entry equal to the default is the default, serving both
    for item, serves in items:
        same = next((m for m in merged if m[0] == item), None)
        if same is None:
            merged.append([item, tuple(serves)])
        else:
            same[1] = tuple(d for d in DTYPES if d in same[1] or d in serves)
    items = merged
    if FULL:
        return [(copy.deepcopy(item), getattr(torch, d)) for item, _ in items for d in DTYPES]
    plan = []
    for i, (item, serves) in enumerate(items):
        plan.append((item, DTYPES[i % 2] if DTYPES[i % 2] in serves else serves[0]))
    for d in DTYPES:
        if d not in {dtype for _, dtype in plan}:
            plan.append(next((item, d) for item, serves in items if d in serves))
    return [(copy.deepcopy(item), getattr(torch, d)) for item, d in plan]


def _served(op, kernel, **key):
    """``(cfg, dtypes)`` for the family-9 default (every dtype) and each tuned entry (its own)."""
    from peftops.kernels import block_config

    out = [(_family_default(kernel), DTYPES)] if kernel in block_config.DEFAULTS else []
    for path in sorted((block_config.CONFIG_DIR / op).glob("*.json")):
        doc = json.loads(path.read_text())
        for e in doc["entries"]:
            if e["kernel"] == kernel and all(e.get(k) == v for k, v in key.items()):
                out.append((dict(e["config"]), (e.get("dtype", doc.get("dtype", "bfloat16")),)))
    return out


#: Adapter slots and the slot ranks of the bank families' launches: rank-16 and rank-64 slots
#: (the benchmarks' mixed ranks; CI compiles rank 64, the larger register tiles), tokens
#: spread over the slots and the base.
SLOTS = 4


def _bank_ranks():
    return (16, 64) if FULL else (64,)


def _bank_ids(torch):
    return torch.arange(TOKENS) % (SLOTS + 1) - 1  # -1: a token on the base layer only


def _multi_launches(torch, multi):
    """Multi-LoRA's segmented forward and backward (prefill, training): with dropout (its
    forward and its dx and dA epilogues) and dB with the bias gradient's column sums; FULL adds
    the dropout-free forward and backward and dB alone."""
    m, n, k = TOKENS, 512, 512
    ids, seed = _bank_ids(torch), torch.zeros((), dtype=torch.int64)
    for cfg, dtype in _plan(torch, [(_family_default("seg"), DTYPES)]):
        for r_max in _bank_ranks():
            x, w, bias = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype), torch.randn(n, dtype=dtype)
            a, b = torch.randn(SLOTS, r_max, k, dtype=dtype), torch.randn(SLOTS, n, r_max, dtype=dtype)
            ranks, scales = torch.full((SLOTS,), r_max, dtype=torch.int32), torch.rand(SLOTS)
            g = torch.randn(m, n, dtype=dtype)
            for p, s in ((0.1, seed), (0.0, None)) if FULL else ((0.1, seed),):
                _, u = multi.forward(x, w, a, b, ids, scales, bias, ranks, p, s, cfg=cfg)
                # dx, dA, dB and the bias: dW (the base's, frozen in LoRA) is the dense tn above.
                multi.backward(g, x, w, a, b, ids, scales, ranks, u, p, s, (True, False, True, True, True), cfg=cfg)
            if FULL:  # dB without the bias gradient's column sums
                multi.backward(g, x, w, a, b, ids, scales, ranks, u, 0.0, None, (False, False, False, True, False), cfg=cfg)  # fmt: skip


def _bank_launches(torch, banks, forced):
    """The bottleneck adapter banks (per-row adapters): forward and backward in each of the row
    kernels' shipped configs (the single adapter's, which the banks' lookup shares); FULL adds
    the bias gradients alone."""
    m, d = TOKENS, 512
    ids = _bank_ids(torch)
    for cfg, dtype in _plan(torch, _served("bottleneck_adapter", "rows")):
        forced["cfg"] = cfg
        for r_max in _bank_ranks():
            x, g = torch.randn(m, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
            wd, bd = torch.randn(SLOTS, r_max, d, dtype=dtype), torch.randn(SLOTS, r_max, dtype=dtype)
            wu = torch.randn(SLOTS, d, r_max, dtype=dtype)
            bu, ranks = torch.randn(SLOTS, d, dtype=dtype), torch.full((SLOTS,), r_max, dtype=torch.int32)
            _, h = banks.forward(x, wd, bd, wu, bu, ids, ranks, None, "gelu", 1.0)
            banks.backward(g, x, wd, bd, wu, ids, ranks, h, "gelu", 1.0, True, (True,) * 5)
            if FULL:  # the bias gradients alone (their column sums over a one-column product)
                banks.backward(g, x, wd, bd, wu, ids, ranks, h, "gelu", 1.0, False, (False, False, True, False, True))
    forced.clear()


def _ia3_launches(torch, ia3):
    """IA3, forward (z kept for the backward) and backward with every gradient: output scaling
    in one dtype and input scaling in the other (FULL: both in both); the GEMM family's configs
    under the op's own name (no tuned file yet)."""
    m, n, k = TOKENS, 512, 512
    for i, (cfg, dtype) in enumerate(_plan(torch, _served("ia3_linear", "gemm"))):
        x, w, bias, g = (torch.randn(*s, dtype=dtype) for s in ((m, k), (n, k), (n,), (m, n)))
        for scale_input in (False, True) if FULL else (bool(i % 2),):
            scale = torch.rand(k if scale_input else n, dtype=dtype)
            _, z = ia3.forward_2d(x, w, scale, bias, scale_input, True, cfg=cfg)
            ia3.backward_2d(g, x, w, scale, z if z.numel() else g, scale_input, True, True, True, cfg=cfg)


def _tma_launches(torch, tma):
    """The TMA GEMM (Hopper's path of lora_linear and DoRA without dropout). Its tensor
    descriptors are built on the device (``tl.make_tensor_descriptor``), so the launch takes
    plain pointers and compiles like the others; only running it needs the global scratch
    allocator. u is float32 in bfloat16 (as the ops pass it) and float16 in float16 (the TMA
    path refuses a float32 u there, so the ops' float16 calls take the pointer kernel). Each
    config with DoRA's epilogue (magnitude, bias, the unscaled output saved: the most live
    registers); the LoRA forward and dx in the first (FULL: in every one)."""
    m, n, k, r = TOKENS, 512, 512, 16
    configs = [(dict(c), DTYPES) for c in tma.SM90_CONFIGS]
    for e in _tuned("lora_linear", tma.KERNEL):
        configs.append((dict(e["config"]), (e.get("dtype", "bfloat16"),)))
    for i, (cfg, dtype) in enumerate(_plan(torch, configs)):
        cfg["NUM_SMS"] = SMS
        u_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
        x, w, bias, g = (torch.randn(*s, dtype=dtype) for s in ((m, k), (n, k), (n,), (m, n)))
        u, b, a = torch.randn(m, r, dtype=u_dtype), torch.randn(n, r, dtype=dtype), torch.randn(r, k, dtype=dtype)
        if tma.layout_reason(x, w, u, b.T, bias, trans_w=True) is not None:
            raise RuntimeError(
                f"gemm_tma refuses the probe's operands: {tma.layout_reason(x, w, u, b.T, bias, trans_w=True)}"
            )
        col = torch.rand(n, dtype=torch.float32)
        tma.gemm_tma_pre(x, w, u, b.T, bias, epi_scale=2.0, trans_w=True, col_scale=col, save_pre=True, cfg=cfg)
        if FULL or i == 0:
            tma.gemm_tma(x, w, u, b.T, bias, trans_w=True, cfg=cfg)  # the LoRA forward (scale folded into u)
            tma.gemm_tma(g, w, u, a, None, epi_scale=1.0, trans_w=False, cfg=cfg)  # dx


#: Attention shapes: a sequence at least the largest BLOCK_N (the dkdv launcher clamps it to
#: the key count), a prefix of 64 (the benchmarks' P, with the clamp that follows), GQA.
ATT_B, ATT_HQ, ATT_HKV, ATT_L, ATT_P = 2, 4, 2, 128, 64
#: The GPU whose tuned attention file ships (an H200 reads it too: same compute capability).
HOPPER = ("NVIDIA H100 80GB HBM3", (9, 0))


def _attention_launches(torch, attention):
    """Prefix attention in every head-dim class (head dims 64, 128, 256): each config of each
    kernel, with the other kernels' configs as a Hopper GPU looks them up. The decoder variant
    throughout: a bank of per-row prefixes with per-slot lengths, a key padding mask, causal
    (BANK, HAS_KPM, CAUSAL, the bank gradient kernel); FULL adds the shared prefix (and its own
    dK/dV launch on the prefix keys: not causal, no mask). Outside FULL a plan item records
    only its own kernel's launches (the backward runs dK/dV, the bank gradient and dq)."""
    from peftops.kernels import block_config

    def hopper(kernel, d, dtype):
        return block_config.lookup("prefix_attention", kernel, *HOPPER, dtype, block_d=d)

    names = {
        "fwd": ("_fwd_kernel",),
        "dkdv": ("_dkdv_kernel", "_dkdv_bank_kernel", "_prep_kernel"),
        "dq": ("_dq_kernel",),
    }
    for kernel in ("fwd", "dkdv", "dq"):
        items = []
        for d, default in block_config.ATTENTION_DEFAULTS[kernel][9].items():
            items.append(((d, dict(default)), DTYPES))
            items += [((d, cfg), dtypes) for cfg, dtypes in _served("prefix_attention", kernel, block_d=d)]
        for (d, cfg), dtype in _plan(torch, items):
            cfgs = {other: hopper(other, d, dtype) for other in ("fwd", "dkdv", "dq")}
            cfgs[kernel] = cfg
            with contextlib.nullcontext() if FULL else _only(*names[kernel]):
                _attention_pair(torch, dtype, attention, d, cfgs)


def _attention_pair(torch, dtype, attention, d, cfgs):
    b, hq, hkv, seq, p = ATT_B, ATT_HQ, ATT_HKV, ATT_L, ATT_P
    q, k, v = torch.randn(b, hq, seq, d, dtype=dtype), *(torch.randn(b, hkv, seq, d, dtype=dtype) for _ in "kv")
    do = torch.randn(b, hq, seq, d, dtype=dtype)
    bwd = {"dkdv": cfgs["dkdv"], "dq": cfgs["dq"]}
    bank_k, bank_v = torch.randn(3, hkv, p, d, dtype=dtype), torch.randn(3, hkv, p, d, dtype=dtype)
    ids, lengths = torch.tensor([2, 0]), torch.tensor([p, 16, 40])
    kpm = torch.ones(b, seq, dtype=torch.bool)
    out, lse = attention.forward(q, k, v, bank_k, bank_v, kpm, True, d**-0.5, ids, lengths, cfg=cfgs["fwd"])
    attention.backward(do, q, k, v, bank_k, bank_v, kpm, out, lse, True, d**-0.5, (True,) * 5, ids, lengths, cfg=bwd)
    if FULL:
        pk, pv = torch.randn(hkv, p, d, dtype=dtype), torch.randn(hkv, p, d, dtype=dtype)
        out, lse = attention.forward(q, k, v, pk, pv, None, True, d**-0.5, cfg=cfgs["fwd"])
        attention.backward(do, q, k, v, pk, pv, None, out, lse, True, d**-0.5, (True,) * 5, cfg=bwd)


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
    name, module, (signature, constexprs, divisible, options), launchers = job
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = REAL[(module, name)]
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget(*TARGET),
            options=options,
        )
    seconds = time.perf_counter() - start
    text = log.getvalue()
    props = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.search(r"Used (\d+) registers", text)
    if props is None or regs is None:
        raise RuntimeError(f"{name}: no ptxas -v report in the compile log:\n{text}")
    ptx = compiled.asm["ptx"]
    # Hopper's warpgroup MMA where Triton could lower the dots to it, else Ampere's mma.sync;
    # neither means the dots ran as FMAs on the CUDA cores.
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync\.", ptx) else None
    return {
        "kernel": f"{module.rsplit('.', 1)[-1]}.{name}",
        "launchers": launchers,
        "constexprs": {k: v for k, v in constexprs.items() if not k.startswith("stride")},
        "options": options,
        "types": sorted({t for t in signature.values() if t.startswith("*")}),
        "registers": int(regs.group(1)),
        "stack": int(props.group(1)),
        "spill_stores": int(props.group(2)),
        "spill_loads": int(props.group(3)),
        "mma": mma,
        "tensor_cores_expected": name not in NO_TENSOR_CORES,
        "seconds": round(seconds, 2),
    }


#: Compile cost classes, heaviest first (so the pool's tail is short): attention and the big
#: GEMM tiles take several times a row kernel's time.
HEAVY = ("_dkdv_kernel", "_dkdv_bank_kernel", "_dq_kernel", "_gemm_tma_kernel", "_gemm_kernel", "_fwd_kernel")


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("sm90_compile_probe: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    jobs = _launches()
    only = os.environ.get("PEFTOPS_PROBE_KERNELS")  # e.g. "_gemm_kernel,prefix_attention._fwd_kernel"
    if only:
        names = set(only.split(","))
        jobs = [j for j in jobs if j[0] in names or f"{j[1].rsplit('.', 1)[-1]}.{j[0]}" in names]
    if os.environ.get("PEFTOPS_PROBE_LIST") == "1":  # what would compile, without compiling
        for name, module, spec, _launchers in jobs:
            print(json.dumps({"kernel": f"{module}.{name}", "constexprs": spec[1], "options": spec[3]}, default=str))
        return 0
    workers = int(os.environ.get("PEFTOPS_COMPILE_WORKERS", str(min(4, os.cpu_count() or 1))))
    jobs.sort(key=lambda j: HEAVY.index(j[0]) if j[0] in HEAVY else len(HEAVY))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_compile, jobs):
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
