"""What the trackers log: metric events and summaries turned into flat ``name -> number`` maps."""

from __future__ import annotations

import math
from typing import Any

from sentinel_core.metrics import MetricEvent


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): the only values a scalar chart can hold."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def event_prefix(event: MetricEvent) -> str:
    """``fine_tune``, or ``evaluate/baseline`` for events that carry a string ``label``."""
    label = event.values.get("label")
    return f"{event.stage}/{label}" if isinstance(label, str) and label else event.stage


def event_scalars(event: MetricEvent) -> dict[str, float]:
    """Every numeric value of an event, named ``<stage>[/<label>]/<key>``.

    Lists (``heads_active``, score matrices), strings, booleans and non-finite numbers (a skipped
    step's NaN loss) are left out; ``lr/<group>`` keys keep their slash, so each parameter
    group's rate is its own chart.
    """
    prefix = event_prefix(event)
    return {f"{prefix}/{key}": float(value) for key, value in event.values.items() if is_number(value)}


def flatten(values: dict[str, Any], prefix: str = "", sep: str = "/") -> dict[str, Any]:
    """Nested dicts to one level: ``{"a": {"b": 1}}`` -> ``{"a/b": 1}``. Lists stay as they are."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, sep))
        else:
            flat[name] = value
    return flat


def config_params(config: Any) -> dict[str, Any]:
    """The run's config as flat parameters (``options.sample_prompt``), values as they are."""
    return flatten(config.to_dict(), sep=".")


def summary_scalars(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers, named ``summary/<path>`` (``summary/perplexity/final``); the configs,
    which were logged as parameters at the start, are left out."""
    skip = {"config", "effective_config", "versions", "samples"}
    kept = {key: value for key, value in summary.items() if key not in skip}
    return {f"summary/{name}": float(value) for name, value in flatten(kept).items() if is_number(value)}
