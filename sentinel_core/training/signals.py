"""Ctrl-C and SIGTERM during training: stop after the current step, checkpoint first."""

from __future__ import annotations

import signal
import threading
from typing import Any

from ..errors import RunInterrupted
from ..log import get_logger

log = get_logger()

class GracefulStop(RunInterrupted):
    """Raised after a requested stop (Ctrl-C, SIGTERM) once the checkpoint is on disk."""


class StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only in the main
    thread, never over a signal that the process ignores, and restored on exit.
    """

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.reason = ""
        self._announce = announce
        self._old: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.request("Ctrl-C")
        if self._announce:
            log.warning("\nStopping after this step (press Ctrl-C again to stop at once)...")

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.request("SIGTERM")
        if self._announce:
            log.warning("\nSIGTERM received: stopping after this step...")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in ((signal.SIGINT, self._on_sigint), (signal.SIGTERM, self._on_sigterm)):
                old = signal.getsignal(signum)
                if old is signal.SIG_IGN:
                    continue
                self._old[signum] = old
                signal.signal(signum, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old.clear()


