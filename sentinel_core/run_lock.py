"""One run at a time per run folder: an exclusive lock taken before the run writes anything.

The lock is an OS file lock (``filelock``) on ``<run folder>/.sentinel.lock``: the operating
system releases it when the holding process ends in any way, ``kill -9`` included, so a lock
left by a killed run never blocks the next one. Beside it, ``.sentinel.lock.json`` names the
holder (process id, host, command, start time), so a refused run can say who holds the folder,
and a run that takes over the folder of a dead one can say so.

Only the main process of a multi-process launch takes the lock (``RANK`` unset or 0); the
other processes write nothing to the run folder.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import SentinelError
from .fileio import write_json_atomic
from .folders import LOCK_FILES
from .log import get_logger

log = get_logger()

LOCK_FILE, OWNER_FILE = LOCK_FILES


class RunFolderBusy(SentinelError):
    """Another live process is running in the folder."""


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process"
    started = owner.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M", time.localtime(started)) if isinstance(started, (int, float)) else ""
    command = f" ({owner['command']})" if owner.get("command") else ""
    return f"process {owner.get('pid')} on {owner.get('host')}{command}{when}"


def _read_owner(folder: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _command_line() -> str:
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program == "__main__.py":
        program = "python -m sentinel_core"
    return " ".join([program, *sys.argv[1:]])[:200]


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


class RunLock:
    """``with RunLock(folder):`` holds the folder's lock; creates the folder if needed.

    :raises RunFolderBusy: one line naming the process that holds the folder.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.created_folder = False
        self._lock = None

    def acquire(self) -> RunLock:
        from filelock import FileLock, Timeout

        if not is_main_process():
            return self
        self.created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder / LOCK_FILE))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunFolderBusy(f"output_dir {str(self.folder)!r} is in use by {_describe(self._holder())}; "
                                "wait for it to finish or choose another --output-dir") from None
        self._lock = lock
        previous = _read_owner(self.folder)
        if previous and previous.get("pid") != os.getpid():
            log.warning(f"Note: taking over {str(self.folder)!r} from {_describe(previous)}, which no longer runs.")
        write_json_atomic(self.folder / OWNER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
            "command": _command_line(),
        })
        return self

    def _holder(self) -> dict[str, Any] | None:
        # The holder writes its record just after taking the lock: give it a moment to appear.
        for _ in range(20):
            owner = _read_owner(self.folder)
            if owner is not None:
                return owner
            time.sleep(0.05)
        return None

    def release(self) -> None:
        if self._lock is None:
            return
        (self.folder / OWNER_FILE).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
