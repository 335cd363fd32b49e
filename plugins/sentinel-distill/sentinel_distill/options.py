"""The options of the ``distill`` fine-tuner (``-o NAME=VALUE``, ``[experiment.options]``).

The defaults follow the logit distillation that NVIDIA's Minitron and ModelOpt use to recover
pruned LLMs: forward KL to the unpruned teacher at temperature 1, and no cross-entropy term
(ModelOpt's Megatron ``DistillationConfig``: ``logit_kl_temperature = 1.0``,
``kd_loss_alpha = 1.0``). README.md says why, with the measurements behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sentinel_core.options import Option

TEMPERATURE = Option(
    "distill_temperature", float, 1.0,
    "softmax temperature T of teacher and student in the KL term (the term is scaled by T^2)",
    minimum=0.0, min_exclusive=True)
ALPHA = Option(
    "distill_alpha", float, 1.0,
    "weight of the distillation term: alpha*T^2*KL + (1-alpha)*CE (1: KL only, 0: plain cross-entropy)",
    minimum=0.0, maximum=1.0)
TEACHER_DEVICE = Option(
    "distill_teacher_device", str, "same",
    "where the frozen teacher lives: 'same' (the training device) or 'cpu' (saves accelerator memory, slower)",
    choices=("same", "cpu"))
SELECT_ON = Option(
    "distill_select_on", str, "objective",
    "what keep-best and early stopping follow: 'objective' (the distillation loss on validation) or 'ce' "
    "(validation cross-entropy)",
    choices=("objective", "ce"))

OPTIONS: tuple[Option, ...] = (TEMPERATURE, ALPHA, TEACHER_DEVICE, SELECT_ON)

# distill_select_on -> the loop's select_on.
_LOOP_METRIC = {"objective": "eval_objective", "ce": "eval_loss"}


@dataclass(frozen=True)
class DistillSettings:
    """The distillation options of one run, checked."""

    temperature: float
    alpha: float
    teacher_device: str
    select_on: str

    @classmethod
    def from_config(cls, config: Any) -> DistillSettings:
        return cls(temperature=TEMPERATURE.value(config), alpha=ALPHA.value(config),
                   teacher_device=TEACHER_DEVICE.value(config), select_on=SELECT_ON.value(config))

    @property
    def loop_metric(self) -> str:
        """What :func:`sentinel_core.training.train` is told to follow (``select_on``)."""
        return _LOOP_METRIC[self.select_on]
