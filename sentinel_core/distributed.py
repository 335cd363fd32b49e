"""Several processes (``torchrun`` / ``accelerate launch``): who this process is, and what they share.

A launcher starts the same ``sentinel run`` once per process and tells each one its place
through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). :func:`start` joins the
process group through Accelerate's ``PartialState`` (gloo on the CPU, nccl on GPUs), the same
state the training loop's ``Accelerator`` then reuses. Everything else here is a no-op in a
single process, so a one-process run does exactly what it did before.

What the processes exchange is JSON (:func:`broadcast_json`), never a pickle: torch's own
``broadcast_object_list`` unpickles what it receives.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .errors import RunInterrupted, SentinelError

T = TypeVar("T")

# How long a collective waits for the other processes. The main process alone samples text,
# measures speed and runs lm-eval tasks while the others wait at a broadcast; torch's default
# (10 minutes for nccl) would end a run whose task evaluation takes longer. A process that dies
# does not leave the others waiting this long: the launcher stops them all.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


class MainProcessFailed(SentinelError):
    """The main process stopped with an error; the other processes stop with the same line."""


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def world_size() -> int:
    """Number of processes in the launch (1 when not launched)."""
    if _group_ready():
        import torch.distributed as dist

        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def rank() -> int:
    """This process's place in the launch, 0 for the main process."""
    if _group_ready():
        import torch.distributed as dist

        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's place on its machine (it picks the GPU ``cuda:<local rank>``)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    """True in the process that writes files, reports metrics and logs (rank 0)."""
    return rank() == 0


def start(device: str) -> None:
    """Join the launch's process group, once; nothing happens in a single process.

    :param device: the resolved device (``cpu``, ``cuda``, ...): the CPU gets gloo, GPUs nccl.
    """
    if world_size() <= 1 or _group_ready():
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise SentinelError(f"WORLD_SIZE is {world_size()} but this torch build has no torch.distributed; "
                            "run one process or install a torch with distributed support")
    from accelerate import PartialState

    PartialState(cpu=device == "cpu", timeout=COLLECTIVE_TIMEOUT)
    if not is_main():
        quiet_this_process()


def process_device(device: str) -> str:
    """The device this process runs on: a launch's ``cuda`` means each process's own GPU."""
    if world_size() > 1 and device == "cuda":
        return f"cuda:{local_rank()}"
    return device


def quiet_this_process() -> None:
    """Every process but the main one keeps to warnings and errors: the main one tells the story
    (progress, stage lines), so each line appears once."""
    from .log import get_logger

    get_logger().setLevel(max(get_logger().level, logging.WARNING))
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - dependencies
        pass


# -- collectives -------------------------------------------------------------------------------


