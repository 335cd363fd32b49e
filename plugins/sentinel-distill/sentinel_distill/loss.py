"""The distillation loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE``, per token.

``teacher_T`` and ``student_T`` are the next-token distributions at temperature ``T``
(``softmax(logits / T)``). The KL term is Hinton et al.'s soft-target loss (2015): its gradient
with respect to the student's logits is ``T * (student_T - teacher_T)``, so it shrinks as 1/T^2
when measured per unit of ``T^2``; the ``T^2`` factor keeps the two terms' relative weight
unchanged when ``T`` changes. ``CE`` is the ordinary next-token cross-entropy on the data.

Both are means over the micro-batch's counted tokens (positions with a next-token label; the
last position of every row and padding labelled -100 count for neither), which is the contract
of a :mod:`sentinel_core.training.losses` loss. They are computed in float32 at least (float64
stays float64), whatever precision the forward passes ran in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_core.data import IGNORE_INDEX
from sentinel_core.errors import SentinelError
from sentinel_core.training import logits_of
from sentinel_core.training.losses import next_token_labels


class TeacherLogits(Protocol):
    def logits(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor: ...


def _working_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """``sum over counted positions of KL(softmax(teacher / T) || softmax(student / T))``.

    :param student_logits, teacher_logits: ``[batch, tokens, vocab]``.
    :param targets: ``[batch, tokens]`` next-token labels (-100 where no token counts).
    """
    counted = targets.to(student_logits.device) != IGNORE_INDEX
    dtype = _working_dtype(student_logits)
    # Only counted positions: packed blocks lose one position per row, padded ones more.
    student = student_logits[counted].to(dtype) / temperature
    teacher = teacher_logits.to(student_logits.device)[counted].to(dtype) / temperature
    return F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="sum",
                    log_target=True)


def ce_sum(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the counted positions (as the core's ``lm_loss``)."""
    logits = student_logits.reshape(-1, student_logits.shape[-1]).to(_working_dtype(student_logits))
    return F.cross_entropy(logits, targets.reshape(-1).to(student_logits.device), ignore_index=IGNORE_INDEX,
                           reduction="sum")


class DistillationLoss:
    """``loss_fn(model, batch, state) -> (loss, {"kl", "ce"})`` for :func:`sentinel_core.training.train`.

    :param teacher: gives the teacher's logits for a batch (a :class:`~sentinel_distill.teacher.Teacher`).
    :param temperature: ``T`` > 0.
    :param alpha: weight of the KL term, in [0, 1]. A term of weight 0 is still measured (and
        logged) but kept out of the gradient, so ``alpha = 0`` trains exactly like ``plain``.
    """

    def __init__(self, teacher: TeacherLogits, *, temperature: float, alpha: float) -> None:
        if not temperature > 0:
            raise SentinelError(f"distill_temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise SentinelError(f"distill_alpha must be in [0, 1], got {alpha}")
        self.teacher, self.temperature, self.alpha = teacher, float(temperature), float(alpha)

    def __call__(self, model: nn.Module, batch: Mapping[str, torch.Tensor], state: Any = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = logits_of(model, batch)
        teacher = self.teacher.logits(batch, student.device)
        if teacher.shape != student.shape:
            raise SentinelError(f"the teacher's logits have shape {tuple(teacher.shape)} but the student's "
                                f"{tuple(student.shape)}; the teacher must be the student's model before pruning "
                                "(same vocabulary)")
        return self.combine(student, teacher, batch["labels"])

    def combine(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its logs from the two models' logits and the batch's labels."""
        targets = next_token_labels(labels)
        count = (targets != IGNORE_INDEX).sum().clamp(min=1)
        alpha, t = self.alpha, self.temperature
        # A term that does not count is computed on detached logits: logged, never differentiated.
        kl = kl_sum(student if alpha > 0 else student.detach(), teacher, targets, t) / count
        ce = ce_sum(student if alpha < 1 else student.detach(), targets) / count
        if alpha == 0:
            loss = ce
        elif alpha == 1:
            loss = (t * t) * kl
        else:
            loss = alpha * (t * t) * kl + (1.0 - alpha) * ce
        return loss, {"kl": kl.detach(), "ce": ce.detach()}
