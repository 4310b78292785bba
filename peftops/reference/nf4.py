r"""The 4-bit NF4 / FP4 weight format of bitsandbytes (QLoRA), the spec.

A weight ``W: (out, in)`` in float32, float16 or bfloat16 is stored as bitsandbytes'
``Params4bit`` stores it, so that checkpoints of HF models quantised with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``
load without conversion. Everything below was read off bitsandbytes 0.50.2 and is checked
against it bit for bit (``tests/reference/test_nf4.py``).

**Blocks.** ``W`` is flattened row-major (``W.reshape(-1)``, ``n = out * in`` elements) and cut
into ``blocks = ceil(n / blocksize)`` consecutive blocks of ``blocksize`` elements (64 by
default; bnb accepts 32, 64, ..., 4096); the last block holds the ``n % blocksize`` remaining
elements when ``blocksize`` does not divide ``n``. Blocks ignore rows: when ``in`` is not a
multiple of ``blocksize`` a block straddles two (or more) rows, so a kernel finds the scale of
element ``(r, c)`` as ``absmax[(r * in + c) // blocksize]``, never per row.

**Codes.** Block ``b`` has the scale ``absmax[b] = max |x|`` over the block (float32, from
the weight upcast to float32). Each element is normalised, ``x * (1 / absmax[b])`` (a
float32 reciprocal, then a product; the short last block divides, ``x / absmax[b]``) and
clamped to ``[-1, 1]``, then replaced by the index (0..15) of the nearest entry of the
16-entry table ``NF4_CODE`` (or ``FP4_CODE``): the first ``i`` with ``x <= mid_i``, with
``mid_i`` the float32 midpoints of the sorted table (a tie goes to the smaller value). FP4's
table is in bit-pattern order and holds 0 twice (patterns ``0b0000`` and ``0b1000``): values
in ``(-0.0026, 0]`` get ``0b0000`` and those in ``(0, 0.0026]`` get ``0b1000``. A block of
zeros keeps ``absmax = 0`` and codes of 0.0; the short last block stores
``max(absmax, 1e-38)``.

**Packing.** Two codes per byte, the *first* element in the *high* nibble:
``packed[k] = code[2k] << 4 | code[2k + 1]``, ``(ceil(n / 2), 1)`` uint8 (the column
shape is bnb's). An odd ``n`` pads the last low nibble with the code of 0.0. So element ``j``
of the flattened weight is ``(packed[j // 2] >> (4 * (1 - j % 2))) & 0xF``.

**Dequantisation.** ``W[j] = (CODE[nibble_j] * absmax[j // blocksize]).to(dtype)``: one
float32 product, then one round-to-nearest-even to the weight's dtype.

**Double quantisation** (``compress_statistics=True``, bnb_4bit_use_double_quant). The
float32 ``absmax`` is itself stored in 8 bits: ``offset = absmax.mean()`` (float32 scalar),
and ``absmax - offset`` is quantised blockwise again, with blocks of
``state2_blocksize = 256`` scales, the float32 scale ``state2_absmax`` per block and the
256-entry signed dynamic map ``state2_code`` (``dynamic_map()``; nearest entry, as above).
The per-block scale is recovered as

    absmax[b] = fl(fl(state2_code[absmax_u8[b]] * state2_absmax[b // 256]) + offset)

with two float32 roundings, a product and then a sum: an FMA (which GPU compilers fuse by
default) gives a different last bit, so a kernel that must match bit for bit either keeps
the two operations apart or reads ``dequantize_absmax(state)``.

**Storage.** ``QuantState4bit`` mirrors ``bitsandbytes.functional.QuantState`` field for
field (the nested ``state2`` flattened into ``state2_*`` fields); in a state dict a
``Linear4bit`` at ``prefix`` has ``{prefix}weight`` (the packed bytes) and, from
``QuantState.as_dict(packed=True)``, ``{prefix}weight.absmax``, ``.quant_map``,
``.nested_absmax``, ``.nested_quant_map`` and ``.quant_state.bitsandbytes__nf4`` (or
``__fp4``): the UTF-8 bytes of a JSON object with ``quant_type``, ``blocksize``, ``dtype``,
``shape`` and, when nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

The packed weight is uint8 here; bnb can store the same bytes in another dtype
(``quant_storage``, ``bnb_4bit_quant_storage``), which ``packed.view(torch.uint8)`` undoes.

bitsandbytes' backends do not all quantise alike: its CPU library picks the 8-bit codes of
double quantisation from a 65536-entry lookup table (an approximation of the nearest entry:
about 0.3% of the codes one step off) and stores a scale of 0, not 1e-38, for a nested block
whose values are all equal; its CUDA kernels compare against midpoints written as decimal
constants and give FP4 values in ``(-0.0026, 0)`` the pattern ``0b1000`` and those in
``[0, 0.0026]`` ``0b0000`` (here, as bnb's PyTorch backend, the other way round above 0). This spec follows bnb's PyTorch backend, which picks the nearest entry
exactly. Dequantisation, which is what loading a checkpoint needs, gives the same values on
every backend; only the sign of a zero differs (FP4 nibble ``0b1000`` is -0.0 in bnb's CPU
library and CUDA kernels, +0.0 in its table and here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) normalised to [-1, 1],
# one more positive value than negative so that 0 is exact.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
# bitsandbytes.functional.get_4bit_type("fp4"): 1 sign bit (bit 3), 2 exponent bits, 1 mantissa
# bit, in bit-pattern order (not sorted), divided by the largest value (12). Index 8, the
# pattern of -0, holds +0.0 as in bnb (its table is built from the integer -0).
FP4_CODE = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=torch.float32) / 12

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256

# bnb writes dtypes as str(dtype).strip("torch."): the bare name.
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map()``: 7 exponent bits at
    most), the 256 sorted float32 values of double quantisation's ``state2_code``.

    Each decade ``10**(i - 6)`` (i = 0..6) holds ``2**i`` evenly spaced means of
    ``linspace(0.1, 1, 2**i + 1)`` and their negatives; then 0 and 1. Computed with the same
    float32 operations as bnb, so the table is bit-identical (a test checks it)."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


_DYNAMIC_MAP = dynamic_map()


@dataclass(frozen=True, eq=False)
class QuantState4bit:
    """What dequantising a 4-bit weight needs: bitsandbytes' ``QuantState`` field for field,
    the nested state flattened.

    ``absmax`` (``QuantState.absmax``): ``(blocks,)`` float32 scales, or uint8 codes of
    ``absmax - offset`` when double-quantised. ``shape`` (``.shape``): the ``(out, in)`` weight
    shape. ``dtype`` (``.dtype``): the dequantised dtype. ``blocksize`` (``.blocksize``).
    ``quant_type`` (``.quant_type``): ``"nf4"`` or ``"fp4"``. ``code`` (``.code``): the 16-entry
    table. Double quantisation only (``None`` otherwise): ``offset`` (``.offset``, a float32
    0-d tensor), ``state2_absmax`` (``.state2.absmax``, float32, one per ``state2_blocksize``
    scales), ``state2_code`` (``.state2.code``, the 256-entry dynamic map) and
    ``state2_blocksize`` (``.state2.blocksize``, 256). bnb's ``state2.dtype`` is always
    float32 and is not kept."""

    absmax: Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: Tensor = NF4_CODE
    offset: Tensor | None = None
    state2_absmax: Tensor | None = None
    state2_code: Tensor | None = None
    state2_blocksize: int | None = None

    @property
    def nested(self) -> bool:
        return self.state2_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def __post_init__(self) -> None:
        _check_state(self, "QuantState4bit")


def _check_blocksize(fn: str, blocksize: Any) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{fn}: blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{fn}: blocksize must be one of {BLOCKSIZES} (as bitsandbytes), got {blocksize}")


def _check_quant_type(fn: str, quant_type: Any) -> None:
    if quant_type not in CODES:
        raise ValueError(f"{fn}: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_tensor(fn: str, name: str, t: Any, dtype: torch.dtype, numel: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{fn}: {name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")


def _check_state(s: QuantState4bit, fn: str) -> None:
    shape = s.shape
    if not (
        isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)
    ):  # torch.Size is a tuple
        raise ValueError(f"{fn}: shape must be a 2-D (out, in) tuple of positive ints, got {shape!r}")
    if s.dtype not in DTYPES:
        raise TypeError(f"{fn}: dtype must be one of {DTYPES}, got {s.dtype}")
    _check_blocksize(fn, s.blocksize)
    _check_quant_type(fn, s.quant_type)
    _check_tensor(fn, "code", s.code, torch.float32, 16)
    # bnb's dequantisation ignores the stored table and uses the one its quant_type names (its
    # kernels hard-code it); a state whose table differs would dequantise to something else.
    # Checked on CPU only: elsewhere reading the values would synchronise the device (and
    # cannot be done while tracing), on every state a module builds.
    if (
        s.code.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not torch.equal(s.code, CODES[s.quant_type])
    ):
        raise ValueError(f"{fn}: code must be bitsandbytes' {s.quant_type} table, got {s.code.tolist()}")
    nested_fields = (s.offset, s.state2_absmax, s.state2_code, s.state2_blocksize)
    if not s.nested:
        if any(f is not None for f in nested_fields):
            raise ValueError(f"{fn}: offset, state2_absmax, state2_code and state2_blocksize are all set or all None")
        _check_tensor(fn, "absmax", s.absmax, torch.float32, s.blocks)
        return
    if any(f is None for f in nested_fields):
        raise ValueError(f"{fn}: offset, state2_absmax, state2_code and state2_blocksize are all set or all None")
    _check_tensor(fn, "absmax", s.absmax, torch.uint8, s.blocks)
    _check_tensor(fn, "offset", s.offset, torch.float32, 1)
    b2 = s.state2_blocksize
    if isinstance(b2, bool) or not isinstance(b2, int) or b2 <= 0:
        raise ValueError(f"{fn}: state2_blocksize must be a positive int, got {b2!r}")
    _check_tensor(fn, "state2_absmax", s.state2_absmax, torch.float32, -(-s.blocks // b2))
    _check_tensor(fn, "state2_code", s.state2_code, torch.float32, 256)


def _code_index(scaled: Tensor, code: Tensor) -> Tensor:
    """The index into ``code`` of the entry nearest each value: in the sorted table, the first
    ``i`` with ``x <= mid_i``. FP4's table is in bit-pattern order and has 0 twice: the stable
    sort puts index 0 (+0) first, so 0.0 gets code 0, as in bnb."""
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    return order[torch.bucketize(scaled, (sorted_code[:-1] + sorted_code[1:]) / 2)]


def _blockwise_codes(x: Tensor, blocksize: int, code: Tensor) -> tuple[Tensor, Tensor]:
    """bnb's blockwise quantiser (its PyTorch backend) on a flat float32 tensor: the int64
    index into ``code`` per element and the float32 scale per block."""
    n = x.numel()
    full = n - n % blocksize
    head = x[:full].view(-1, blocksize)
    absmax = head.abs().amax(dim=1)
    # The reciprocal then a product, not a division: bnb's rounding, which the codes depend on.
    scaled = (head * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        # The short last block divides instead, and stores its clamped scale.
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_max).clamp(-1, 1)])
    return _code_index(scaled, code), absmax


def quantize_4bit(
    weight: Tensor, *, blocksize: int = 64, quant_type: str = "nf4", compress_statistics: bool = True
) -> tuple[Tensor, QuantState4bit]:
    """Quantise a 2-D float weight to 4 bits: ``(packed, state)`` with ``packed`` the
    ``(ceil(numel / 2), 1)`` uint8 bytes, bit-exact with
    ``bitsandbytes.functional.quantize_4bit(weight, blocksize=..., quant_type=...,
    compress_statistics=...)`` (its PyTorch backend; see the module docstring)."""
    fn = "quantize_4bit"
    if not isinstance(weight, Tensor):
        raise TypeError(f"{fn}: weight must be a Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"{fn}: weight must be one of {DTYPES}, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError(f"{fn}: weight must not be empty, got shape {tuple(weight.shape)}")
    _check_blocksize(fn, blocksize)
    _check_quant_type(fn, quant_type)
    # A copy per state, as bnb makes: the module's tables must not be reachable for in-place edits.
    code = CODES[quant_type].to(weight.device, copy=True)
    idx, absmax = _blockwise_codes(weight.reshape(-1).float(), blocksize, code)
    if idx.numel() % 2:
        # The pad nibble is the code of 0.0, as bnb pads the scaled values with a zero.
        idx = torch.cat([idx, _code_index(torch.zeros(1, device=weight.device), code)])
    nib = idx.to(torch.uint8)
    packed = ((nib[0::2] << 4) | nib[1::2]).unsqueeze(1)
    shape = (int(weight.shape[0]), int(weight.shape[1]))
    if not compress_statistics:
        return packed, QuantState4bit(absmax, shape, weight.dtype, blocksize, quant_type, code)
    offset = absmax.mean()
    dyn = _DYNAMIC_MAP.to(weight.device, copy=True)
    q2, absmax2 = _blockwise_codes(absmax - offset, NESTED_BLOCKSIZE, dyn)
    state = QuantState4bit(
        q2.to(torch.uint8), shape, weight.dtype, blocksize, quant_type, code, offset, absmax2, dyn, NESTED_BLOCKSIZE
    )
    return packed, state


def dequantize_absmax(state: QuantState4bit) -> Tensor:
    """The float32 ``(blocks,)`` scales: ``state.absmax`` itself, or after undoing double
    quantisation ``fl(fl(state2_code[absmax_u8[b]] * state2_absmax[b // state2_blocksize]) + offset)``."""
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"dequantize_absmax: state must be a QuantState4bit, got {type(state).__name__}")
    if not state.nested:
        return state.absmax
    assert state.state2_code is not None and state.state2_absmax is not None and state.offset is not None
    assert state.state2_blocksize is not None
    block2 = torch.arange(state.blocks, device=state.absmax.device) // state.state2_blocksize
    scaled = state.state2_code[state.absmax.long()] * state.state2_absmax[block2]
    return scaled + state.offset.reshape(())


def dequantize_4bit(packed: Tensor, state: QuantState4bit) -> Tensor:
    """The ``state.shape`` weight in ``state.dtype`` from its packed bytes (any shape with
    ``ceil(numel / 2)`` uint8 elements), bit-exact with ``bitsandbytes.functional.dequantize_4bit``."""
    fn = "dequantize_4bit"
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"{fn}: state must be a QuantState4bit, got {type(state).__name__}")
    n = state.numel
    _check_tensor(fn, "packed", packed, torch.uint8, -(-n // 2))
    flat = packed.reshape(-1)
    nib = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n]
    values = state.code.to(packed.device)[nib.long()]
    block = torch.arange(n, device=packed.device) // state.blocksize
    return (values * dequantize_absmax(state)[block]).to(state.dtype).view(state.shape)


def quantize_nf4(
    weight: Tensor, *, blocksize: int = 64, compress_statistics: bool = True
) -> tuple[Tensor, QuantState4bit]:
    """``quantize_4bit`` with ``quant_type="nf4"`` (QLoRA's NormalFloat)."""
    return quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=compress_statistics)


def quantize_fp4(
    weight: Tensor, *, blocksize: int = 64, compress_statistics: bool = True
) -> tuple[Tensor, QuantState4bit]:
    """``quantize_4bit`` with ``quant_type="fp4"``."""
    return quantize_4bit(weight, blocksize=blocksize, quant_type="fp4", compress_statistics=compress_statistics)


# The state names its quant type, so dequantising is one function; both names as the issue asks.
dequantize_nf4 = dequantize_4bit
dequantize_fp4 = dequantize_4bit


def state_from_bnb(quant_state: Any) -> QuantState4bit:
    """A ``QuantState4bit`` holding the tensors of a ``bitsandbytes.functional.QuantState``."""
    from bitsandbytes.functional import QuantState

    if not isinstance(quant_state, QuantState):
        raise TypeError(
            f"state_from_bnb: quant_state must be a bitsandbytes QuantState, got {type(quant_state).__name__}"
        )
    shape = tuple(int(d) for d in quant_state.shape) if quant_state.shape is not None else None
    fields: dict[str, Any] = {}
    if quant_state.nested:
        s2 = quant_state.state2
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32)
        fields = dict(offset=offset, state2_absmax=s2.absmax, state2_code=s2.code, state2_blocksize=s2.blocksize)
    return QuantState4bit(
        quant_state.absmax,
        shape,  # type: ignore[arg-type]  # validated by the constructor
        quant_state.dtype,
        quant_state.blocksize,
        quant_state.quant_type,
        quant_state.code,
        **fields,
    )


