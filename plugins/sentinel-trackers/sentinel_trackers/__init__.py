"""sentinel-trackers: report a Sentinel run to TensorBoard, MLflow and/or Weights & Biases.

``sentinel run --report-to tensorboard,mlflow,wandb`` (or ``report_to`` in the config). The plugin
opens each tracker in ``on_run_start`` and logs the config as parameters, logs every numeric value
of every metric event in ``on_metric`` (named ``<stage>[/<label>]/<key>`` at the stage's step),
and logs the summary and closes the trackers in ``on_run_end``.

A tracker that fails is reported once, in one line, and left out for the rest of the run; the run
itself never stops for a tracker.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path
from typing import Any

from sentinel_core import hookimpl
from sentinel_core.fileio import read_json, write_json_atomic
from sentinel_core.metrics import MetricEvent
from sentinel_core.report_to import parse_report_to
from sentinel_core.run_files import RUN_SUMMARY_FILE

from .backends import BACKENDS
from .values import config_params, event_prefix, event_scalars, summary_scalars

__version__ = "0.1.0"
__all__ = ["TrackerPlugin", "plugin"]

IDS_FILE = "trackers.json"


class _Session:
    """The trackers of one run: started together, each contained on its own."""

    def __init__(self, names: tuple[str, ...], run_dir: Path, config: Any) -> None:
        self.run_dir = run_dir
        self.ids_path = run_dir / IDS_FILE
        ids = read_json(self.ids_path) if self.ids_path.is_file() else {}
        params = config_params(config)
        self.backends: dict[str, Any] = {}
        for name in names:
            try:
                backend = BACKENDS[name](run_dir, quiet=bool(getattr(config, "quiet", False)))
                ids[name] = backend.start(params, ids.get(name) or {})
            except Exception as exc:
                _warn(name, "could not start", exc)
                continue
            self.backends[name] = backend
        write_json_atomic(self.ids_path, ids)

    def log(self, event: MetricEvent) -> None:
        scalars = event_scalars(event)
        if not scalars:
            return
        prefix, step = event_prefix(event), event.step if event.step is not None else 0
        for name, backend in list(self.backends.items()):
            try:
                backend.log(scalars, prefix, step)
            except Exception as exc:
                _warn(name, "failed to log and is left out for the rest of the run", exc)
                self._drop(name, "FAILED")

    def finish(self, summary: dict[str, Any] | None, status: str, report: bool = True) -> None:
        scalars = summary_scalars(summary) if summary else {}
        summary_path = self.run_dir / RUN_SUMMARY_FILE if summary else None
        for name in list(self.backends):
            backend = self.backends.pop(name)
            try:
                backend.finish(scalars, summary_path, status)
            except Exception as exc:
                if report:
                    _warn(name, "failed to finish", exc)

    def _drop(self, name: str, status: str) -> None:
        backend = self.backends.pop(name)
        try:
            backend.finish({}, None, status)
        except Exception:  # already reported once; closing what is left is best effort
            pass


class TrackerPlugin:
    """The hook implementations; one instance is registered through the ``sentinel`` entry point."""

    def __init__(self) -> None:
        self.session: _Session | None = None
        atexit.register(self._at_exit)

    @hookimpl
    def on_run_start(self, config: Any, run_dir: Path) -> None:
        # A run of this process that stopped with an error never reached on_run_end.
        self._close(None, "FAILED")
        names = parse_report_to(getattr(config, "report_to", None))
        if names:
            self.session = _Session(names, Path(run_dir).absolute(), config)

    @hookimpl
    def on_metric(self, event: MetricEvent) -> None:
        if self.session is not None:
            self.session.log(event)

    @hookimpl
    def on_run_end(self, summary: dict[str, Any], run_dir: Path) -> None:
        self._close(summary, "FINISHED")

    def _close(self, summary: dict[str, Any] | None, status: str, report: bool = True) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.finish(summary, status, report)

    def _at_exit(self) -> None:
        # An interrupted or crashed run: close the trackers so what they logged is on disk, and
        # mark the MLflow run as stopped rather than still running. Libraries may already have
        # torn themselves down (W&B closes its own run at exit), so failures here stay silent.
        self._close(None, "KILLED", report=False)


def _warn(tracker: str, what: str, exc: BaseException) -> None:
    message = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]
    print(f"Warning: the {tracker} tracker {what} ({message[:300]})", file=sys.stderr)


plugin = TrackerPlugin()
