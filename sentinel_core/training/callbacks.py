"""Extending the training loop without editing it: callbacks, in the spirit of transformers'
``TrainerCallback``.

A callback overrides the events it cares about. Each receives the loop's
:class:`~sentinel_core.training.state.TrainerState` and a :class:`TrainingContext` (the model,
the optimizer, the config, the processes). Callbacks fire in the order they were given, those
passed to :func:`~sentinel_core.training.train` first, then those plugins add through the
``register_training_callbacks`` hook; ``unwrap_model`` fires in the reverse order, so nested
wrappers come off inside out.

Events, in the order a stage sees them:

``wrap_model``
    before the optimizer is built; may return a different module to train (LoRA adapters).
``on_train_begin``
    once the stage starts or resumes (state, and each callback's own state, restored).
``on_step_begin`` / ``on_step_end``
    around each optimizer step; ``on_step_end`` gets the step's logs (``loss``, ``lr``, ...)
    and fires after the update, or after the loop skipped a non-finite step. The loss is read
    from the device only if a callback reads it, and whether the step was skipped reaches
    ``state.bad_in_row`` / ``state.skipped_steps`` one step later (docs/fine-tuning.md).
``on_evaluate``
    after each validation pass, with its metrics (``eval_loss``, ``eval_objective``).
``on_load``
    after the loop loaded a step checkpoint: when it resumes, and when it rolls back to an
    earlier step after non-finite losses (``state.step`` may then go back).
``on_save``
    after a step checkpoint is written, with its folder.
``unwrap_model``
    at the end, after the best weights are restored: undo ``wrap_model`` (merge LoRA).
``on_train_end``
    last, before the final record is written. ``context.from_final_record`` is True when the
    stage had finished in an earlier call and its weights were only loaded back.

A callback's own state survives resume: what ``state_dict()`` returns (JSON) is saved in
every step checkpoint under the callback's ``name`` and handed back to ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..config import ExperimentConfig
    from .state import TrainerState


@dataclass
class TrainingContext:
    """What the loop shows its callbacks.

    :param model: the module being trained (after ``wrap_model``), without the data-parallel
        wrapper.
    :param optimizer: the AdamW optimizer (None in ``wrap_model`` and for a finished stage).
    :param config: the stage's ExperimentConfig.
    :param stage: the stage's name.
    :param world_size, rank, is_main: the processes (``is_main`` writes files and metrics).
    :param device: where the model trains.
    :param from_final_record: in ``on_train_end``, the stage had already finished.
    """

    model: nn.Module
    config: ExperimentConfig
    stage: str
    world_size: int = 1
    rank: int = 0
    is_main: bool = True
    device: torch.device | None = None
    optimizer: torch.optim.Optimizer | None = None
    from_final_record: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


class TrainerCallback:
    """Base class: override the events you need (see the module docstring)."""

    @property
    def name(self) -> str:
        """The key of this callback's state in step checkpoints (default: the class name)."""
        return type(self).__name__

    def settings(self) -> Any:
        """JSON-able settings that change results: a checkpoint written with other settings does
        not resume this run (default: none)."""
        return None

    def wrap_model(self, model: nn.Module, state: TrainerState, context: TrainingContext) -> nn.Module:
        return model

    def unwrap_model(self, model: nn.Module, state: TrainerState, context: TrainingContext) -> nn.Module:
        return model

    def on_train_begin(self, state: TrainerState, context: TrainingContext) -> None:
        pass

    def on_step_begin(self, state: TrainerState, context: TrainingContext) -> None:
        pass

    def on_step_end(self, state: TrainerState, context: TrainingContext, logs: Mapping[str, Any]) -> None:
        pass

    def on_evaluate(self, state: TrainerState, context: TrainingContext, metrics: Mapping[str, float]) -> None:
        pass

    def on_save(self, state: TrainerState, context: TrainingContext, path: Any) -> None:
        pass

    def on_load(self, state: TrainerState, context: TrainingContext, path: Any) -> None:
        pass

    def on_train_end(self, state: TrainerState, context: TrainingContext) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        pass


class CallbackList:
    """The callbacks of one stage, fired in order."""

    def __init__(self, callbacks: Iterable[TrainerCallback]) -> None:
        self.callbacks = list(callbacks)
        names = [c.name for c in self.callbacks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"two training callbacks are called {duplicates[0]!r}; give each a distinct name")
        for callback in self.callbacks:
            if not isinstance(callback, TrainerCallback):
                raise TypeError(f"training callbacks must subclass TrainerCallback, got {type(callback).__name__}")

    def fire(self, event: str, *args: Any, **kwargs: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args, **kwargs)

    def wrap(self, model: nn.Module, state: TrainerState, context: TrainingContext) -> nn.Module:
        for callback in self.callbacks:
            model = callback.wrap_model(model, state, context)
            context.model = model
        return model

    def unwrap(self, model: nn.Module, state: TrainerState, context: TrainingContext) -> nn.Module:
        for callback in reversed(self.callbacks):
            model = callback.unwrap_model(model, state, context)
            context.model = model
        return model

    def settings(self) -> dict[str, Any]:
        return {c.name: c.settings() for c in self.callbacks if c.settings() is not None}

    def state_dicts(self) -> dict[str, Any]:
        return {c.name: c.state_dict() for c in self.callbacks}

    def load_state_dicts(self, saved: Mapping[str, Any]) -> None:
        for callback in self.callbacks:
            if callback.name in saved:
                callback.load_state_dict(saved[callback.name])
