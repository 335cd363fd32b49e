"""Optional gate warm-up for grown heads (``options.growth_warmup_steps = N``, 0 = off).

After growth, each new head's gate (the per-head factor that surgery multiplies into the output
projection's input) is set to ``g(0)`` and raised with the fine-tuning stage's optimizer steps:

    g(k) = min(1, (k + 1) / (N + 1))     after k completed optimizer steps

so the new heads start at about 0 and are fully on after N steps. Because their output weights
start at zero, the function is unchanged at birth either way; the ramp damps how fast the new
heads' contribution can grow while the rest of the model adapts.

What drives it: the training loop's own step count, read from the metric events it reports
(``sentinel_core.training.train`` emits one per optimizer step, with ``step`` = completed steps,
and a ``finished`` event before it returns). The warm-up binds to the first stage that reports a
step after growth (in the pipeline, ``fine_tune_growth``). Using the loop's events rather than
counting forward passes keeps the gate right through rollbacks (the step goes back), evaluations
(no step), and the end of the stage:

- the gate is not saved in checkpoints (it is a non-persistent buffer), so the warm-up must be
  resolved before the pipeline saves the model. On the ``finished`` event the gate the final
  weights were trained and evaluated with, ``g(best_step)`` when the loop restored its best
  weights, else ``g(step)``, is folded into the new heads' output-projection weights
  (``W <- g W``) and the gate is set back to 1. The function is unchanged (up to float
  rounding) and the saved model is the model that was evaluated.

A training loop that reports no steps can drive the ramp itself: :func:`active_warmups` gives
the live schedules, with ``set_step(k)`` and ``finish(step)``.

Limitation: the schedule lives in the process. A run resumed from disk in the middle of
``fine_tune_growth`` continues with the gates at 1 (the grown heads are then trained without the
ramp from the resumed step on).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from sentinel_core.hookspecs import hookimpl
from sentinel_core.surgery import gates, get_adapter, get_head_map

from .gain import output_weight_blocks

_ACTIVE: list[GateWarmup] = []


def ramp(step: int, steps: int) -> float:
    """``g(k) = min(1, (k + 1) / (N + 1))``."""
    return min(1.0, (max(0, step) + 1) / (steps + 1))


class GateWarmup:
    """The ramp of one growth step: ``heads`` ({layer: new head ids}) of one model over ``steps`` steps."""

    def __init__(self, model: nn.Module, heads: dict[int, list[int]], steps: int) -> None:
        self._model = weakref.ref(model)
        self.heads = {layer: list(ids) for layer, ids in heads.items() if ids}
        self.steps = int(steps)
        self.stage: str | None = None
        self.value = ramp(0, self.steps)
        self.done = False

    @property
    def model(self) -> nn.Module | None:
        return self._model()

    def _write(self, value: float) -> None:
        model = self.model
        if model is None:
            return
        adapter = get_adapter(model)
        head_map = get_head_map(model)
        for layer, ids in self.heads.items():
            proj = adapter.output_projection(adapter.attention_modules()[layer])
            slots = head_map.layers[layer]
            gate = gates.read_gate(proj, len(slots))
            for head in ids:
                gate[slots.index(head)] = value
            gates.write_gate(proj, gate)
        self.value = value

    def start(self) -> None:
        """Set the new heads' gates to ``g(0)``."""
        self._write(ramp(0, self.steps))

    def set_step(self, step: int) -> None:
        """Gates for ``step`` completed optimizer steps; the warm-up ends by itself once they reach 1."""
        value = ramp(step, self.steps)
        if value >= 1.0:
            self.finish(step)
        else:
            self._write(value)

    def finish(self, step: int | None = None) -> None:
        """Fold ``g(step)`` (default: the current gate) into the output weights and set the gates to 1."""
        if self.done:
            return
        value = self.value if step is None else ramp(step, self.steps)
        model = self.model
        if model is not None and value < 1.0:
            with torch.no_grad():
                for layer, ids in self.heads.items():
                    for weight, dim, start, width in output_weight_blocks(model, layer, ids):
                        weight.narrow(dim, start, width).mul_(value)
        self._write(1.0)
        self.done = True
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        _listen(bool(_ACTIVE))

    def on_event(self, stage: str, step: int | None, values: dict[str, Any]) -> None:
        if self.done or step is None:
            return
        if self.stage is None:
            self.stage = stage
        if stage != self.stage:
            return
        if values.get("finished"):
            best = values.get("best_step")
            self.finish(best if values.get("restored_best") and best is not None else step)
        else:
            self.set_step(step)


class _Listener:
    """Feeds metric events to the running warm-ups. Registered with the plugin manager only while
    a warm-up runs, so the plugin itself implements just its strategy hooks."""

    name = "sentinel-growth-warmup"

    @hookimpl
    def on_metric(self, event):
        for warmup in list(_ACTIVE):
            if warmup.model is None:
                _ACTIVE.remove(warmup)
                continue
            try:
                warmup.on_event(event.stage, event.step, event.values)
            except Exception as exc:  # on_metric must never raise: end the ramp instead
                warnings.warn(f"growth warm-up stopped ({type(exc).__name__}: {exc}); gates set to 1", stacklevel=2)
                warmup.done = True
                if warmup in _ACTIVE:
                    _ACTIVE.remove(warmup)
                try:
                    warmup._write(1.0)
                except Exception:  # noqa: BLE001 - nothing more can be done from a metric hook
                    pass
        _listen(bool(_ACTIVE))


_LISTENER = _Listener()


def _listen(on: bool) -> None:
    from sentinel_core.plugins import pm

    registered = pm.is_registered(_LISTENER)
    if on and not registered:
        pm.register(_LISTENER, name=_Listener.name)
    elif not on and registered:
        pm.unregister(_LISTENER)  # safe mid-call: pluggy iterates over a copy of the hooks


def install_warmup(model: nn.Module, heads: dict[int, list[int]], steps: int) -> GateWarmup:
    """Start a warm-up of ``steps`` optimizer steps for the new ``heads`` of ``model``."""
    for old in [w for w in _ACTIVE if w.model is model]:
        old.finish()  # a second growth step: settle the first one where it stands
    warmup = GateWarmup(model, heads, steps)
    warmup.start()
    _ACTIVE.append(warmup)
    _listen(True)
    return warmup


def active_warmups() -> list[GateWarmup]:
    """The warm-ups still running in this process."""
    return [w for w in _ACTIVE if not w.done and w.model is not None]
