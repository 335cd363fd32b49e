"""The command line: one-line errors with a non-zero exit and no traceback, and whole runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _one_error_line(result, fragment):
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("Error: "), result.output
    assert fragment in lines[-1], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "--pruning-percent", "1.5"], "pruning_percent must be a fraction in [0, 1), e.g. 0.3, got 1.5"),
        (["run", "--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["run", "--device", "cuda:3"], "device 'cuda:3'"),
        (["run", "--config", "no-such.toml"], "config file 'no-such.toml' does not exist"),
        (["run", "--scorer", "entropyy", "--model", "m", "--data", "d"], "unknown scorer 'entropyy'; available:"),
        (["run", "--scorer", "random", "--fine-tune", "fast", "--model", "m", "--data", "d"], "unknown fine-tuning strategy 'fast'"),
        (["run", "--resume", "no-such-dir"], "holds no Sentinel run to resume"),
        (["run", "--prune-mode", "cut"], "'cut' is not one of 'remove', 'mask'"),
        (["run", "--pruning-percent", "lots"], "'lots' is not a valid float"),
    ],
)
def test_user_errors_are_one_line(args, fragment):
    _one_error_line(invoke(*args), fragment)


def test_unknown_command_is_a_usage_error():
    result = invoke("prunee")
    assert result.exit_code == 2
    assert "No such command 'prunee'" in result.output


def test_a_missing_model_path_is_one_line(tiny_assets):
    result = invoke("run", "--scorer", "random", "--model", str(tiny_assets["tmp"] / "nope"), "--data", tiny_assets["data"],
                    "--output-dir", str(tiny_assets["tmp"] / "out"), "--quiet")
    _one_error_line(result, "nope")


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "score", "prune", "evaluate", "generate", "report", "plugins"):
        assert f"  {command}" in result.output


def test_whole_run_in_test_mode_then_resume_is_refused_and_outputs_exist(tiny_assets):
    out = tiny_assets["tmp"] / "run"
    args = ["run", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--scorer", "random",
            "--pruning-percent", "0.5", "--block-size", "32", "--batch-size", "4", "--test-mode", "--quiet",
            "--output-dir", str(out)]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"] == {**summary["heads"], "original": 8, "removed": 4, "final": 4}
    assert summary["perplexity"]["baseline"] > 1
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stages = {event["stage"] for event in events}
    assert {"evaluate", "score", "prune", "fine_tune", "sample"} <= stages
    assert (out / "model" / "config.json").exists()
    # The saved model is the pruned one, and evaluates to the final perplexity.
    evaluation = invoke("evaluate", "--model", str(out / "model"), "--data", tiny_assets["data"],
                        "--block-size", "32", "--max-blocks", "8", "--json")
    assert evaluation.exit_code == 0, evaluation.output
    record = json.loads(evaluation.stdout)
    assert record["perplexity"] == pytest.approx(summary["perplexity"]["final"], rel=1e-4)
    # A finished run can't be resumed, and its folder can't be reused by accident for a new run.
    _one_error_line(invoke("run", "--resume", str(out)), "already finished")


def test_console_script_module_entry_point():
    run = subprocess.run([sys.executable, "-m", "sentinel_core", "--help"], capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert run.returncode == 0 and "Usage: sentinel" in run.stdout


def test_an_existing_run_folder_is_not_overwritten(tmp_path):
    (tmp_path / "state.json").write_text('{"completed": ["baseline"], "results": {}, "finished": false}')
    _one_error_line(invoke("run", "--output-dir", str(tmp_path), "--model", "m", "--data", "d"),
                    "holds an unfinished run; continue it with `sentinel run --resume")
