"""The trackers against what the run recorded itself: every scalar is read back from the tracker's own files.

One real (tiny) ``sentinel run`` reports to every tracker whose library is installed; TensorBoard is
read back with its ``EventAccumulator``, MLflow with ``MlflowClient``, W&B (offline) by decoding the
run's ``.wandb`` record log. The reference is the run's own ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import struct
from pathlib import Path

import pytest
import sentinel_trackers
from sentinel_trackers.backends import BACKENDS

from sentinel_core import hookimpl
from sentinel_core.config import ExperimentConfig
from sentinel_core.metrics import MetricEvent
from sentinel_core.plugins import load_plugins, pm
from sentinel_core.tracking import read_metrics

HAVE = {name: importlib.util.find_spec(name) is not None for name in ("tensorboard", "mlflow", "wandb")}
needs = {name: pytest.mark.skipif(not HAVE[name], reason=f"{name} is not installed") for name in HAVE}


class FailingObserver:
    """A third-party observer whose every run hook raises: the run must go on regardless."""

    @hookimpl
    def on_run_start(self, config, run_dir):
        raise RuntimeError("observer broke at the start")

    @hookimpl
    def on_run_end(self, summary, run_dir):
        raise RuntimeError("observer broke at the end")


def run_config(model: str, data: str, out: Path, report_to: str) -> ExperimentConfig:
    return ExperimentConfig(model_name=model, data=data, scorer="random", pruning_percent=0.25, block_size=32,
                            batch_size=4, max_steps=6, eval_every=3, checkpoint_every=3, max_eval_blocks=4,
                            device="cpu", quiet=True, seed=3, speed_repeats=1, output_dir=str(out),
                            report_to=report_to)


@pytest.fixture(scope="module")
def tracked_run(model_and_corpus, tmp_path_factory):
    """One run reported to every installed tracker, with a failing observer registered beside them."""
    from sentinel_core.pipeline import run_experiment

    load_plugins()
    assert pm.get_plugin("trackers") is not None, "install plugins/sentinel-trackers (pip install -e)"
    names = [n for n in ("tensorboard", "mlflow", "wandb") if HAVE[n]]
    if not names:
        pytest.skip("none of tensorboard, mlflow and wandb is installed")
    out = tmp_path_factory.mktemp("tracked") / "run"
    observer = FailingObserver()
    pm.register(observer, name="failing-observer")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _, _, summary = run_experiment(run_config(*model_and_corpus, out, ",".join(names)))
    finally:
        pm.unregister(observer)
    return {"dir": out, "summary": summary, "events": read_metrics(out), "stderr": err.getvalue(), "names": names}


def expected_series(events: list[dict], stage: str, key: str, label: str | None = None) -> dict[int, float]:
    """What the run itself recorded for one chart: {step: value} from metrics.jsonl."""
    series = {}
    for event in events:
        if event["stage"] != stage or (label is not None and event.get("label") != label):
            continue
        value = event.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            series[event["step"] or 0] = float(value)
    return series


def test_a_failing_observer_is_reported_once_per_hook_and_the_run_finishes(tracked_run):
    lines = [line for line in tracked_run["stderr"].splitlines() if "failing-observer" in line]
    assert lines == [
        "Warning: plugin failing-observer failed in on_run_start and is switched off for the rest of this run: "
        "RuntimeError: observer broke at the start",
        "Warning: plugin failing-observer failed in on_run_end and is switched off for the rest of this run: "
        "RuntimeError: observer broke at the end",
    ]
    assert json.loads((tracked_run["dir"] / "state.json").read_text())["finished"] is True
    assert "Warning: the" not in tracked_run["stderr"], "a tracker itself reported a failure"


@needs["tensorboard"]
def test_tensorboard_holds_every_scalar_the_run_recorded(tracked_run):
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(tracked_run["dir"] / "tensorboard"),
                                             size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])

    def read(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    events = tracked_run["events"]
    for stage, key in (("fine_tune", "loss"), ("fine_tune", "lr"), ("fine_tune", "eval_loss"),
                       ("fine_tune", "grad_norm")):
        want = expected_series(events, stage, key)
        assert want, f"the run recorded no {stage}/{key}"
        assert read(f"{stage}/{key}") == pytest.approx(want, rel=1e-6)  # TensorBoard stores float32
    for label in ("baseline", "pruned", "final"):
        assert read(f"evaluate/{label}/perplexity") == pytest.approx(
            {0: tracked_run["summary"]["perplexity"][label]}, rel=1e-6)
    summary = tracked_run["summary"]
    assert read("summary/parameters/after/total") == {0: summary["parameters"]["after"]["total"]}
    assert read("summary/kv_cache/bytes_per_token_after") == {0: summary["kv_cache"]["bytes_per_token_after"]}
    assert read("summary/speed/ratio") == pytest.approx({0: summary["speed"]["ratio"]}, rel=1e-6)
    assert not any(tag.startswith("sample") for tag in tags), "text values must not become scalars"


@needs["tensorboard"]
def test_tensorboard_holds_the_config_as_hyperparameters(tracked_run):
    import yaml

    stored = list((tracked_run["dir"] / "tensorboard").glob("*/hparams.yml"))
    assert len(stored) == 1
    params = yaml.safe_load(stored[0].read_text())
    assert params["scorer"] == "random" and params["pruning_percent"] == 0.25
    assert params["report_to"] == ",".join(tracked_run["names"]) and params["growth_strategy"] == "none"


@needs["mlflow"]
def test_mlflow_holds_every_scalar_params_and_the_summary(tracked_run):
    from mlflow import MlflowClient

    ids = json.loads((tracked_run["dir"] / "trackers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == (tracked_run["dir"] / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    run = client.get_run(ids["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["scorer"] == "random" and run.data.params["batch_size"] == "4"
    events = tracked_run["events"]
    for stage, key in (("fine_tune", "loss"), ("fine_tune", "lr"), ("fine_tune", "eval_perplexity")):
        history = {m.step: m.value for m in client.get_metric_history(ids["run_id"], f"{stage}/{key}")}
        assert history == pytest.approx(expected_series(events, stage, key), rel=1e-12)
    summary = tracked_run["summary"]
    assert run.data.metrics["summary/perplexity/final"] == pytest.approx(summary["perplexity"]["final"], rel=1e-12)
    assert run.data.metrics["summary/heads/removed"] == summary["heads"]["removed"]
    artifacts = [a.path for a in client.list_artifacts(ids["run_id"])]
    assert "summary.json" in artifacts


def _wandb_records(path: Path):
    """Decode a W&B run file: LevelDB's log format (32 KiB blocks of CRC, length, type, payload)
    after a 7-byte ":W&B" header, each record a ``wandb_internal_pb2.Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        if kind in (1, 4):  # full, or last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + payload if kind == 4 else payload)
            pending = b""
            yield record
        else:  # first or middle fragment
            pending += payload


