"""Run-level observer hooks and ``--report-to``: contained failures, one-line refusals before any stage."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core import hookimpl, plugins, report_to
from sentinel_core.cli import cli
from sentinel_core.config import ExperimentConfig
from sentinel_core.errors import SentinelError
from sentinel_core.plugins import load_plugins, pm


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def on_run_start(self, config, run_dir):
        self.calls.append(("start", config.scorer, run_dir))

    @hookimpl
    def on_run_end(self, summary, run_dir):
        self.calls.append(("end", summary["perplexity"], run_dir))


class Broken:
    @hookimpl
    def on_run_start(self, config, run_dir):
        raise ValueError("bad\nsecond line")


@pytest.fixture
def registered():
    load_plugins()
    added = []

    def register(plugin, name):
        pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    yield register
    for plugin in added:
        pm.unregister(plugin)


def test_every_observer_runs_even_when_one_raises(registered, tmp_path, capsys):
    first = registered(Recorder(), "first")
    registered(Broken(), "broken")
    last = registered(Recorder(), "last")
    plugins.start_run()
    plugins.notify("on_run_start", config=ExperimentConfig(scorer="random"), run_dir=tmp_path)
    plugins.notify("on_run_end", summary={"perplexity": {"final": 2.0}}, run_dir=tmp_path)
    for recorder in (first, last):
        assert recorder.calls == [("start", "random", tmp_path), ("end", {"final": 2.0}, tmp_path)]
    assert capsys.readouterr().err.splitlines() == [
        "Warning: plugin broken failed in on_run_start and is switched off for the rest of this run: ValueError: bad"]


def test_report_to_names_are_validated():
    assert report_to.parse_report_to("none") == ()
    assert report_to.parse_report_to(" TensorBoard, mlflow,tensorboard ") == ("tensorboard", "mlflow")
    with pytest.raises(SentinelError, match=r"unknown tracker 'tensorbored'; use a comma list of tensorboard, "
                                            r"mlflow, wandb, or none"):
        ExperimentConfig(report_to="tensorbored")


def test_a_missing_tracker_plugin_stops_the_run_before_anything_is_written(monkeypatch, tiny_assets):
    load_plugins()
    get_plugin = pm.get_plugin
    monkeypatch.setattr(pm, "get_plugin", lambda name: None if name == report_to.PLUGIN_NAME else get_plugin(name))
    out = tiny_assets["tmp"] / "run"
    result = CliRunner().invoke(cli, ["run", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                                      "--scorer", "random", "--report-to", "tensorboard", "--output-dir", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --report-to tensorboard needs the sentinel-trackers plugin: pip install ./plugins/sentinel-trackers "
        "(from a Sentinel checkout)"]
    assert not out.exists()


def test_a_missing_tracker_library_is_one_line_naming_the_package(monkeypatch, tiny_assets):
    load_plugins()
    get_plugin = pm.get_plugin
    # Only the plugin's presence is checked here: stand in for it where it is not installed.
    monkeypatch.setattr(pm, "get_plugin", lambda name: object() if name == report_to.PLUGIN_NAME else get_plugin(name))
    real = report_to.importlib.util.find_spec
    monkeypatch.setattr(report_to.importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tiny_assets["tmp"] / "run"
    result = CliRunner().invoke(cli, ["run", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                                      "--scorer", "random", "--report-to", "tensorboard,mlflow",
                                      "--output-dir", str(out)], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: --report-to mlflow needs the mlflow package: pip install mlflow-skinny (or mlflow)"]
    assert not out.exists()
