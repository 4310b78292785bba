"""Serve a batch of requests from one model, each row with its own LoRA adapter, prefix and
bottleneck adapter (or none of them), by greedy decoding over a static KV cache; on a GPU the
whole decode step is one CUDA graph, captured once and replayed for every token of every round.

    python examples/serve_multi_adapter.py                     # offline: a tiny Llama built from a config
    python examples/serve_multi_adapter.py --model Qwen/Qwen2.5-0.5B --max-new-tokens 16
    python examples/serve_multi_adapter.py --no-cuda-graph     # eager decode steps, also on a GPU

The model carries three banks of fixed slots: LoRA on q_proj/v_proj (``apply_lora(...,
capacity=)``), a bottleneck adapter after each feed-forward block (``apply_adapters(...,
capacity=)``) and per-row prefixes (``apply_prefix_tuning(..., capacity=)``). Each bank holds its
row ids as a tensor, by reference: a request mix is written into those tensors with ``copy_``,
so a captured graph reads the new mix. Round 1 serves a mix; then one adapter of each kind is
removed and a new one put into its freed slot (weights written in place, where the graph reads
them), and round 2 replays the same graph with another mix.

Every row is checked against its request generated alone (a batch of one, eager), and against
the base model: the example exits non-zero if any row differs from its request alone, or if any
row with an adapter writes what the base model writes (each kind serves some row on its own, so
a dropped contribution of any bank shows). The adapters are stand-ins for trained ones, random,
so that each changes what the model writes.
"""

from __future__ import annotations

import argparse
import sys

import torch

import peftops
from peftops.nn import MultiLoRALinear, add_adapter, remove_adapter, set_batch_adapters

CAPACITY = 3  # slots per bank: all three are filled, so a new adapter needs a removed one's slot
P_MAX, BN_REDUCTION = 4, 8  # the longest prefix; bottleneck width = hidden size / BN_REDUCTION
LORAS = {"support": (8, 16.0), "legal": (4, 8.0), "code": (2, 4.0), "finance": (8, 8.0)}  # name -> (r, alpha)
PREFIXES = {"formal": 4, "terse": 2, "poem": 3, "chatty": 4}  # name -> prefix length
BOTTLENECKS = ["medical", "kids", "news", "pirate"]
KINDS = ("lora", "prefix", "bottleneck")
WARMUP = 2  # eager decode steps before the capture
# Between the rounds, per kind: (removed, added in its slot).
SWAPS = {"lora": ("legal", "finance"), "prefix": ("terse", "chatty"), "bottleneck": ("kids", "pirate")}
# One request per row: (lora, prefix, bottleneck), None for none. Row 2 keeps its prompt and
# changes only legal -> finance, both in slot 1: a stale slot would give it legal's tokens. Each
# kind also serves a row alone (rows 0 of both rounds, row 1 of round 2), so a bank whose
# contribution were dropped would leave such a row equal to the base model's.
ROUND_1 = [
    (None, "formal", None),
    (None, None, None),
    ("legal", None, "medical"),
    ("code", "terse", "kids"),
    ("legal", "poem", "news"),
]
ROUND_2 = [
    (None, None, "pirate"),
    ("support", None, None),
    ("finance", None, "medical"),
    ("code", "formal", "pirate"),
    ("finance", "chatty", None),
]
TEXTS = [
    "How do I reset my password?",
    "The capital of France is",
    "This agreement is governed by",
    "def fibonacci(n):",
    "My order arrived damaged, and",
]


def tiny_llama(vocab: int = 128):
    import transformers

    torch.manual_seed(0)
    # No end-of-sequence token: every row runs to max_new_tokens, so rows compare whole.
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.LlamaConfig(vocab_size=vocab, num_key_value_heads=2, eos_token_id=None, **shape)
    return transformers.LlamaForCausalLM(config)


# The adapters each bank starts with, in slot order.
INITIAL = {"lora": list(LORAS)[:CAPACITY], "prefix": list(PREFIXES)[:CAPACITY], "bottleneck": BOTTLENECKS[:CAPACITY]}


