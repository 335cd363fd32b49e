"""Progress off a terminal: one line every ``log_every`` steps and one per evaluation, through the
``sentinel`` logger; ``-q`` and ``-v`` move Sentinel's and the libraries' levels together."""

from __future__ import annotations

import logging
import re

import pytest
from training_fixtures import make_data, make_model

from sentinel_core import log
from sentinel_core.config import ExperimentConfig
from sentinel_core.training import TrainerCallback, train
from sentinel_core.training.progress import format_duration

LINE = re.compile(r"^fine_tune step (\d+)/6 \((\d+)%\): loss (\d+\.\d{4}), lr (\S+), ([\d,]+) tok/s, ETA (\S+)$")
EVAL = re.compile(r"^fine_tune step (\d+)/6: eval_loss (\d+\.\d{4}) \(perplexity (\d+\.\d\d)\)")


class Losses(TrainerCallback):
    name = "losses"

    def __init__(self):
        self.steps, self.evals = {}, {}

    def on_step_end(self, state, context, logs):
        self.steps[state.step] = float(logs["loss"])

    def on_evaluate(self, state, context, metrics):
        self.evals[state.step] = metrics["eval_loss"]


@pytest.fixture(autouse=True)
def normal_verbosity():
    log.configure(log.NORMAL)
    yield
    log.configure(log.NORMAL)


def run(tmp_path, **overrides):
    values = dict(device="cpu", batch_size=4, max_steps=6, eval_every=3, checkpoint_every=100, patience=0,
                  learning_rate=3e-3, output_dir=str(tmp_path / "run"), quiet=False, seed=1, max_eval_blocks=4,
                  log_every=2)
    values.update(overrides)
    seen = Losses()
    train(make_model(seed=3), make_data(32), ExperimentConfig(**values), stage="fine_tune", callbacks=[seen])
    return seen


def test_off_a_terminal_a_line_every_log_every_steps_and_one_per_evaluation(tmp_path, capsys):
    seen = run(tmp_path)
    lines = capsys.readouterr().err.splitlines()
    steps = [LINE.match(line) for line in lines if LINE.match(line)]
    assert [int(m[1]) for m in steps] == [2, 4, 6]
    for m in steps:  # the loss printed is the step's own loss, the percentage its share of the stage
        assert m[3] == f"{seen.steps[int(m[1])]:.4f}"
        assert int(m[2]) == round(100 * int(m[1]) / 6)
        assert float(m[4]) > 0 and int(m[5].replace(",", "")) > 0
    assert steps[-1][6] == "0s"
    evals = [EVAL.match(line) for line in lines if EVAL.match(line)]
    assert [int(m[1]) for m in evals] == sorted(seen.evals) == [0, 3, 6]  # 0: the start, for keep-best
    for m in evals:
        assert m[2] == f"{seen.evals[int(m[1])]:.4f}"


def test_the_last_step_is_logged_even_off_the_interval(tmp_path, capsys):
    run(tmp_path, log_every=4)
    steps = [int(LINE.match(line)[1]) for line in capsys.readouterr().err.splitlines() if LINE.match(line)]
    assert steps == [4, 6]


def test_quiet_shows_no_progress(tmp_path, capsys):
    run(tmp_path, quiet=True)
    assert not [line for line in capsys.readouterr().err.splitlines() if LINE.match(line) or EVAL.match(line)]


def test_verbosity_moves_sentinel_and_the_libraries_together(capsys):
    import datasets
    import transformers

    log.configure(log.QUIET)
    log.get_logger("x").info("hidden")
    log.get_logger("x").warning("shown")
    assert capsys.readouterr().err.splitlines() == ["shown"]
    assert transformers.utils.logging.get_verbosity() == logging.ERROR
    assert datasets.utils.logging.get_verbosity() == logging.ERROR
    log.configure(log.VERBOSE)
    log.get_logger("x").debug("detail")
    assert capsys.readouterr().err.splitlines() == ["detail"]
    assert transformers.utils.logging.get_verbosity() == logging.INFO
    log.configure(log.NORMAL)
    assert transformers.utils.logging.get_verbosity() == logging.WARNING


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (45.4, "45s"), (132, "2m12s"), (7380, "2h03m"),
                                          (float("nan"), "?"), (-1, "?")])
def test_durations_read_like_a_person_writes_them(seconds, text):
    assert format_duration(seconds) == text
