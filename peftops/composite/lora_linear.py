r"""``lora_linear`` on the framework's GEMMs (the ``torch`` backend).

Forward, for ``x: (T, K)``, ``W: (N, K)``, ``A: (r, K)``, ``B: (N, r)``, scale ``s``, dropout
keep-mask ``m`` with probability ``1 - p``::

    x_d = x * m / (1 - p)                         (no pass at all without dropout)
    u   = x_d A^T                                 narrow GEMM, (T, r), saved unscaled
    y   = b + s u B^T                             narrow GEMM writing y (alpha = s)
    y  += x W^T                                   the big GEMM accumulating into y (beta = 1;
                                                  without a bias, y = u B^T and beta = s)

Backward, for ``g = dL/dy: (T, N)``; ``dL/du = g B`` and ``u = s x_d A^T`` give::

    v  = s g B                                    narrow GEMM, (T, r) (alpha = s)
    dB = s g^T u,  db = g^T 1                     one GEMM, s g^T [u | c] with c = 1 / s when s
                                                  is a power of two: (N, r + 1), reads g again;
                                                  db, when the bias trains, needs no pass of its
                                                  own (see _grad_b_and_bias for other s)
    dx = (v A) * m / (1 - p) + g W                narrow GEMM writing dx, then the big GEMM
                                                  accumulating into it (beta = 1)
    dA = v^T x_d                                  (r, K)
    dW = g^T x                                    only when the frozen base is trained
    db = sum_t g                                  its own pass only when dB is not trained

The mask is drawn in the forward from torch's generator for ``x.device`` (so it follows
``torch.manual_seed`` and is capturable in CUDA graphs) and returned for the backward to
save, one byte per element as ``nn.Dropout`` keeps it. The op's ``seed`` is not used.

Every GEMM accumulates in float32 inside the BLAS and rounds its output once; ``u`` and
``v`` are rounded to the activation dtype between the narrow GEMMs, as in the eager LoRA that
users write, but unscaled, so that a large ``s`` cannot overflow them in float16. This
backend's ``u`` is ``x_d A^T`` (the op's saved rank-r activation is each backend's own). GEMM reductions are deterministic for a given device and library.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..backends import OpImpl, register_impl
from ..ops.lora_linear import OP, SAVED_MASK, U_DTYPE, no_mask


def _keep(x2: Tensor, dropout_p: float) -> Tensor:
    return torch.rand(x2.shape, device=x2.device, dtype=torch.float32) >= dropout_p


def _dropped(x2: Tensor, keep: Tensor, dropout_p: float) -> Tensor:
    return x2 * keep * (1.0 / (1.0 - dropout_p))


def forward(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    if dropout_p > 0.0:
        keep = _keep(x2, dropout_p)
        xd = _dropped(x2, keep, dropout_p)
    else:
        keep, xd = no_mask(x.device), x2
    # u is kept unscaled (the scale rides on a GEMM's alpha or beta, which is free): the
    # backward below is its only reader.
    u = torch.mm(xd, lora_a.t())
    if bias is not None:
        y = torch.addmm(bias, u, lora_b.t(), alpha=scale)
        y.addmm_(x2, weight.t())
    else:
        y = torch.mm(u, lora_b.t())
        y.addmm_(x2, weight.t(), beta=scale)
    if x.dim() != 2:
        y, u = y.reshape(*lead, weight.shape[0]), u.reshape(*lead, lora_a.shape[0])
    return y, u, keep


def backward(grad, x, weight, lora_a, lora_b, lora_u, keep, scale, dropout_p, seed, output_mask):
    need_x, need_w, need_a, need_b, need_bias = output_mask
    n, k = weight.shape
    g = grad if grad.dim() == 2 else grad.reshape(-1, n)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    dx = dw = da = db_ = dbias = None
    r = lora_a.shape[0]
    # Scales ride on alpha with beta = 0 (the uninitialised input is then ignored, NaN
    # included): one GEMM each, no elementwise kernels, 5 launches in all without dropout.
    if need_x or need_a:
        v = torch.addmm(g.new_empty(g.shape[0], r), g, lora_b, beta=0, alpha=scale)  # s g B
    if need_b and need_bias and (ones := _ones_value(scale)) is not None:
        db_, dbias = _grad_b_and_bias(g, lora_u, r, scale, ones)
    elif need_b:
        u = lora_u if lora_u.dim() == 2 else lora_u.reshape(-1, r)
        db_ = torch.addmm(lora_b.new_empty(n, r), g.t(), u, beta=0, alpha=scale)
    if need_x:
        low = torch.mm(v, lora_a)
        if dropout_p > 0.0:
            low = _dropped(low, keep, dropout_p)
        dx = low.addmm_(g, weight)
        if x.dim() != 2:
            dx = dx.reshape(x.shape)
    if need_a:
        xd = _dropped(x2, keep, dropout_p) if dropout_p > 0.0 else x2
        da = torch.mm(v.t(), xd)
    if need_w:
        dw = torch.mm(g.t(), x2)
    if need_bias and dbias is None:
        # Without dB no GEMM here reduces over tokens (v and dx reduce over features; dW would
        # need x copied beside a ones column, more bytes than g): the sum is the one pass, and
        # torch.mv(g.t(), ones) would read g just the same.
        dbias = g.sum(0, dtype=torch.float64 if g.dtype == torch.float64 else torch.float32).to(grad.dtype)
    return dx, dw, da, db_, dbias


def _ones_value(scale: float) -> float | None:
    """The value ``c`` of the extra column beside u: a signed power of two with ``scale * c`` in
    ``(0.5, 1]``, so ``c`` is exact in every dtype and so are the products ``g * c``;
    ``scale * c == 1`` (db needs no correction) whenever ``|scale|`` is a power of two, as
    ``alpha / r`` usually is. None for a scale outside ``[2**-14, 2**14]`` in magnitude (0
    included), where ``c`` would leave fp16's normal range or scale bf16 values near float32's
    limits."""
    if not 2.0**-14 <= abs(scale) <= 2.0**14:
        return None
    mantissa, exponent = math.frexp(abs(scale))  # |scale| = mantissa * 2**exponent, mantissa in [0.5, 1)
    c = 2.0 ** (1 - exponent) if mantissa == 0.5 else 2.0**-exponent
    return math.copysign(c, scale)


def _grad_b_and_bias(g: Tensor, lora_u: Tensor, r: int, scale: float, c: float) -> tuple[Tensor, Tensor]:
    """``dB = s g^T u`` and ``db = g^T 1`` as one GEMM, ``s g^T [u | c]``: g is read once.

    The GEMM's alpha stays ``s``, so dB is rounded once from the BLAS's float32 accumulator as
    before, and the last column is ``round(s c sum_t g)``: with ``s c = 1`` that is db rounded
    once from a float32 sum, as ``g.sum(0, dtype=float32)`` gives; otherwise (``s c`` in
    (0.5, 1), so it cannot overflow where db does not) it is divided by ``s c`` in float32,
    which rounds db a second time. Cost: ``[u | c]`` is written (T x (r + 1)) and u read once
    more, against a read of g (T x out) saved. The buffer's rows are padded to a multiple of
    8 elements, so that 16-bit rows stay 16-byte aligned for the BLAS."""
    t, n = g.shape
    width = (r + 1 + 7) // 8 * 8
    uc = torch.empty((t, width), dtype=g.dtype, device=g.device)[:, : r + 1]
    uc[:, :r].copy_(lora_u if lora_u.dim() == 2 else lora_u.reshape(-1, r))
    uc[:, r].fill_(c)
    both = torch.addmm(g.new_empty(n, r + 1), g.t(), uc, beta=0, alpha=scale)
    # The op's gradient is contiguous (its fake says so): one copy of out x r elements.
    db_ = both[:, :r].contiguous()
    last = both[:, r]
    sc = scale * c
    if sc != 1.0:
        acc = torch.float64 if g.dtype == torch.float64 else torch.float32
        last = (last.to(acc) / sc).to(g.dtype)
    return db_, last.contiguous()


def _saved_mask(x: Tensor, dropout_p: float) -> tuple[tuple[int, ...], torch.dtype]:
    if dropout_p > 0.0:
        return (x.numel() // x.shape[-1], x.shape[-1]), torch.bool
    return (0,), torch.bool


register_impl(
    OP,
    "torch",
    OpImpl(forward=forward, backward=backward, extras={SAVED_MASK: _saved_mask, U_DTYPE: lambda x: x.dtype}),
)
