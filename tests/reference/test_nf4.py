"""The 4-bit NF4 / FP4 spec against bitsandbytes itself on CPU: quantisation bit for bit,
dequantisation exactly, state dicts both ways, and the format's known answers."""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftops.reference import nf4

# The test extra installs bitsandbytes, so CI always runs these; the GPU machine has none, and
# its gpu stages collect every test file.
bnb = pytest.importorskip("bitsandbytes", reason="parity with bitsandbytes needs it installed (the test extra)")
import bitsandbytes.functional as bnbF  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (out, in): in not a multiple of 64 (blocks straddle rows), numel not a multiple of 64, odd
# numel (a padded last nibble), and one that divides evenly.
SHAPES = [(33, 70), (5, 3), (24, 100), (64, 128)]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(autouse=True)
def _eager_bnb(monkeypatch):
    # bnb's PyTorch dequantiser is wrapped in torch.compile(dynamic=False): one inductor build
    # per shape, seconds each here. Eager runs the same operations.
    monkeypatch.setattr(torch._dynamo.config, "disable", True)


@contextlib.contextmanager
def _bnb_pytorch_blockwise():
    """Route bnb's 8-bit blockwise quantiser (double quantisation) to its PyTorch backend
    instead of its CPU library, which picks codes from a lookup table (an approximation)."""
    real = torch.ops.bitsandbytes.quantize_blockwise
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    pytorch = types.SimpleNamespace(default=lambda *args: real.default.redispatch(keys, *args))
    torch.ops.bitsandbytes.quantize_blockwise = pytorch
    try:
        yield
    finally:
        torch.ops.bitsandbytes.quantize_blockwise = real


def _weight(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(_INT_VIEW[a.dtype]), b.view(_INT_VIEW[b.dtype]))


def _assert_same_dequant(ours, theirs, quant_type):
    # bnb's CPU library (and CUDA) dequantise FP4 nibble 0b1000 to -0.0, its table holds +0.0:
    # equal values, so FP4 is compared by value, NF4 bit for bit.
    if quant_type == "nf4":
        _assert_same_bits(ours, theirs)
    else:
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and torch.equal(ours, theirs)


def test_code_tables_are_bnbs():
    _assert_same_bits(nf4.NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    _assert_same_bits(nf4.FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))
    _assert_same_bits(nf4.dynamic_map(), bnbF.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bnb(shape, dtype, quant_type):
    w = _weight(shape, dtype)
    theirs_packed, theirs = bnbF.quantize_4bit(w, quant_type=quant_type, compress_statistics=False)
    packed, state = nf4.quantize_4bit(w, quant_type=quant_type, compress_statistics=False)
    assert packed.shape == theirs_packed.shape and torch.equal(packed, theirs_packed)
    _assert_same_bits(state.absmax, theirs.absmax)
    _assert_same_bits(state.code, theirs.code)
    assert (state.shape, state.dtype, state.blocksize, state.quant_type, state.nested) == (
        tuple(theirs.shape),
        theirs.dtype,
        theirs.blocksize,
        theirs.quant_type,
        False,
    )
    _assert_same_dequant(nf4.dequantize_4bit(packed, state), bnbF.dequantize_4bit(theirs_packed, theirs), quant_type)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_quantize_matches_bnb_other_blocksizes(blocksize):
    w = _weight((24, 100), torch.float16, seed=1)
    theirs_packed, theirs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    packed, state = nf4.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, theirs_packed) and torch.equal(state.absmax, theirs.absmax)
    _assert_same_bits(nf4.dequantize_4bit(packed, state), bnbF.dequantize_4bit(theirs_packed, theirs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(33, 70), (96, 400)])  # one nested block; two, the last short
