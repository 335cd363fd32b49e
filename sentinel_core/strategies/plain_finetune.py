"""The ``plain`` fine-tuner: every parameter at one learning rate, through :func:`sentinel_core.training.train`."""

from __future__ import annotations

import dataclasses

from ..hookspecs import hookimpl
from ..results import FineTuneResult, Strategy

NAME = "plain"


@hookimpl
def register_strategies():
    from ..training import TRAINING_OPTIONS

    return [Strategy("fine_tune", NAME, "AdamW, warm-up then cosine decay, one learning rate for all parameters",
                     options=TRAINING_OPTIONS, function=plain_fine_tune)]


def plain_fine_tune(model, data, config, stage) -> FineTuneResult:
    """Train every parameter with :func:`sentinel_core.training.train`."""
    from ..training import train

    result = train(model, data, config, stage=stage)
    return dataclasses.replace(result, strategy=NAME)