def _items(update) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


@needs["wandb"]
def test_wandb_offline_run_holds_every_scalar_the_config_and_the_summary(tracked_run):
    ids = json.loads((tracked_run["dir"] / "trackers.json").read_text())["wandb"]
    assert ids["mode"] == "offline"
    files = list((tracked_run["dir"] / "wandb").glob(f"offline-run-*-{ids['run_id']}/run-{ids['run_id']}.wandb"))
    assert len(files) == 1
    history: dict[str, dict[int, float]] = {}
    config: dict = {}
    summary: dict = {}
    for record in _wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = _items(record.history.item)
            for key, value in row.items():
                stage = key.rsplit("/", 1)[0]
                if f"{stage}/step" in row and not key.endswith("/step"):
                    history.setdefault(key, {})[row[f"{stage}/step"]] = value
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
    events = tracked_run["events"]
    for stage, key in (("fine_tune", "loss"), ("fine_tune", "lr"), ("fine_tune", "eval_loss")):
        assert history[f"{stage}/{key}"] == pytest.approx(expected_series(events, stage, key), rel=1e-12)
    assert history["evaluate/final/perplexity"] == pytest.approx(
        {0: tracked_run["summary"]["perplexity"]["final"]}, rel=1e-12)
    assert config["scorer"] == "random" and config["pruning_percent"] == 0.25 and config["batch_size"] == 4
    assert summary["summary/perplexity/final"] == pytest.approx(tracked_run["summary"]["perplexity"]["final"])


@needs["mlflow"]
def test_a_resumed_run_continues_the_same_mlflow_run(tmp_path):
    from mlflow import MlflowClient

    plugin = sentinel_trackers.TrackerPlugin()
    config = ExperimentConfig(output_dir=str(tmp_path), report_to="mlflow", device="cpu")
    plugin.on_run_start(config=config, run_dir=tmp_path)
    plugin.on_metric(event=MetricEvent("fine_tune", 1, {"loss": 3.0}))
    first = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]["run_id"]
    plugin._close(None, "KILLED")  # the process was interrupted
    plugin.on_run_start(config=config, run_dir=tmp_path)  # `sentinel run --resume`
    plugin.on_metric(event=MetricEvent("fine_tune", 2, {"loss": 2.5}))
    plugin.on_run_end(summary={"perplexity": {"final": 9.0}}, run_dir=tmp_path)
    ids = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    assert ids["run_id"] == first
    client = MlflowClient(tracking_uri=ids["tracking_uri"])
    assert {m.step: m.value for m in client.get_metric_history(first, "fine_tune/loss")} == {1: 3.0, 2: 2.5}
    assert client.get_run(first).info.status == "FINISHED"
    assert len(client.search_runs([ids["experiment_id"]])) == 1


@needs["tensorboard"]
def test_a_tracker_that_fails_is_reported_once_and_left_out(tmp_path, monkeypatch, capsys):
    calls = []

    def broken_log(self, scalars, prefix, step):
        calls.append(step)
        raise OSError("disk full")

    monkeypatch.setattr(BACKENDS["tensorboard"], "log", broken_log)
    plugin = sentinel_trackers.TrackerPlugin()
    plugin.on_run_start(config=ExperimentConfig(output_dir=str(tmp_path), report_to="tensorboard", device="cpu"),
                        run_dir=tmp_path)
    for step in range(1, 4):
        plugin.on_metric(event=MetricEvent("fine_tune", step, {"loss": 1.0}))
    plugin.on_run_end(summary={}, run_dir=tmp_path)
    assert calls == [1]
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Warning")]
    assert warnings == ["Warning: the tensorboard tracker failed to log and is left out for the rest of the run "
                        "(OSError: disk full)"]


def test_no_tracker_is_opened_for_report_to_none_or_outside_a_run(tmp_path):
    plugin = sentinel_trackers.TrackerPlugin()
    plugin.on_metric(event=MetricEvent("fine_tune", 1, {"loss": 1.0}))  # no run: ignored
    plugin.on_run_start(config=ExperimentConfig(output_dir=str(tmp_path), device="cpu"), run_dir=tmp_path)
    plugin.on_metric(event=MetricEvent("fine_tune", 1, {"loss": 1.0}))
    plugin.on_run_end(summary={}, run_dir=tmp_path)
    assert plugin.session is None and list(tmp_path.iterdir()) == []