def test_double_quant_matches_bnb(shape, dtype, quant_type):
    w = _weight(shape, dtype, seed=2)
    with _bnb_pytorch_blockwise():
        theirs_packed, theirs = bnbF.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    packed, state = nf4.quantize_4bit(w, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(packed, theirs_packed)
    assert state.nested and theirs.nested
    for ours, bnbs in [
        (state.absmax, theirs.absmax),
        (state.code, theirs.code),
        (state.offset, theirs.offset),
        (state.state2_absmax, theirs.state2.absmax),
        (state.state2_code, theirs.state2.code),
    ]:
        assert ours.dtype == bnbs.dtype and ours.shape == bnbs.shape and torch.equal(ours, bnbs)
    assert state.state2_blocksize == theirs.state2.blocksize == 256
    # Dequantised by bnb with its CPU library, the state bnb would load.
    _assert_same_dequant(nf4.dequantize_4bit(packed, state), bnbF.dequantize_4bit(theirs_packed, theirs), quant_type)


def test_double_quant_close_to_bnb_cpu_library():
    """bnb's CPU library quantises the scales through a 65536-entry lookup table: its 8-bit
    codes differ from the nearest entry's by one step, rarely; everything else is the same."""
    w = _weight((512, 640), torch.float32, seed=3)
    theirs_packed, theirs = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    packed, state = nf4.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, theirs_packed)
    assert torch.equal(state.offset, theirs.offset) and torch.equal(state.state2_absmax, theirs.state2.absmax)
    step = (state.absmax.int() - theirs.absmax.int()).abs()
    assert step.max() <= 1 and (step > 0).float().mean() < 0.02
    # Their state, dequantised by the spec, is their weight exactly.
    ours = nf4.dequantize_4bit(theirs_packed, nf4.state_from_bnb(theirs))
    _assert_same_bits(ours, bnbF.dequantize_4bit(theirs_packed, theirs))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_bnb_dequantizes_the_specs_state(quant_type, compress_statistics):
    w = _weight((40, 90), torch.bfloat16, seed=4)
    packed, state = nf4.quantize_4bit(w, quant_type=quant_type, compress_statistics=compress_statistics)
    theirs = nf4.state_to_bnb(state)
    _assert_same_dequant(nf4.dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed, theirs), quant_type)
    back = nf4.state_from_bnb(theirs)
    assert torch.equal(nf4.dequantize_absmax(back), nf4.dequantize_absmax(state))


def test_nibble_order_and_blocks_known_answer():
    """First element in the high nibble; blocks run over the flattened weight, across rows."""
    w = torch.zeros(3, 40)  # 120 elements, blocks of 32: 0..31, 32..63, 64..95, 96..119 (short)
    w[0, 0], w[0, 1] = 1.0, -1.0  # NF4 codes 15 and 0: byte 0xF0
    w[0, 35] = -2.0  # element 35, in block 1 with row 1's columns 0..23
    w[1, 23] = 1.0  # element 63, the last of block 1: 1 / 2 = 0.5, nearer 0.4407 (12) than 0.5626
    w[1, 24] = 4.0  # element 64, the first of block 2
    packed, state = nf4.quantize_4bit(w, blocksize=32, compress_statistics=False)
    flat = packed.reshape(-1)
    assert packed.shape == (60, 1) and flat[0].item() == 0xF0
    # A short last block of zeros stores 1e-38, a full one would store 0.
    assert torch.equal(state.absmax, torch.tensor([1.0, 2.0, 4.0, 1e-38]))
    codes = torch.stack([flat >> 4, flat & 0xF], 1).reshape(-1)
    assert codes[[2, 35, 63, 64, 119]].tolist() == [7, 0, 12, 15, 7]
    out = nf4.dequantize_4bit(packed, state)
    assert out[0, 35].item() == -2.0 and out[1, 24].item() == 4.0 and out[2, 39].item() == 0.0
    assert out[1, 23].item() == (nf4.NF4_CODE[12] * 2.0).item()


def test_short_last_block_divides():
    """bnb scales a full block by the float32 reciprocal of its absmax but divides the short
    last block by it: one rounding apart, which can cross an NF4 midpoint. Here the same
    pair (absmax, x) gets code 10 in a full block and 11 in the short one, in bnb too."""
    a, x = 1.0099999904632568, 0.29493391513824463  # found by search: x * (1 / a) < mid < x / a
    w = torch.zeros(1, 66)
    w[0, 0], w[0, 1], w[0, 64], w[0, 65] = a, x, a, x
    packed, _ = nf4.quantize_4bit(w, compress_statistics=False)
    theirs, _ = bnbF.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, theirs)
    assert packed.reshape(-1)[[0, 32]].tolist() == [0xFA, 0xFB]


