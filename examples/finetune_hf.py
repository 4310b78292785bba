"""Fine-tune a transformers causal LM with peftops LoRA, save it in PEFT's format, reload it
with peft, and check that peft computes the same logits.

    python examples/finetune_hf.py                      # offline: a tiny Llama built from a config
    python examples/finetune_hf.py --model Qwen/Qwen2.5-0.5B --steps 50 --out ./adapter

Offline, the "text" is a synthetic task (sequences count up from a random token), so the
loss must fall well below the base model's; with ``--model`` it is a few lines of text run
through the model's tokenizer. Exits non-zero if the loss did not fall or peft disagrees.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

import peftops


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


def counting_batches(vocab: int, batch: int, seq: int, steps: int, seed: int = 0):
    """Sequences that count up from a random start (mod vocab): each next token is fixed by the
    current one, which the random base model does not know and the adapter must learn."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        yield (start + torch.arange(seq)) % vocab


def text_batches(tokenizer, steps: int):
    lines = [
        "Low-rank adapters train a small update next to frozen weights.",
        "peftops fuses the adapter path into the base layer's kernels.",
        "A PEFT checkpoint holds adapter_config.json and adapter_model.safetensors.",
    ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids = tokenizer(lines, return_tensors="pt", padding=True).input_ids
    for _ in range(steps):
        yield ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model name or path (default: a tiny Llama, offline)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", help="where to save the adapter (default: a temporary directory)")
    args = parser.parse_args(argv)

    import transformers
    from peft import PeftModel

    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)

        def load_base():
            return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

        batches = list(text_batches(tokenizer, args.steps))
    else:
        vocab = 64

        def load_base():
            return tiny_llama(vocab)

        batches = list(counting_batches(vocab, batch=16, seq=12, steps=args.steps))

    model = peftops.apply_lora(load_base(), "all-linear", r=args.r, alpha=args.alpha, dropout=0.05)
    torch.manual_seed(0)  # the dropout masks: the same run in any process
    print(peftops.count_trainable(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    losses = []
    for step, ids in enumerate(batches):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == len(batches) - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    out = args.out or tempfile.mkdtemp(prefix="peftops-adapter-")
    peftops.save_adapter(model, out)
    print(f"saved the adapter in PEFT format to {out}")

    reloaded = PeftModel.from_pretrained(load_base(), out)
    probe = batches[-1]
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=probe).logits, reloaded(input_ids=probe).logits
    diff = (ours - theirs).abs().max().item()
    print(f"peft reloaded the adapter: max |logits difference| {diff:.2e}")
    ok = True
    if not diff <= 1e-4 * max(1.0, ours.abs().max().item()):
        print("FAIL: peft's reloaded model disagrees with the trained peftops model", file=sys.stderr)
        ok = False
    if not losses[-1] < 0.9 * losses[0]:
        print(f"FAIL: the loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
