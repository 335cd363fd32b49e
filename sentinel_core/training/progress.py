"""Progress a person can follow anywhere: a bar on a terminal, a line every few steps elsewhere.

On a terminal (stderr is a TTY) a stage shows a tqdm bar with the loss. Off one (Slurm, nohup,
CI logs) it writes through the ``sentinel`` logger, every ``log_every`` steps::

    fine_tune step 40/200 (20%): loss 4.7312, lr 9.8e-05, 2,341 tok/s, ETA 2m12s

and one line per evaluation::

    fine_tune step 40/200: eval_loss 4.8120 (perplexity 123.01), best 4.8120 at step 40

Only the main process reports; ``quiet`` shows neither.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from ..log import get_logger, hide_bar, show_bar
from .callbacks import TrainerCallback

log = get_logger("training")


def format_duration(seconds: float) -> str:
    """``2h03m``, ``2m12s``, ``45s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressReporter(TrainerCallback):
    """The loop's own progress display (see the module docstring)."""

    name = "sentinel-progress"

    def __init__(self, *, terminal: bool | None = None) -> None:
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar: Any = None
        self._clock: tuple[float, int, int] | None = None  # (time, step, tokens) at the start

    def _on(self, context) -> bool:
        return context.is_main and not context.config.quiet

    def on_train_begin(self, state, context) -> None:
        if not self._on(context):
            return
        self._clock = (time.perf_counter(), state.step, state.tokens)
        if self.terminal:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.total_steps, initial=state.step, desc=context.stage, unit="step",
                            dynamic_ncols=True, file=sys.stderr)
            show_bar(self.bar)

    def on_step_end(self, state, context, logs) -> None:
        if not self._on(context):
            return
        # The loss is read only when it is shown: reading it makes the host wait for the step
        # (see deferred_step), so the bar shows it every log_every steps too.
        every = context.config.log_every
        shown = state.step % every == 0 or state.step == state.total_steps
        if self.bar is not None:
            self.bar.update(1)
            if shown:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}", refresh=False)
            return
        if not shown:
            return
        loss = float(logs["loss"])
        lr = logs.get("lr")
        if lr is None:
            rates = [float(v) for k, v in logs.items() if k.startswith("lr/")]
            lr = max(rates) if rates else None
        rate, eta = self._rates(state)
        parts = [f"loss {loss:.4f}"]
        if lr is not None:
            parts.append(f"lr {float(lr):.1e}")
        if rate is not None:
            parts.append(f"{rate:,.0f} tok/s")
        parts.append(f"ETA {format_duration(eta)}")
        percent = 100 * state.step / max(1, state.total_steps)
        log.info(f"{context.stage} step {state.step}/{state.total_steps} ({percent:.0f}%): {', '.join(parts)}")

    def on_evaluate(self, state, context, metrics) -> None:
        if not self._on(context) or self.bar is not None:
            return
        loss = metrics["eval_loss"]
        ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
        best = (f", best {state.best_metric:.4f} at step {state.best_step}"
                if state.metric and math.isfinite(state.best_metric) else "")
        objective = f", objective {metrics['eval_objective']:.4f}" if "eval_objective" in metrics else ""
        log.info(f"{context.stage} step {state.step}/{state.total_steps}: eval_loss {loss:.4f} "
                 f"(perplexity {ppl:.2f}){objective}{best}")

    def on_load(self, state, context, path) -> None:
        if self.bar is not None:  # a rollback: the bar goes back too
            self.bar.reset(total=state.total_steps)
            self.bar.update(state.step)
        if self._clock is not None:
            self._clock = (time.perf_counter(), state.step, state.tokens)

    def on_train_end(self, state, context) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            hide_bar(self.bar)
            self.bar.close()
            self.bar = None

    def _rates(self, state) -> tuple[float | None, float]:
        if self._clock is None:
            return None, math.nan
        start, step0, tokens0 = self._clock
        elapsed = time.perf_counter() - start
        steps = state.step - step0
        if elapsed <= 0 or steps <= 0:
            return None, math.nan
        return (state.tokens - tokens0) / elapsed, (state.total_steps - state.step) * elapsed / steps
