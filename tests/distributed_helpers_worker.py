"""The body of one of the two gloo processes of tests/test_distributed_helpers.py (spawned, so it
lives in an importable module of its own)."""

from __future__ import annotations

import math
import os
import socket
import time

import torch
import torch.distributed as dist
from torch import nn

from sentinel_core import distributed
from sentinel_core.errors import SentinelError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refuse() -> None:
    raise SentinelError("folder 'x' is taken; pick another")


def _interrupt() -> None:
    raise KeyboardInterrupt


def _load_after_main(shared: str) -> str:
    """The main process writes the file that the other one then reads (what main_first is for)."""
    if distributed.is_main():
        time.sleep(0.5)  # were the other process not waiting, it would look now and find nothing
        with open(shared, "w", encoding="utf-8") as f:
            f.write("written by process 0")
    with open(shared, encoding="utf-8") as f:
        return f.read()


def two_process_worker(rank: int, port: int, queue, shared: str) -> None:
    """One of two gloo processes; puts ``(rank, what it saw)`` or ``(rank, error text)``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        torch.set_num_threads(1)
        distributed.start("cpu")
        seen: dict = {"world": distributed.world_size(), "rank": distributed.rank()}
        seen["json"] = distributed.broadcast_json({"heads": {"0": [1, 3]}, "nan": math.nan, "pair": (1, 2)}
                                                  if rank == 0 else "ignored")
        seen["sum"] = distributed.all_reduce_sum([rank + 0.25, 10.0])
        seen["max"] = distributed.all_reduce_max([float(rank), -float(rank)])
        seen["on_main"] = distributed.on_main(lambda: f"decided by {distributed.rank()}")
        try:
            distributed.on_main(_refuse)
        except SentinelError as exc:
            seen["error"] = [type(exc).__name__, str(exc)]
        try:
            distributed.on_main(_interrupt)
        except KeyboardInterrupt as exc:
            seen["interrupt"] = [type(exc).__name__, str(exc)]
        seen["loaded"] = distributed.main_first(lambda: _load_after_main(shared))
        torch.manual_seed(rank)  # different weights in each process
        model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
        distributed.share_model(model, after="growth")
        seen["weights"] = [p.detach().flatten().tolist() for p in model.parameters()]
        bigger = nn.Linear(3, 4 + rank)
        try:
            distributed.share_model(bigger, after="pruning")
        except SentinelError as exc:
            seen["layout_error"] = str(exc)
        distributed.barrier()
        queue.put((rank, seen))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        queue.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
