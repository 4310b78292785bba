"""A self-attention block that takes a layer's prefix: where :class:`PrefixKV` plugs into a model."""

from __future__ import annotations

from torch import Tensor, nn

from ..ops.prefix_attention import prefix_attention
from ._base import positive_int, strict_bool


class PrefixSelfAttention(nn.Module):
    r"""Multi-head (or grouped-query) self-attention whose keys can be preceded by a prefix.

    ``q, k, v = x W_q^T, x W_k^T, x W_v^T`` split into heads, then
    :func:`peftops.prefix_attention` over ``[prefix ; k]`` with a bottom-right causal mask,
    then ``o_proj``. The projections keep the Hugging Face names (``q_proj``, ``k_proj``,
    ``v_proj``, ``o_proj``), so :func:`peftops.apply_lora` finds them and state dicts of such
    models load.

    ``forward(x, prefix=None, key_padding_mask=None)``: ``x: (B, L, hidden)``, ``prefix`` one
    ``(prefix_k, prefix_v)`` pair as :class:`PrefixKV` returns per layer (``(Hkv, P, D)``
    shared by the batch, or ``(B, Hkv, P, D)`` per row), ``key_padding_mask: (B, L)`` bool,
    True = a real token. On CUDA the ``auto`` backend runs the fused Triton kernel, which reads
    the prefix in place: no concatenation, no copy per batch row.
    """

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        bias: bool = False,
        o_bias: bool | None = None,
        causal: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        owner = "PrefixSelfAttention"
        self.hidden = positive_int(owner, "hidden", hidden)
        self.num_heads = positive_int(owner, "num_heads", num_heads)
        self.num_kv_heads = positive_int(owner, "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{owner}: num_kv_heads: expected a divisor of num_heads={self.num_heads}, got {self.num_kv_heads}"
            )
        if head_dim is None:
            if self.hidden % self.num_heads:
                raise ValueError(
                    f"{owner}: head_dim: expected it given, or hidden={self.hidden} divisible by "
                    f"num_heads={self.num_heads}"
                )
            head_dim = self.hidden // self.num_heads
        self.head_dim = positive_int(owner, "head_dim", head_dim)
        self.causal = strict_bool(owner, "causal", causal)
        bias = strict_bool(owner, "bias", bias)
        o_bias = bias if o_bias is None else strict_bool(owner, "o_bias", o_bias)
        f = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(self.hidden, self.num_heads * self.head_dim, bias=bias, **f)
        self.k_proj = nn.Linear(self.hidden, self.num_kv_heads * self.head_dim, bias=bias, **f)
        self.v_proj = nn.Linear(self.hidden, self.num_kv_heads * self.head_dim, bias=bias, **f)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden, bias=o_bias, **f)

    def forward(
        self, x: Tensor, prefix: tuple[Tensor, Tensor] | None = None, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden:
            raise ValueError(f"PrefixSelfAttention: x: expected shape (B, L, {self.hidden}), got {tuple(x.shape)}")
        b, n, _ = x.shape
        d = self.head_dim
        # (B, L, H, D) viewed as (B, H, L, D): the kernel takes strides, so no copy here.
        q = self.q_proj(x).view(b, n, self.num_heads, d).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, d).transpose(1, 2)
        if prefix is None:
            pk = pv = None
        else:
            if not isinstance(prefix, (tuple, list)) or len(prefix) != 2:
                raise TypeError(
                    f"PrefixSelfAttention: prefix: expected a (prefix_k, prefix_v) pair, got {type(prefix).__name__}"
                )
            pk, pv = prefix
        o = prefix_attention(q, k, v, pk, pv, causal=self.causal, key_padding_mask=key_padding_mask)
        return self.o_proj(o.transpose(1, 2).reshape(b, n, self.num_heads * d))

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, causal={self.causal}"
        )
