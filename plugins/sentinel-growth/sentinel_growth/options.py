"""The growth plugin's options, declared once: ``-o NAME=VALUE`` or ``[options]`` in TOML."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sentinel_core.options import Option

DEFAULT_CANDIDATES = 4
DEFAULT_INIT_STD = 0.02

ALLOW_EXCEED = Option("growth_allow_exceed", bool, False, "let a layer grow past its original head count")
WARMUP_STEPS = Option("growth_warmup_steps", int, 0,
                      "ramp the new heads' gates up over this many optimizer steps of the next stage (0 = off)",
                      minimum=0)
CANDIDATES = Option("growth_candidates", int, DEFAULT_CANDIDATES,
                    "fresh heads measured per layer by the gradient strategy", minimum=1)
INIT_STD = Option("growth_init_std", float, None,
                  "std of the new query/key/value weights (unset: the model's initializer_range, else 0.02)",
                  minimum=0.0, min_exclusive=True, optional=True)
COMMON_OPTIONS = (ALLOW_EXCEED, WARMUP_STEPS, INIT_STD)


@dataclass(frozen=True)
class GrowthOptions:
    """``allow_exceed``: let a layer pass its original head count. ``warmup_steps``: gate ramp
    length in optimizer steps (0 = off). ``candidates``: fresh heads measured per layer by the
    ``gradient`` strategy. ``init_std``: std of new query/key/value weights."""

    allow_exceed: bool = False
    warmup_steps: int = 0
    candidates: int = DEFAULT_CANDIDATES
    init_std: float = DEFAULT_INIT_STD


def growth_options(config: Any, model_config: Any = None) -> GrowthOptions:
    """The growth options of ``config``; ``init_std`` defaults to the model's
    ``initializer_range`` (the std its own weights were drawn with), else 0.02."""
    std = INIT_STD.value(config)
    if std is None:
        std = getattr(model_config, "initializer_range", None)
        if not isinstance(std, (int, float)) or isinstance(std, bool) or not std > 0:
            std = DEFAULT_INIT_STD
    return GrowthOptions(allow_exceed=ALLOW_EXCEED.value(config), warmup_steps=WARMUP_STEPS.value(config),
                         candidates=CANDIDATES.value(config), init_std=float(std))
