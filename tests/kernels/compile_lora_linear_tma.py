"""Compile ``lora_linear_tma``'s kernel ahead of time for sm_90a (no GPU needed) and print one
JSON line per variant: registers, spills, shared memory, and whether the PTX and SASS hold
wgmma and TMA instructions. ptxas and cuobjdump are the ones Triton's wheel ships.

Run without ``TRITON_INTERPRET`` (the test runs it in a subprocess for that reason)::

    python tests/kernels/compile_lora_linear_tma.py            # the default config, both orientations, r=16
    python tests/kernels/compile_lora_linear_tma.py --all      # every shipped config x ranks 1, 16, 64, 256
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from peftops.kernels import lora_linear_tma as T  # noqa: E402

#: H100 SXM and H200 have 132 SMs: the persistent stride the kernel is compiled with there.
SMS = 132
_POINTERS = ("X", "W", "U", "B", "BIAS", "OUT", "COL", "PRE")
_INTS = ("M", "N", "K", "R", "stride_xm", "stride_w", "stride_um", "stride_ur", "stride_br", "stride_bn")
#: What Triton's launcher would specialize on real layers: 16-byte aligned pointers, and
#: N, K and the descriptor row strides multiples of 16.
_DIVISIBLE = (*_POINTERS, "N", "K", "stride_xm", "stride_w")


def _tool(name: str) -> str:
    from triton.backends.nvidia import compiler as nv

    if name == "ptxas":
        try:
            return nv.get_ptxas(90).path  # triton >= 3.8 picks the newer ptxas for sm_90
        except TypeError:
            return nv.get_ptxas().path
    return getattr(triton.knobs.nvidia, name).path


def compile_variant(cfg: dict, *, trans_w: bool, r: int, bias: bool, dtype: str = "bf16", dora: bool = False) -> dict:
    """``dora``: DoRA's epilogue (the column scale and the saved unscaled output), forward only."""
    t0 = time.time()
    full = T.check_config(dict(cfg), r)
    opts = {k: full.pop(k) for k in ("num_warps", "num_stages")}
    full.pop("NUM_SMS", None)
    const = dict(
        TRANS_W=trans_w,
        HAS_BIAS=bias,
        EPI_SCALED=False,
        COL_SCALE=dora,
        SAVE_PRE=dora,
        PRECISION="ieee",
        RANK_STEPS=triton.cdiv(r, full["BLOCK_R"]),
        TILE_STRIDE=SMS,
        **full,
    )
    fn = T._gemm_tma_kernel
    sig = {p: f"*{dtype}" for p in _POINTERS}
    if dtype == "bf16":
        sig["U"] = "*fp32"  # what lora_linear passes: u is saved in float32 (rounded to bf16 in registers)
    sig["COL"] = "*fp32"  # DoRA's magnitude over the norm, float32
    sig.update({i: "i32" for i in _INTS})
    sig.update(epi_scale="fp32", inv_epi_scale="fp32")
    sig.update({c: "constexpr" for c in const})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in _DIVISIBLE}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32), options=opts
    )
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cubin_path = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [_tool("ptxas"), "-v", "--gpu-name=sm_90a", ptx_path, "-o", os.path.join(d, "v.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
        with open(cubin_path, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run(
            [_tool("cuobjdump"), "--dump-sass", cubin_path], capture_output=True, text=True, check=True
        ).stdout
    info = log.stdout + log.stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return dict(
        config={**cfg, **opts},
        trans_w=trans_w,
        r=r,
        bias=bias,
        dora=dora,
        target=re.search(r"\.target\s+(\S+)", ptx).group(1),
        registers=int(re.search(r"Used (\d+) registers", info).group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
        stack_frame=int(re.search(r"(\d+) bytes stack frame", info).group(1)),
        shared_bytes=kernel.metadata.shared,
        ptx_wgmma=ptx.count("wgmma.mma_async"),
        ptx_tma=ptx.count("cp.async.bulk.tensor"),
        sass_hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        sass_hmma=len(re.findall(r"\bHMMA\b", sass)),
        sass_utma=len(re.findall(r"\bUTMA(?:LDG|STG)\b", sass)),
        seconds=round(time.time() - t0, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every shipped config x ranks 1, 16, 64, 256")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("compile_lora_linear_tma: run without TRITON_INTERPRET=1 (it compiles for sm_90a)")
    configs = T.SM90_CONFIGS if args.all else T.SM90_CONFIGS[:1]
    ranks = (1, 16, 64, 256) if args.all else (16,)
    for cfg in configs:
        for r in ranks:
            # The forward carries the bias, the dx GEMM never does.
            for trans_w, bias in ((True, True), (False, False)):
                print(json.dumps(compile_variant(cfg, trans_w=trans_w, r=r, bias=bias)), flush=True)
            # DoRA's forward: the magnitude in the epilogue, the unscaled output stored beside y.
            print(json.dumps(compile_variant(cfg, trans_w=True, r=r, bias=True, dora=True)), flush=True)


if __name__ == "__main__":
    main()
