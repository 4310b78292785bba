r"""A persistent, tensor-descriptor (TMA) version of ``lora_linear``'s GEMM for Hopper.

It computes what ``lora_linear.gemm`` computes without dropout::

    out = x W' + epi_scale * (u B') + bias        float32 accumulation, out written once

in the two orientations its callers use (``trans_w`` names how ``W'`` sits in memory):

* forward, ``trans_w=True``: ``w = weight`` (N, K) row-major, ``W' = weight^T``; ``B' = lora_b^T``.
* dx, ``trans_w=False``: ``w = weight`` read as (K_red, N_out) = (out_features, in_features)
  row-major, ``W' = weight``; ``B' = lora_a``.

What differs from the pointer kernel:

* ``x``, ``W`` and the output go through device-side tensor descriptors
  (``tl.make_tensor_descriptor``): the copy engine moves whole tiles, zero-fills what lies past
  the edges and clips stores there, so no masks or address arithmetic sit in the main loop and
  the matrix units read operands straight from the swizzled shared memory it wrote.
* A persistent grid: ``min(#SMs, #tiles)`` programs, each walking tiles ``pid, pid + P, ...``
  in GROUP_M-grouped order, so the descriptors are built once per program; with FLATTEN the
  tile and K loops are one software-pipelined loop, and the next tile's first loads are in
  flight during this tile's epilogue.
* The epilogue stores the tile in two halves along N, which halves the shared-memory staging
  buffer of the store (that memory goes to pipeline stages instead).

The rank-r term goes into the same accumulator, loaded by pointers with any strides (u and B'
are small, and ``r`` need not be a multiple of 8, which a descriptor would require), but
after the main loop rather than before it as in the pointer kernel: placed before it, it
stopped Triton from pipelining the flattened loop (compiled for sm_90a: every load waited).
Dropout is not here: its epilogue stays on the pointer kernel.

TMA wants the innermost dimension contiguous, every other stride and the base address
16-byte aligned; :func:`supports_tma` checks that, and callers fall back to the pointer kernel
when it gives a reason.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import block_config
from .block_config import num_sms
from .common import dot_precision, dtype_reason, empty, interpreting, on_device
from .lowrank import MAX_RANK, pow2, tile_coords

OP = "lora_linear"
KERNEL = "gemm_tma"

#: Hopper defaults, largest tile first (:func:`pick_sm90` chooses). Shared memory per stage is
#: (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes in 16-bit: 48 KB for the first, so three stages plus
#: the half-tile store buffer and the rank-r tiles fit in 227 KB.
SM90_CONFIGS: tuple[dict, ...] = (
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
)

#: The interpreter runs one program at a time in numpy: small tiles.
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=1, num_stages=1)

#: Optional keys and their defaults. FLATTEN merges the tile and K loops into one pipelined
#: loop (the next tile's loads overlap this one's epilogue); EPI_SUBTILE stores the tile in two
#: halves along N; BLOCK_R (default :func:`rank_block`) is the ranks per step of the rank-r term.
CONFIG_DEFAULTS = dict(GROUP_M=8, EPI_SUBTILE=True, FLATTEN=True, num_warps=8, num_stages=3)

#: Keys a config may carry; ``NUM_SMS`` (optional) replaces the device's SM count as the
#: persistent grid's width (tests run several programs on CPU with it; a tuner may try fewer).
CONFIG_KEYS = frozenset({"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "NUM_SMS", *CONFIG_DEFAULTS})

#: TMA's alignment unit for the base address and every stride but the innermost.
TMA_ALIGN = 16


@triton.jit
def _gemm_tma_kernel(
    X,
    W,
    U,
    B,
    BIAS,
    OUT,
    COL,
    PRE,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_w,
    stride_um,
    stride_ur,
    stride_br,
    stride_bn,
    epi_scale,
    inv_epi_scale,
    TRANS_W: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EPI_SCALED: tl.constexpr,
    COL_SCALE: tl.constexpr,
    SAVE_PRE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    RANK_STEPS: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPI_SUBTILE: tl.constexpr,
    FLATTEN: tl.constexpr,
    TILE_STRIDE: tl.constexpr,
):
    """``OUT = X W' + epi_scale * (U B') + BIAS``, ``X: (M, K)``, ``W' : (K, N)`` stored as
    ``W: (N, K)`` when ``TRANS_W`` else ``(K, N)``, both with unit inner stride; ``U: (M, R)``
    and ``B': (R, N)`` by strides, ``R <= RANK_STEPS * BLOCK_R``; ``OUT: (M, N)`` contiguous.
    ``COL_SCALE`` (DoRA): ``OUT = COL * (X W' + epi_scale * U B') + BIAS``, ``COL: (N,)``
    float32; ``SAVE_PRE`` also stores the unscaled sum to ``PRE`` (``OUT``'s layout)."""
    dtype = OUT.dtype.element_ty
    x_desc = tl.make_tensor_descriptor(X, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if TRANS_W:
        w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_w, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        w_desc = tl.make_tensor_descriptor(W, shape=[K, N], strides=[stride_w, 1], block_shape=[BLOCK_K, BLOCK_N])
    STORE_N: tl.constexpr = BLOCK_N // 2 if EPI_SUBTILE else BLOCK_N
    o_desc = tl.make_tensor_descriptor(OUT, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, STORE_N])
    if SAVE_PRE:
        p_desc = tl.make_tensor_descriptor(PRE, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, STORE_N])

    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    tiles_in_group = GROUP_M * blocks_n
    # The epilogue finds its tile from a counter of its own: with FLATTEN the tile loop and the
    # K loop become one pipelined loop, and the next tile's first loads are issued before this
    # tile's epilogue, so the two must not share the loop's tile index (as in Triton's tutorial).
    tile_c = tl.program_id(0) - TILE_STRIDE
    for tile in tl.range(tl.program_id(0), blocks_m * blocks_n, TILE_STRIDE, flatten=FLATTEN):
        pid_m, pid_n = tile_coords(tile, tiles_in_group, blocks_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0])
            if TRANS_W:
                w = w_desc.load([off_n, k0]).T
            else:
                w = w_desc.load([k0, off_n])
            acc = tl.dot(x, w, acc, input_precision=PRECISION)

        tile_c += TILE_STRIDE
        pid_m, pid_n = tile_coords(tile_c, tiles_in_group, blocks_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)[:, None]
        cols = (off_n + tl.arange(0, BLOCK_N))[None, :]
        # The rank-r term after the main loop: here its loads and dot run while the next tile's
        # first TMA loads are in flight (before the loop, they kept the flattened loop from
        # being pipelined). Scaling the accumulator around the dot keeps one accumulator and
        # costs two float32 roundings of the main term; scaling u would round it to 16 bits.
        if EPI_SCALED:
            acc = acc * inv_epi_scale
        for step in tl.range(0, RANK_STEPS, num_stages=1):
            rs = step * BLOCK_R + tl.arange(0, BLOCK_R)
            b = tl.load(B + rs[:, None] * stride_br + cols * stride_bn, mask=(rs[:, None] < R) & (cols < N), other=0.0)
            u = tl.load(
                U + rows * stride_um + rs[None, :].to(tl.int64) * stride_ur,
                mask=(rows < M) & (rs[None, :] < R),
                other=0.0,
            ).to(b.dtype)
            acc = tl.dot(u, b, acc, input_precision=PRECISION)
        if EPI_SCALED:
            acc = acc * epi_scale
        if SAVE_PRE:
            _store_tile(p_desc, acc.to(dtype), off_m, off_n, BLOCK_M, BLOCK_N, EPI_SUBTILE)
        if COL_SCALE:
            acc = acc * tl.load(COL + cols, mask=cols < N, other=0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
        _store_tile(o_desc, acc.to(dtype), off_m, off_n, BLOCK_M, BLOCK_N, EPI_SUBTILE)


@triton.jit
def _store_tile(desc, tile, off_m, off_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EPI_SUBTILE: tl.constexpr):
    """Store a (BLOCK_M, BLOCK_N) tile through ``desc``, in two halves along N when
    ``EPI_SUBTILE`` (half the shared-memory staging buffer)."""
    if EPI_SUBTILE:
        halves = tl.permute(tl.reshape(tile, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        desc.store([off_m, off_n], left)
        desc.store([off_m, off_n + BLOCK_N // 2], right)
    else:
        desc.store([off_m, off_n], tile)


# -- launch support ---------------------------------------------------------------------------


def _alloc_scratch(size: int, alignment: int, stream: int | None) -> Tensor:
    # Device-side descriptors live in a global scratch buffer (128 bytes per descriptor per
    # program). torch's caching allocator serves it on the current device, which the launcher
    # sets, and from the graph's pool during CUDA-graph capture.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Install the scratch allocator unless one is set. Triton keeps it in a ContextVar, so a
    thread that never set one (autograd's device threads run the backward) sees none: hence
    a check on every launch rather than once at import."""
    try:
        from triton.runtime._allocation import NullAllocator, _allocator
    except ImportError:  # (a Triton that moved it: set ours, as the tutorial does)
        triton.set_allocator(_alloc_scratch)
        return
    if isinstance(_allocator.get(), NullAllocator):
        triton.set_allocator(_alloc_scratch)


def layout_reason(
    x: Tensor, w: Tensor, u: Tensor, b: Tensor, bias: Tensor | None = None, *, trans_w: bool
) -> str | None:
    """The part of :func:`supports_tma` that looks only at the operands (no device query), so
    that it runs on any tensor: dtypes, shapes, strides and alignment."""
    # float32 would need TF32 wgmma with both operands K-major, which the dx orientation is
    # not; the pointer kernel serves it.
    reason = dtype_reason(x.dtype, "the TMA GEMM takes", (torch.float16, torch.bfloat16))
    if reason is not None:
        return reason
    operands = (("w", w), ("u", u), ("b", b)) + ((("bias", bias),) if bias is not None else ())
    for name, t in operands:
        # The ops keep u in float32 (rounded to float16 it can overflow where y does not); the
        # kernel rounds it to bfloat16 in registers, whose range is float32's. In float16 that
        # rounding could overflow: the pointer kernel, which scales rows into range, serves it.
        u_f32_ok = name == "u" and t.dtype == torch.float32 and x.dtype == torch.bfloat16
        if t.dtype != x.dtype and not u_f32_ok:
            return f"the TMA GEMM takes one dtype, got x {x.dtype} and {name} {t.dtype}"
        if t.device != x.device:
            return f"the TMA GEMM takes one device, got x on {x.device} and {name} on {t.device}"
    if x.dim() != 2 or w.dim() != 2:
        return f"the TMA GEMM takes 2-D x and w, got {x.dim()}-D and {w.dim()}-D"
    k = x.shape[1]
    n, k_w = (w.shape[0], w.shape[1]) if trans_w else (w.shape[1], w.shape[0])
    if k_w != k:
        return (
            f"the TMA GEMM needs w's reduction dimension to be x's {k}, got w {tuple(w.shape)} with trans_w={trans_w}"
        )
    if k == 0:
        return "the TMA GEMM needs K > 0 (a descriptor cannot have an empty dimension)"
    if u.shape[1] > MAX_RANK:
        return f"the TMA GEMM takes ranks up to {MAX_RANK}, got {u.shape[1]}"
    es = x.element_size()
    for name, t in (("x", x), ("w", w)):
        if t.stride(1) != 1:
            return f"TMA needs {name}'s last dimension contiguous, got strides {tuple(t.stride())}"
        if t.stride(0) < t.shape[1]:
            return f"TMA needs {name}'s rows not to overlap, got shape {tuple(t.shape)} and strides {tuple(t.stride())}"
        if t.data_ptr() % TMA_ALIGN or (t.stride(0) * es) % TMA_ALIGN:
            return (
                f"TMA needs {name}'s base address and row stride to be multiples of {TMA_ALIGN} bytes, "
                f"got address {t.data_ptr()} and row stride {t.stride(0) * es} bytes"
            )
    if (n * es) % TMA_ALIGN:
        return f"TMA stores rows of {TMA_ALIGN}-byte multiples, got N = {n} ({n * es} bytes)"
    return None


def supports_tma(
    x: Tensor, w: Tensor, u: Tensor, b: Tensor, bias: Tensor | None = None, *, trans_w: bool
) -> str | None:
    """None when :func:`gemm_tma` applies to these operands, else the reason it does not.

    ``w`` is the stored matrix: ``(N, K)`` when ``trans_w`` (the forward's weight), ``(K, N)``
    otherwise (the dx GEMM's weight). Conditions: a CUDA device of compute capability 9.x (not
    the interpreter), then :func:`layout_reason`'s: float16 or bfloat16 throughout, rank at
    most :data:`.lowrank.MAX_RANK` (the pointer kernel's limit too), ``x`` and ``w`` with unit
    inner stride, non-overlapping rows and 16-byte aligned base and row stride, ``N`` a
    multiple of 16 bytes (the output is a contiguous ``(M, N)`` written by descriptor),
    ``K > 0``.
    """
    if x.device.type != "cuda" or interpreting():
        return f"TMA needs a CUDA device, got {x.device.type}" + (" under TRITON_INTERPRET" if interpreting() else "")
    major, minor = block_config.device_info(x.device).capability
    if major != 9:
        return f"the TMA GEMM is built and tuned for compute capability 9.x (Hopper), got {major}.{minor}"
    return layout_reason(x, w, u, b, bias, trans_w=trans_w)


#: A config is taken when its last wave of tiles keeps at least this share of the SMs busy.
MIN_WAVE_EFFICIENCY = 0.8


def pick_sm90(m: int, n: int, sms: int) -> dict:
    """The first (largest-tile) of :data:`SM90_CONFIGS` whose tiles fill the SMs' waves to
    :data:`MIN_WAVE_EFFICIENCY`, else the smallest: 512 tokens of a 4096-wide layer are 64
    tiles of 128 x 256 for 132 SMs (48%), but 128 tiles of 128 x 128 (97%)."""
    for cfg in SM90_CONFIGS:
        tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
        if tiles / (triton.cdiv(tiles, sms) * sms) >= MIN_WAVE_EFFICIENCY:
            return dict(cfg)
    return dict(SM90_CONFIGS[-1])


def default_config(m: int, n: int, device: torch.device) -> dict:
    """:func:`pick_sm90` on a GPU, small tiles under the interpreter."""
    if device.type != "cuda" or interpreting():
        return dict(INTERPRETER_CONFIG)
    return pick_sm90(m, n, num_sms(device))


def config(m: int, n: int, k: int, r: int, dtype: torch.dtype, device: torch.device) -> dict:
    """A tuned entry for kernel ``gemm_tma`` in ``configs/lora_linear/<GPU>.json`` if there is one
    near this shape (``block_config``'s lookup), else :func:`default_config`."""
    if device.type == "cuda" and not interpreting():
        info = block_config.device_info(device)
        tuned = block_config.tuned_config(OP, KERNEL, info.name, info.capability, dtype, m, n, k, r)
        if tuned is not None:
            return tuned
    return default_config(m, n, device)


#: The u and B' tiles of one rank step pass through registers beside the accumulator: at
#: most this many of their elements per thread. Compiled for sm_90a, 96 spilled (128 x 256
#: with steps of 64 ranks, 8 warps; 64 x 128 with 64, 4 warps) and 48 left 250 registers of 255.
RANK_ELEMENTS_PER_THREAD = 32


def rank_block(r: int, block_m: int, block_n: int, num_warps: int) -> int:
    """Ranks per step of the rank-r term: ``pow2(r)`` (one step) unless that puts more than
    :data:`RANK_ELEMENTS_PER_THREAD` tile elements in each thread's registers."""
    block = min(pow2(r), 64)
    while block > 16 and (block_m + block_n) * block > RANK_ELEMENTS_PER_THREAD * 32 * num_warps:
        block //= 2
    return block


def check_config(cfg: dict, r: int = 16) -> dict:
    """``cfg`` completed with the defaults of optional keys and checked: unknown keys or bad
    values raise ValueError naming them, so a tuner's candidate fails here rather than inside
    the compiler."""
    unknown = set(cfg) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"gemm_tma: cfg: unknown keys {sorted(unknown)}, expected a subset of {sorted(CONFIG_KEYS)}")
    full = {**CONFIG_DEFAULTS, **cfg}
    missing = {"BLOCK_M", "BLOCK_N", "BLOCK_K"} - set(full)
    if missing:
        raise ValueError(f"gemm_tma: cfg: missing {sorted(missing)}")
    if "BLOCK_R" not in full and all(isinstance(full[k], int) for k in ("BLOCK_M", "BLOCK_N", "num_warps")):
        full["BLOCK_R"] = rank_block(r, full["BLOCK_M"], full["BLOCK_N"], full["num_warps"])
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"):
        v = full[key]
        # A descriptor's box is at most 256 elements along each dimension.
        if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v > 256 or v & (v - 1):
            raise ValueError(f"gemm_tma: cfg: {key}: expected a power of two in [16, 256], got {v!r}")
    if full["EPI_SUBTILE"] and full["BLOCK_N"] < 32:
        raise ValueError(f"gemm_tma: cfg: BLOCK_N: EPI_SUBTILE halves it, so expected >= 32, got {full['BLOCK_N']}")
    for key in ("GROUP_M", "num_warps", "num_stages") + (("NUM_SMS",) if "NUM_SMS" in full else ()):
        v = full[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"gemm_tma: cfg: {key}: expected a positive int, got {v!r}")
    for key in ("EPI_SUBTILE", "FLATTEN"):
        if not isinstance(full[key], bool):
            raise ValueError(f"gemm_tma: cfg: {key}: expected a bool, got {full[key]!r}")
    return full


def grid_size(m: int, n: int, cfg: dict, sms: int) -> tuple[int, int]:
    """``(programs, stride)`` of the persistent grid: program ``p`` takes tiles ``p, p + stride,
    ...``; one program per SM (``cfg["NUM_SMS"]`` if given), never more than there are tiles.
    The stride stays the SM count when there are fewer tiles, so that it does not vary with
    the shape (it is a compile-time constant)."""
    stride = cfg.get("NUM_SMS", sms)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    return max(1, min(stride, tiles)), stride


#: ``epi_scale`` is applied by scaling the accumulator by ``1 / epi_scale`` and back: within
#: this range neither step can overflow or underflow for any accumulator a GEMM produces.
EPI_SCALE_RANGE = (2.0**-64, 2.0**64)


def gemm_tma(
    x: Tensor,
    w: Tensor,
    u: Tensor,
    b: Tensor,
    bias: Tensor | None,
    *,
    epi_scale: float = 1.0,
    trans_w: bool,
    cfg: dict | None = None,
) -> Tensor:
    """``x @ W' + epi_scale * (u @ b) + bias`` with ``W' = w.T`` if ``trans_w`` else ``w``.

    ``x: (M, K)``, ``w: (N, K)`` if ``trans_w`` else ``(K, N)``, ``u: (M, r)``, ``b: (r, N)`` (u
    and b with any strides), ``bias: (N,)`` or None. Returns a contiguous ``(M, N)`` tensor in
    ``x``'s dtype, accumulated in float32 and written once. ``cfg`` forces a configuration
    (keys :data:`CONFIG_KEYS`), else tuned or default ones serve. Callers check
    :func:`supports_tma` first; this launcher does not repeat it, so that the interpreter can
    run the kernel on CPU, in float32 too.
    """
    return gemm_tma_pre(x, w, u, b, bias, epi_scale=epi_scale, trans_w=trans_w, cfg=cfg)[0]


def gemm_tma_pre(
    x: Tensor,
    w: Tensor,
    u: Tensor,
    b: Tensor,
    bias: Tensor | None,
    *,
    epi_scale: float = 1.0,
    trans_w: bool,
    col_scale: Tensor | None = None,
    save_pre: bool = False,
    cfg: dict | None = None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`gemm_tma` with DoRA's epilogue: the output scaled per column by ``col_scale``
    (``(N,)`` float32) before the bias, and with ``save_pre`` the unscaled output returned too."""
    m, k = x.shape
    n = w.shape[0] if trans_w else w.shape[1]
    r = u.shape[1]
    if not (
        epi_scale == 0 or (math.isfinite(epi_scale) and EPI_SCALE_RANGE[0] <= abs(epi_scale) <= EPI_SCALE_RANGE[1])
    ):
        raise ValueError(f"gemm_tma: epi_scale: expected 0 or a magnitude in [2**-64, 2**64], got {epi_scale}")
    out = empty((m, n), dtype=x.dtype, device=x.device)
    pre = empty((m, n), dtype=x.dtype, device=x.device) if save_pre else None
    if m == 0 or n == 0:
        return out, pre
    cfg = check_config(dict(cfg) if cfg else config(m, n, k, r, x.dtype, x.device), r)
    opts = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
    block_config.fit_stages(opts, (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * x.element_size(), x.device)
    programs, stride = grid_size(m, n, cfg, num_sms(x.device))
    cfg.pop("NUM_SMS", None)
    # epi_scale == 0 drops the rank-r term (as the pointer kernel's 0 * low does for finite u).
    rank_steps = triton.cdiv(r, cfg["BLOCK_R"]) if epi_scale != 0 else 0
    with on_device(x.device):
        if x.device.type == "cuda" and not interpreting():
            _ensure_allocator()
        _gemm_tma_kernel[(programs,)](
            x,
            w,
            u,
            b,
            bias.contiguous() if bias is not None else x,
            out,
            col_scale if col_scale is not None else out,
            pre if pre is not None else out,
            m,
            n,
            k,
            r,
            x.stride(0),
            w.stride(0),
            u.stride(0),
            u.stride(1),
            b.stride(0),
            b.stride(1),
            float(epi_scale),
            1.0 / epi_scale if epi_scale != 0 else 0.0,
            TRANS_W=trans_w,
            HAS_BIAS=bias is not None,
            EPI_SCALED=rank_steps > 0 and epi_scale != 1.0,
            COL_SCALE=col_scale is not None,
            SAVE_PRE=pre is not None,
            PRECISION=dot_precision(x.dtype),
            RANK_STEPS=rank_steps,
            TILE_STRIDE=stride,
            **cfg,
            **opts,
        )
    return out, pre
