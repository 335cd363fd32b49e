"""What a finished run leaves for users: the model card, task accuracy before and after, KV-cache size
and the interleaved speed measurement, each checked against the saved model and the run's own records."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
from click.testing import CliRunner
from data_fixtures import make_tokenizer, sample_lines, tiny_gpt2
from task_fixtures import TASK, expected_accuracy, mc_documents, write_mc_task

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli
from sentinel_core.kv_cache import kv_cache_bytes_per_token
from sentinel_core.model_io import load_model
from sentinel_core.surgery import get_head_map

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("users")
    tokenizer = make_tokenizer(400)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_head=4, n_embd=32, n_positions=64,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    (tmp / "corpus.txt").write_text("\n".join(sample_lines(600, seed=7)) + "\n", encoding="utf-8")
    out = tmp / "run"
    args = ["run", "--model", str(tmp / "base"), "--data", str(tmp / "corpus.txt"), "--scorer", "random",
            "--pruning-percent", "0.5", "--block-size", "32", "--batch-size", "4", "--test-mode", "--quiet",
            "--output-dir", str(out)]
    if HAVE_LM_EVAL:
        args += ["--tasks", TASK, "--tasks-include-path", str(write_mc_task(tmp / "tasks"))]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return {"dir": out, "base": tmp / "base", "summary": json.loads((out / "summary.json").read_text())}


def card_parts(path):
    text = path.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    assert match, "the card must open with YAML front matter"
    return match.group(1), text[match.end():]


def table(body: str, header_start: str) -> list[list[str]]:
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_card_front_matter_is_what_the_hub_reads(finished_run):
    front, _ = card_parts(finished_run["dir"] / "model" / "README.md")
    yaml = pytest.importorskip("yaml")
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and "pruned" in meta["tags"]
    assert "base_model" not in meta, "a local base model is no Hub id"


def test_the_cards_head_table_is_the_saved_models_head_map(finished_run):
    _, body = card_parts(finished_run["dir"] / "model" / "README.md")
    model, _ = load_model(finished_run["dir"] / "model")
    head_map = get_head_map(model)
    removed = {int(k): v for k, v in finished_run["summary"]["heads"]["removed_heads"].items()}
    rows = table(body, "| layer |")
    assert len(rows) == head_map.num_layers
    for layer, row in enumerate(rows):
        gone = sorted(set(range(head_map.original_num_heads)) - set(head_map.present(layer)))
        assert gone == sorted(removed.get(layer, []))
        assert row[:6] == [str(layer), "4", str(len(gone)), "0", "0", str(len(head_map.active(layer)))]
        assert row[6] == (", ".join(map(str, gone)) or "–")
    assert f"{finished_run['summary']['heads']['removed']} of 8 attention heads removed" in body


def test_the_cards_sizes_quality_and_recipe_are_the_runs(finished_run):
    summary = finished_run["summary"]
    _, body = card_parts(finished_run["dir"] / "model" / "README.md")
    model, _ = load_model(finished_run["dir"] / "model")
    rows = {row[0]: row[1:] for row in table(body, "| | before | after |")}
    params = summary["parameters"]
    assert rows["parameters"] == [f"{params['before']['total']:,}", f"{params['after']['total']:,}"]
    assert rows["attention parameters"] == [f"{params['before']['attention']:,}", f"{params['after']['attention']:,}"]
    kv = summary["kv_cache"]
    assert kv["bytes_per_token_after"] == kv_cache_bytes_per_token(model) < kv["bytes_per_token_before"]
    assert rows["KV cache per token"] == [f"{kv['bytes_per_token_before']:,} B", f"{kv['bytes_per_token_after']:,} B"]
    ppl = summary["perplexity"]
    assert rows["validation perplexity"] == [f"{ppl['baseline']:.2f}",
                                             f"{ppl['final']:.2f} (right after pruning: {ppl['pruned']:.2f})"]
    recipe = {row[0]: row[1] for row in table(body, "| step | setting |")}
    assert recipe["head scorer"].startswith("`random`")
    assert recipe["selection"] == "global selection of 50% of the original heads, removed physically"
    assert recipe["recovery"].startswith(f"`plain` fine-tuning, {summary['fine_tune']['steps']} steps")
    assert f"load_model({str(finished_run['dir'] / 'model')!r})" in body


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is an optional extra")
def test_task_accuracy_before_and_after_is_recorded_and_on_the_card(finished_run):
    tasks = finished_run["summary"]["tasks"]
    base, base_tokenizer = load_model(finished_run["base"])
    final, final_tokenizer = load_model(finished_run["dir"] / "model")
    docs = mc_documents()
    assert tasks["baseline"][TASK]["metrics"] == pytest.approx(expected_accuracy(base, base_tokenizer, docs), abs=1e-12)
    assert tasks["final"][TASK]["metrics"] == pytest.approx(expected_accuracy(final, final_tokenizer, docs), abs=1e-12)
    _, body = card_parts(finished_run["dir"] / "model" / "README.md")
    rows = {row[0]: row[1:] for row in table(body, "| | before | after |")}
    assert rows[f"{TASK} acc"] == [f"{tasks['baseline'][TASK]['metrics']['acc']:.4f}",
                                   f"{tasks['final'][TASK]['metrics']['acc']:.4f}"]
    events = [json.loads(line) for line in (finished_run["dir"] / "metrics.jsonl").read_text().splitlines()]
    logged = {e["label"]: e[f"{TASK}/acc"] for e in events if e["stage"] == "tasks"}
    assert logged == {"baseline": tasks["baseline"][TASK]["metrics"]["acc"],
                      "final": tasks["final"][TASK]["metrics"]["acc"]}


def test_speed_is_the_interleaved_measurement_and_says_so(finished_run):
    speed = finished_run["summary"]["speed"]
    assert speed["method"] == "interleaved" and speed["indicative"] is False
    assert speed["repeats"] == 2  # test mode caps the default 5
    low, high = speed["ratio_range"]
    assert low <= speed["ratio"] <= high
    assert set(speed["single_pass"]) == {"tokens_per_second_before", "tokens_per_second_after", "ratio"}
    state = json.loads((finished_run["dir"] / "state.json").read_text())
    assert "speed" in state["completed"] and state["results"]["speed"]["ratio"] == speed["ratio"]


def test_sentinel_prune_writes_a_card_for_compact_and_dense_exports(tiny_assets):
    for export in ("compact", "dense"):
        out = tiny_assets["tmp"] / f"pruned-{export}"
        result = CliRunner().invoke(cli, ["prune", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                                          "--scorer", "random", "--pruning-percent", "0.25", "--block-size", "32",
                                          "--batch-size", "4", "--calibration-batches", "1", "--export", export,
                                          "--output-dir", str(out)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        _, body = card_parts(out / "README.md")
        model, _ = load_model(out)
        rows = {row[0]: row[1:] for row in table(body, "| | before | after |")}
        before, after = (int(v.replace(",", "")) for v in rows["parameters"])
        assert after == sum(p.numel() for p in model.parameters())
        assert (after == before) if export == "dense" else (after < before)
        assert rows["validation perplexity"] == ["not measured", "not measured"]
        assert "2 of 8 attention heads removed" in body
        assert ("AutoModelForCausalLM.from_pretrained" in body) == (export == "dense")
        assert ("from sentinel_core import load_model" in body) == (export == "compact")


def test_a_hub_base_model_is_named_in_the_front_matter():
    from surgery_fixtures import tiny_gpt2 as surgery_gpt2

    from sentinel_core.model_card import render_model_card

    card = render_model_card(surgery_gpt2(), {"base_model": "distilgpt2"})
    yaml = pytest.importorskip("yaml")
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "distilgpt2"
    assert "0 of 8 attention heads removed" in card