def state_to_bnb(state: QuantState4bit) -> Any:
    """The ``bitsandbytes.functional.QuantState`` that ``quantize_4bit`` in bnb would have
    returned for the same weight (sharing the tensors)."""
    from bitsandbytes.functional import QuantState

    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state_to_bnb: state must be a QuantState4bit, got {type(state).__name__}")
    state2, offset = None, None
    if state.nested:
        state2 = QuantState(
            absmax=state.state2_absmax, code=state.state2_code, blocksize=state.state2_blocksize, dtype=torch.float32
        )
        offset = state.offset
    return QuantState(
        absmax=state.absmax,
        shape=torch.Size(state.shape),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=offset,
        state2=state2,
    )


def state_to_dict(state: QuantState4bit, prefix: str = "") -> dict[str, Tensor]:
    """The quant-state entries a ``bnb.nn.Linear4bit`` at ``prefix`` writes into its state dict
    (``QuantState.as_dict(packed=True)`` under ``{prefix}weight.``): same keys, same order,
    same bytes. The packed weight itself goes under ``{prefix}weight``."""
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state_to_dict: state must be a QuantState4bit, got {type(state).__name__}")
    meta: dict[str, Any] = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _DTYPE_NAMES[state.dtype],
        "shape": list(state.shape),
    }
    # Tables cloned, as bnb does: safetensors refuses a file in which two layers' entries share
    # memory, and states may share one table.
    out = {"absmax": state.absmax, "quant_map": state.code.clone()}
    if state.nested:
        assert state.offset is not None and state.state2_code is not None and state.state2_absmax is not None
        out.update(nested_absmax=state.state2_absmax, nested_quant_map=state.state2_code.clone())
        meta.update(nested_blocksize=state.state2_blocksize, nested_dtype="float32", nested_offset=state.offset.item())
    blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    out["quant_state.bitsandbytes__" + state.quant_type] = blob
    return {f"{prefix}weight.{k}": v for k, v in out.items()}


