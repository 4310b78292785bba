"""``examples/train_distributed.py`` as documented: torchrun on 2 CPU ranks (gloo, FSDP2), the
losses of one process on the whole batch, both checkpoints, and ``--resume`` on another world
size and wrapper (DDP, 1 rank) continuing where the 2 ranks stopped."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import torch

import peftops
from peftops.integrations.distributed_checkpoint import load_sharded_adapter
from tests.examples import example_path, load_example
from tests.integrations import hf_models

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = example_path("train_distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--standalone"]
    proc = subprocess.run([*cmd, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _losses(stdout: str) -> list[float]:
    return [float(x) for x in re.findall(r"^step \d+ loss (\S+)$", stdout, re.MULTILINE)]


def test_torchrun_two_ranks_equal_one_process_and_resume(tmp_path, monkeypatch):
    two, one = tmp_path / "two", tmp_path / "one"
    stdout = _torchrun(2, "--output-dir", str(two), "--steps", "2")
    losses = _losses(stdout)
    # Rank 0 alone prints, once per step.
    assert len(losses) == 2, stdout
    assert sorted(os.listdir(two / "sharded")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert sorted(os.listdir(two / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]

    example = load_example("train_distributed")
    reference = example.train(example.parse_args(["--output-dir", str(one), "--steps", "4"]))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference[:2]), rtol=1e-6, atol=1e-6)
    assert reference[2] < reference[0] - 0.1

    # The PEFT checkpoint holds what the sharded one does.
    ids = hf_models.token_ids(batch=2, seq=5)
    from_peft = peftops.load_adapter(example.base_model(None), str(two / "adapter"))
    from_dcp = load_sharded_adapter(example.build_model(None, 8), two / "sharded")
    with torch.no_grad():
        torch.testing.assert_close(from_peft(ids).logits, from_dcp(ids).logits, rtol=0, atol=0)
        assert not torch.equal(from_dcp(ids).logits, example.base_model(None)(ids).logits)

    # --resume on 1 rank under DDP (a process group of one) from the 2 ranks' adapter and AdamW
    # state: steps 3 and 4 are the single process's (step 4's loss depends on the moments).
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    resumed = example.train(example.parse_args(["--output-dir", str(two), "--steps", "2", "--resume", "--ddp"]))
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference[2:]), rtol=1e-5, atol=1e-5)
