"""Downstream tasks through lm-evaluation-harness, checked against log-likelihoods computed here.

The task is a local YAML over a local JSONL (no Hub): each document's choices are scored by
summing the model's log-probabilities of the choice's tokens after the question, computed
directly from the logits; accuracy is then the share of documents whose gold choice scores
highest. lm-eval must report exactly that, for a plain model and for a compact pruned one.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from data_fixtures import make_tokenizer, tiny_gpt2
from task_fixtures import TASK, choice_logliks, expected_accuracy, mc_documents, write_mc_task

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core import downstream
from sentinel_core.cli import cli
from sentinel_core.errors import SentinelError
from sentinel_core.surgery import prune_heads

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'sentinel-core[tasks]'")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(400)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return write_mc_task(tmp_path_factory.mktemp("tasks"))


def model_for(tokenizer, seed=0):
    return tiny_gpt2(len(tokenizer), n_layer=2, n_head=4, n_embd=32, n_positions=64, seed=seed,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)


@pytest.mark.parametrize("pruned", [False, True], ids=["plain", "compact-pruned"])
def test_lm_eval_accuracy_equals_the_models_own_log_likelihoods(tokenizer, task_dir, pruned):
    model = model_for(tokenizer, seed=3)
    if pruned:
        prune_heads(model, {0: [1, 2], 1: [0, 1, 2, 3]})  # layer 1 loses every head
    docs = mc_documents()
    probe = torch.tensor([tokenizer("the king speaks", add_special_tokens=False).input_ids])
    with torch.no_grad():
        logits_before = model(probe).logits
    result = downstream.evaluate_tasks(model, tokenizer, TASK, include_path=str(task_dir), batch_size=4)
    entry = result["tasks"][TASK]
    assert entry["samples"] == len(docs) and entry["num_fewshot"] == 0
    assert entry["metrics"] == pytest.approx(expected_accuracy(model, tokenizer, docs), abs=1e-12)
    assert set(entry["stderr"]) == {"acc", "acc_norm"}
    # Not a degenerate check: the choices' scores differ, so the argmax decides something.
    assert len({round(ll, 6) for ll in choice_logliks(model, tokenizer, docs[0])}) == len(docs[0]["choices"])
    with torch.no_grad():
        assert torch.equal(model(probe).logits, logits_before), "lm-eval must leave the model as it was"


def test_the_compact_model_is_evaluated_as_it_is_not_reloaded(tokenizer, task_dir):
    full = model_for(tokenizer, seed=3)
    pruned = model_for(tokenizer, seed=3)
    prune_heads(pruned, {0: [0, 1, 2], 1: [3]})
    docs = mc_documents()
    assert [choice_logliks(full, tokenizer, d) for d in docs] != [choice_logliks(pruned, tokenizer, d) for d in docs]


def test_a_hub_dataset_offline_is_one_line(tmp_path, tokenizer):
    folder = write_mc_task(tmp_path, task="sentinel_hub_mc", dataset_path="sentinel-tests/not-on-this-machine")
    with pytest.raises(SentinelError) as error:
        downstream.prepare_tasks("sentinel_hub_mc", str(folder))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("lm-eval task 'sentinel_hub_mc' cannot load its dataset (")
    assert "cannot be downloaded offline" in message and "--include-path" in message


def test_missing_lm_eval_is_one_line_naming_the_install(monkeypatch, task_dir):
    real = downstream.importlib.util.find_spec
    monkeypatch.setattr(downstream.importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(SentinelError, match=r"pip install 'sentinel-core\[tasks\]'"):
        downstream.prepare_tasks(TASK, str(task_dir))
    result = CliRunner().invoke(cli, ["evaluate", "--model", "demo", "--tasks", TASK], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: downstream tasks need lm-evaluation-harness, which is not installed: "
        "pip install 'sentinel-core[tasks]' (or pip install lm-eval)"]


def test_task_options_need_tasks_and_bad_names_are_refused():
    with pytest.raises(SentinelError, match="no task names"):
        downstream.parse_tasks(" , ")
    assert downstream.parse_tasks("a, b,a") == ["a", "b"]
    result = CliRunner().invoke(cli, ["evaluate", "--model", "demo", "--limit", "3"], catch_exceptions=False)
    assert result.exit_code == 1 and "apply to --tasks" in result.output


def test_cli_evaluate_tasks_prints_a_table_and_writes_json(tiny_assets, task_dir, tokenizer):
    from sentinel_core.model_io import load_model

    out = tiny_assets["tmp"] / "tasks.json"
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", "--model", tiny_assets["model"], "--tasks", TASK, "--include-path",
                                 str(task_dir), "--limit", "5", "--batch-size", "4", "--json", "--output", str(out)],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text())
    assert "perplexity" not in printed, "without --data only the tasks are scored"
    entry = printed["tasks"]["tasks"][TASK]
    model, tok = load_model(tiny_assets["model"])
    assert entry["samples"] == 5 and printed["tasks"]["limit"] == 5
    assert entry["metrics"] == pytest.approx(expected_accuracy(model, tok, mc_documents()[:5]), abs=1e-12)
    table = runner.invoke(cli, ["evaluate", "--model", tiny_assets["model"], "--tasks", TASK, "--include-path",
                                str(task_dir), "--limit", "5"], catch_exceptions=False)
    assert table.exit_code == 0, table.output
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["task", "metric", "value", "±", "stderr", "docs", "shots"]
    row = next(line.split() for line in lines if line.split()[:2] == [TASK, "acc"])
    assert float(row[2]) == pytest.approx(entry["metrics"]["acc"], abs=5e-5) and row[4:] == ["5", "0"]
