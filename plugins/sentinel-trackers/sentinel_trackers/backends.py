"""One class per tracker, each writing into the run folder unless its own settings say otherwise.

- TensorBoard: accelerate's ``TensorBoardTracker`` into ``<run>/tensorboard``.
- MLflow: ``mlflow.MlflowClient`` on ``MLFLOW_TRACKING_URI``, or a local file store in
  ``<run>/mlruns``. The client is used directly rather than accelerate's ``MLflowTracker``, which
  works through MLflow's process-wide tracking URI and active-run stack and so could neither be
  pointed at the run folder nor leave a caller's own MLflow run alone.
- W&B: accelerate's ``WandBTracker``, files in ``<run>/wandb``, offline unless ``WANDB_MODE`` says
  otherwise or the W&B server is reachable with an API key configured.

Every backend has ``start(params) -> ids``, ``log(scalars, prefix, step)``, and
``finish(summary_scalars, summary_path, status)``; ``ids`` (the MLflow run id, the W&B run id) are
kept in ``<run>/trackers.json`` so that a resumed run continues the same tracker run.
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .values import is_number

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
WANDB_DIR = "wandb"
DEFAULT_PROJECT = "sentinel"
_MLFLOW_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, run_dir: Path, quiet: bool = False) -> None:
        from accelerate.tracking import TensorBoardTracker

        self.logdir = run_dir / TENSORBOARD_DIR
        self.tracker = TensorBoardTracker(run_name=TENSORBOARD_DIR, logging_dir=str(run_dir))

    def start(self, params: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
        self.tracker.start()
        if not ids.get("params_logged"):
            # add_hparams takes int, float, str and bool; None becomes "none" so the key still shows.
            self.tracker.store_init_configuration(
                {k: (v if isinstance(v, (int, float, str, bool)) else str(v).lower() if v is None else str(v))
                 for k, v in params.items()})
        return {"params_logged": True, "logdir": str(self.logdir)}

    def log(self, scalars: dict[str, float], prefix: str, step: int) -> None:
        writer = self.tracker.writer
        for key, value in scalars.items():
            writer.add_scalar(key, value, global_step=step)

    def finish(self, summary: dict[str, float], summary_path: Path | None, status: str) -> None:
        writer = self.tracker.writer
        for key, value in summary.items():
            writer.add_scalar(key, value, global_step=0)
        if summary_path is not None and summary_path.is_file():
            writer.add_text("summary", "```\n" + summary_path.read_text(encoding="utf-8") + "\n```", global_step=0)
        self.tracker.finish()


class MLflowBackend:
    name = "mlflow"

    def __init__(self, run_dir: Path, quiet: bool = False) -> None:
        self.run_dir = run_dir
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / MLFLOW_DIR).as_uri()
        if self.uri.startswith("file:"):
            # MLflow 3 keeps the file store in "maintenance mode" and refuses it unless told
            # otherwise; a folder of plain files inside the run folder is what is wanted here.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None
        self.pending: list[Any] = []

    def start(self, params: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
        from mlflow.entities import Param

        if ids.get("run_id") and ids.get("tracking_uri") == self.uri:
            self.run_id = ids["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return ids
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"sentinel.run_dir": str(self.run_dir)})
        self.run_id = run.info.run_id
        items = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _MLFLOW_BATCH])
        return {"run_id": self.run_id, "tracking_uri": self.uri, "experiment_id": experiment_id}

    def log(self, scalars: dict[str, float], prefix: str, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # Asynchronous: MLflow's own worker thread writes the files, so the training step does not wait
        # on them (see the tracker overhead in docs/benchmarks.md).
        self.pending.append(self.client.log_batch(
            self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()], synchronous=False))

    def finish(self, summary: dict[str, float], summary_path: Path | None, status: str) -> None:
        if summary:
            self.log(summary, "summary", 0)
        for operation in self.pending:  # everything logged is on disk before the run is closed
            operation.wait()
        self.pending.clear()
        if summary_path is not None and summary_path.is_file():
            self.client.log_artifact(self.run_id, str(summary_path))
        self.client.set_terminated(self.run_id, status=status)


class WandbBackend:
    name = "wandb"

    def __init__(self, run_dir: Path, quiet: bool = False) -> None:
        self.run_dir = run_dir
        self.quiet = quiet
        self.tracker: Any = None
        self.prefixes: set[str] = set()

    def start(self, params: dict[str, Any], ids: dict[str, Any]) -> dict[str, Any]:
        import wandb
        from accelerate.tracking import WandBTracker

        from .values import flatten

        run_id = ids.get("run_id") or secrets.token_hex(4)
        # wandb.init(dir=D) writes into D/wandb/.
        kwargs: dict[str, Any] = {"dir": str(self.run_dir), "id": run_id, "resume": "allow",
                                  "name": self.run_dir.name, "settings": wandb.Settings(console="off",
                                                                                        silent=self.quiet)}
        mode = wandb_mode()
        if mode is not None:
            kwargs["mode"] = mode
        self.tracker = WandBTracker(os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), **kwargs)
        self.tracker.start()
        self.tracker.store_init_configuration(flatten(params, sep="."))
        return {"run_id": run_id, "mode": mode or os.environ.get("WANDB_MODE")}

    def log(self, scalars: dict[str, float], prefix: str, step: int) -> None:
        run = self.tracker.run
        if prefix not in self.prefixes:
            # W&B's own step must only grow, but each stage counts its steps from 0 or 1; so every
            # stage's charts use that stage's step as their x axis instead.
            run.define_metric(f"{prefix}/step")
            run.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
            self.prefixes.add(prefix)
        run.log({**scalars, f"{prefix}/step": step})

    def finish(self, summary: dict[str, float], summary_path: Path | None, status: str) -> None:
        run = self.tracker.run
        run.summary.update({k: v for k, v in summary.items() if is_number(v)})
        run.finish(exit_code=0 if status == "FINISHED" else 1)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoardBackend, "mlflow": MLflowBackend, "wandb": WandbBackend}


def wandb_mode() -> str | None:
    """None when ``WANDB_MODE`` is set (W&B reads it itself); ``online`` when the W&B server accepts
    a connection and an API key is configured; ``offline`` otherwise, so a run never waits on, or
    asks for, a login it cannot get."""
    if os.environ.get("WANDB_MODE"):
        return None
    base = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host = base.hostname or "api.wandb.ai"
    if not _has_api_key(host):
        return "offline"
    try:
        with socket.create_connection((host, base.port or (443 if base.scheme == "https" else 80)), timeout=3):
            return "online"
    except OSError:
        return "offline"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _mlflow_key(name: str) -> str:
    # MLflow keys may hold letters, digits, "_", "-", ".", " ", "/" only.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)
