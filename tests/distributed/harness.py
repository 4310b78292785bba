"""Run a function on ``world_size`` CPU ranks (gloo), as torchrun would, and collect what each returns.

The function must be importable by name (module-level in a test module or here): ranks are fresh
processes started with ``spawn``, since a forked child would inherit this process's threads and
its Triton interpreter state. Each rank gets ``TRITON_INTERPRET=1`` like the test suite, one
intra-op thread (two ranks share CI's two cores), and its results travel back pickled through a
file, so a rank can return tensors.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world_size: int, tmp: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    out = os.path.join(tmp, f"rank{rank}.pkl")
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank, world_size=world_size
    )
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001  # the parent re-raises it with the rank's traceback
        result = ("error", traceback.format_exc())
    finally:
        dist.destroy_process_group()
    with open(out, "wb") as f:
        pickle.dump(result, f)


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any) -> list[Any]:
    """``[fn(rank, world_size, *args) for each rank]``, run concurrently in a process group of
    ``world_size`` gloo ranks; a rank's exception is raised here with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(world_size, tmp, fn, args), nprocs=world_size, start_method="spawn")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            results.append(value)
        return results
