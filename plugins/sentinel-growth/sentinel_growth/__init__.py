"""Sentinel plugin: grow attention heads back after pruning (``--growth-strategy``).

Strategies (details and formulas in docs/growth.md):

- ``gradient``: layers where a fresh head's zero output weights get the largest loss
  gradient, i.e. the largest first-order loss decrease per unit learning rate;
- ``entropy-gap``: layers whose surviving heads attend most diffusely;
- ``balanced``: layers that lost the most heads first, round-robin;
- ``random``: seeded random layers, the baseline.

The number of new heads is ``round(growth_percent * num_layers * original_num_heads)``; no
layer passes its original head count unless ``options.growth_allow_exceed`` is true. New heads
have zero output-projection weights, so the model computes the same function right after
growth, and the next fine-tuning stage trains them in; ``options.growth_warmup_steps`` ramps
their gates up over that stage's first steps (:mod:`sentinel_growth.warmup`).
"""

from __future__ import annotations

import sentinel_core
from sentinel_core.results import Strategy

from .allocation import allocate_balanced, allocate_by_score, allocate_random, growth_target, layer_room
from .entropy import layer_entropies
from .gain import CandidateGains, candidate_gains
from .grow import GRADIENT, STRATEGIES, grow, plan_growth
from .options import CANDIDATES, COMMON_OPTIONS, GrowthOptions, growth_options
from .warmup import GateWarmup, active_warmups, install_warmup, ramp

__all__ = [
    "STRATEGIES",
    "CandidateGains",
    "GateWarmup",
    "GrowthOptions",
    "active_warmups",
    "allocate_balanced",
    "allocate_by_score",
    "allocate_random",
    "candidate_gains",
    "grow",
    "growth_options",
    "growth_target",
    "install_warmup",
    "layer_entropies",
    "layer_room",
    "plan_growth",
    "ramp",
]
__version__ = "0.1.0"


@sentinel_core.hookimpl
def register_strategies():
    return [Strategy("grow_heads", name, description,
                     options=(*COMMON_OPTIONS, CANDIDATES) if name == GRADIENT else COMMON_OPTIONS, function=grow)
            for name, description in STRATEGIES.items()]
