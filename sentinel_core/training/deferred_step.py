"""A training step the host does not wait for: the non-finite skip is decided on the device and
the step's numbers are read back one step late.

Reading the loss and the gradient norm back every step (``.item()``, ``.tolist()``) makes the
host wait until the device has finished the step, and the device then idles while the host
launches the next one. Instead:

- the skip is a device flag, ``found_inf = not (isfinite(loss) and isfinite(grad_norm))``, handed
  to fused AdamW the way ``torch.amp.GradScaler`` hands it over: the fused kernel leaves the
  weights and the moments alone when it is 1, and torch takes the step count back, so a skipped
  step changes nothing, exactly as not calling ``step()`` did;
- the step's numbers (loss, the loss function's logs, gradient norm, the flag) start copying to
  the host when the step is queued (pinned memory and an event on CUDA) and are read when the
  next step's forward and backward are queued, or earlier when the host needs them (an
  evaluation, a checkpoint, a stop, the end of the stage).

``on_step_end`` still fires right after each update; its logs (:class:`StepLogs`) give what the
host knows at once (``lr``, ``epoch``, ``tokens``) and read the rest on first use, so a callback
that reads the loss every step brings the per-step wait back, only for itself.

fp16 training keeps the per-step read: its ``GradScaler`` sets ``found_inf`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

# Benchmarks set this to measure the loop as it was: the numbers read back and the skip decided
# on the host every step, foreach AdamW on the CPU (bench/bench_finetune.py --host-sync).
HOST_SYNC_EVERY_STEP = False

# Devices with a fused AdamW kernel that honours ``found_inf``.
_FUSED_DEVICES = ("cpu", "cuda")


def fused_adamw_on(device: torch.device) -> bool:
    """Whether the loop builds a fused AdamW on ``device`` (CUDA always; elsewhere only for the
    deferred step, since the old loop used foreach AdamW on the CPU)."""
    if device.type == "cuda":
        return True
    return not HOST_SYNC_EVERY_STEP and device.type in _FUSED_DEVICES


def skips_on_device(optimizer: Any, scaler: Any) -> bool:
    """Whether ``optimizer`` (Accelerate's wrapper or a torch optimizer) can skip a step on a
    device flag: fused AdamW without a loss scaler, and the per-step read not asked for."""
    inner = getattr(optimizer, "optimizer", optimizer)
    fused = any(group.get("fused") for group in inner.param_groups)
    return fused and scaler is None and not HOST_SYNC_EVERY_STEP


def non_finite(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """1.0 where the step's loss or gradient norm is NaN or infinite, else 0.0 (float32, on the
    device: what fused AdamW reads as ``found_inf``)."""
    return (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).to(torch.float32).reshape(())


def step_unless(optimizer: Any, found_inf: torch.Tensor) -> None:
    """``optimizer.step()``, which the fused kernel turns into nothing where ``found_inf`` is 1.

    The flag goes on the torch optimizer as an attribute, which ``Adam.step`` reads (the
    GradScaler protocol); it is removed again so that no later step sees a stale one.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = found_inf
    try:
        optimizer.step()
    finally:
        del inner.found_inf


class PendingStep:
    """One step's numbers, ``[loss, *logs, grad_norm, skipped]``, on their way to the host.

    :param record: a 1-D float tensor on the device (copied asynchronously now), or the numbers
        already read (the per-step path).
    :param names: the names of the loss function's logs, in ``record`` order.
    """

    def __init__(self, record: torch.Tensor | list[float], names: list[str]) -> None:
        self.names = names
        self.step = -1  # the step number it completes (set once the update is queued)
        self.known: dict[str, Any] = {}  # what the host knows about it without reading
        self.counted = False
        self._event: Any = None
        self._values: dict[str, Any] | None = None
        if isinstance(record, list):
            self._host: torch.Tensor | None = None
            self._read: list[float] | None = record
            return
        self._read = None
        record = record.detach()
        if record.device.type == "cuda":
            self._host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            self._host.copy_(record, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = record

    def read(self) -> list[float]:
        """The numbers on the host; waits for the device only if it has not got there yet."""
        if self._read is None:
            if self._event is not None:
                self._event.synchronize()
            self._read = self._host.tolist()
            self._host = self._event = None
        return self._read

    @property
    def loss(self) -> float:
        return self.read()[0]

    @property
    def skipped(self) -> bool:
        return self.read()[-1] != 0.0

    def values(self, perplexity: Callable[[float], float] | None) -> dict[str, Any]:
        """The step's metric event: loss, perplexity (None when ``perplexity`` is None: the loss is
        not a cross-entropy), grad_norm, the known values, the loss function's logs, skipped."""
        if self._values is None:
            loss, *log_values, norm, _ = self.read()
            known = dict(self.known)
            values: dict[str, Any] = {"loss": loss, "perplexity": perplexity(loss) if perplexity else None,
                                      "grad_norm": norm, "epoch": known.pop("epoch"), "tokens": known.pop("tokens"),
                                      **dict(zip(self.names, log_values, strict=True)), **known}
            if self.skipped:
                values["skipped"] = True
            self._values = values
        return self._values


class StepLogs(Mapping):
    """The logs ``on_step_end`` gets: the keys the host knows are free, any other key reads the
    step's numbers from the device (once)."""

    def __init__(self, known: Mapping[str, Any], resolve: Callable[[], Mapping[str, Any]]) -> None:
        self._known = known
        self._resolve = resolve

    def __getitem__(self, key: str) -> Any:
        if key in self._known:
            return self._known[key]
        return self._resolve()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._resolve())

    def __len__(self) -> int:
        return len(self._resolve())

    def __repr__(self) -> str:
        return f"StepLogs({dict(self._resolve())!r})"