def state_from_dict(tensors: Mapping[str, Tensor], prefix: str = "") -> QuantState4bit:
    """The state of the 4-bit weight of the ``Linear4bit`` at ``prefix`` in a state dict written
    by bitsandbytes / transformers (or ``state_to_dict``); other keys are ignored."""
    fn = "state_from_dict"
    base = f"{prefix}weight."
    blobs = [k for k in tensors if k.startswith(base + "quant_state.bitsandbytes__")]
    if len(blobs) != 1:
        raise ValueError(
            f"{fn}: expected one '{base}quant_state.bitsandbytes__nf4' or '...__fp4' key, got {blobs or 'none'}"
        )
    try:
        meta = json.loads(bytes(tensors[blobs[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{fn}: {blobs[0]} does not hold bitsandbytes' JSON quant state ({e})") from e

    def get(name: str) -> Tensor:
        if base + name not in tensors:
            raise ValueError(f"{fn}: missing key '{base + name}'")
        return tensors[base + name]

    if meta.get("quant_type") != blobs[0].rsplit("__", 1)[1]:
        raise ValueError(f"{fn}: quant_type {meta.get('quant_type')!r} does not match the key {blobs[0]}")
    if meta.get("dtype") not in _DTYPES_BY_NAME:
        raise TypeError(f"{fn}: dtype must be one of {list(_DTYPES_BY_NAME)}, got {meta.get('dtype')!r}")
    shape = meta.get("shape")
    fields: dict[str, Any] = {}
    if "nested_blocksize" in meta:
        if meta.get("nested_dtype") != "float32":
            raise TypeError(f"{fn}: nested_dtype must be 'float32', got {meta.get('nested_dtype')!r}")
        fields = dict(
            offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32),
            state2_absmax=get("nested_absmax"),
            state2_code=get("nested_quant_map"),
            state2_blocksize=meta["nested_blocksize"],
        )
    return QuantState4bit(
        get("absmax"),
        tuple(shape) if isinstance(shape, list) else shape,
        _DTYPES_BY_NAME[meta["dtype"]],
        meta.get("blocksize"),  # validated by the constructor
        meta["quant_type"],
        get("quant_map"),
        **fields,
    )