def test_odd_numel_pads_the_low_nibble_with_the_code_of_zero():
    packed, _ = nf4.quantize_4bit(torch.ones(1, 3), compress_statistics=False)
    assert packed.reshape(-1).tolist() == [0xFF, 0xF7]
    packed, _ = nf4.quantize_fp4(torch.ones(1, 3), compress_statistics=False)
    assert packed.reshape(-1).tolist() == [0x33, 0x30]


def test_dequantize_absmax_formula():
    packed, state = nf4.quantize_4bit(_weight((96, 400), torch.float32, seed=5))
    assert state.blocks == 600 and state.state2_absmax.shape == (3,)
    expected = torch.tensor(
        [
            state.state2_code[int(state.absmax[b])].item() * state.state2_absmax[b // 256].item()
            for b in range(state.blocks)
        ],
        dtype=torch.float32,
    )
    # float32 product then float32 sum, no fused multiply-add
    expected = expected + state.offset
    assert torch.equal(nf4.dequantize_absmax(state), expected)
    assert torch.equal(nf4.dequantize_absmax(state), nf4.dequantize_absmax(state_no_nesting(packed, state)))


def state_no_nesting(packed, state):
    """The same scales written out in float32 (a non-nested state)."""
    return nf4.QuantState4bit(nf4.dequantize_absmax(state), state.shape, state.dtype, state.blocksize, state.quant_type)


def test_linear4bit_checkpoint_round_trip(tmp_path):
    """A checkpoint written by bnb.nn.Linear4bit (safetensors), read by the spec."""
    torch.manual_seed(6)
    layer = bnb.nn.Linear4bit(70, 33, bias=True, quant_type="nf4", compress_statistics=True)
    # Made bfloat16 first (not yet quantised), then quantised by the move to a device.
    model = torch.nn.Sequential(torch.nn.Identity(), layer).to(torch.bfloat16).to("cpu")
    assert layer.weight.dtype == torch.uint8
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sd = load_file(str(path))
    assert {"1.weight.absmax", "1.weight.quant_map", "1.weight.nested_absmax", "1.weight.nested_quant_map"} <= set(sd)
    assert "1.weight.quant_state.bitsandbytes__nf4" in sd
    state = nf4.state_from_dict(sd, "1.")
    assert state.shape == (33, 70) and state.dtype == torch.bfloat16 and state.nested
    expected = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    _assert_same_bits(nf4.dequantize_4bit(sd["1.weight"], state), expected)
    # Written back, the spec's entries are bnb's, key for key and byte for byte.
    ours = nf4.state_to_dict(state, "1.")
    theirs = {k: v for k, v in model.state_dict().items() if k.startswith("1.weight.")}
    assert list(ours) == list(theirs)  # the order too, as bnb writes it (safetensors sorts)
    theirs = {k: sd[k] for k in theirs}
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_bnb_loads_the_specs_state_dict(compress_statistics):
    w = _weight((33, 70), torch.float16, seed=7)
    packed, state = nf4.quantize_4bit(w, compress_statistics=compress_statistics)
    sd = {"layer.weight": packed, **nf4.state_to_dict(state, "layer.")}
    stats = {k.removeprefix("layer.weight."): v for k, v in sd.items() if k.startswith("layer.weight.")}
    param = bnb.nn.Params4bit.from_prequantized(sd["layer.weight"], stats, device="cpu")
    assert param.quant_state.nested == compress_statistics
    _assert_same_bits(bnbF.dequantize_4bit(param.data, param.quant_state), nf4.dequantize_4bit(packed, state))
    # And the spec reads back what it wrote.
    assert torch.equal(nf4.dequantize_absmax(nf4.state_from_dict(sd, "layer.")), nf4.dequantize_absmax(state))


def test_states_own_their_tables(tmp_path):
    """Each state gets its own copy of the tables (as in bnb): an in-place edit of one state
    cannot reach the module's tables, and two layers' entries can go in one safetensors file."""
    _, a = nf4.quantize_4bit(torch.randn(4, 64))
    _, b = nf4.quantize_4bit(torch.randn(4, 64))
    assert a.code.data_ptr() not in (nf4.NF4_CODE.data_ptr(), b.code.data_ptr())
    assert a.state2_code.data_ptr() != b.state2_code.data_ptr()
    s, t = (nf4.QuantState4bit(torch.ones(4), (4, 64), torch.float32) for _ in range(2))  # the default table
    entries = {**nf4.state_to_dict(a, "a."), **nf4.state_to_dict(s, "s."), **nf4.state_to_dict(t, "t.")}
    save_file(entries, str(tmp_path / "layers.safetensors"))


def test_bits_per_parameter():
    """QLoRA's 4.127 bits per parameter with double quantisation (4.5 without), from the
    tensors actually stored for a 4096 x 4096 weight, 16-entry and 256-entry tables included."""
    w = torch.empty(4096, 4096, dtype=torch.float16).normal_(generator=torch.Generator().manual_seed(8))

    def stored_bits(state, packed):
        tensors = [packed, *nf4.state_to_dict(state).values()]
        return 8 * sum(t.numel() * t.element_size() for t in tensors) / w.numel()

    packed, state = nf4.quantize_4bit(w)
    assert abs(stored_bits(state, packed) - 4.127) < 1e-3
    assert abs(stored_bits(nf4.QuantState4bit(nf4.dequantize_absmax(state), state.shape, w.dtype), packed) - 4.5) < 1e-3


def _state(**overrides):
    fields = dict(absmax=torch.ones(2), shape=(2, 64), dtype=torch.float16, blocksize=64, quant_type="nf4")
    return nf4.QuantState4bit(**{**fields, **overrides})


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: nf4.quantize_4bit(torch.randn(4, 64), blocksize=48), ValueError, "quantize_4bit: blocksize .* got 48"),
        (lambda: nf4.quantize_4bit(torch.randn(4, 64), blocksize=64.0), TypeError, "quantize_4bit: blocksize"),
        (lambda: nf4.quantize_4bit(torch.randn(256)), ValueError, r"quantize_4bit: weight must be 2-D .* \(256,\)"),
        (
            lambda: nf4.quantize_4bit(torch.ones(4, 64, dtype=torch.int32)),
            TypeError,
            "quantize_4bit: weight .* got torch.int32",
        ),
        (lambda: nf4.quantize_4bit(torch.randn(4, 64), quant_type="int4"), ValueError, "quant_type .* 'int4'"),
        (
            lambda: nf4.dequantize_4bit(torch.zeros(64, dtype=torch.int8), _state()),
            TypeError,
            "packed must be torch.uint8",
        ),
        (lambda: nf4.dequantize_4bit(torch.zeros(63, dtype=torch.uint8), _state()), ValueError, "packed .* 64 .* 63"),
        (lambda: nf4.dequantize_4bit(torch.zeros(64, dtype=torch.uint8), None), TypeError, "dequantize_4bit: state"),
        (lambda: _state(absmax=torch.ones(3)), ValueError, "absmax must have 2 elements, got 3"),
        (lambda: _state(absmax=torch.ones(2, dtype=torch.float16)), TypeError, "absmax must be torch.float32"),
        (lambda: _state(shape=(128,)), ValueError, "shape must be a 2-D"),
        (lambda: _state(dtype=torch.float64), TypeError, "dtype must be one of"),
        (lambda: _state(blocksize=100), ValueError, "QuantState4bit: blocksize"),
        (lambda: _state(quant_type="fp8"), ValueError, "QuantState4bit: quant_type"),
        (lambda: _state(code=nf4.FP4_CODE), ValueError, "code must be bitsandbytes' nf4 table"),
        (lambda: _state(offset=torch.tensor(0.0)), ValueError, "all set or all None"),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_nested_state():
    _, good = nf4.quantize_4bit(torch.randn(24, 100))  # 38 blocks, one nested block
    fields = {f: getattr(good, f) for f in good.__dataclass_fields__}
    with pytest.raises(ValueError, match="absmax must have 38 elements, got 37"):
        nf4.QuantState4bit(**{**fields, "absmax": good.absmax[:-1]})
    with pytest.raises(TypeError, match="absmax must be torch.uint8"):
        nf4.QuantState4bit(**{**fields, "absmax": good.absmax.float()})
    with pytest.raises(ValueError, match="state2_absmax must have 1 elements, got 2"):
        nf4.QuantState4bit(**{**fields, "state2_absmax": torch.ones(2)})
    with pytest.raises(ValueError, match="state2_code must have 256 elements"):
        nf4.QuantState4bit(**{**fields, "state2_code": good.state2_code[:16]})


