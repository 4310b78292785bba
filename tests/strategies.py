"""hypothesis strategies and input makers shared by every op's tests.

Sizes are drawn to miss block sizes (1, 3, 17, 100, 129 ...), inputs come in several
memory layouts (contiguous, transposed views, strided slices), and every tensor is filled
from a seed the example carries, so a failing example replays exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import Tensor

from peftops.reference import ACTIVATIONS

#: Sizes that are not multiples of any block size, plus small powers of two and neighbours.
ODD_SIZES = (1, 2, 3, 5, 7, 17, 31, 33, 63, 65, 100, 127, 129)
LAYOUTS = ("contiguous", "transposed", "sliced")
#: The dtypes every op is tested at, per device: bfloat16 only on CUDA (bf16 ``tl.dot`` is
#: wrong under the Triton interpreter).
DTYPES = {"cpu": [torch.float32, torch.float16], "cuda": [torch.float32, torch.float16, torch.bfloat16]}


def sizes(max_value: int = 129) -> st.SearchStrategy[int]:
    odd = [s for s in ODD_SIZES if s <= max_value]
    return st.one_of(st.sampled_from(odd), st.integers(1, max_value))


def leading_dims(max_dims: int = 2, max_size: int = 5) -> st.SearchStrategy[tuple[int, ...]]:
    """Batch dims in front of the feature dim: () for a 1-D input up to ``max_dims`` dims."""
    return st.lists(st.integers(1, max_size), min_size=0, max_size=max_dims).map(tuple)


def ranks(max_value: int = 128) -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([r for r in (1, 2, 8, 16, 64, 128) if r <= max_value]), st.integers(1, max_value))


gqa_ratios = st.sampled_from([1, 2, 4, 8])
prefix_lens = st.one_of(st.sampled_from([0, 1, 17, 63, 64]), st.integers(0, 64))
seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(LAYOUTS)
scales = st.sampled_from([1.0, 0.5, 2.0, 1 / 3])


def make_tensor(
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype,
    device,
    gen: torch.Generator,
    layout: str = "contiguous",
    std: float = 1.0,
) -> Tensor:
    """A normal(0, std) tensor of logical ``shape`` stored in ``layout``.

    ``transposed``: a view whose last two dims (for 4-D: heads and sequence, as attention
    code gets from ``(B, L, H, D).transpose(1, 2)``) are swapped in memory.
    ``sliced``: every other element of a twice-as-wide buffer in the last dim.
    """
    shape = tuple(shape)

    def draw(s):
        return (torch.randn(s, generator=gen, dtype=torch.float64) * std).to(device=device, dtype=dtype)

    if layout == "transposed" and len(shape) >= 2:
        a, b = (1, 2) if len(shape) == 4 else (len(shape) - 2, len(shape) - 1)
        store = list(shape)
        store[a], store[b] = store[b], store[a]
        return draw(tuple(store)).transpose(a, b)
    if layout == "sliced" and len(shape) >= 1:
        return draw((*shape[:-1], 2 * shape[-1]))[..., ::2]
    return draw(shape)


def leaf(t: Tensor) -> Tensor:
    """A view made into an autograd leaf without changing its strides."""
    return t.detach().requires_grad_(True)


def maker(seed: int, dtype: torch.dtype, device):
    """``mk(shape, std=1.0, layout="contiguous")``: tensors drawn in order from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def mk(shape, std: float = 1.0, layout: str = "contiguous") -> Tensor:
        return make_tensor(shape, dtype=dtype, device=device, gen=gen, layout=layout, std=std)

    mk.gen = gen
    return mk


def leaves(t: dict[str, Tensor | None], requires_grad: bool) -> dict[str, Tensor | None]:
    return {k: (leaf(v) if requires_grad and v is not None else v) for k, v in t.items()}


# -- LoRA ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraCase:
    lead: tuple[int, ...]
    in_f: int
    out_f: int
    rank: int
    bias: bool
    scale: float
    layout: str
    seed: int

    def inputs(self, dtype: torch.dtype, device, requires_grad: bool = True) -> dict[str, Tensor | None]:
        mk = maker(self.seed, dtype, device)
        t = {
            "x": mk((*self.lead, self.in_f), layout=self.layout),
            "weight": mk((self.out_f, self.in_f), 1 / math.sqrt(self.in_f)),
            "lora_a": mk((self.rank, self.in_f), 1 / math.sqrt(self.in_f)),
            # Non-zero B (not the module's zero init) so the low-rank path is really tested.
            "lora_b": mk((self.out_f, self.rank), 1 / math.sqrt(self.rank)),
            "bias": mk((self.out_f,)) if self.bias else None,
        }
        return leaves(t, requires_grad)


