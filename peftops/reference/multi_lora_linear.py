r"""Multi-tenant LoRA, the spec: every token of a batch with its own adapter.

With ``N`` adapters stacked in fixed-capacity slots, ``A: (N, r_max, in)``, ``B: (N, out, r_max)``,
per-adapter scales ``s: (N,)`` and ranks ``r: (N,)`` (adapter ``a`` uses its first ``r_a``
rank slots; the rest are padding that neither computes nor receives gradient), and one adapter
id per token ``id_t`` (``-1``: the base layer only)::

    M_a   = [j < r_a]                                  (r_max,) rank mask of adapter a
    u_t   = s_a * (x_d,t A_a^T) * M_a                  (r_max,) with a = id_t; 0 when id_t = -1
    y_t   = x_t W^T + b + u_t B_a^T

Backward, for ``g_t = dL/dy_t``::

    v_t   = s_a * (g_t B_a) * M_a                      (r_max,)
    dx_t  = g_t W + (v_t A_a) * m_t / (1 - p)
    dA_a  = sum_{t: id_t = a} v_t^T x_d,t              rows >= r_a stay 0
    dB_a  = sum_{t: id_t = a} g_t^T u_t                columns >= r_a stay 0
    dW    = g^T x,  db = sum_t g                       (only when the base is trained)

so each adapter's gradient is exactly the one it would get from a batch of its own tokens
alone, and the slots of adapters absent from the batch get zeros. ``x_d`` is x with the LoRA
dropout applied (``keep`` mask, scaled by ``1 / (1 - p)``), as in :mod:`.lora_linear`.

A base-only token reads no slot and writes no slot's gradient: its ``y_t`` is ``x_t W^T + b``
exactly, whatever the slots hold (inf or NaN included), and an inf or NaN in its ``x_t`` or
``g_t`` reaches no adapter. The same holds for an id outside ``[-1, N)``, which the op refuses
in eager mode but cannot check under ``torch.compile`` or CUDA graph capture: such a token is
base-only, as in the kernels. Likewise the rank padding is never read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import acc_dtype


def rank_mask(ranks: Tensor | None, num_adapters: int, r_max: int, device) -> Tensor:
    """``(N, r_max)`` bool: True where a rank slot is in use (everywhere without ``ranks``).

    A rank above ``r_max`` uses every slot and one below 1 none, as in the kernels."""
    if ranks is None:
        return torch.ones(num_adapters, r_max, dtype=torch.bool, device=device)
    return torch.arange(r_max, device=device)[None, :] < ranks.to(device=device, dtype=torch.int64)[:, None]


def token_groups(adapter_ids: Tensor, num_adapters: int) -> tuple[Tensor, Tensor]:
    """``(has_adapter, group)`` per token: whether its id names a slot in ``[0, N)``, and its
    group, that slot or ``N`` for the base-only tokens. An id outside ``[-1, N)`` is base-only
    too (the op range-checks ids in eager mode only)."""
    ids = adapter_ids.to(torch.int64)  # compared with N in int64: an int8 id must not wrap
    has = (ids >= 0) & (ids < num_adapters)
    return has, torch.where(has, ids, num_adapters)


def _per_token(t: Tensor, group: Tensor) -> Tensor:
    """``t[group]`` with one more all-zero slot ``N`` appended: base-only tokens gather zeros
    instead of some adapter's values, and under autograd their gradients land in that extra
    slot, which is dropped, instead of in a real one."""
    return torch.cat([t, t.new_zeros((1, *t.shape[1:]))])[group]


def _parts(x, lora_a, lora_b, adapter_ids, scales, ranks, keep, dropout_p, acc):
    """Per token ``(x_d, A_t, B_t, s_t, has)``: the dropped input, zero in base-only rows, and
    each token's own adapter with its rank padding zeroed (all zeros for base-only tokens).

    Selections, never multiplications by 0, keep the parts that do not take part out of the
    result: inf * 0 is NaN, and an inf or NaN in an unused slot, in the rank padding or in a
    base-only row must not reach anything else (the kernels skip all three)."""
    n, r_max = lora_a.shape[0], lora_a.shape[1]
    mask = rank_mask(ranks, n, r_max, x.device)
    has, group = token_groups(adapter_ids, n)
    xd = x.to(acc) if keep is None else torch.where(keep, x.to(acc) / (1.0 - dropout_p), 0.0)
    xd = torch.where(has[:, None], xd, 0.0)
    a_t = _per_token(torch.where(mask[:, :, None], lora_a.to(acc), 0.0), group)  # (T, r_max, in)
    b_t = _per_token(torch.where(mask[:, None, :], lora_b.to(acc), 0.0), group)  # (T, out, r_max)
    s_t = _per_token(scales.to(acc), group)  # (T,)
    return xd, a_t, b_t, s_t, has


def _activation(xd: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    """``u_t = s_a * (x_d,t A_a^T)``, the rank mask already in ``a_t``."""
    return s_t[:, None] * torch.einsum("ti,tri->tr", xd, a_t)


def _sum_per_adapter(per_token: Tensor, group: Tensor, num_adapters: int) -> Tensor:
    """``out[a] = sum over the tokens of adapter a`` with ``index_add`` (a fixed order); the
    base-only tokens' group ``N`` is summed apart and dropped."""
    out = per_token.new_zeros((num_adapters + 1, *per_token.shape[1:]))
    return out.index_add_(0, group, per_token)[:num_adapters]


