"""End to end: ``sentinel run --fine-tune distill`` on a tiny model, interrupted and resumed, after growth."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli
from sentinel_core.config import ExperimentConfig
from sentinel_core.hookspecs import hookimpl
from sentinel_core.plugins import pm


def _run(assets, out, *extra):
    args = ["run", "--model", assets["model"], "--data", assets["data"], "--scorer", "random",
            "--pruning-percent", "0.5", "--fine-tune", "distill", "--block-size", "32", "--batch-size", "4",
            "--test-mode", "--quiet", "--output-dir", str(out), *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _events(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    return load_file(next(folder.glob("*.safetensors")))


def test_run_distills_the_pruned_model_from_the_run_model(distill_plugin, tiny_run_assets):
    out = tiny_run_assets["tmp"] / "run"
    result = _run(tiny_run_assets, out, "-o", "distill_alpha=0.5", "-o", "distill_temperature=2",
                  "-o", "weight_decay=0.1")
    assert result.exit_code == 0, result.output
    events = _events(out)
    described = [e["distill"] for e in events if "distill" in e]
    assert described == [{"teacher": tiny_run_assets["model"], "temperature": 2.0, "alpha": 0.5,
                          "teacher_device": "same", "select_on": "objective"}]
    steps = [e for e in events if e["stage"] == "fine_tune" and "loss" in e]
    assert len(steps) == 6
    for values in steps:  # the loss is the documented mix of the two logged terms
        assert values["loss"] == pytest.approx(0.5 * 4 * values["kl"] + 0.5 * values["ce"], rel=1e-5)
    config = json.loads((out / "experiment.json").read_text())
    assert config["options"]["weight_decay"] == 0.1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fine_tune"]["steps"] == 6
    assert summary["heads"]["removed"] == 4
    from sentinel_core.model_io import load_model
    from sentinel_core.surgery import get_head_map

    model, _ = load_model(out / "model")
    assert sum(len(get_head_map(model).active(layer)) for layer in range(2)) == 4


def test_bad_distill_option_is_one_line_on_the_command_line(distill_plugin, tiny_run_assets):
    result = _run(tiny_run_assets, tiny_run_assets["tmp"] / "bad", "-o", "distill_alpha=2")
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "distill_alpha" in lines[0] and "[0, 1]" in lines[0]
    assert not (tiny_run_assets["tmp"] / "bad").exists()


class StopAt:
    """Raises KeyboardInterrupt from on_metric once, at fine-tuning step ``k``; records kl per step."""

    def __init__(self, k=None):
        self.k, self.kl = k, {}

    @hookimpl
    def on_metric(self, event):
        if event.stage != "fine_tune" or "loss" not in event.values:
            return
        self.kl[event.step] = event.values["kl"]
        if event.step == self.k:
            self.k = None
            raise KeyboardInterrupt


def test_interrupted_distill_run_resumes_to_the_same_model(distill_plugin, tiny_run_assets, capsys):
    from sentinel_core.pipeline import resume_experiment, run_experiment

    def config(name):
        return ExperimentConfig(model_name=tiny_run_assets["model"], data=tiny_run_assets["data"], scorer="random",
                                pruning_percent=0.5, fine_tune="distill", block_size=32, batch_size=4, max_steps=6,
                                eval_every=3, checkpoint_every=2, max_eval_blocks=4, device="cpu", quiet=True,
                                seed=4, output_dir=str(tiny_run_assets["tmp"] / name),
                                options={"distill_alpha": 0.7, "distill_temperature": 1.5})

    whole = StopAt()
    pm.register(whole)
    try:
        _, _, reference = run_experiment(config("whole"))
    finally:
        pm.unregister(whole)
    cut = StopAt(3)
    pm.register(cut)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_experiment(config("cut"))
        out = tiny_run_assets["tmp"] / "cut"
        assert f"Interrupted: resume with `sentinel run --resume {out}`" in capsys.readouterr().err
        assert sorted(cut.kl) == [1, 2, 3]
        _, _, summary = resume_experiment(out)
    finally:
        pm.unregister(cut)
    # The resumed stage reopened the teacher: the KL of steps 4-6 is the uninterrupted run's.
    assert sorted(cut.kl) == list(range(1, 7))
    assert cut.kl == pytest.approx(whole.kl, abs=1e-6)
    assert summary["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-6)
    assert summary["fine_tune"] == pytest.approx(reference["fine_tune"], rel=1e-6)
    a, b = _weights(tiny_run_assets["tmp"] / "whole" / "model"), _weights(out / "model")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_distill_after_growth_keeps_the_original_as_teacher(distill_plugin, tiny_run_assets):
    pytest.importorskip("sentinel_growth", reason="the growth strategies are in the sentinel-growth plugin")
    out = tiny_run_assets["tmp"] / "grown"
    result = _run(tiny_run_assets, out, "--growth-percent", "0.25", "--growth-strategy", "random")
    assert result.exit_code == 0, result.output
    events = _events(out)
    teachers = [e["distill"]["teacher"] for e in events if "distill" in e]
    assert teachers == [tiny_run_assets["model"]] * 2  # fine_tune and fine_tune_growth
    grown_steps = [e for e in events if e["stage"] == "fine_tune_growth" and "loss" in e]
    assert len(grown_steps) == 6 and all(v["kl"] > 0 and v["ce"] > 0 for v in grown_steps)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"]["grown"] == 2 and summary["heads"]["final"] == 6
