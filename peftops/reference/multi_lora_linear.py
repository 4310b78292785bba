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
dropout applied (``keep`` mask, scaled by ``1 / (1 - p)``), as in :mod:`.lora`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .common import acc_dtype


def rank_mask(ranks: Tensor | None, num_adapters: int, r_max: int, device, dtype) -> Tensor:
    """``(N, r_max)``: 1 where a rank slot is in use, 0 in the padding (all ones without ranks)."""
    if ranks is None:
        return torch.ones(num_adapters, r_max, device=device, dtype=dtype)
    return (torch.arange(r_max, device=device)[None, :] < ranks.to(device)[:, None]).to(dtype)


def _gathered(adapter_ids: Tensor, num_adapters: int) -> tuple[Tensor, Tensor]:
    """``(valid, index)``: which tokens have an adapter, and a safe slot index for every token."""
    valid = (adapter_ids >= 0) & (adapter_ids < num_adapters)
    return valid, torch.where(valid, adapter_ids, torch.zeros_like(adapter_ids)).long()


def _parts(x, lora_a, lora_b, adapter_ids, scales, ranks, keep, dropout_p, acc):
    """Per-token ``(x_d, A_t, B_t, s_t)``: the dropped input and each token's own adapter, masked."""
    n, r_max = lora_a.shape[0], lora_a.shape[1]
    mask = rank_mask(ranks, n, r_max, x.device, acc)
    valid, index = _gathered(adapter_ids, n)
    xd = x.to(acc) if keep is None else x.to(acc) * keep / (1.0 - dropout_p)
    a_t = (lora_a.to(acc) * mask[:, :, None])[index]  # (T, r_max, in)
    b_t = (lora_b.to(acc) * mask[:, None, :])[index]  # (T, out, r_max)
    s_t = scales.to(acc)[index] * valid.to(acc)  # (T,): 0 for the base-only tokens
    return xd, a_t, b_t, s_t


def _activation(xd: Tensor, a_t: Tensor, s_t: Tensor) -> Tensor:
    """``u_t = s_a * (x_d,t A_a^T)``, the rank mask already in ``a_t``."""
    return s_t[:, None] * torch.einsum("ti,tri->tr", xd, a_t)


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
    xd, a_t, b_t, s_t = _parts(x, lora_a, lora_b, adapter_ids, scales, ranks, keep, dropout_p, acc)
    u = _activation(xd, a_t, s_t)
    y = x.to(acc) @ weight.to(acc).T + torch.einsum("tr,tor->to", u, b_t)
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
    xd, a_t, b_t, s_t = _parts(x, lora_a, lora_b, adapter_ids, scales, ranks, keep, dropout_p, acc)
    _, index = _gathered(adapter_ids, n)
    g = grad.to(acc)
    v = s_t[:, None] * torch.einsum("to,tor->tr", g, b_t)  # zero outside each adapter's rank
    dx = dw = da = db = dbias = None
    if need_x:
        low = torch.einsum("tr,tri->ti", v, a_t)
        if keep is not None:
            low = low * keep / (1.0 - dropout_p)
        dx = (g @ weight.to(acc) + low).to(x.dtype)
    if need_w:
        dw = (g.T @ x.to(acc)).to(weight.dtype)
    if need_a:
        per_token = v[:, :, None] * xd[:, None, :]  # (T, r_max, in)
        da = torch.zeros(lora_a.shape, dtype=acc, device=x.device).index_add_(0, index, per_token).to(lora_a.dtype)
    if need_b:
        per_token = g[:, :, None] * _activation(xd, a_t, s_t)[:, None, :]  # (T, out, r_max)
        db = torch.zeros(lora_b.shape, dtype=acc, device=x.device).index_add_(0, index, per_token).to(lora_b.dtype)
    if need_bias:
        dbias = g.sum(0).to(grad.dtype)
    return dx, dw, da, db, dbias
