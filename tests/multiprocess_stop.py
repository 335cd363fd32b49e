"""``sentinel`` with an observer that asks the run to stop after fine-tuning step ``$STOP_AFTER_STEP``.

tests/test_multiprocess_pipeline.py starts this file under torchrun to interrupt a run of two
processes the way Ctrl-C would (the observer hears the main process's metrics only; the loop
then tells the others), and resumes the run with the plain ``sentinel run --resume``.
"""

from __future__ import annotations

import os

from sentinel_core.cli import main
from sentinel_core.hookspecs import hookimpl
from sentinel_core.plugins import pm


class StopAfterStep:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_metric(self, event):
        if event.stage == "fine_tune" and event.step == self.step and "loss" in event.values:
            raise KeyboardInterrupt


if __name__ == "__main__":
    pm.register(StopAfterStep(int(os.environ["STOP_AFTER_STEP"])))
    main()
