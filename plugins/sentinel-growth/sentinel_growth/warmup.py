"""Optional gate warm-up for grown heads (``-o growth_warmup_steps=N``, 0 = off).

After growth, each new head's gate (the per-head factor that surgery multiplies into the output
projection's input) follows the training stage that trains the new heads:

    g(k) = min(1, (k + 1) / (N + 1))     after k completed optimizer steps

so the new heads start at about 0 and are fully on after N steps. Because their output weights
start at zero, the function is unchanged at birth either way; the ramp damps how fast the new
heads' contribution can grow while the rest of the model adapts.

How it works: growth records the pending ramp in the model's config
(``sentinel_growth_warmup``: the new heads and N), which travels with every checkpoint of the
model. When :func:`sentinel_core.training.train` starts a stage on a model that carries it, the
plugin's ``register_training_callbacks`` hook hands the loop a :class:`GateWarmup` callback.
The callback sets the gates from the loop's own step count, on every process, so it follows
resume (the step comes back from the checkpoint), rollbacks and several processes alike:

- before each step and after each checkpoint load: ``g(step)``;
- at the end, the gate the final weights were trained and evaluated with, ``g(best_step)``
  when the loop restored its best weights, else ``g(step)``, is folded into the new heads'
  output-projection weights (``W <- g W``), the gate is set back to 1 and the record leaves
  the config. The function is unchanged (up to float rounding) and the saved model is the
  model that was evaluated.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sentinel_core.hookspecs import hookimpl
from sentinel_core.surgery import gates, get_adapter, get_head_map
from sentinel_core.training import TrainerCallback

from .gain import output_weight_blocks

CONFIG_KEY = "sentinel_growth_warmup"


def ramp(step: int, steps: int) -> float:
    """``g(k) = min(1, (k + 1) / (N + 1))``."""
    return min(1.0, (max(0, step) + 1) / (steps + 1))


def pending_warmup(model: nn.Module) -> tuple[dict[int, list[int]], int] | None:
    """The ramp growth left on ``model``: ``({layer: new head ids}, N)``, or None."""
    record = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if not isinstance(record, dict) or not record.get("heads"):
        return None
    return {int(layer): [int(i) for i in ids] for layer, ids in record["heads"].items()}, int(record["steps"])


def install_warmup(model: nn.Module, heads: dict[int, list[int]], steps: int) -> None:
    """Record a ramp of ``steps`` optimizer steps for the new ``heads`` and set their gates to ``g(0)``.

    A ramp still pending from an earlier growth step is settled first (folded where it stands).
    """
    if pending_warmup(model) is not None:
        GateWarmup(model).finish(None)
    heads = {layer: list(ids) for layer, ids in heads.items() if ids}
    setattr(model.config, CONFIG_KEY, {"heads": {str(k): v for k, v in heads.items()}, "steps": int(steps)})
    write_gates(model, heads, ramp(0, steps))


def write_gates(model: nn.Module, heads: dict[int, list[int]], value: float) -> None:
    """Set the gates of ``heads`` ({layer: ids}) to ``value``."""
    adapter = get_adapter(model)
    head_map = get_head_map(model)
    attns = adapter.attention_modules()
    for layer, ids in heads.items():
        proj = adapter.output_projection(attns[layer])
        slots = head_map.layers[layer]
        gate = gates.read_gate(proj, len(slots))
        for head in ids:
            gate[slots.index(head)] = value
        gates.write_gate(proj, gate)


class GateWarmup(TrainerCallback):
    """Drives the pending ramp of ``model`` from a training stage's steps (see the module docstring)."""

    name = "sentinel-growth-warmup"

    def __init__(self, model: nn.Module) -> None:
        found = pending_warmup(model)
        if found is None:
            raise ValueError("the model carries no pending growth warm-up")
        self.model = model
        self.heads, self.steps = found

    def settings(self) -> Any:
        return {"heads": {str(k): v for k, v in self.heads.items()}, "steps": self.steps}

    def _set(self, step: int) -> None:
        write_gates(self.model, self.heads, ramp(step, self.steps))

    def on_train_begin(self, state, context) -> None:
        self._set(state.step)

    def on_step_begin(self, state, context) -> None:
        self._set(state.step)

    def on_step_end(self, state, context, logs) -> None:
        self._set(state.step)  # what the evaluation after this step sees

    def on_load(self, state, context, path) -> None:
        self._set(state.step)  # a rollback goes back in steps

    def on_train_end(self, state, context) -> None:
        if context.from_final_record:  # the final weights were folded when the stage first ended
            self.finish(None, fold=False)
        else:
            restored = context.extra.get("restored_best", False) and state.best_step is not None
            self.finish(state.best_step if restored else state.step)

    @torch.no_grad()
    def finish(self, step: int | None, *, fold: bool = True) -> None:
        """Fold ``g(step)`` (default: the gate as it is) into the output weights, gates to 1, record gone."""
        head_map = get_head_map(self.model)
        if fold:
            for layer, ids in self.heads.items():
                proj = get_adapter(self.model).output_projection(get_adapter(self.model).attention_modules()[layer])
                current = gates.read_gate(proj, len(head_map.layers[layer]))
                for head in ids:
                    value = float(current[head_map.layers[layer].index(head)]) if step is None \
                        else ramp(step, self.steps)
                    if value < 1.0:
                        for weight, dim, start, width in output_weight_blocks(self.model, layer, [head]):
                            weight.narrow(dim, start, width).mul_(value)
        write_gates(self.model, self.heads, 1.0)
        if hasattr(self.model.config, CONFIG_KEY):
            delattr(self.model.config, CONFIG_KEY)


@hookimpl
def register_training_callbacks(model):
    """A stage that trains a model with a pending ramp drives it (any fine-tuner, any process)."""
    return [GateWarmup(model)] if pending_warmup(model) is not None else []
