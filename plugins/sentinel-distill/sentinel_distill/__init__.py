"""Sentinel plugin ``distill``: recover a pruned model by logit distillation from the model before pruning.

The teacher is the run's own model as it was loaded, before any head was removed (the pipeline
passes it as ``original_model``); the student is the pruned (or pruned and grown) model. The
loss is ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` per token
(:mod:`sentinel_distill.loss`), trained with the core loop, so checkpoints, exact resume,
signals, non-finite-step handling, several processes and LoRA (``--lora-rank``) are the loop's.
See README.md for the options and their defaults.
"""

from __future__ import annotations

import dataclasses
import os

from sentinel_core import hookimpl
from sentinel_core.results import Strategy

__version__ = "0.1.0"
NAME = "distill"


@hookimpl
def register_strategies():
    from sentinel_core.training import TRAINING_OPTIONS

    from .options import OPTIONS

    return [Strategy("fine_tune", NAME, "logit distillation from the model before pruning (KL to it, plus CE)",
                     options=(*TRAINING_OPTIONS, *OPTIONS), function=distill_fine_tune)]


def distill_fine_tune(model, data, config, stage, original_model=None):
    """Train ``model`` towards the frozen ``original_model`` with :func:`sentinel_core.training.train`.

    :param original_model: what :func:`sentinel_core.load_model` opens to get the teacher.
    :raises SentinelError: without ``original_model`` (outside a run), or for a bad option.
    """
    from sentinel_core.plugins import emit
    from sentinel_core.training import train

    from .loss import DistillationLoss
    from .options import DistillSettings
    from .teacher import Teacher

    settings = DistillSettings.from_config(config)
    teacher = Teacher(original_model, placement=settings.teacher_device,
                      attn_implementation=config.attn_implementation, trust_remote_code=config.trust_remote_code)
    loss = DistillationLoss(teacher, temperature=settings.temperature, alpha=settings.alpha)
    described = {"teacher": teacher.source, **dataclasses.asdict(settings)}
    if int(os.environ.get("RANK", "0")) == 0:  # one report per run, not one per process
        emit(stage, None, distill=described)
    result = train(model, data, config, stage=stage, loss_fn=loss, select_on=settings.loop_metric,
                   callbacks=[teacher])
    return dataclasses.replace(result, strategy=NAME, extra={**result.extra, "distill": described})
