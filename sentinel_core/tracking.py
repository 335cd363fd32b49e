"""``ProgressTracker``: an ``on_metric`` plugin that writes every event to ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .hookspecs import hookimpl
from .metrics import MetricEvent
from .run_files import METRICS_FILE


class ProgressTracker:
    """Appends one JSON object per metric event to ``<output_dir>/metrics.jsonl``.

    Each line is flushed as it is written, so an interrupted run leaves a file whose every
    complete line parses; a half-written last line (from a hard kill) is skipped by
    :func:`read_metrics`. Appending lets a resumed run continue the same file.
    """

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    @hookimpl
    def on_metric(self, event: MetricEvent) -> None:
        if self._file.closed:
            return
        self._file.write(json.dumps(event.to_record(), default=str, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete event in ``metrics.jsonl``, in order; an unfinished last line is ignored."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
