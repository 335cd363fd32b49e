"""Metric events: every stage reports what it measured through the ``on_metric`` hook.

Events are broadcast with :func:`sentinel_core.plugins.emit` (also ``sentinel_core.emit``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .fileio import json_ready


@dataclass(frozen=True)
class MetricEvent:
    """One measurement, or a group of measurements taken at the same moment.

    :param stage: pipeline stage (``evaluate``, ``score``, ``prune``, ``fine_tune``, ``grow``,
        ``sample``, ...); evaluations carry ``label`` ``baseline``, ``pruned`` or ``final``.
    :param step: optimizer step within the stage, or None for one-off values.
    :param values: JSON-able values, e.g. ``{"loss": 2.3, "perplexity": 9.9}``.
    :param time: wall-clock time of the event (``time.time()``).
    """

    stage: str
    step: int | None = None
    values: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def to_record(self) -> dict[str, Any]:
        """A flat JSON-able dict; non-finite floats become None so every line is valid JSON."""
        record: dict[str, Any] = {"stage": self.stage, "step": self.step, "time": self.time}
        for key, value in self.values.items():
            record[key] = json_ready(value)
        return record