def multi_lora_linear(
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_ids: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    ranks: Tensor | None = None,
    keep: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(y, u)`` for ``x: (T, in)`` and ``adapter_ids: (T,)``, accumulated in float32 and rounded
    once; ``u: (T, r_max)`` is the rank-r activation of the module docstring.

    Readable, not fast: every token gathers its own adapter (``T x r_max x in`` floats), which
    is fine at test sizes. Differentiable with plain autograd (the explicit backward below is
    checked against it)."""
    acc = acc_dtype(x.dtype)
    xd, a_t, b_t, s_t, has = _parts(x, lora_a, lora_b, adapter_ids, scales, ranks, keep, dropout_p, acc)
    u = _activation(xd, a_t, s_t)
    low = torch.where(has[:, None], torch.einsum("tr,tor->to", u, b_t), 0.0)
    y = x.to(acc) @ weight.to(acc).T + low
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).contiguous(), u.to(x.dtype).contiguous()


def multi_lora_linear_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    adapter_ids: Tensor,
    scales: Tensor,
    ranks: Tensor | None,
    keep: Tensor | None,
    dropout_p: float,
    output_mask: Sequence[bool],
) -> tuple[Tensor | None, ...]:
    """Gradients ``(dx, dW, dA, dB, db)`` of the module docstring, entry i ``None`` unless
    ``output_mask[i]``; dA and dB are summed per adapter with ``index_add`` (a fixed order)."""
    need_x, need_w, need_a, need_b, need_bias = output_mask
    acc = acc_dtype(x.dtype)
    n = lora_a.shape[0]
    xd, a_t, b_t, s_t, has = _parts(x, lora_a, lora_b, adapter_ids, scales, ranks, keep, dropout_p, acc)
    _, group = token_groups(adapter_ids, n)
    g = grad.to(acc)
    g_low = torch.where(has[:, None], g, 0.0)  # a base-only row's gradient reaches no adapter
    v = s_t[:, None] * torch.einsum("to,tor->tr", g_low, b_t)  # zero outside each adapter's rank
    dx = dw = da = db = dbias = None
    if need_x:
        low = torch.einsum("tr,tri->ti", v, a_t)
        if keep is not None:
            low = torch.where(keep, low / (1.0 - dropout_p), 0.0)
        dx = (g @ weight.to(acc) + low).to(x.dtype)
    if need_w:
        dw = (g.T @ x.to(acc)).to(weight.dtype)
    if need_a:
        da = _sum_per_adapter(v[:, :, None] * xd[:, None, :], group, n).to(lora_a.dtype)  # (T, r_max, in) summed
    if need_b:
        u = _activation(xd, a_t, s_t)
        db = _sum_per_adapter(g_low[:, :, None] * u[:, None, :], group, n).to(lora_b.dtype)  # (T, out, r_max) summed
    if need_bias:
        dbias = g.sum(0).to(grad.dtype)
    return dx, dw, da, db, dbias
