"""Pruning in rounds (``--prune-rounds N``) and LoRA in a whole run (issue #15)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import invoke, one_error_line

from sentinel_core.model_io import load_model
from sentinel_core.surgery import get_head_map


def run(assets, name, *extra):
    out = assets["tmp"] / name
    result = invoke("run", "--model", assets["model"], "--data", assets["data"], "--scorer", "random",
                    "--pruning-percent", "0.5", "--block-size", "32", "--batch-size", "4", "--test-mode", "--quiet",
                    "--device", "cpu", "--output-dir", out, *extra)
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, json.loads((out / "summary.json").read_text()), events


def test_rounds_reach_the_same_head_count_as_one_shot_with_the_same_steps(tiny_assets):
    _, once, once_events = run(tiny_assets, "once")
    out, rounds, events = run(tiny_assets, "rounds", "--prune-rounds", "2")
    assert rounds["heads"]["final"] == once["heads"]["final"] == 4 and rounds["heads"]["removed"] == 4
    prunes = [e for e in events if e["stage"] == "prune" and "round" in e]
    assert [(e["round"], e["pruning_percent"], e["heads_removed"]) for e in prunes] == [(1, 0.25, 2), (2, 0.5, 2)]
    assert len([e for e in once_events if e["stage"] == "prune" and "round" in e]) == 1
    steps = {stage: max(e["step"] for e in events if e["stage"] == stage and isinstance(e.get("step"), int))
             for stage in ("fine_tune", "fine_tune_round2")}
    once_steps = max(e["step"] for e in once_events if e["stage"] == "fine_tune" and isinstance(e.get("step"), int))
    assert steps["fine_tune"] + steps["fine_tune_round2"] == once_steps == 6
    assert [r["round"] for r in rounds["prune_rounds"]] == [1, 2]
    assert rounds["fine_tune"]["steps"] == 6
    # What the summary says was removed is what the saved model lacks.
    model, _ = load_model(out / "model")
    head_map = get_head_map(model)
    removed = {int(layer): ids for layer, ids in rounds["heads"]["removed_heads"].items()}
    for layer in range(head_map.num_layers):
        assert sorted(removed.get(layer, [])) == head_map.removed(layer)


def test_a_run_with_lora_saves_an_ordinary_model(tiny_assets):
    pytest.importorskip("peft")
    out, summary, _ = run(tiny_assets, "lora", "--lora-rank", "2")
    model, _ = load_model(out / "model")
    assert not any("lora_" in name for name in model.state_dict())
    assert summary["effective_config"]["lora_rank"] == 2
    evaluation = invoke("evaluate", "--model", out / "model", "--data", tiny_assets["data"], "--block-size", "32",
                        "--max-blocks", "8", "--json", "--device", "cpu")
    assert json.loads(evaluation.stdout)["perplexity"] == pytest.approx(summary["perplexity"]["final"], rel=1e-4)


def test_bad_round_and_lora_settings_are_one_line():
    one_error_line(invoke("run", "--prune-rounds", "0"), "prune_rounds must be a positive integer, got 0")
    one_error_line(invoke("run", "--lora-rank", "-1"), "lora_rank must be 0 or more, got -1")
