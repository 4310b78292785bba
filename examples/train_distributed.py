"""Fine-tune a LoRA'd transformers causal LM on several processes with FSDP2 (or DDP), then save
a sharded checkpoint (adapter and optimizer, to resume from) and a PEFT checkpoint (for peft or
``peftops.load_adapter``).

    torchrun --nproc-per-node 2 examples/train_distributed.py --output-dir ./run            # CPU: gloo
    torchrun --nproc-per-node 2 examples/train_distributed.py --output-dir ./run --resume   # 2 more steps
    torchrun --nproc-per-node 8 examples/train_distributed.py --output-dir ./run --model Qwen/Qwen2.5-0.5B
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 \\
        --rdzv-id run1 examples/train_distributed.py --output-dir /shared/run   # the same on each node

One process per device: NCCL and ``cuda:$LOCAL_RANK`` where there are GPUs, gloo on the CPU.
Run without torchrun it trains in one process. Offline (no ``--model``) the model is a tiny Llama
built from a config; ``--model`` takes a Llama-style causal LM (``q_proj`` ... ``o_proj``), loaded
whole by every rank before sharding. Every step trains on one synthetic global batch (sequences that count up
from a random token), split across the ranks, so the losses printed by rank 0 (averaged over the
ranks) are those of one process on the whole batch, whatever the number of processes.

``--output-dir`` receives ``sharded/`` (:func:`peftops.integrations.distributed_checkpoint.save_sharded_adapter`:
each rank writes its shards; ``--resume`` reads it back, on any number of ranks) and ``adapter/``
(:func:`peftops.save_adapter`: one PEFT checkpoint written by rank 0).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

import peftops
from peftops.integrations.distributed_checkpoint import load_sharded_adapter, save_sharded_adapter, unwrap

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    p.add_argument("--output-dir", required=True, help="where sharded/ and adapter/ are written")
    p.add_argument("--model", default=None, help="a transformers causal LM (default: a tiny offline Llama)")
    p.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    p.add_argument("--resume", action="store_true", help="start from <output-dir>/sharded")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="the global batch, split across ranks")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=8)
    return p.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def base_model(name: str | None) -> torch.nn.Module:
    import transformers

    if name is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    else:
        # Every rank builds the same weights from the same seed: nothing to broadcast.
        torch.manual_seed(0)
        config = transformers.LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        model = transformers.LlamaForCausalLM(config)
    return model


def build_model(name: str | None, r: int) -> torch.nn.Module:
    return peftops.apply_lora(base_model(name), TARGETS, r=r, alpha=2 * r)


def wrap(model: torch.nn.Module, device: torch.device, ddp: bool, world_size: int) -> torch.nn.Module:
    model.to(device)
    if world_size == 1 and not dist.is_initialized():
        return model
    if ddp:
        # Only the adapters require grad: DDP reduces those alone, the frozen base costs nothing.
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    from torch.distributed.fsdp import fully_shard

    # One FSDP2 unit per decoder layer, so one layer's weights are gathered at a time; the frozen
    # base is sharded too and gets no gradient, hence no reduce-scatter.
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    return fully_shard(model)


def global_batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    """The same batch on every rank (counting sequences: each token fixes the next one)."""
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + torch.arange(seq)) % vocab


def train(args: argparse.Namespace) -> list[float]:
    """Train, save both checkpoints, and return the losses (averaged over the ranks)."""
    rank, world_size, device = setup()
    try:
        if args.batch % world_size:
            raise ValueError(f"--batch: expected a multiple of the {world_size} ranks, got {args.batch}")
        model = wrap(build_model(args.model, args.r), device, args.ddp, world_size)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        sharded = os.path.join(args.output_dir, "sharded")
        first = 0
        if args.resume:
            load_sharded_adapter(model, sharded, optimizer=optimizer)
            first = max((int(s["step"]) for s in optimizer.state.values()), default=0)
        vocab = unwrap(model).config.vocab_size
        ids = global_batch(vocab, args.batch, args.seq).chunk(world_size)[rank].to(device)
        losses = []
        for step in range(first + 1, first + args.steps + 1):
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Equal shares of equal-length rows: the mean of the ranks' means is the global mean.
            total = loss.detach().clone()
            if dist.is_initialized():
                dist.all_reduce(total)
            losses.append(total.item() / world_size)
            if rank == 0:
                print(f"step {step} loss {losses[-1]:.8f}", flush=True)
        save_sharded_adapter(model, sharded, optimizer=optimizer)
        # Collective: the adapter shards are gathered, rank 0 writes.
        peftops.save_adapter(model, os.path.join(args.output_dir, "adapter"))
        if rank == 0:
            print(
                f"saved {sharded} ({world_size} rank{'s' if world_size > 1 else ''}) and {os.path.join(args.output_dir, 'adapter')}",
                flush=True,
            )
        return losses
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
