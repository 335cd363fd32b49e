"""Sentinel plugin ``adaptive``: fine-tuning with faster learning rates where surgery changed the model.

Layers that lost or gained heads train faster than the rest, and newly grown heads faster still;
the boosts ramp up over warm-up and decay back to the base rate. See :mod:`sentinel_adaptive.plan`
for the mechanism and README.md for the options.
"""

from __future__ import annotations

import dataclasses
import os

from sentinel_core import hookimpl
from sentinel_core.results import Strategy

__version__ = "0.1.0"
NAME = "adaptive"


@hookimpl
def register_strategies():
    from sentinel_core.training import TRAINING_OPTIONS

    from .plan import OPTIONS

    return [Strategy("fine_tune", NAME, "faster learning rates for the layers and heads pruning or growth touched",
                     options=(*TRAINING_OPTIONS, *OPTIONS), function=adaptive_fine_tune)]


def adaptive_fine_tune(model, data, config, stage):
    """Train with :func:`sentinel_core.training.train`, boosting what surgery touched (see plan.py)."""
    from sentinel_core.plugins import emit
    from sentinel_core.training import train

    from .plan import AdaptivePlan

    plan = AdaptivePlan.from_model(model, config)
    if int(os.environ.get("RANK", "0")) == 0:  # one report per run, not one per process
        emit(stage, None, adaptive_plan=plan.describe())
    with plan.grown_head_boost():
        result = train(model, data, config, stage=stage, param_groups=plan.param_groups(),
                       lr_multiplier=plan.multiplier)
    return dataclasses.replace(result, strategy=NAME, extra={**result.extra, "adaptive": plan.describe()})
