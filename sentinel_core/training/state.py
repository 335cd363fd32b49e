"""``TrainerState``: the loop's counters, saved with every step checkpoint.

Callbacks read it (``state.step``, ``state.total_steps``, ``state.best_step``, ...), and may
keep their own state beside it (see :class:`~sentinel_core.training.callbacks.TrainerCallback`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

_FLOATS = ("best_metric", "best_eval_loss", "last_loss")


@dataclass
class TrainerState:
    """Where a training stage stands.

    :param step: optimizer steps completed (skipped ones included).
    :param total_steps: steps the stage will take.
    :param stage: the stage's name (``fine_tune``, ``fine_tune_growth``, ...).
    :param metric: what keep-best and early stopping follow (``eval_loss``, ``eval_objective``),
        or None when both are off.
    :param best_metric: its best value so far (lower is better), at ``best_step``.
    :param best_eval_loss: the validation loss at ``best_step`` (the loss of the last evaluation
        when keep-best is off).
    :param eval_history: ``[step, eval_loss]`` of every evaluation.
    """

    step: int = 0
    total_steps: int = 0
    stage: str = ""
    metric: str | None = "eval_loss"
    best_metric: float = math.inf
    best_eval_loss: float = math.inf
    best_step: int | None = None
    evals_since_best: int = 0
    last_eval_step: int = -1
    lr_scale: float = 1.0
    rollbacks: int = 0
    bad_in_row: int = 0
    skipped_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_loss: float = math.nan
    stopped_early: bool = False
    eval_history: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in _FLOATS:
            if not math.isfinite(out[key]):
                out[key] = None
        out["eval_history"] = [[s, v if math.isfinite(v) else None] for s, v in self.eval_history]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainerState:
        values = dict(data)
        for key in _FLOATS:
            if values.get(key) is None:
                values[key] = math.nan if key == "last_loss" else math.inf
        values["eval_history"] = [[s, math.nan if v is None else v] for s, v in values.get("eval_history", [])]
        return cls(**values)