def _comm_device():
    """Where a collective's tensors live: the GPU for nccl, the CPU for gloo."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process. On gloo this is torch's plain barrier: with ``device_ids`` (as
    Accelerate's ``wait_for_everyone`` passes them) torch runs even a gloo barrier on
    ``cuda:<local rank>``, which failed for CPU processes on a GPU machine (see training/loop.py)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[_comm_device().index])
    else:
        dist.barrier()


def broadcast_json(value: Any = None, *, src: int = 0) -> Any:
    """``value`` as the process ``src`` has it, on every process (it must be JSON-able there).

    Every process gets the JSON round trip, ``src`` included, so all of them hold equal values
    (a tuple becomes a list everywhere, not only on the receivers).
    """
    if world_size() <= 1:
        return value
    import torch
    import torch.distributed as dist

    device = _comm_device()
    if rank() == src:
        payload = json.dumps(value).encode("utf-8")
        size = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=src)
    if rank() == src:
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=src)
    return json.loads(bytes(buffer.cpu().tolist()).decode("utf-8"))


def _all_reduce(values: Sequence[float], op_name: str) -> list[float]:
    if world_size() <= 1:
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    device = _comm_device()
    # float64 where the device has it: token-loss sums of a large test split keep their digits.
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op_name))
    return tensor.tolist()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum of ``values`` over the processes (every process must call it)."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values: Sequence[float]) -> list[float]:
    """Element-wise maximum of ``values`` over the processes (every process must call it)."""
    return _all_reduce(values, "MAX")


# -- the main process decides ------------------------------------------------------------------


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line if isinstance(exc, SentinelError) else f"{type(exc).__name__}: {line}".rstrip(": ")


def _outcome_of_main(work: Callable[[], T]) -> tuple[bool, T | None]:
    """Run ``work`` on the main process and tell the others whether it raised; the others raise
    :class:`MainProcessFailed` with its line. Returns ``(ran here, result)``."""
    if is_main():
        try:
            result = work()
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            reason = exc.reason if isinstance(exc, RunInterrupted) else "Ctrl-C"
            broadcast_json({"error": _error_line(exc), "interrupted": reason if interrupted else None})
            raise
        broadcast_json({"error": None})
        return True, result
    outcome = broadcast_json()
    if outcome.get("interrupted"):  # the main process was stopped: so is this one, the same way
        raise RunInterrupted(outcome["interrupted"])
    if outcome["error"] is not None:
        raise MainProcessFailed(outcome["error"])
    return False, None


def on_main(work: Callable[[], T]) -> T:
    """``work()`` run by the main process only; every process returns its (JSON-able) result.

    When the main process raises, it raises as usual and every other process raises
    :class:`MainProcessFailed` with the same line, instead of waiting for a result that never
    comes. Used for what only the main process does (claim the run folder, sample text, time
    the models) and for decisions every process must share (the head scores).
    """
    if world_size() <= 1:
        return work()
    _, result = _outcome_of_main(work)
    return broadcast_json(result)


def main_first(work: Callable[[], T]) -> T:
    """``work()`` on every process, the main one first, the others once it succeeded.

    For loading: the main process fills the caches (a demo model built, a tokenized data set
    written) that the others then read, instead of all of them writing the same files at once.
    """
    if world_size() <= 1:
        return work()
    ran, result = _outcome_of_main(work)
    return result if ran else work()


def share_model(model: Any, *, after: str) -> None:
    """Give every process the main process's weights, after surgery changed the model.

    The layouts (every tensor's name, shape and dtype) are compared first: processes that cut
    different heads stop with one line naming the first difference, since a broadcast between
    tensors of other shapes cannot work. Then the main process's parameters and buffers are
    broadcast, so a strategy that drew random numbers unevenly cannot leave the processes with
    different models.

    :param model: this process's model, changed in place.
    :param after: the stage that changed it, for the message.
    """
    if world_size() <= 1:
        return
    import torch.distributed as dist

    state = model.state_dict(keep_vars=True)
    layout = [[name, list(t.shape), str(t.dtype)] for name, t in state.items()]
    reference = broadcast_json(layout)
    # Every process learns which ones differ, so all of them stop rather than some waiting in
    # a broadcast the others never join.
    differs = [0.0] * world_size()
    differs[rank()] = float(layout != reference)
    odd = [index for index, flag in enumerate(all_reduce_sum(differs)) if flag]
    if odd:
        hint = "; a strategy must decide from the shared scores and config alone"
        if rank() in odd:
            first = next((mine, theirs) for mine, theirs in zip(layout + [None], reference + [None], strict=False)
                         if mine != theirs)
            raise SentinelError(f"after {after}, process {rank()} holds {first[0]} where process 0 holds "
                                f"{first[1]}{hint}")
        raise SentinelError(f"after {after}, process {odd[0]} changed the model differently from process 0{hint}")
    device = _comm_device()
    seen: set[int] = set()
    for tensor in state.values():
        data = tensor.data
        if data.numel() == 0 or data.data_ptr() in seen:  # tied weights (GPT-2's lm_head) go once
            continue
        seen.add(data.data_ptr())
        buffer = data if data.device == device and data.is_contiguous() else data.contiguous().to(device)
        dist.broadcast(buffer, src=0)
        if buffer is not data:
            data.copy_(buffer)
