"""Serve several LoRA adapters from one model in one batch: each row of the batch names its
adapter (or the base model), and one ``generate()`` call, beam search included, serves them all.

    python examples/serve_multi_adapter.py                        # offline: a tiny Llama built from a config
    python examples/serve_multi_adapter.py --model Qwen/Qwen2.5-0.5B --num-beams 3

The adapters here are stand-ins for trained ones: their B matrices are random rather than
zeros, so that each one changes what the model writes. Every row is then generated again
alone, with only its adapter, and the example exits non-zero if any row differs from its
batched output token for token.
"""

from __future__ import annotations

import argparse
import sys

import torch

import peftops
from peftops.integrations.generate import generate
from peftops.nn import MultiLoRALinear, add_adapter

ADAPTERS = {"support": (8, 16.0), "legal": (4, 8.0), "code": (2, 4.0)}  # name -> (r, alpha)
ROWS = ["support", None, "legal", "code", "support"]  # None: the base model
TEXTS = [
    "How do I reset my password?",
    "The capital of France is",
    "This agreement is governed by",
    "def fibonacci(n):",
    "My order arrived damaged, and",
]


def tiny_llama(vocab: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model name or path (default: a tiny Llama, offline)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="module names to adapt")
    parser.add_argument("--num-beams", type=int, default=2)
    parser.add_argument("--num-return-sequences", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    import transformers

    tokenizer = None
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        tokenizer.padding_side = "left"  # decoder-only models generate after the prompt's last token
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
        batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
        prompts, mask, pad = batch.input_ids, batch.attention_mask, tokenizer.pad_token_id
    else:
        model = tiny_llama(vocab=128)
        prompts = torch.randint(3, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(1))
        mask, pad = torch.ones_like(prompts), 0
    model.eval()

    r_max = max(r for r, _ in ADAPTERS.values())
    peftops.apply_lora(model, args.targets, r=r_max, alpha=1.0, capacity=len(ADAPTERS))
    for name, (r, alpha) in ADAPTERS.items():
        add_adapter(model, name, r, alpha)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MultiLoRALinear):
                std = 0.5 / layer.r_max**0.5
                layer.lora_B.copy_(std * torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B))

    settings = {
        "num_beams": args.num_beams,
        "num_return_sequences": args.num_return_sequences,
        "max_new_tokens": args.max_new_tokens,
        "do_sample": False,
        "pad_token_id": pad,
    }
    with torch.no_grad():
        out = generate(model, prompts, attention_mask=mask, adapter_ids=ROWS, **settings)
    per = args.num_return_sequences
    start = prompts.shape[1]
    eos = model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)

    def new_tokens(seq: torch.Tensor) -> list[int]:
        # Up to the first end-of-sequence token: in the batch, a row that ends early is padded to
        # the longest row, alone it is not.
        out = seq[start:].tolist()
        ends = [k for k, t in enumerate(out) if t in eos]
        return out[: ends[0] + 1] if ends else out

    def show(seq: torch.Tensor) -> str:
        new = new_tokens(seq)
        return repr(tokenizer.decode(new, skip_special_tokens=True)) if tokenizer else str(new)

    mismatches = 0
    for i, name in enumerate(ROWS):
        with torch.no_grad():
            alone = generate(model, prompts[i : i + 1], attention_mask=mask[i : i + 1], adapter_ids=[name], **settings)
        for j in range(per):
            row = out[i * per + j]
            same = torch.equal(row[:start], alone[j][:start]) and new_tokens(row) == new_tokens(alone[j])
            mismatches += not same
            label = name or "base"
            print(f"row {i}.{j} [{label:>7}] {show(row)}{'' if same else '   MISMATCH alone: ' + show(alone[j])}")
    if mismatches:
        print(f"FAIL: {mismatches} rows differ from generating them alone with their adapter", file=sys.stderr)
        return 1
    print(f"all rows match their single-adapter generation ({len(ROWS)} prompts, num_beams={args.num_beams})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
