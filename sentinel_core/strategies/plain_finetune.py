"""The ``plain`` fine-tuner: every parameter at one learning rate, through :func:`sentinel_core.training.train`."""

from __future__ import annotations

import dataclasses

from ..hookspecs import hookimpl
from ..results import Strategy

NAME = "plain"


@hookimpl
def register_strategies():
    return [Strategy("fine_tune", NAME, "AdamW, warm-up then cosine decay, one learning rate for all parameters")]


@hookimpl
def fine_tune(strategy, model, data, config, stage):
    if strategy != NAME:
        return None
    from ..training import train  # imported here so that listing plugins does not import accelerate

    result = train(model, data, config, stage=stage)
    return dataclasses.replace(result, strategy=NAME)
