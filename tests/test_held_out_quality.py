"""A run reports quality on the test split, which keep-best never chose on, beside validation."""

from __future__ import annotations

import math

import pytest
from data_fixtures import sample_lines

from sentinel_core import ExperimentConfig, run_experiment
from sentinel_core.data import load_data
from sentinel_core.evaluation import evaluate
from sentinel_core.model_io import load_model


@pytest.fixture
def folder_data(tiny_assets):
    folder = tiny_assets["tmp"] / "splits"
    folder.mkdir()
    for name, seed, lines in (("train", 7, 600), ("validation", 8, 120), ("test", 9, 120)):
        (folder / f"{name}.txt").write_text("\n".join(sample_lines(lines, seed=seed)) + "\n", encoding="utf-8")
    return str(folder)


def run(tiny_assets, data, name):
    config = ExperimentConfig(model_name=tiny_assets["model"], data=data, scorer="random", pruning_percent=0.5,
                              block_size=32, batch_size=4, max_steps=4, eval_every=2, max_eval_blocks=6,
                              speed_repeats=0, quiet=True, device="cpu", output_dir=str(tiny_assets["tmp"] / name))
    return run_experiment(config)


def test_the_summary_has_the_test_splits_perplexity_of_the_final_model(tiny_assets, folder_data):
    model, tokenizer, summary = run(tiny_assets, folder_data, "run")
    data = load_data(folder_data, tokenizer, block_size=32, seed=0)
    ids = data.test.ids[: 6 * 32]
    expected = {"final": evaluate(model, ids, block_size=32, batch_size=4, device="cpu", progress=False),
                "baseline": evaluate(load_model(tiny_assets["model"])[0], ids, block_size=32, batch_size=4,
                                     device="cpu", progress=False)}
    test = summary["test_perplexity"]
    for stage, result in expected.items():
        assert math.isclose(test[stage], result.perplexity, rel_tol=1e-6), stage
    assert test["pruned"] > 0 and test["final"] != summary["perplexity"]["final"]


def test_without_a_test_split_there_is_no_test_figure(tiny_assets):
    _, _, summary = run(tiny_assets, tiny_assets["data"], "no-test")
    assert summary["test_perplexity"] is None