def build(model, adapters: dict[str, list[str]] | None = None) -> torch.nn.Module:
    """Put the three banks on ``model`` (already on its device) and add ``adapters`` (kind -> names,
    default ``INITIAL``)."""
    model.eval()
    peftops.apply_lora(model, ["q_proj", "v_proj"], r=max(r for r, _ in LORAS.values()), alpha=1.0, capacity=CAPACITY)
    peftops.apply_adapters(model, "seq_bn", capacity=CAPACITY, reduction_factor=BN_REDUCTION)
    peftops.apply_prefix_tuning(model, P_MAX, capacity=CAPACITY)
    for kind, names in (INITIAL if adapters is None else adapters).items():
        for name in names:
            add(model, kind, name)
    return model


@torch.no_grad()
def add(model, kind: str, name: str) -> int:
    """Add adapter ``name`` of ``kind`` and return its slot. Its weights are random, drawn from its
    name alone, so an adapter is the same whatever slot it lands in and whatever was there before."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))

    def rand(t: torch.Tensor, std: float) -> None:
        t.copy_(std * torch.randn(t.shape, generator=g).to(t))

    if kind == "lora":
        r = LORAS[name][0]
        add_adapter(model, name, *LORAS[name])
        layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
        slot = layers[0].adapter_id(name)
        for layer in layers:  # B, zero when fresh, too: the adapter would change nothing
            rand(layer.lora_A[slot, :r], layer.in_features**-0.5)
            rand(layer.lora_B[slot, :, :r], 0.5 * r**-0.5)
        return slot
    if kind == "prefix":
        slot = peftops.add_prefix(model, name, PREFIXES[name])
        rand(model.peftops_prefix.prefix[:, :, slot, :, : PREFIXES[name]], 3.0)
        return slot
    slot = peftops.add_bottleneck(model, name)
    for bank in model.modules():
        if isinstance(bank, peftops.nn.MultiBottleneckAdapter):  # the up projection, zero when fresh, too
            rand(bank.down_weight[slot], bank.d**-0.5)
            rand(bank.up_weight[slot], 1.0)
    return slot


REMOVE = {"lora": remove_adapter, "prefix": peftops.remove_prefix, "bottleneck": peftops.remove_bottleneck}


def slots(model, kind: str) -> dict[str, int]:
    """Adapter name -> slot, for one kind."""
    if kind == "lora":
        return next(m for m in model.modules() if isinstance(m, MultiLoRALinear)).adapters
    if kind == "prefix":
        return model.peftops_prefix.adapters
    return next(m for m in model.modules() if isinstance(m, peftops.nn.MultiBottleneckAdapter)).adapters


class Server:
    """A batch of ``rows`` requests over a static KV cache of ``max_len`` tokens: every tensor the
    decode step reads lives here, at a fixed address, and is written in place between steps and
    rounds, so the step can be captured once (``cuda_graph``) and replayed with new contents."""

    def __init__(self, model, rows: int, max_len: int, cuda_graph: bool = False):
        import transformers

        device = next(model.parameters()).device
        self.model = model
        self.ids = {kind: torch.full((rows,), -1, dtype=torch.long, device=device) for kind in KINDS}
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)
        # All of the cache's slots: the ones not written yet are masked by the attention itself.
        self.mask = torch.ones(rows, max_len, dtype=torch.long, device=device)
        self.cache = transformers.StaticCache(config=model.config, max_cache_len=max_len)
        self.graph = torch.cuda.CUDAGraph() if cuda_graph else None
        self.warmups = self.captures = 0

    def step(self) -> None:
        """One decode step: the next token of every row, from its own adapters. Captured as is."""
        logits = self.model(
            input_ids=self.token, attention_mask=self.mask, position_ids=self.position, cache=self.cache, use_cache=True
        ).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)

    @torch.no_grad()
    def serve(self, prompts: torch.Tensor, mask: torch.Tensor, requests, new_tokens: int) -> torch.Tensor:
        """Greedy ``new_tokens`` for each row of ``prompts`` (left-padded, ``mask`` 0 on padding)."""
        for k, kind in enumerate(KINDS):
            names = slots(self.model, kind)
            wanted = [-1 if r[k] is None else names[r[k]] for r in requests]
            self.ids[kind].copy_(torch.tensor(wanted))  # in place: the graph holds this storage
        # The banks hold the id tensors by reference; another Server may have bound its own since.
        set_batch_adapters(self.model, self.ids["lora"])
        peftops.set_prefix_ids(self.model, self.ids["prefix"])
        peftops.set_bottleneck_ids(self.model, self.ids["bottleneck"])
        self.cache.reset()  # zeroed in place: same tensors, and the written length back to 0
        self.mask.fill_(1)
        self.mask[:, : prompts.shape[1]].copy_(mask)
        position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first token
        logits = self.model(
            input_ids=prompts, attention_mask=self.mask, position_ids=position, cache=self.cache, use_cache=True
        ).logits  # the prefill: eager, prompts vary in length
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.copy_(position[:, -1:] + 1)
        out = [self.token.clone()]
        for _ in range(new_tokens - 1):
            self.decode()
            out.append(self.token.clone())
        return torch.cat(out, 1)

    def decode(self) -> None:
        if self.graph is None:
            self.step()
        elif self.warmups < WARMUP:
            # Before capture, on a side stream as torch.cuda.graph needs: lazy initialisation,
            # kernel selection, autotuning. Each is a real step, this token's.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step()
            torch.cuda.current_stream().wait_stream(side)
            self.warmups += 1
        else:
            if self.captures == 0:
                with torch.cuda.graph(self.graph):
                    self.step()  # recorded, not run
                self.captures += 1
            self.graph.replay()


def alone(model, prompts, mask, requests, new_tokens) -> list[torch.Tensor]:
    """Each request generated by itself: a batch of one, eager."""
    server = Server(model, 1, prompts.shape[1] + new_tokens)
    return [server.serve(prompts[i : i + 1], mask[i : i + 1], [r], new_tokens)[0] for i, r in enumerate(requests)]


def swap(model) -> None:
    """Between rounds: remove one adapter of each kind and add a new one, which takes its slot."""
    for kind, (old, new) in SWAPS.items():
        freed = slots(model, kind)[old]
        REMOVE[kind](model, old)
        if add(model, kind, new) != freed:
            raise RuntimeError(f"{new!r} went to another slot than {old!r}'s ({freed})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model name or path (default: a tiny Llama, offline)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, help="default: on with CUDA")
    args = parser.parse_args(argv)
    cuda_graph = args.device.startswith("cuda") if args.cuda_graph is None else args.cuda_graph
    if cuda_graph and not args.device.startswith("cuda"):
        parser.error(f"--cuda-graph needs a CUDA device, got --device {args.device}")
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))  # side streams and graphs take the current device

    import transformers

    tokenizer = None
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        tokenizer.padding_side = "left"  # decoder-only models generate after the prompt's last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        prompts, mask = batch.input_ids, batch.attention_mask
    else:
        model = tiny_llama()
        prompts = torch.randint(3, 128, (len(TEXTS), 6), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(prompts)
        mask[1, :2] = mask[3, :1] = 0  # left padding
    model = build(model.to(args.device))
    prompts, mask = prompts.to(args.device), mask.to(args.device)
    n = args.max_new_tokens
    server = Server(model, len(TEXTS), prompts.shape[1] + n, cuda_graph=cuda_graph)

    def show(tokens: torch.Tensor) -> str:
        return repr(tokenizer.decode(tokens, skip_special_tokens=True)) if tokenizer else str(tokens.tolist())

    mismatches = dropped = 0
    for round_, requests in enumerate((ROUND_1, ROUND_2), 1):
        if round_ == 2:
            swap(model)
        out = server.serve(prompts, mask, requests, n)
        base = server.serve(prompts, mask, [(None, None, None)] * len(requests), n)
        swapped = ", ".join(f"{old}->{new}" for old, new in SWAPS.values())
        print(f"round {round_}" + (f" (swapped {swapped})" if round_ == 2 else ""))
        for i, (row, single, request) in enumerate(
            zip(out, alone(model, prompts, mask, requests, n), requests, strict=True)
        ):
            same = torch.equal(row, single)
            mismatches += not same
            dropped += request != (None, None, None) and torch.equal(row, base[i])
            label = "/".join(name or "-" for name in request)
            print(f"  row {i} [{label:>22}] {show(row)}{'' if same else '   MISMATCH alone: ' + show(single)}")
    mode = f"eager decode on {args.device}"
    if cuda_graph:  # one capture for both rounds: round 2's mix and adapters reach the same graph
        mode = f"decode step captured {server.captures} time(s) as a CUDA graph and replayed on {args.device}"
    if mismatches:
        print(f"FAIL: {mismatches} rows differ from their request generated alone ({mode})", file=sys.stderr)
        return 1
    if dropped:
        print(f"FAIL: {dropped} rows with adapters write what the base model writes ({mode})", file=sys.stderr)
        return 1
    print(f"all rows match their request alone, and every row with adapters differs from the base model ({mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
