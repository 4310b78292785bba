"""peftops.lora_linear_nf4 (QLoRA): every backend against lora_linear on the dequantised weight
(forward and every gradient, NF4 and FP4, in-features not a multiple of the block so blocks
straddle rows), the state's own dtype rounding, double quantisation through the public call,
dropout against lora_linear's own mask, the registered op (opcheck, torch.compile), and bad
input named. Quantised with peftops' reference (bit-exact with bitsandbytes, which
tests/reference/test_nf4.py checks), so these run where bitsandbytes is not installed."""

from __future__ import annotations

import importlib

import pytest
import torch

import peftops
from peftops.reference import nf4
from peftops.testing import assert_close

from .helpers import backend_params

# The module (``peftops.ops.lora_linear_nf4`` as an attribute is the function).
nf4_op = importlib.import_module("peftops.ops.lora_linear_nf4")

OP = "lora_linear_nf4"
SCALE = 0.5


def _quantized(n, k, quant_type, blocksize=64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    q, state = nf4.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
    w_deq = nf4.dequantize_4bit(q, state)
    return q.to(device), state.absmax.to(device), state.code.to(device), w_deq.to(device)


def _inputs(m, k, n, r, dtype, device, seed=1, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def mk(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype).to(device).requires_grad_()

    return mk(m, k), mk(r, k, std=k**-0.5), mk(n, r, std=r**-0.5), mk(n) if bias else None


def _grads(y, tensors, g):
    live = [t for t in tensors if t is not None]
    return torch.autograd.grad(y, live, g)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 45, 19, 5), (8, 128, 33, 3)], ids=["K45", "K128"])
def test_matches_lora_linear_on_the_dequantized_weight(device, backend, quant_type, dtype, shape):
    m, k, n, r = shape
    q, absmax, code, w = _quantized(n, k, quant_type, device=device)
    x, a, b, bias = _inputs(m, k, n, r, dtype, device)
    with peftops.use_backend(backend):
        y = nf4_op.lora_linear_nf4_raw(x, q, absmax, code, n, 64, a, b, scale=SCALE, bias=bias)
    wide = [t.detach().double().requires_grad_() for t in (x, a, b, bias)]
    want = peftops.lora_linear(wide[0], w.double(), wide[1], wide[2], scale=SCALE, bias=wide[3])
    assert y.dtype == dtype and y.shape == (m, n)
    assert_close(y, want, dtype=dtype, name="y")
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    for name, got, exp in zip(["dx", "dA", "dB", "dbias"], _grads(y, [x, a, b, bias], g),
                              _grads(want, wide, g.double()), strict=True):  # fmt: skip
        assert_close(got, exp, dtype=dtype, kind="bwd", name=name)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_dropout_is_lora_linears_dropout(device, backend):
    """Same seed, same backend: the mask lora_linear draws is the one this op draws, so the
    outputs and gradients agree with lora_linear on the dequantised weight."""
    m, k, n, r = 21, 40, 24, 4
    q, absmax, code, w = _quantized(n, k, "nf4", device=device)
    x, a, b, _ = _inputs(m, k, n, r, torch.float32, device, bias=False)
    g = torch.randn(m, n, device=device)
    with peftops.use_backend(backend):
        torch.manual_seed(3)
        y = nf4_op.lora_linear_nf4_raw(x, q, absmax, code, n, 64, a, b, scale=SCALE, dropout_p=0.4)
        torch.manual_seed(3)
        want = peftops.lora_linear(x, w, a, b, scale=SCALE, dropout_p=0.4)
    assert not torch.allclose(want, peftops.lora_linear(x, w, a, b, scale=SCALE))  # dropout did act
    assert_close(y, want, name="y")
    for name, got, exp in zip(["dx", "dA", "dB"], _grads(y, [x, a, b], g), _grads(want, [x, a, b], g), strict=True):
        assert_close(got, exp, kind="bwd", name=name)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_opcheck(device, backend, dropout_p):
    q, absmax, code, _ = _quantized(12, 40, "nf4", device=device)
    x, a, b, bias = _inputs(5, 40, 12, 3, torch.float32, device)
    seed = torch.tensor(7, device=device) if dropout_p else None
    args = (x, q, absmax, code, 12, 64, torch.float32, a, b, bias, SCALE, dropout_p, seed, backend)
    torch.library.opcheck(torch.ops.peftops.lora_linear_nf4.default, args)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_compile_fullgraph_matches_eager(device, backend):
    q, absmax, code, _ = _quantized(12, 40, "nf4", device=device)
    x, a, b, bias = _inputs(6, 40, 12, 3, torch.float32, device)

    def fn(x, a, b, bias):
        with peftops.use_backend(backend):
            return nf4_op.lora_linear_nf4_raw(x, q, absmax, code, 12, 64, a, b, scale=SCALE, bias=bias)

    eager = fn(x, a, b, bias)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, a, b, bias)
    assert torch.equal(eager, compiled)
    g = torch.randn_like(eager)
    for got, exp in zip(_grads(compiled, [x, a, b, bias], g), _grads(eager, [x, a, b, bias], g), strict=True):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("device,backend", backend_params(OP))
