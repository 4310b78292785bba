r"""The tolerance policy: one table per dtype, forward and backward, with the reasoning.

How a comparison works (:func:`assert_close`): ``actual`` passes against ``expected`` when,
element-wise and in float64,

    |actual - expected| <= atol * scale + rtol * |expected|,   scale = max(max |expected|, 1)

``atol`` is relative to the tensor's *scale*, not absolute: low-precision errors are
proportional to the magnitudes that flowed through the computation, so an element that
came out small through cancellation (a gradient entry near zero, say) is judged against
the size of its neighbours rather than against itself. Test inputs are drawn with unit
scale (weights scaled by 1/sqrt(fan_in)), so the intermediates are O(1) and these numbers
read as ulps of O(1) values; the floor of 1 on ``scale`` covers a tensor that cancels to
~0 as a whole (the query gradient of a row that sees a single key is exactly 0 in exact
arithmetic, and one rounding of its O(1) terms away from it in floating point). NaN or inf where ``expected`` is finite always fails.

Unit roundoff u: float64 1.1e-16, float32 6.0e-8, float16 4.9e-4, bfloat16 3.9e-3.

Forward. Every implementation accumulates in float32 and rounds the output once, so two
correct ones differ by at most one rounding each (2u relative) plus accumulation-order
noise in float32 (~sqrt(K) * 6e-8 for a K-long reduction: 8e-6 at K = 16384). Hence 4u for
the low-precision dtypes (a margin of 2x over two roundings) and 1e-5 for float32.

Backward. Looser by about 5x because gradients pass through more roundings: a kernel
rounds its intermediates (``x A^T``, ``g B``, the attention probabilities) to the input dtype
between GEMMs, each costing u relative to the intermediate's scale, and the weight
gradients sum over all tokens, so their entries carry the error of T rounded products.

float32 under TF32 (``torch.backends.cuda.matmul.allow_tf32``) has float16's 10-bit mantissa
in the GEMM inputs, so it uses the float16 row (``tolerance(..., tf32=True)``).

For attention-like kernels on the GPU, the FlashAttention rule applies as well
(:func:`check_fa_rule`): the kernel's error against a float32 reference must be at most
twice the error of the same computation written in PyTorch at the low precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tol:
    atol: float  # times max|expected|
    rtol: float  # times |expected| element-wise


# Four unit roundoffs (u = eps / 2): one rounding in each of two implementations, 2x margin.
_FOUR_U = {dt: 2 * torch.finfo(dt).eps for dt in (torch.float16, torch.bfloat16)}

FORWARD: dict[torch.dtype, Tol] = {
    torch.float64: Tol(atol=1e-12, rtol=1e-12),
    torch.float32: Tol(atol=1e-5, rtol=1e-5),
    torch.float16: Tol(atol=_FOUR_U[torch.float16], rtol=_FOUR_U[torch.float16]),  # 1.95e-3
    torch.bfloat16: Tol(atol=_FOUR_U[torch.bfloat16], rtol=_FOUR_U[torch.bfloat16]),  # 1.56e-2
}

BACKWARD: dict[torch.dtype, Tol] = {
    torch.float64: Tol(atol=1e-10, rtol=1e-10),
    torch.float32: Tol(atol=5e-5, rtol=5e-5),
    torch.float16: Tol(atol=1e-2, rtol=1e-2),
    torch.bfloat16: Tol(atol=8e-2, rtol=8e-2),
}


def tolerance(dtype: torch.dtype, kind: str = "fwd", *, tf32: bool = False) -> Tol:
    if kind not in ("fwd", "bwd"):
        raise ValueError(f"tolerance: kind: expected 'fwd' or 'bwd', got {kind!r}")
    if tf32 and dtype == torch.float32:
        dtype = torch.float16
    table = FORWARD if kind == "fwd" else BACKWARD
    if dtype not in table:
        raise ValueError(f"tolerance: dtype: expected one of {list(table)}, got {dtype}")
    return table[dtype]


def close_report(actual: Tensor, expected: Tensor, tol: Tol) -> str | None:
    """``None`` if ``actual`` is within ``tol`` of ``expected``, else a one-line explanation."""
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    if actual.numel() == 0:
        return None
    a, e = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    bad_values = ~torch.isfinite(a) & torch.isfinite(e)
    if bad_values.any():
        return f"{int(bad_values.sum())} non-finite values where the reference is finite"
    scale = max(e.abs().max().item(), 1.0)
    err = (a - e).abs()
    budget = tol.atol * scale + tol.rtol * e.abs()
    over = err > budget
    if over.any():
        idx = int(torch.argmax((err - budget).flatten()))
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape))
        return (
            f"{int(over.sum())}/{a.numel()} elements out of tolerance (atol={tol.atol:g}*scale, rtol={tol.rtol:g}); "
            f"worst at {where}: got {a.flatten()[idx].item():.6g}, expected {e.flatten()[idx].item():.6g}; "
            f"max abs err {err.max().item():.3g}, scale {scale:.3g}"
        )
    return None


def assert_close(
    actual: Tensor,
    expected: Tensor,
    *,
    dtype: torch.dtype | None = None,
    kind: str = "fwd",
    tf32: bool = False,
    name: str = "",
) -> None:
    """Assert ``actual`` matches ``expected`` under the table row for ``dtype`` (default: ``actual``'s)."""
    tol = tolerance(dtype or actual.dtype, kind, tf32=tf32)
    report = close_report(actual, expected, tol)
    if report is not None:
        raise AssertionError(f"{name or 'tensor'} ({actual.dtype}, {kind}): {report}")


def check_fa_rule(actual: Tensor, reference_fp32: Tensor, torch_lowp: Tensor) -> tuple[bool, float, float]:
    """FlashAttention's rule: ``max|actual - ref| <= 2 * max|torch_lowp - ref| + floor``.

    ``torch_lowp`` is the same computation done by plain PyTorch in ``actual``'s dtype;
    ``floor`` is one unit roundoff of ``actual``'s dtype at the reference's scale, so that a
    PyTorch result that happens to be exact does not demand an exact kernel.
    Returns ``(ok, kernel_error, budget)``.
    """
    ref = reference_fp32.detach().to(torch.float64)
    err = (actual.detach().to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    base = (torch_lowp.detach().to(torch.float64) - ref).abs().max().item() if ref.numel() else 0.0
    floor = torch.finfo(actual.dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
    budget = 2.0 * base + floor
    return err <= budget, err, budget