@st.composite
def lora_cases(draw, max_features: int = 129, max_rank: int = 128) -> LoraCase:
    return LoraCase(
        lead=draw(leading_dims()),
        in_f=draw(sizes(max_features)),
        out_f=draw(sizes(max_features)),
        rank=draw(ranks(max_rank)),
        bias=draw(st.booleans()),
        scale=draw(scales),
        layout=draw(layouts),
        seed=draw(seeds),
    )


# -- bottleneck adapter ---------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterCase:
    lead: tuple[int, ...]
    d: int
    rank: int
    activation: str
    parallel: bool
    down_bias: bool
    up_bias: bool
    scale: float
    layout: str
    seed: int

    def inputs(self, dtype: torch.dtype, device, requires_grad: bool = True) -> dict[str, Tensor | None]:
        mk = maker(self.seed, dtype, device)
        t = {
            "x": mk((*self.lead, self.d), layout=self.layout),
            "down_weight": mk((self.rank, self.d), 1 / math.sqrt(self.d)),
            "down_bias": mk((self.rank,)) if self.down_bias else None,
            "up_weight": mk((self.d, self.rank), 1 / math.sqrt(self.rank)),
            "up_bias": mk((self.d,)) if self.up_bias else None,
            "residual": mk((*self.lead, self.d), layout=self.layout) if self.parallel else None,
        }
        return leaves(t, requires_grad)


