"""``peftops.bottleneck_adapter``: validation, backend dispatch, ``torch.library`` registration."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from ..backends import OpImpl, register_impl, resolve_backend
from ..reference import ACTIVATIONS
from ..reference.bottleneck_adapter import multi_bottleneck_adapter as multi_reference
from ..reference.bottleneck_adapter import (
    multi_bottleneck_adapter_backward,
)
from ..reference.multi_lora_linear import rank_mask, token_groups
from . import validate as check
from .dispatch import run_backward, run_forward

OP = "bottleneck_adapter"
# The per-row banks (``adapter_ids=``) are an op of their own: other shapes, other backends.
MULTI_OP = "multi_bottleneck_adapter"


# Returns ``(y, h)`` with ``h = x Wd^T + bd`` the pre-activation, shape (..., r), in float32
# (float64 for float64 inputs): T x r, tiny next to x, saved so that the backward needs no
# extra pass over x to recompute it.
@torch.library.custom_op("peftops::bottleneck_adapter", mutates_args=())
def _bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    residual: Tensor | None,
    activation: str,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(
        OP, backend, x.device, x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale
    )


@_bottleneck_adapter.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((*x.shape[:-1], down_weight.shape[0]), dtype=acc)


@torch.library.custom_op(
    "peftops::bottleneck_adapter_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor hidden, "
    "str activation, float scale, bool serial, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _bottleneck_adapter_backward(
    grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask, backend
):
    return run_backward(
        OP,
        backend,
        x.device,
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        hidden,
        activation,
        scale,
        serial,
        output_mask,
    )


@_bottleneck_adapter_backward.register_fake
def _(grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask, backend):
    rank, d = down_weight.shape
    shapes = ((x, x.shape), (down_weight, (rank, d)), (down_weight, (rank,)), (up_weight, (d, rank)), (up_weight, (d,)))
    return tuple(t.new_empty(s) if need else None for (t, s), need in zip(shapes, output_mask, strict=False))


def _setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, backend = inputs
    _, hidden = output
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, hidden)
    ctx.activation, ctx.scale, ctx.backend, ctx.serial = activation, scale, backend, residual is None
    ctx.mark_non_differentiable(hidden)


def _backward(ctx, grad, grad_hidden):
    x, down_weight, down_bias, up_weight, hidden = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dwd, dbd, dwu, dbu = _bottleneck_adapter_backward(
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        hidden,
        ctx.activation,
        ctx.scale,
        ctx.serial,
        list(need[:5]),
        ctx.backend,
    )
    # The parallel form's residual enters y with coefficient 1.
    dres = grad if need[5] else None
    return dx, dwd, dbd, dwu, dbu, dres, None, None, None


_bottleneck_adapter.register_autograd(_backward, setup_context=_setup_context)


# The registered op takes (residual, activation, scale), the order the kernels' entry points
# use; the spec takes the public op's. Keywords keep the two from being crossed.
def reference_forward(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale):
    y = reference.bottleneck_adapter(
        x, down_weight, down_bias, up_weight, up_bias, activation=activation, scale=scale, residual=residual
    )
    return y, reference.adapter_hidden(x, down_weight, down_bias)


def reference_backward(grad, x, down_weight, down_bias, up_weight, hidden, activation, scale, serial, output_mask):
    # The spec recomputes the pre-activation from x rather than use the saved one.
    return reference.bottleneck_adapter_backward(
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        activation=activation,
        scale=scale,
        serial=serial,
        output_mask=output_mask,
    )


register_impl(OP, "reference", OpImpl(forward=reference_forward, backward=reference_backward))


# -- per-row adapter banks: peftops::multi_bottleneck_adapter -------------------------------


# Works on 2-D ``x: (T, d)`` with per-token int64 ids; the public function flattens and expands.
# Returns ``(y, h)``, ``h: (T, r_max)`` the rank-masked pre-activation in the accumulation dtype
# (zero for tokens without an adapter), saved for the backward.
@torch.library.custom_op("peftops::multi_bottleneck_adapter", mutates_args=())
def _multi_bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    adapter_ids: Tensor,
    ranks: Tensor | None,
    residual: Tensor | None,
    activation: str,
    scale: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_forward(
        MULTI_OP,
        backend,
        x.device,
        x,
        down_weight,
        down_bias,
        up_weight,
        up_bias,
        adapter_ids,
        ranks,
        residual,
        activation,
        scale,
    )


@_multi_bottleneck_adapter.register_fake
def _(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((x.shape[0], down_weight.shape[1]), dtype=acc)


@torch.library.custom_op(
    "peftops::multi_bottleneck_adapter_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor down_weight, Tensor? down_bias, Tensor up_weight, Tensor adapter_ids, "
    "Tensor? ranks, Tensor hidden, str activation, float scale, bool serial, bool[] output_mask, str backend) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)",
)
def _multi_bottleneck_adapter_backward(
    grad,
    x,
    down_weight,
    down_bias,
    up_weight,
    adapter_ids,
    ranks,
    hidden,
    activation,
    scale,
    serial,
    output_mask,
    backend,
):
    return run_backward(
        MULTI_OP,
        backend,
        x.device,
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        adapter_ids,
        ranks,
        hidden,
        activation,
        scale,
        serial,
        output_mask,
    )


@_multi_bottleneck_adapter_backward.register_fake
def _(
    grad,
    x,
    down_weight,
    down_bias,
    up_weight,
    adapter_ids,
    ranks,
    hidden,
    activation,
    scale,
    serial,
    output_mask,
    backend,
):
    num, r_max, d = down_weight.shape
    shapes = (
        (x, x.shape),
        (down_weight, (num, r_max, d)),
        (down_weight, (num, r_max)),
        (up_weight, (num, d, r_max)),
        (up_weight, (num, d)),
    )
    return tuple(t.new_empty(s) if need else None for (t, s), need in zip(shapes, output_mask, strict=False))


def _multi_setup_context(ctx, inputs, output):
    x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale, backend = inputs
    _, hidden = output
    ctx.save_for_backward(x, down_weight, down_bias, up_weight, adapter_ids, ranks, hidden)
    ctx.activation, ctx.scale, ctx.backend, ctx.serial = activation, scale, backend, residual is None
    ctx.mark_non_differentiable(hidden)


def _multi_backward(ctx, grad, grad_hidden):
    x, down_weight, down_bias, up_weight, adapter_ids, ranks, hidden = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dwd, dbd, dwu, dbu = _multi_bottleneck_adapter_backward(
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        adapter_ids,
        ranks,
        hidden,
        ctx.activation,
        ctx.scale,
        ctx.serial,
        list(need[:5]),
        ctx.backend,
    )
    # Every token's output holds its residual with coefficient 1, adapter or not.
    dres = grad if need[7] else None
    return dx, dwd, dbd, dwu, dbu, None, None, dres, None, None, None


_multi_bottleneck_adapter.register_autograd(_multi_backward, setup_context=_multi_setup_context)


def multi_reference_forward(
    x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale
):
    return multi_reference(
        x,
        down_weight,
        down_bias,
        up_weight,
        up_bias,
        adapter_ids,
        ranks=ranks,
        activation=activation,
        scale=scale,
        residual=residual,
    )


def multi_reference_backward(
    grad, x, down_weight, down_bias, up_weight, adapter_ids, ranks, hidden, activation, scale, serial, output_mask
):
    # The spec recomputes the pre-activation from x rather than use the saved one.
    return multi_bottleneck_adapter_backward(
        grad,
        x,
        down_weight,
        down_bias,
        up_weight,
        adapter_ids,
        ranks,
        activation=activation,
        scale=scale,
        serial=serial,
        output_mask=output_mask,
    )


register_impl(MULTI_OP, "reference", OpImpl(forward=multi_reference_forward, backward=multi_reference_backward))


# -- the torch backend for the banks ----------------------------------------------------------
#
# Tokens grouped by adapter without a host synchronisation (so CUDA graphs can capture it):
# the tokens are sorted by adapter and cut into tiles of ``bm`` rows that each hold one
# adapter's tokens (the idea of the multi-LoRA kernels' tile table). The number of tiles has a
# bound known from the shapes alone, ``T // bm + min(N, T)``, and ``bm`` follows the mean
# group size, so at most about 3 T rows are computed, padding included. Each tile gathers its
# adapter's weights and the tiles run as one batched GEMM per product. The cost: every tile
# computes at rank r_max (a rank-r slot's padding is zeroed by selection, so the result is the
# rank-r one; it is the triton backend's to skip the padding), and the gathered weights take
# (tiles x r_max x d) per matrix.


class _Tiles:
    """The tile table of one call: for tile k, its adapter ``ad[k]`` (``N`` for a tile past
    the last one in use), the token of each of its rows ``tok[k, i]`` (``T``, a sentinel row,
    where the row is padding) and ``valid[k, i]``."""

    def __init__(self, adapter_ids: Tensor, num: int) -> None:
        tokens = adapter_ids.shape[0]
        device = adapter_ids.device
        groups = max(1, min(num, tokens))
        mean = max(1, tokens // groups)
        self.bm = bm = min(128, 1 << (mean - 1).bit_length())
        n_tiles = tokens // bm + groups
        _, group = token_groups(adapter_ids, num)
        order = torch.argsort(group, stable=True)  # the tokens without an adapter (group N) last
        # scatter_add into a fixed size, not bincount: bincount sizes its output from max(group),
        # a read-back that would break CUDA graph capture.
        counts = torch.zeros(num + 1, dtype=torch.int64, device=device).scatter_add_(0, group, torch.ones_like(group))
        counts = counts[:num]
        starts = torch.cumsum(counts, 0) - counts
        per = (counts + bm - 1) // bm
        ends = torch.cumsum(per, 0)
        k = torch.arange(n_tiles, device=device)
        ad = torch.searchsorted(ends, k, right=True)
        safe = ad.clamp(max=num - 1)
        first_row = starts[safe] + (k - (ends - per)[safe]) * bm
        rows = first_row[:, None] + torch.arange(bm, device=device)
        self.valid = (ad < num)[:, None] & (rows < (starts + counts)[safe][:, None])
        self.tok = torch.where(self.valid, order[rows.clamp(max=max(tokens - 1, 0))], tokens)
        self.ad, self.safe = ad, safe

    def gather(self, t: Tensor) -> Tensor:
        """``t[tok]`` for a per-token ``t`` (padding rows read the last token; masked later)."""
        return t[self.tok.clamp(max=t.shape[0] - 1)]

    def scatter(self, out: Tensor, values: Tensor, *, accumulate: bool = False) -> Tensor:
        """``out[tok] = values`` (or ``+=``) for an ``out`` with the sentinel row ``T`` appended,
        which takes the padding rows' values and is dropped."""
        out.index_put_((self.tok.reshape(-1),), values.reshape(-1, *values.shape[2:]), accumulate=accumulate)
        return out[:-1]

    def per_slot(self, per_tile: Tensor, num: int) -> Tensor:
        """Sum the tiles of each adapter (tiles past the last one in use land in slot N, dropped)."""
        out = per_tile.new_zeros((num + 1, *per_tile.shape[1:]))
        return out.index_add_(0, self.ad, per_tile)[:num]


