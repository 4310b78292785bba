"""Block configurations as data: tuned per GPU, looked up by nearest problem size.

Tuned configurations live in ``configs/<op>/<device name>.json`` (the device name as
``torch.cuda.get_device_name`` spells it, non-alphanumerics as ``_``), written by
``benchmarks/tune.py`` on that GPU. Each entry is keyed by kernel, exact ``(n, k, r)`` and a
bucket of the token count ``m`` (the next power of two, clamped to [16, 65536]), so a new
token count never triggers tuning: the lookup takes the exact ``(n, k, r)`` if tuned, else
the nearest one in log space, then the nearest ``m`` bucket within a factor of 4 (farther
away the defaults serve). A device with no file uses its
family's defaults (by compute capability major). Nothing autotunes at run time, so a call
inside CUDA-graph capture never benchmarks.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import torch

from .common import interpreting

CONFIG_DIR = Path(__file__).parent / "configs"

#: Family defaults per kernel, by compute capability major (None: any other GPU). The
#: interpreter gets small blocks: it runs one program at a time in numpy.
DEFAULTS: dict[str, dict[int | None, dict]] = {
    # y = x W^T + u B^T (+ b), and dx = g W + (g B) A: a GEMM with a rank-r epilogue.
    "gemm": {
        9: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
        8: dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
        None: dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
    },
    # u = s * dropout(x) A^T and g B: a narrow GEMM, one row block per program.
    "down": {
        9: dict(BLOCK_M=64, BLOCK_K=128, num_warps=4, num_stages=4),
        8: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=3),
        None: dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2),
    },
    # The bottleneck adapter's row kernels: a row block's rank-r hidden on chip, d in column blocks.
    "rows": {
        9: dict(BLOCK_M=64, BLOCK_D=128, num_warps=4, num_stages=3),
        8: dict(BLOCK_M=64, BLOCK_D=64, num_warps=4, num_stages=3),
        None: dict(BLOCK_M=64, BLOCK_D=64, num_warps=4, num_stages=2),
    },
    # dA = (gB)^T dropout(x), dB = g^T u, dW = g^T x: reductions over tokens, split over m.
    "tn": {
        9: dict(BLOCK_P=64, BLOCK_Q=128, BLOCK_M=64, num_warps=8, num_stages=3),
        8: dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_M=64, num_warps=4, num_stages=3),
        None: dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_M=32, num_warps=4, num_stages=2),
    },
}

INTERPRETER: dict[str, dict] = {
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1),
    "down": dict(BLOCK_M=32, BLOCK_K=32, num_warps=1, num_stages=1),
    "rows": dict(BLOCK_M=32, BLOCK_D=32, num_warps=1, num_stages=1),
    "tn": dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_M=32, num_warps=1, num_stages=1),
}


def m_bucket(m: int) -> int:
    return min(max(16, 1 << max(0, (m - 1).bit_length())), 65536)


def file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


@functools.cache
def _load(op: str, device_name: str, dtype: str = "bfloat16") -> tuple[dict, ...]:
    """Tuned entries for ``op`` on this GPU, if they were tuned in ``dtype`` (block sizes that
    fit bfloat16 tiles need not fit float32 ones)."""
    path = CONFIG_DIR / op / file_name(device_name)
    if not path.exists():
        return ()
    doc = json.loads(path.read_text())
    return tuple(doc["entries"]) if doc.get("dtype", "bfloat16") == dtype else ()


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(max(x, 1) / max(y, 1))) for x, y in zip(a, b, strict=False))


#: A tuned entry serves token counts within this many powers of two of its own bucket.
MAX_BUCKET_OCTAVES = 2


def nearest(entries, kernel: str, m: int, n: int, k: int, r: int) -> dict | None:
    """The tuned config for the nearest ``(n, k, r)``, then the nearest ``m`` bucket (None when
    that bucket is more than ``MAX_BUCKET_OCTAVES`` away)."""
    mine = [e for e in entries if e["kernel"] == kernel]
    if not mine:
        return None
    best_shape = min(mine, key=lambda e: _distance((e["n"], e["k"], e["r"]), (n, k, r)))
    same_shape = [e for e in mine if (e["n"], e["k"], e["r"]) == (best_shape["n"], best_shape["k"], best_shape["r"])]
    bucket = m_bucket(m)
    best = min(same_shape, key=lambda e: abs(math.log2(e["m_bucket"] / bucket)))
    if abs(math.log2(best["m_bucket"] / bucket)) > MAX_BUCKET_OCTAVES:
        # Block sizes tuned for 8192 tokens can starve the GPU at 512 (a 128 x 256 tile gives
        # 64 programs for 132 SMs): that far from any tuned count, the defaults are the safer bet.
        return None
    return best["config"]


def config(
    op: str, kernel: str, device: torch.device, m: int, n: int, k: int, r: int, dtype: torch.dtype = torch.bfloat16
) -> dict:
    """Meta-parameters for one launch (block sizes as constexprs, ``num_warps``, ``num_stages``)."""
    if device.type != "cuda" or interpreting():
        return dict(INTERPRETER[kernel])
    tuned = nearest(
        _load(op, torch.cuda.get_device_name(device), str(dtype).removeprefix("torch.")), kernel, m, n, k, r
    )
    if tuned is not None:
        return dict(tuned)
    major = torch.cuda.get_device_capability(device)[0]
    family = DEFAULTS[kernel]
    cfg = dict(family.get(major, family[None]))
    if dtype == torch.float32:  # twice the bytes per element: halve the reduction block
        for key in ("BLOCK_K", "BLOCK_D"):
            if key in cfg:
                cfg[key] = max(16, cfg[key] // 2)
    return cfg


def fit_stages(cfg: dict, bytes_per_stage: int, device: torch.device) -> dict:
    """Cut ``num_stages`` until the pipelined tiles fit the GPU's shared memory (with 10% for
    the epilogue's layout conversions), so a tuned or default config never fails to launch."""
    if device.type != "cuda" or interpreting():
        return cfg
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
    while cfg["num_stages"] > 1 and 1.1 * cfg["num_stages"] * bytes_per_stage > limit:
        cfg["num_stages"] -= 1
    return cfg
