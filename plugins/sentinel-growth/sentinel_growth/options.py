"""The growth plugin's settings from ``config.options``, checked once with one-line errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sentinel_core.errors import SentinelError

ALLOW_EXCEED = "growth_allow_exceed"
WARMUP_STEPS = "growth_warmup_steps"
CANDIDATES = "growth_candidates"
INIT_STD = "growth_init_std"

DEFAULT_CANDIDATES = 4
DEFAULT_INIT_STD = 0.02


@dataclass(frozen=True)
class GrowthOptions:
    """``allow_exceed``: let a layer pass its original head count. ``warmup_steps``: gate ramp
    length in optimizer steps (0 = off). ``candidates``: fresh heads measured per layer by the
    ``gradient`` strategy. ``init_std``: std of new query/key/value weights."""

    allow_exceed: bool = False
    warmup_steps: int = 0
    candidates: int = DEFAULT_CANDIDATES
    init_std: float = DEFAULT_INIT_STD


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SentinelError(f"options.{name}={value!r} is not valid; use true or false")


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SentinelError(f"options.{name} must be an integer >= {minimum}, got {value!r}")
    return value


def growth_options(options: dict[str, Any], model_config: Any = None) -> GrowthOptions:
    """Read and check the growth keys of ``options``; ``init_std`` defaults to the model's
    ``initializer_range`` (the std its own weights were drawn with), else 0.02."""
    default_std = getattr(model_config, "initializer_range", None)
    if not isinstance(default_std, (int, float)) or isinstance(default_std, bool) or not default_std > 0:
        default_std = DEFAULT_INIT_STD
    std = options.get(INIT_STD, default_std)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 < std < float("inf"):
        raise SentinelError(f"options.{INIT_STD} must be a positive number such as 0.02, got {std!r}")
    return GrowthOptions(
        allow_exceed=_flag(ALLOW_EXCEED, options.get(ALLOW_EXCEED, False)),
        warmup_steps=_int(WARMUP_STEPS, options.get(WARMUP_STEPS, 0), 0),
        candidates=_int(CANDIDATES, options.get(CANDIDATES, DEFAULT_CANDIDATES), 1),
        init_std=float(std),
    )
