"""End to end: ``sentinel run --growth-percent ... --growth-strategy ...`` prunes, fine-tunes, grows, fine-tunes."""

from __future__ import annotations

import json
import math

from click.testing import CliRunner

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli


def _run(assets, out, *extra):
    args = ["run", "--model", assets["model"], "--data", assets["data"], "--scorer", "random",
            "--pruning-percent", "0.5", "--growth-percent", "0.25", "--block-size", "32", "--batch-size", "4",
            "--test-mode", "--quiet", "--output-dir", str(out), *extra]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def _saved_model_measures(assets, out):
    """The saved model, its perplexity measured as the final evaluation did (test mode: 8 blocks of
    validation text), and its mean token loss on the blocks the growth fine-tuning evaluated on."""
    import torch

    from sentinel_core.data import load_data
    from sentinel_core.evaluation import evaluate
    from sentinel_core.model_io import load_model
    from sentinel_core.training import causal_lm_loss

    model, tokenizer = load_model(out / "model")
    data = load_data(assets["data"], tokenizer, block_size=32, seed=42)
    ppl = evaluate(model, data.validation.ids[: 8 * 32], block_size=32, batch_size=4).perplexity
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 8, 4):
            ids = data.validation.blocks[start:start + 4].long()
            nll, n = causal_lm_loss(model(input_ids=ids).logits, ids)
            total, count = total + float(nll), count + int(n)
    return model, ppl, total / count


def test_run_with_gradient_growth_and_warmup(growth_plugin, tiny_run_assets, monkeypatch):
    monkeypatch.setenv("SENTINEL_CACHE_DIR", str(tiny_run_assets["tmp"] / "cache"))
    out = tiny_run_assets["tmp"] / "run"
    config = tiny_run_assets["tmp"] / "growth.toml"
    # A ramp longer than the stage's 6 steps: the warm-up is still running when training ends.
    config.write_text("[experiment]\noptions = {growth_warmup_steps = 10}\n", encoding="utf-8")
    # A high learning rate, so that the new heads matter after six steps.
    result = _run(tiny_run_assets, out, "--growth-strategy", "gradient", "--config", str(config),
                  "--learning-rate", "0.01")
    assert result.exit_code == 0, result.output
    assert "4 removed, 2 grown" in result.output

    summary = json.loads((out / "summary.json").read_text())
    assert summary["heads"] == {**summary["heads"], "original": 8, "removed": 4, "grown": 2, "final": 6}
    state = json.loads((out / "state.json").read_text())
    completed = state["completed"]
    assert completed.index("prune") < completed.index("fine_tune") < completed.index("grow") \
        < completed.index("fine_tune_growth") < completed.index("final")
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    growth_steps = [e for e in events if e["stage"] == "fine_tune_growth" and e.get("loss") is not None]
    assert len(growth_steps) == 6
    grow_events = [e for e in events if e["stage"] == "grow"]
    assert any(e.get("strategy") == "gradient" and len(e["layer_scores"]) == 2 for e in grow_events)

    model, ppl, eval_loss = _saved_model_measures(tiny_run_assets, out)
    from sentinel_core.surgery import get_head_map

    head_map = get_head_map(model)
    grown = {str(layer): head_map.grown(layer) for layer in range(2) if head_map.grown(layer)}
    assert grown == summary["heads"]["grown_heads"]
    assert all(len(head_map.active(layer)) <= 4 for layer in range(2))
    # The saved model is the one the pipeline evaluated last...
    assert math.isclose(ppl, summary["perplexity"]["final"], rel_tol=1e-6)
    # ...and the one the growth fine-tuning chose as its best, gates and all: the warm-up's
    # gate was folded into the weights before the model was saved.
    assert math.isclose(eval_loss, summary["fine_tune_growth"]["best_eval_loss"], rel_tol=1e-5)
