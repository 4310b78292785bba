"""Block configurations as data, for every Triton kernel: tuned per GPU, else family defaults.

Tuned configurations live in ``configs/<op>/<device name>.json`` (the device name as
``torch.cuda.get_device_name`` spells it, non-alphanumerics as ``_``), written on that GPU by
``benchmarks/tune.py`` (LoRA, adapter) or ``benchmarks/sweep_attention.py`` (attention). Each
file records the GPU's compute capability; each entry names its kernel and its key:

* shape-keyed kernels (``gemm``, ``down``, ``tn``, ``rows``, ``seg``): exact ``(n, k, r)`` and a
  bucket of the token count ``m`` (the next power of two, clamped to [16, 65536]), so a new
  token count never triggers tuning. The lookup takes the exact ``(n, k, r)`` if tuned, else
  the nearest one in log space, then the nearest ``m`` bucket within a factor of 4 (farther
  away the defaults serve);
* attention kernels (``fwd``, ``dkdv``, ``dq``): the head-dim class ``block_d`` (64 for head
  dims up to 64, then 128, 256), exactly.

An entry serves only its own dtype (block sizes that fit bfloat16 tiles need not fit float32
ones). A GPU with no file of its own for an op uses the file of a GPU with the same compute
capability (an H200 uses the H100's), then its family's defaults (by compute capability
major). Nothing autotunes at run time, so a call inside CUDA-graph capture never benchmarks;
and every launcher takes ``cfg=``, a forced configuration, which is how the tuners time their
candidates.

:func:`lookup` is the pure part (a device name and capability in, a config out: testable on
any machine); :func:`config` feeds it the launching device's properties, read once per device.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import interpreting

CONFIG_DIR = Path(__file__).parent / "configs"

#: Family defaults of the shape-keyed kernels, by compute capability major (None: any other
#: GPU). The interpreter gets small blocks: it runs one program at a time in numpy.
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
    # multi_lora_linear's segmented kernels (down pass, GEMM, per-adapter reductions) share one
    # config: the tile table is cut at BLOCK_M tokens for all of them. Unmeasured, one for all.
    "seg": {
        None: dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
    },
}

_HOPPER_ATTENTION = {
    "fwd": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
        128: dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
        256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    },
    "dkdv": {
        64: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=3),
        256: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
    },
    "dq": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
        256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
    },
}
_SMALL_SMEM_ATTENTION = {
    "fwd": {
        64: dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
        128: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        256: dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=1),
    },
    "dkdv": {
        64: dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
        128: dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2),
        256: dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=1),
    },
    "dq": {
        64: dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
        128: dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2),
        256: dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=1),
    },
}
#: Family defaults of the attention kernels, by compute capability major, then head-dim class.
#: The Hopper D=128 entries are the fastest of ``benchmarks/sweep_attention.py`` on an H100
#: (bf16, B=4, H=32, L=2048, P=64: results/NVIDIA-H100-80GB-HBM3-2026-11-23-attention-sweep-run2.json);
#: the others are scaled from them, unmeasured. Hopper and data-centre Blackwell (10) have
#: 227 KB of shared memory per block; the others (Ampere, Ada, consumer Blackwell) about 100 KB.
ATTENTION_DEFAULTS: dict[str, dict[int | None, dict[int, dict]]] = {
    kernel: {9: _HOPPER_ATTENTION[kernel], 10: _HOPPER_ATTENTION[kernel], None: _SMALL_SMEM_ATTENTION[kernel]}
    for kernel in ("fwd", "dkdv", "dq")
}

#: Per kernel, the block halved for float32 defaults (twice the bytes per element) and the
#: pipeline stages dropped with it. Tuned entries are per dtype and taken as they are.
FLOAT32_CUTS: dict[str, tuple[tuple[str, ...], int]] = {
    "gemm": (("BLOCK_K",), 0),
    "down": (("BLOCK_K",), 0),
    "rows": (("BLOCK_D",), 0),
    "tn": ((), 0),
    "seg": ((), 0),
    "fwd": (("BLOCK_N",), 1),
    "dkdv": (("BLOCK_N",), 1),
    "dq": (("BLOCK_N",), 1),
}

INTERPRETER: dict[str, dict] = {
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1),
    "down": dict(BLOCK_M=32, BLOCK_K=32, num_warps=1, num_stages=1),
    "rows": dict(BLOCK_M=32, BLOCK_D=32, num_warps=1, num_stages=1),
    "tn": dict(BLOCK_P=32, BLOCK_Q=32, BLOCK_M=32, num_warps=1, num_stages=1),
    # 16 x 16: odd shapes stay cheap and the tests cross several blocks.
    "seg": dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1, num_stages=1),
    "fwd": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
    "dkdv": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
    "dq": dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1),
}


# -- the launching device, read once ----------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    capability: tuple[int, int]
    shared_memory: int  #: bytes per block, with opt-in
    sms: int


@functools.cache
def _device_info(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(
        name=props.name,
        capability=(props.major, props.minor),
        shared_memory=getattr(props, "shared_memory_per_block_optin", 99 * 1024),
        sms=props.multi_processor_count,
    )


def device_info(device: torch.device) -> DeviceInfo:
    """Name, capability and limits of a CUDA device, queried once per device index: every
    launch needs them, and each ``torch.cuda.get_device_*`` call costs host time."""
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


# -- tuned files ----------------------------------------------------------------------------


def m_bucket(m: int) -> int:
    return min(max(16, 1 << max(0, (m - 1).bit_length())), 65536)


def file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json"


def _entries_of(doc: dict, dtype: str) -> tuple[dict, ...]:
    default = doc.get("dtype", "bfloat16")
    return tuple(e for e in doc["entries"] if e.get("dtype", default) == dtype)


@functools.cache
def _load(op: str, device_name: str, dtype: str = "bfloat16") -> tuple[dict, ...]:
    """Tuned entries for ``op`` on this GPU in ``dtype`` (empty without a file)."""
    path = CONFIG_DIR / op / file_name(device_name)
    if not path.exists():
        return ()
    return _entries_of(json.loads(path.read_text()), dtype)


@functools.cache
def _load_same_capability(op: str, capability: tuple[int, int], dtype: str = "bfloat16") -> tuple[dict, ...]:
    """Tuned entries for ``op`` in ``dtype`` from the first file (by name) of a GPU with this
    compute capability: same architecture, same shared memory and register file, so its
    tuned tiles launch and are usually near the best (clocks and SM counts differ)."""
    folder = CONFIG_DIR / op
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        doc = json.loads(path.read_text())
        if tuple(doc.get("capability", ())) == tuple(capability):
            entries = _entries_of(doc, dtype)
            if entries:
                return entries
    return ()


def clear_caches() -> None:
    """Forget the files read (after writing new ones, or pointing ``CONFIG_DIR`` elsewhere)."""
    _load.cache_clear()
    _load_same_capability.cache_clear()


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum(abs(math.log2(max(x, 1) / max(y, 1))) for x, y in zip(a, b, strict=True))


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


def head_dim_class(block_d: int) -> int:
    return max(64, block_d)


def _tuned(entries, kernel: str, m: int, n: int, k: int, r: int, block_d: int | None) -> dict | None:
    if block_d is None:
        return nearest(entries, kernel, m, n, k, r)
    cls = head_dim_class(block_d)
    return next((e["config"] for e in entries if e["kernel"] == kernel and e["block_d"] == cls), None)


def _family(table: dict, major: int):
    return table.get(major, table[None])


def tuned_config(
    op: str,
    kernel: str,
    device_name: str,
    capability: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
    m: int = 0,
    n: int = 0,
    k: int = 0,
    r: int = 0,
    *,
    block_d: int | None = None,
) -> dict | None:
    """The tuned part of :func:`lookup`: this GPU's own file, else a same-capability GPU's;
    ``None`` where neither has the key (kernels with defaults of their own start there)."""
    dt = str(dtype).removeprefix("torch.")
    for entries in (_load(op, device_name, dt), _load_same_capability(op, tuple(capability), dt)):
        if entries:
            # A file that exists but misses this key falls through to the defaults, not to
            # another GPU's file: the tuner of this GPU chose to leave it out.
            tuned = _tuned(entries, kernel, m, n, k, r, block_d)
            return dict(tuned) if tuned is not None else None
    return None


def lookup(
    op: str,
    kernel: str,
    device_name: str,
    capability: tuple[int, int],
    dtype: torch.dtype = torch.bfloat16,
    m: int = 0,
    n: int = 0,
    k: int = 0,
    r: int = 0,
    *,
    block_d: int | None = None,
) -> dict:
    """The config a GPU of this name and capability launches ``kernel`` of ``op`` with: its own
    tuned file, else a same-capability GPU's, else the family defaults. ``block_d`` (the
    attention kernels' padded head dim) replaces the shape key. Pure: no device needed."""
    found = tuned_config(op, kernel, device_name, capability, dtype, m, n, k, r, block_d=block_d)
    if found is not None:
        return found
    major = capability[0]
    if block_d is None:
        cfg = dict(_family(DEFAULTS[kernel], major))
    else:
        cfg = dict(_family(ATTENTION_DEFAULTS[kernel], major)[head_dim_class(block_d)])
    if dtype == torch.float32:
        keys, stage_cut = FLOAT32_CUTS[kernel]
        for key in keys:
            cfg[key] = max(16, cfg[key] // 2)
        cfg["num_stages"] = max(1, cfg["num_stages"] - stage_cut)
    return cfg


def config(
    op: str,
    kernel: str,
    device: torch.device,
    m: int = 0,
    n: int = 0,
    k: int = 0,
    r: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    *,
    block_d: int | None = None,
) -> dict:
    """Meta-parameters for one launch (block sizes as constexprs, ``num_warps``, ``num_stages``)."""
    if device.type != "cuda" or interpreting():
        return dict(INTERPRETER[kernel])
    info = device_info(device)
    return lookup(op, kernel, info.name, info.capability, dtype, m, n, k, r, block_d=block_d)


def fit_stages(cfg: dict, bytes_per_stage: int, device: torch.device) -> dict:
    """Cut ``num_stages`` until the pipelined tiles fit the GPU's shared memory (with 10% for
    the epilogue's layout conversions), so a tuned or default config never fails to launch."""
    if device.type != "cuda" or interpreting():
        return cfg
    limit = device_info(device).shared_memory
    while cfg["num_stages"] > 1 and 1.1 * cfg["num_stages"] * bytes_per_stage > limit:
        cfg["num_stages"] -= 1
    return cfg


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU), from the per-device cache: a
    properties query costs host time on every launch."""
    return device_info(device).sms if device.type == "cuda" else 1