def test_bad_state_dict():
    packed, state = nf4.quantize_4bit(torch.randn(24, 100))
    sd = nf4.state_to_dict(state, "q.")
    with pytest.raises(ValueError, match="state_from_dict: expected one 'k.weight.quant_state.bitsandbytes__nf4'"):
        nf4.state_from_dict(sd, "k.")
    with pytest.raises(ValueError, match="state_from_dict: missing key 'q.weight.nested_absmax'"):
        nf4.state_from_dict({k: v for k, v in sd.items() if not k.endswith("nested_absmax")}, "q.")
    wrong = dict(sd)
    wrong["q.weight.absmax"] = sd["q.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="QuantState4bit: absmax must have 38 elements, got 37"):
        nf4.state_from_dict(wrong, "q.")


def test_transformers_qlora_checkpoint(tmp_path):
    """A tiny Llama quantised by transformers with QLoRA's BitsAndBytesConfig on CPU and saved:
    the spec reads every 4-bit layer of the checkpoint; and a checkpoint whose 4-bit layers the
    spec wrote loads back into transformers to the same weights."""
    import transformers

    from tests.integrations import hf_models

    dense = hf_models.llama()
    dense.save_pretrained(tmp_path / "dense")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    load = transformers.AutoModelForCausalLM.from_pretrained
    quantised = load(tmp_path / "dense", quantization_config=config, device_map="cpu", dtype=torch.bfloat16)
    quantised.save_pretrained(tmp_path / "qlora")
    (file,) = (tmp_path / "qlora").glob("*.safetensors")
    sd = load_file(str(file))
    layers = {n: m for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    ours_sd = dict(sd)
    for name, layer in layers.items():
        state = nf4.state_from_dict(sd, name + ".")
        assert state.quant_type == "nf4" and state.nested and state.dtype == torch.bfloat16
        theirs = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        _assert_same_bits(nf4.dequantize_4bit(sd[name + ".weight"], state), theirs)
        # The spec's own quantisation of the dense weight, written in the checkpoint's place.
        packed, ours = nf4.quantize_nf4(dense.get_submodule(name).weight.detach().to(torch.bfloat16))
        ours_sd.update({name + ".weight": packed, **nf4.state_to_dict(ours, name + ".")})
    save_file(ours_sd, str(file), metadata={"format": "pt"})
    reloaded = load(tmp_path / "qlora", device_map="cpu", dtype=torch.bfloat16)
    for name in layers:
        layer = reloaded.get_submodule(name)
        expected = nf4.dequantize_4bit(ours_sd[name + ".weight"], nf4.state_from_dict(ours_sd, name + "."))
        _assert_same_bits(bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state), expected)


def test_fp4_small_values_codes():
    """FP4 holds 0 at patterns 0b0000 and 0b1000: small negatives (and 0) get the first, small
    positives the second, as in bnb's PyTorch backend."""
    w = torch.tensor([[1.0, -1e-3, 0.0, 1e-3]])
    packed, _ = nf4.quantize_fp4(w, compress_statistics=False)
    theirs, _ = bnbF.quantize_4bit(w, quant_type="fp4", compress_statistics=False)
    assert packed.reshape(-1).tolist() == [0x30, 0x08] == theirs.reshape(-1).tolist()