@st.composite
def adapter_cases(draw, max_features: int = 129, max_rank: int = 128) -> AdapterCase:
    return AdapterCase(
        lead=draw(leading_dims()),
        d=draw(sizes(max_features)),
        rank=draw(ranks(max_rank)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        parallel=draw(st.booleans()),
        down_bias=draw(st.booleans()),
        up_bias=draw(st.booleans()),
        scale=draw(scales),
        layout=draw(layouts),
        seed=draw(seeds),
    )


# -- prefix attention -----------------------------------------------------------------------

PREFIX_MODES = ("none", "shared", "per_row")
PADDING_MODES = ("none", "random", "whole_rows")


@dataclass(frozen=True)
class AttentionCase:
    batch: int
    hkv: int
    group: int
    q_len: int
    seq_len: int
    head_dim: int
    prefix_len: int
    prefix_mode: str
    causal: bool
    padding: str
    layout: str
    seed: int

    @property
    def hq(self) -> int:
        return self.hkv * self.group

    def inputs(self, dtype: torch.dtype, device, requires_grad: bool = True) -> dict[str, Tensor | None]:
        mk = maker(self.seed, dtype, device)
        gen = mk.gen
        b, s, d = self.batch, self.seq_len, self.head_dim
        t: dict[str, Tensor | None] = {
            "q": mk((b, self.hq, self.q_len, d), layout=self.layout),
            "k": mk((b, self.hkv, s, d), layout=self.layout),
            "v": mk((b, self.hkv, s, d), layout=self.layout),
            "prefix_k": None,
            "prefix_v": None,
        }
        if self.prefix_mode != "none":
            lead = (self.hkv,) if self.prefix_mode == "shared" else (b, self.hkv)
            t["prefix_k"] = mk((*lead, self.prefix_len, d))
            t["prefix_v"] = mk((*lead, self.prefix_len, d))
        t = leaves(t, requires_grad)
        mask = None
        if self.padding != "none":
            mask = torch.rand(b, s, generator=gen) > 0.3
            if self.padding == "whole_rows":
                mask[0] = False  # row 0 sees no sequence key: with P = 0 its output must be zeros
            mask = mask.to(device)
        t["key_padding_mask"] = mask
        return t


@st.composite
def attention_cases(draw, max_len: int = 40, head_dims=(1, 8, 16, 17, 33, 64)) -> AttentionCase:
    prefix_mode = draw(st.sampled_from(PREFIX_MODES))
    prefix_len = draw(prefix_lens) if prefix_mode != "none" else 0
    if prefix_mode != "none" and prefix_len == 0:
        prefix_mode = draw(st.sampled_from(["shared", "per_row"]))  # an explicit empty prefix (P = 0)
    return AttentionCase(
        batch=draw(st.integers(1, 3)),
        hkv=draw(st.integers(1, 2)),
        group=draw(gqa_ratios),
        q_len=draw(st.one_of(st.just(1), sizes(max_len))),
        seq_len=draw(st.one_of(st.just(1), sizes(max_len))),
        head_dim=draw(st.sampled_from(head_dims)),
        prefix_len=prefix_len,
        prefix_mode=prefix_mode,
        causal=draw(st.booleans()),
        padding=draw(st.sampled_from(PADDING_MODES)),
        layout=draw(layouts),
        seed=draw(seeds),
    )


# -- multi-tenant LoRA ----------------------------------------------------------------------

#: How a batch's tokens name their adapters (-1: the base layer only). ``mixed``: random
#: adapters with about a quarter of the tokens base-only; ``base_only``: every token -1;
#: ``one``: one adapter for every token; ``distinct``: each token a different adapter (round
#: robin once the tokens outnumber the adapters); ``few``: two adapters and -1, every other
#: adapter absent from the batch.
ID_PATTERNS = ("mixed", "base_only", "one", "distinct", "few")


def adapter_ids(pattern: str, tokens: int, num: int, gen: torch.Generator) -> Tensor:
    """``(tokens,)`` int64 ids in ``[-1, num)`` following ``pattern`` (all -1 when ``num == 0``)."""
    if num == 0 or pattern == "base_only":
        return torch.full((tokens,), -1, dtype=torch.int64)
    if pattern == "one":
        return torch.full((tokens,), int(torch.randint(0, num, (), generator=gen)), dtype=torch.int64)
    if pattern == "distinct":
        return torch.randperm(num, generator=gen)[torch.arange(tokens) % num]
    if pattern == "few":
        pool = torch.cat([torch.randperm(num, generator=gen)[:2], torch.tensor([-1])])
        return pool[torch.randint(0, pool.numel(), (tokens,), generator=gen)]
    ids = torch.randint(0, num, (tokens,), generator=gen)
    ids[torch.rand(tokens, generator=gen) < 0.25] = -1
    return ids


@dataclass(frozen=True)
class MultiLoraCase:
    lead: tuple[int, ...]
    in_f: int
    out_f: int
    num: int
    r_max: int
    ranks: bool
    bias: bool
    ids: str
    layout: str
    seed: int

    @property
    def tokens(self) -> int:
        return math.prod(self.lead)

    def inputs(self, dtype: torch.dtype, device, requires_grad: bool = True) -> dict[str, Tensor | None]:
        """The op's arguments by name; ``adapter_ids`` one per token (shape ``lead``), ``scales``
        float32 (what :class:`peftops.nn.MultiLoRALinear` keeps), ``ranks`` in ``[1, r_max]``."""
        mk = maker(self.seed, dtype, device)
        t = {
            "x": mk((*self.lead, self.in_f), layout=self.layout),
            "weight": mk((self.out_f, self.in_f), 1 / math.sqrt(self.in_f)),
            "lora_a": mk((self.num, self.r_max, self.in_f), 1 / math.sqrt(self.in_f)),
            # Non-zero B (not the module's zero init) so the low-rank path is really tested.
            "lora_b": mk((self.num, self.out_f, self.r_max), 1 / math.sqrt(self.r_max)),
            "bias": mk((self.out_f,)) if self.bias else None,
        }
        t = leaves(t, requires_grad)
        gen = mk.gen
        t["adapter_ids"] = adapter_ids(self.ids, self.tokens, self.num, gen).reshape(self.lead).to(device)
        t["scales"] = (torch.rand(self.num, generator=gen) * 2 + 0.25).to(device)
        t["ranks"] = torch.randint(1, self.r_max + 1, (self.num,), generator=gen).to(device) if self.ranks else None
        return t


@st.composite
def multi_lora_cases(draw, max_features: int = 40, max_rank: int = 20, max_adapters: int = 7) -> MultiLoraCase:
    return MultiLoraCase(
        # One token dim (T up to 40) or a (B, L) batch.
        lead=draw(st.one_of(st.tuples(sizes(40)), st.tuples(st.integers(1, 5), st.integers(1, 8)))),
        in_f=draw(sizes(max_features)),
        out_f=draw(sizes(max_features)),
        num=draw(st.integers(1, max_adapters)),
        r_max=draw(st.one_of(st.sampled_from([1, 16]), st.integers(1, max_rank))),
        ranks=draw(st.booleans()),
        bias=draw(st.booleans()),
        ids=draw(st.sampled_from(ID_PATTERNS)),
        layout=draw(layouts),
        seed=draw(seeds),
    )