def _tile_weights(tiles: _Tiles, down_weight, down_bias, up_weight, ranks):
    """Each tile's adapter: ``(Wd, bd, Wu, mask)``, the rank padding zeroed by selection (an
    inf there must not become NaN in a product) and the mask ``(tiles, bm, r_max)`` also false
    on padding rows."""
    num, r_max, _ = down_weight.shape
    in_rank = rank_mask(ranks, num, r_max, down_weight.device)[tiles.safe]  # (tiles, r_max)
    wd = torch.where(in_rank[:, :, None], down_weight[tiles.safe], 0.0)
    wu = torch.where(in_rank[:, None, :], up_weight[tiles.safe], 0.0)
    bd = None if down_bias is None else down_bias[tiles.safe]
    return wd, bd, wu, in_rank[:, None, :] & tiles.valid[:, :, None]


def torch_forward(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tokens, d = x.shape
    num, r_max, _ = down_weight.shape
    res = x if residual is None else residual
    if num == 0 or tokens == 0:
        return res.clone(memory_format=torch.contiguous_format), x.new_zeros((tokens, r_max), dtype=acc)
    tiles = _Tiles(adapter_ids, num)
    wd, bd, wu, mask = _tile_weights(tiles, down_weight, down_bias, up_weight, ranks)
    xs = tiles.gather(x)  # (tiles, bm, d)
    h = torch.bmm(xs, wd.transpose(1, 2)).to(acc)
    if bd is not None:
        h = h + bd.to(acc)[:, None, :]
    h = torch.where(mask, h, 0.0)
    a = torch.where(mask, reference.activation(h, activation), 0.0)
    z = torch.bmm(a.to(x.dtype), wu.transpose(1, 2)).to(acc)
    if up_bias is not None:
        z = z + up_bias[tiles.safe].to(acc)[:, None, :]
    ys = (tiles.gather(res).to(acc) + scale * z).to(x.dtype)
    y = tiles.scatter(torch.cat([res, res.new_empty((1, d))]), ys)
    hidden = tiles.scatter(h.new_zeros((tokens + 1, r_max)), h)
    return y.contiguous(), hidden


def torch_backward(
    grad, x, down_weight, down_bias, up_weight, adapter_ids, ranks, hidden, activation, scale, serial, output_mask
):
    need_x, need_wd, need_bd, need_wu, need_bu = output_mask
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tokens, d = x.shape
    num, r_max, _ = down_weight.shape
    dx = dwd = dbd = dwu = dbu = None
    if num == 0 or tokens == 0:
        if need_x:
            dx = grad.clone() if serial else torch.zeros_like(x)
        zeros = (
            down_weight.new_zeros(down_weight.shape),
            down_weight.new_zeros((num, r_max)),
            up_weight.new_zeros(up_weight.shape),
            up_weight.new_zeros((num, d)),
        )
        dwd, dbd, dwu, dbu = (z if need else None for z, need in zip(zeros, output_mask[1:], strict=True))
        return dx, dwd, dbd, dwu, dbu
    tiles = _Tiles(adapter_ids, num)
    wd, _, wu, mask = _tile_weights(tiles, down_weight, None, up_weight, ranks)
    h = tiles.gather(hidden)
    # The padding rows read some token's gradient: zeroed here, so no slot sums them.
    dz = torch.where(tiles.valid[:, :, None], scale * tiles.gather(grad).to(acc), 0.0)
    if need_wu:
        a = torch.where(mask, reference.activation(h, activation), 0.0)
        dwu = tiles.per_slot(torch.bmm(dz.transpose(1, 2).to(x.dtype), a.to(x.dtype)).to(acc), num)
        dwu = dwu.to(up_weight.dtype)
    if need_bu:
        dbu = tiles.per_slot(dz.sum(1), num).to(grad.dtype)
    if need_x or need_wd or need_bd:
        dh = torch.bmm(dz.to(x.dtype), wu).to(acc) * reference.activation_grad(h, activation)
        dh = torch.where(mask, dh, 0.0)
        if need_x:
            base = grad.to(acc) if serial else grad.new_zeros((tokens, d), dtype=acc)
            dxs = torch.bmm(dh.to(x.dtype), wd).to(acc)
            dx = tiles.scatter(torch.cat([base, base.new_zeros((1, d))]), dxs, accumulate=True).to(x.dtype)
        if need_wd:
            xs = tiles.gather(x)
            dwd = tiles.per_slot(torch.bmm(dh.transpose(1, 2).to(x.dtype), xs).to(acc), num).to(down_weight.dtype)
        if need_bd:
            dbd = tiles.per_slot(dh.sum(1), num).to(grad.dtype)
    return dx, dwd, dbd, dwu, dbu


# Registered as the torch backend by peftops.composite.multi_bottleneck_adapter (the backend
# is declared there, after peftops.ops is imported).


def _check_bank_values(ids: Tensor, num: int, ranks: Tensor | None, r_max: int) -> None:
    """Ids in ``[-1, N)`` and ranks in ``[1, r_max]``, one read-back for both (int64
    comparisons: an int8 id must not wrap). Skipped while ``torch.compile`` traces and during
    CUDA graph capture (see :func:`bottleneck_adapter` for what unchecked values mean)."""
    if torch.compiler.is_compiling() or (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    ids = ids.to(torch.int64)
    bad_ids = (ids < -1) | (ids >= num)
    checks = [bad_ids.any()]
    if ranks is not None:
        ranks64 = ranks.to(torch.int64)
        bad_ranks = (ranks64 < 1) | (ranks64 > r_max)
        checks.append(bad_ranks.any())
    found = torch.stack(checks).tolist()
    if found[0]:
        raise ValueError(
            f"{OP}: adapter_ids: expected adapter ids (-1 = no adapter) in [-1, {num - 1}], got {ids[bad_ids][0].item()}"
        )
    if ranks is not None and found[1]:
        raise ValueError(f"{OP}: ranks: expected ranks in [1, {r_max}], got {ranks64[bad_ranks][0].item()}")


def _multi(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale):
    """The banked form of :func:`bottleneck_adapter`, arguments already checked up to their shapes."""
    check.tensor(OP, "down_weight", down_weight, 3)
    check.tensor(OP, "up_weight", up_weight, 3)
    for name, t in (("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None:
            check.tensor(OP, name, t, 2)
    for name, t in (("adapter_ids", adapter_ids), ("ranks", ranks)):
        if t is None:
            continue
        check.tensor(OP, name, t, floating=False)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"{OP}: {name}: expected an integer tensor, got {t.dtype}")
    # -1 (no adapter) does not exist in an unsigned dtype: uint8 would bring it as 255.
    if not adapter_ids.dtype.is_signed:
        raise TypeError(
            f"{OP}: adapter_ids: expected a signed integer dtype (-1 = no adapter), got {adapter_ids.dtype}"
        )
    if ranks is not None:
        check.tensor(OP, "ranks", ranks, 1, floating=False)
    x, down_weight, down_bias, up_weight, up_bias, residual = check.autocast(
        x.device.type, x, down_weight, down_bias, up_weight, up_bias, residual
    )
    check.same_dtype_device(
        OP,
        "x",
        x,
        (
            ("down_weight", down_weight),
            ("down_bias", down_bias),
            ("up_weight", up_weight),
            ("up_bias", up_bias),
            ("residual", residual),
        ),
    )
    for name, t in (("adapter_ids", adapter_ids), ("ranks", ranks)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP}: {name}: expected device {x.device} (the device of x), got {t.device}")
    d = x.shape[-1]
    num, r_max = down_weight.shape[0], down_weight.shape[1]
    if d == 0:
        raise ValueError(f"{OP}: x: expected a feature dim d >= 1, got shape {tuple(x.shape)}")
    check.shape(OP, "down_weight", down_weight, (None, None, d), f"(N, r_max, d) with d={d} from x")
    if r_max == 0:
        raise ValueError(
            f"{OP}: down_weight: expected r_max >= 1 (dim 1 of (N, r_max, d)), got shape {tuple(down_weight.shape)}"
        )
    check.shape(
        OP,
        "up_weight",
        up_weight,
        (num, d, r_max),
        f"(N, d, r_max) with d={d} from x, N={num}, r_max={r_max} from down_weight",
    )
    if down_bias is not None:
        check.shape(
            OP, "down_bias", down_bias, (num, r_max), f"(N, r_max) with N={num}, r_max={r_max} from down_weight"
        )
    if up_bias is not None:
        check.shape(OP, "up_bias", up_bias, (num, d), f"(N, d) with N={num} from down_weight, d={d} from x")
    if ranks is not None:
        check.shape(OP, "ranks", ranks, (num,), f"(N,) with N={num} from down_weight")
    if residual is not None:
        check.shape(OP, "residual", residual, tuple(x.shape), "(the shape of x)")
    lead = x.shape[:-1]
    if tuple(adapter_ids.shape) == tuple(lead):
        ids = adapter_ids.reshape(-1)
    elif x.dim() >= 3 and tuple(adapter_ids.shape) == tuple(lead[:1]):
        ids = adapter_ids.reshape(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)
    else:
        raise ValueError(
            f"{OP}: adapter_ids: expected shape {tuple(lead)} (one per token) or "
            f"{tuple(lead[:1])} (one per row, for x with 3+ dims), got {tuple(adapter_ids.shape)}"
        )
    _check_bank_values(ids, num, ranks, r_max)
    x2 = x.reshape(-1, d)
    res2 = None if residual is None else residual.reshape(-1, d)
    # int64 for every backend: ids compared with N in a narrower dtype would wrap (int8, N = 200).
    ids = ids.to(torch.int64).contiguous()
    args = (x2, down_weight, down_bias, up_weight, up_bias, ids, ranks, res2, activation, scale)
    backend = resolve_backend(MULTI_OP, x.device, args)
    y, _ = _multi_bottleneck_adapter(*args, backend)
    return y.reshape(x.shape)


def bottleneck_adapter(
    x: Tensor,
    down_weight: Tensor,
    down_bias: Tensor | None,
    up_weight: Tensor,
    up_bias: Tensor | None,
    *,
    activation: str = "gelu",
    scale: float = 1.0,
    residual: Tensor | None = None,
    adapter_ids: Tensor | None = None,
    ranks: Tensor | None = None,
) -> Tensor:
    r"""Bottleneck adapter: ``y = residual + scale * (act(x Wd^T + bd) Wu^T + bu)``.

    Args:
        x: ``(..., d)`` adapter input.
        down_weight: ``(r, d)``; down_bias: ``(r,)`` or ``None``.
        up_weight: ``(d, r)``; up_bias: ``(d,)`` or ``None``.
        activation: ``relu``, ``gelu`` (erf), ``gelu_tanh`` or ``silu``.
        scale: multiplies the adapter branch.
        residual: ``None`` for a serial adapter (Houlsby/Pfeiffer: ``residual = x``), or a
            tensor of the shape of ``x`` for a parallel adapter (He et al. 2022).

        adapter_ids: ``None`` for one adapter, or a bank of ``N`` adapters stacked in slots
            (the spec: :func:`peftops.reference.bottleneck_adapter.multi_bottleneck_adapter`):
            ``down_weight (N, r_max, d)``, ``down_bias (N, r_max)``, ``up_weight (N, d, r_max)``,
            ``up_bias (N, d)``, and ``adapter_ids`` a signed integer tensor (int8 to int64) with one
            id per token (``x.shape[:-1]``) or one per row of the first dimension (``(B,)`` for
            ``x: (B, L, d)``), values in ``[-1, N)``; ``-1`` means no adapter (``y = residual``,
            or ``x`` for the serial form). Activation and scale are shared by the bank.
        ranks: with ``adapter_ids`` only: ``(N,)`` integer in ``[1, r_max]``, or ``None`` (every
            slot uses ``r_max``). Slot a uses its first ``ranks[a]`` rows of ``down_weight`` and
            columns of ``up_weight`` and computes exactly what the single adapter with weights
            cut to that rank does; its padding is never read and gets zero gradient.

    ``d`` and ``r`` must be at least 1; the batch dims may be empty. A bank may have ``N = 0``
    slots (every id -1).

    Banks: each slot gets exactly the gradient its own tokens give it and a slot no token
    names gets zeros, its weights unread. Backends: ``reference``; ``torch`` (tokens grouped
    by adapter without a host synchronisation, so CUDA graphs can capture it; every tile
    computes at ``r_max``); ``triton`` (:mod:`peftops.kernels.multi_bottleneck_adapter`, the
    multi-LoRA tile table, loads masked at each slot's rank). In eager mode ids and ranks are checked on the host (one
    synchronisation; ``ValueError`` naming the argument). While ``torch.compile`` traces and
    during CUDA graph capture nothing can be read back, so nothing is checked, and every
    backend gives unchecked values one meaning, never an error or an out-of-bounds access: an
    id outside ``[-1, N)`` means no adapter, like -1; a rank above ``r_max`` means ``r_max``
    and one below 1 means an adapter branch of ``bu`` alone (``act(0) = 0``).
    """
    check.tensor(OP, "x", x)
    check.min_dims(OP, "x", x, 1)
    if residual is not None:
        check.tensor(OP, "residual", residual)
    if not isinstance(activation, str):
        raise TypeError(f"{OP}: activation: expected a str, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation: expected one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
    scale = check.finite_float(OP, "scale", scale)
    if adapter_ids is not None:
        return _multi(x, down_weight, down_bias, up_weight, up_bias, adapter_ids, ranks, residual, activation, scale)
    if ranks is not None:
        raise ValueError(f"{OP}: ranks: expected None without adapter_ids (one adapter has one rank), got a tensor")
    check.tensor(OP, "down_weight", down_weight, 2)
    check.tensor(OP, "up_weight", up_weight, 2)
    for name, t in (("down_bias", down_bias), ("up_bias", up_bias)):
        if t is not None:
            check.tensor(OP, name, t, 1)
    x, down_weight, down_bias, up_weight, up_bias, residual = check.autocast(
        x.device.type, x, down_weight, down_bias, up_weight, up_bias, residual
    )
    check.same_dtype_device(
        OP,
        "x",
        x,
        (
            ("down_weight", down_weight),
            ("down_bias", down_bias),
            ("up_weight", up_weight),
            ("up_bias", up_bias),
            ("residual", residual),
        ),
    )
    d = x.shape[-1]
    rank = down_weight.shape[0]
    if d == 0:
        raise ValueError(f"{OP}: x: expected a feature dim d >= 1, got shape {tuple(x.shape)}")
    check.shape(OP, "down_weight", down_weight, (None, d), f"(r, d) with d={d} from x")
    # r = 0 would be the identity, but the kernels' rank-r blocks cannot be empty: refused here,
    # before any backend runs, rather than failing in one backend's backward.
    if rank == 0:
        raise ValueError(f"{OP}: down_weight: expected a bottleneck width r >= 1, got shape {tuple(down_weight.shape)}")
    check.shape(OP, "up_weight", up_weight, (d, rank), f"(d, r) with d={d} from x, r={rank} from down_weight")
    if down_bias is not None:
        check.shape(OP, "down_bias", down_bias, (rank,), f"(r,) with r={rank} from down_weight")
    if up_bias is not None:
        check.shape(OP, "up_bias", up_bias, (d,), f"(d,) with d={d} from x")
    if residual is not None:
        check.shape(OP, "residual", residual, tuple(x.shape), "(the shape of x)")

    backend = resolve_backend(
        OP, x.device, (x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale)
    )
    y, _ = _bottleneck_adapter(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, backend)
    return y