def test_eager_path_is_the_registered_op(monkeypatch, device, backend):
    q, absmax, code, _ = _quantized(12, 40, "nf4", device=device)
    x, a, b, bias = _inputs(6, 40, 12, 3, torch.float32, device)
    g = torch.randn(6, 12, device=device)
    outs = {}
    for mode in ("eager", "op"):
        monkeypatch.setitem(nf4_op.EAGER_PATH, "mode", mode)
        with peftops.use_backend(backend):
            y = nf4_op.lora_linear_nf4_raw(x, q, absmax, code, 12, 64, a, b, scale=SCALE, bias=bias)
        outs[mode] = (y, *_grads(y, [x, a, b, bias], g))
    for got, exp in zip(outs["eager"], outs["op"], strict=True):
        assert torch.equal(got, exp)


def test_dequantize_blocks_is_the_reference_bit_for_bit():
    for quant_type in ("nf4", "fp4"):
        for blocksize in (64, 128):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                gen = torch.Generator().manual_seed(blocksize)
                w = torch.randn(23, 57, generator=gen).to(dtype)
                q, st = nf4.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False)
                got = nf4_op.dequantize_blocks(q, st.absmax, st.code, (23, 57), blocksize, dtype)
                assert torch.equal(got, nf4.dequantize_4bit(q, st)), (quant_type, blocksize, dtype)


@pytest.mark.parametrize("device,backend", backend_params(OP))
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16])
def test_double_quantised_state_and_its_dtype(device, backend, state_dtype):
    """The public call on a double-quantised state from a 16-bit weight, float32 x: W is the
    float32 product, not rounded through the state's dtype (bitsandbytes 0.50's matmul_4bit)."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, 70, generator=gen).to(state_dtype)
    q, state = nf4.quantize_4bit(w, compress_statistics=True)
    state = _to(state, device)
    q = q.to(device)
    x, a, b, bias = _inputs(9, 70, 24, 4, torch.float32, device)
    with peftops.use_backend(backend):
        y = peftops.lora_linear_nf4(x, q, state, a, b, scale=SCALE, bias=bias)
    absmax = nf4.dequantize_absmax(state)
    w_deq = nf4_op.dequantize_blocks(q, absmax, state.code.float(), state.shape, 64, torch.float32)
    assert not torch.equal(w_deq, nf4.dequantize_4bit(q, state).float())  # the two roundings differ here
    want = peftops.lora_linear(x, w_deq, a, b, scale=SCALE, bias=bias)
    assert_close(y, want, name="y")
    g = torch.randn_like(y)
    for name, got, exp in zip(["dx", "dA", "dB", "dbias"], _grads(y, [x, a, b, bias], g),
                              _grads(want, [x, a, b, bias], g), strict=True):  # fmt: skip
        assert_close(got, exp, kind="bwd", name=name)


def _to(state, device):
    fields = {f: getattr(state, f) for f in state.__dataclass_fields__}
    return type(state)(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in fields.items()})


def test_quant_state_of_another_kind_is_refused():
    q, absmax, code, _ = _quantized(12, 40, "nf4")
    x, a, b, _ = _inputs(5, 40, 12, 3, torch.float32, "cpu")
    with pytest.raises(TypeError, match="lora_linear_nf4: quant_state: expected a peftops QuantState4bit"):
        peftops.lora_linear_nf4(x, q, {"absmax": absmax}, a, b)


def _bad_cases():
    def base():
        q, absmax, code, _ = _quantized(12, 40, "nf4")
        x, a, b, bias = _inputs(5, 40, 12, 3, torch.float32, "cpu")
        return dict(x=x, qweight=q, absmax=absmax, code=code, out_features=12, blocksize=64, lora_a=a, lora_b=b,
                    bias=bias)  # fmt: skip

    return [
        (
            "qweight dtype",
            lambda t: t.update(qweight=t["qweight"].to(torch.int8)),
            TypeError,
            "qweight: expected uint8",
        ),
        ("qweight bytes", lambda t: t.update(qweight=t["qweight"][:-1]), ValueError, "qweight: expected 240 bytes"),
        ("absmax dtype", lambda t: t.update(absmax=t["absmax"].half()), TypeError, "absmax: expected float32"),
        ("absmax blocks", lambda t: t.update(absmax=t["absmax"][:-1]), ValueError, r"absmax: expected \(8,\)"),
        ("code", lambda t: t.update(code=t["code"][:8]), ValueError, "code: expected 16 float32"),
        ("blocksize", lambda t: t.update(blocksize=48), ValueError, "blocksize: expected one of"),
        ("out_features", lambda t: t.update(out_features=13), ValueError, "qweight: expected 260 bytes"),
        ("x dtype", lambda t: t.update(x=t["x"].double()), TypeError, "x: expected float16, bfloat16 or float32"),
        ("lora_b", lambda t: t.update(lora_b=t["lora_b"][:5]), ValueError, "lora_b"),
    ], base


@pytest.mark.parametrize("case", range(9))
def test_bad_input_is_rejected_with_a_named_argument(case):
    cases, base = _bad_cases()
    _, change, exc, match = cases[case]
    t = base()
    change(t)
    with pytest.raises(exc, match=f"lora_linear_nf4: {match}" if not match.startswith("lora_b") else match):
        nf4_op.lora_linear_nf4_raw(
            t["x"], t["qweight"], t["absmax"], t["code"], t["out_features"], t["blocksize"], t["lora_a"],
            t["lora_b"], bias=t["bias"], scale=SCALE,
        )  # fmt: skip
