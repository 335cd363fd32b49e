"""``sentinel export``: stock transformers checkpoints that open without Sentinel and compute the same function.

The exported folders are opened in a subprocess in which ``import sentinel_core`` fails (a shim
package on PYTHONPATH raises ImportError), with plain ``AutoModelForCausalLM.from_pretrained``,
and compared there with the compact model's logits (float32, 1e-5) and greedy generation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from surgery_fixtures import (
    inputs,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tiny_qwen3,
)

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core import export as export_module
from sentinel_core.cli import cli
from sentinel_core.errors import SentinelError
from sentinel_core.export import export_checkpoint, export_model, plan_stock_layout
from sentinel_core.model_io import load_model, save_model
from sentinel_core.surgery import get_head_map, grow_heads, mask_heads, prune_heads

SHAPE = dict(num_attention_heads=8, num_key_value_heads=4)  # 4 KV groups of 2, 2 layers, hidden 32
NEW_TOKENS = 8


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)


# name -> (model builder, surgery, expected stock class, expected (heads, kv heads) or None for GPT-2, padded)
def _uniform(model):  # whole groups, the same in every layer: 4 query heads in 2 groups, no padding
    prune_heads(model, {0: [2, 3, 6, 7], 1: [0, 1, 4, 5]})


def _three_groups(model):  # 6 heads in 3 groups: LlamaConfig refuses 6 heads with hidden 32
    prune_heads(model, {0: [2, 3], 1: [6, 7]})


def _uneven(model):  # layer 0 loses a group and one more head, layer 1 one head: padding needed
    prune_heads(model, {0: [0, 1, 5], 1: [3]})


def _per_group(model):
    prune_heads(model, {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]})


def _masked_and_grown(model):  # masked heads are dropped, grown heads are ordinary heads in stock form
    prune_heads(model, {0: [0, 1], 1: [2]})
    mask_heads(model, {1: [5]})
    grow_heads(model, {1: 2}, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # born silent; give the new heads a voice so a misplaced one shows
        model.model.layers[1].self_attn.o_proj.weight[:, -16:].normal_(0, 0.2)


def _headless_layer(model):
    prune_heads(model, {0: list(range(8)), 1: [7]})


CASES = {
    "llama-eager-uniform": (lambda: tiny_llama("eager", **SHAPE), _uniform, "LlamaForCausalLM", (4, 2), 0),
    "llama-sdpa-three-groups": (lambda: tiny_llama("sdpa", **SHAPE), _three_groups, "MistralForCausalLM", (6, 3), 0),
    "llama-sdpa-uneven": (lambda: tiny_llama("sdpa", **SHAPE), _uneven, "LlamaForCausalLM", (8, 4), 4),
    # layer 1 ends with 5 groups (4 old, 1 grown): 10 heads, which LlamaConfig refuses with hidden 32
    "llama-eager-masked-grown": (lambda: tiny_llama("eager", **SHAPE), _masked_and_grown, "MistralForCausalLM",
                                 (10, 5), 6),
    "llama-sdpa-headless": (lambda: tiny_llama("sdpa", **SHAPE), _headless_layer, "LlamaForCausalLM", (8, 4), 9),
    "qwen2-sdpa-three-groups": (lambda: tiny_qwen2("sdpa", **SHAPE), _three_groups, "Qwen2ForCausalLM", (6, 3), 0),
    "qwen2-eager-per-group": (lambda: tiny_qwen2("eager", **SHAPE), _per_group, "Qwen2ForCausalLM", (4, 4), 0),
    "qwen3-eager-uneven": (lambda: tiny_qwen3("eager", **SHAPE), _uneven, "Qwen3ForCausalLM", (8, 4), 4),
    "qwen3-sdpa-per-group": (lambda: tiny_qwen3("sdpa", **SHAPE), _per_group, "Qwen3ForCausalLM", (4, 4), 0),
    "mistral-sdpa-uneven": (lambda: tiny_mistral("sdpa", **SHAPE), _uneven, "MistralForCausalLM", (8, 4), 4),
    "mistral-eager-uniform": (lambda: tiny_mistral("eager", **SHAPE), _uniform, "MistralForCausalLM", (4, 2), 0),
    "gpt2-sdpa-dense": (lambda: tiny_gpt2("sdpa"), lambda m: prune_heads(m, {0: [1, 2], 1: [0]}),
                        "GPT2LMHeadModel", None, 0),
}

# Runs where sentinel_core cannot be imported: the exported folders must open with transformers alone.
CHILD = textwrap.dedent("""
    import json, sys, torch
    try:
        import sentinel_core
    except ImportError as exc:
        assert "not installed here" in str(exc)
    else:
        raise SystemExit("sentinel_core was importable in the child")
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    out = {}
    for name, job in jobs.items():
        kwargs = {} if job["attn"] == "sdpa" else {"attn_implementation": job["attn"]}
        model = AutoModelForCausalLM.from_pretrained(job["path"], **kwargs).eval()
        ids = load_file(job["inputs"])["ids"]
        with torch.no_grad():
            out[name + ".logits"] = model(ids).logits
        out[name + ".greedy"] = model.generate(ids[:1], max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                                               eos_token_id=None)
        out[name + ".class"] = torch.tensor(list(type(model).__name__.encode()))
        assert "sentinel" not in json.dumps({k: v for k, v in model.config.to_dict().items()
                                             if k != "sentinel_dense_export"})
    save_file(out, sys.argv[2])
""").replace("NEW_TOKENS", str(NEW_TOKENS))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    shim = root / "shim" / "sentinel_core"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('sentinel_core is not installed here')\n")
    ids = inputs(batch=2, length=9)
    save_file({"ids": ids}, str(root / "inputs.safetensors"))
    results, jobs = {}, {}
    for name, (make, surgery, _, _, _) in CASES.items():
        model = make()
        surgery(model)
        report = export_model(model, None, root / name, quiet=True)
        with torch.no_grad():
            results[name] = {"logits": model(ids).logits, "greedy": greedy(model, ids[:1]), "report": report,
                             "model": model}
        jobs[name] = {"path": str(root / name), "attn": model.config._attn_implementation,
                      "inputs": str(root / "inputs.safetensors")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "shim"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs), str(root / "child.safetensors")],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    return {"root": root, "results": results, "child": load_file(str(root / "child.safetensors"))}


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_opens_without_sentinel_with_equal_logits_and_generation(exported, name):
    child, mine = exported["child"], exported["results"][name]
    _, _, stock_class, heads, padded = CASES[name]
    assert bytes(child[name + ".class"].tolist()).decode() == stock_class
    torch.testing.assert_close(child[name + ".logits"], mine["logits"], atol=1e-5, rtol=0)
    assert torch.equal(child[name + ".greedy"], mine["greedy"])
    report = mine["report"]
    assert report.architecture == stock_class and report.padded_query_slots == padded
    if heads is not None:
        config = json.loads((exported["root"] / name / "config.json").read_text())
        assert (config["num_attention_heads"], config["num_key_value_heads"]) == heads
        assert config["head_dim"] == 8 and "sentinel_head_map" not in config
        assert (exported["root"] / name / "model.safetensors").is_file()
        assert report.kv_cache_bytes_per_token == 2 * heads[1] * 2 * 8 * 4  # layers x kv x (k, v) x dim x fp32


def test_uniform_results_need_no_padding_and_keep_the_kv_savings(exported):
    report = exported["results"]["llama-eager-uniform"]["report"]
    assert report.padded_kv_slots == 0 and report.padding_parameters == 0
    # 2 of 4 KV groups left in each of 2 layers: half the original cache per token
    assert report.kv_cache_bytes_per_token == 2 * 2 * 2 * 8 * 4


def test_padding_is_what_the_layer_layout_needs_and_its_cost_is_counted(exported):
    report = exported["results"]["llama-sdpa-uneven"]["report"]
    # layer 0 keeps groups {2,3}, {4}, {6,7}: 1 slot pads group {4}, one whole group (2 slots) is added;
    # layer 1 keeps {0,1}, {2}, {4,5}, {6,7}: 1 slot pads group {2}.
    assert (report.padded_query_slots, report.padded_kv_slots) == (4, 1)
    per_slot = 2 * 32 * 8  # q rows + o columns (no biases in LLaMA), or k rows + v rows
    assert report.padding_parameters == 4 * per_slot + 1 * per_slot
    assert report.padding_kv_cache_bytes_per_token == 2 * 8 * 4
    assert any("padded with inert zeros" in note for note in report.notes)


def test_a_padded_export_reopened_by_sentinel_gates_the_padding(exported):
    model, _ = load_model(exported["root"] / "llama-sdpa-uneven")
    hm = get_head_map(model)
    assert hm.masked(0) == [3, 6, 7] and hm.masked(1) == [3]  # the inert slots, so training cannot revive them
    ids = inputs(batch=2, length=9)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, exported["results"]["llama-sdpa-uneven"]["logits"],
                                   atol=1e-5, rtol=0)


def test_gpt2_exports_its_dense_form_and_says_so(exported, capsys):
    report = exported["results"]["gpt2-sdpa-dense"]["report"]
    assert report.format == "transformers" and "dense form" in report.notes[0]
    model = tiny_gpt2("sdpa")
    prune_heads(model, {0: [1]})
    export_model(model, None, exported["root"] / "gpt2-loud")
    assert "stock GPT-2 ties the head size to n_embd / n_head" in capsys.readouterr().err


def test_stock_layout_fits_every_layer_into_the_largest():
    model = tiny_llama("sdpa", **SHAPE)
    prune_heads(model, {0: [0, 1, 5], 1: [3]})
    layout = plan_stock_layout(get_head_map(model))
    assert (layout.num_kv_heads, layout.group_size) == (4, 2)
    # compact layer 0 slots: [2, 3, 4, None, 6, 7] (3 groups of 2); stock: its groups, then one zero group
    assert layout.layouts[0] == ([0, 1, 2, None, 4, 5, None, None], [0, 1, 2, None])
    assert layout.padded_query_slots == [[3, 6, 7], [3]]


# -- what cannot be expressed is refused, and nothing is written -------------------------------


def refused(model, tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(SentinelError, match=match) as err:
        export_model(model, None, out, quiet=True, **kwargs)
    assert "\n" not in str(err.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_active_grown_heads_have_no_place_in_a_dense_form(tmp_path):
    gpt2 = tiny_gpt2()
    grow_heads(gpt2, {0: 1})
    refused(gpt2, tmp_path, "active grown heads .* have no place")
    llama = tiny_llama(**SHAPE)
    grow_heads(llama, {1: 2})
    refused(llama, tmp_path, "active grown heads", format="dense")


def test_a_model_with_no_heads_left_is_refused(tmp_path):
    model = tiny_llama(**SHAPE)
    prune_heads(model, {0: list(range(8)), 1: list(range(8))})
    refused(model, tmp_path, "no attention head is active")


def test_llama_biases_block_the_mistral_form(tmp_path):
    model = tiny_llama(**SHAPE, attention_bias=True)
    _three_groups(model)
    refused(model, tmp_path, "LlamaConfig refuses 6 query heads .* attention_bias, which MistralConfig lacks")


def test_families_outside_gpt2_and_llama_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "LLAMA_MODEL_TYPES", ("llama",))
    refused(tiny_qwen2(**SHAPE), tmp_path, r"knows GPT-2 and the LLaMA family \(llama\); .*'qwen2'.*--format dense")


def test_an_export_whose_logits_would_differ_is_not_written(tmp_path, monkeypatch):
    real = export_module.plan_stock_layout

    def swapped(head_map):  # a planning bug: query heads of two groups trade places, so each reads
        layout = real(head_map)  # the other group's keys and values (a swap within a group is harmless)
        q, kv = layout.layouts[0]
        layout.layouts[0] = ([q[2], q[1], q[0], *q[3:]], kv)
        return layout

    monkeypatch.setattr(export_module, "plan_stock_layout", swapped)
    model = tiny_qwen3(**SHAPE)
    _uneven(model)
    refused(model, tmp_path, "logits differ from the source model's")


# -- sources, the CLI, and `sentinel run --export` ----------------------------------------------


def test_cli_exports_a_sentinel_checkpoint_or_run_folder(tmp_path):
    from data_fixtures import make_tokenizer

    model = tiny_llama(**SHAPE)
    _uniform(model)
    run = tmp_path / "run"
    save_model(model, make_tokenizer(100), run / "model")
    (run / "state.json").write_text("{}")
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(run), str(tmp_path / "stock")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM, 4 query heads in 2 KV groups per layer" in result.output
    assert (tmp_path / "stock" / "tokenizer.json").is_file()
    assert (tmp_path / "stock" / "generation_config.json").is_file()
    dense = runner.invoke(cli, ["export", str(run / "model"), str(tmp_path / "dense"), "--format", "dense",
                                "--json"], catch_exceptions=False)
    record = json.loads(dense.stdout)
    assert record["format"] == "dense" and record["num_attention_heads"] is None
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["num_attention_heads"] == 8


@pytest.mark.parametrize("args,fragment", [
    (["MISSING", "x"], "does not exist"),
    (["RUN", "x"], "has no model/ yet"),
    (["RUN/..", "x"], "neither a model folder"),
    (["MODEL", "MODEL"], "is the source model folder"),
])
def test_cli_errors_are_one_line(tmp_path, args, fragment):
    run = tmp_path / "run"
    run.mkdir()
    (run / "experiment.json").write_text("{}")
    model_dir = tmp_path / "m"
    save_model(tiny_llama(**SHAPE), None, model_dir)
    args = [a.replace("RUN", str(run)).replace("MODEL", str(model_dir)).replace("MISSING", str(tmp_path / "no"))
            for a in args]
    args[1] = args[1] if args[1] == str(model_dir) else str(tmp_path / args[1])
    result = CliRunner().invoke(cli, ["export", *args])
    assert result.exit_code != 0 and fragment in result.output
    assert result.output.strip().startswith("Error:") and len(result.output.strip().splitlines()) == 1


def test_prune_export_transformers_writes_a_stock_checkpoint(tiny_assets):
    out = tiny_assets["tmp"] / "pruned"
    result = CliRunner().invoke(cli, ["prune", "--model", tiny_assets["model"], "--scorer", "magnitude",
                                      "--pruning-percent", "0.25", "--prune-strategy", "kv-groups",
                                      "--output-dir", str(out), "--export", "transformers"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "sentinel_dense_export" in (out / "config.json").read_text()  # GPT-2: the dense form
    assert not (out / "sentinel.safetensors").exists()


def test_run_export_writes_a_stock_checkpoint_into_the_run_folder(tiny_assets):
    from data_fixtures import make_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer(400)
    model_dir = tiny_assets["tmp"] / "llama"
    tiny_llama(**SHAPE, vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tiny_assets["tmp"] / "run"
    result = CliRunner().invoke(cli, ["run", "--model", str(model_dir), "--data", tiny_assets["data"],
                                      "--scorer", "magnitude", "--prune-strategy", "kv-groups", "--pruning-percent",
                                      "0.5", "--block-size", "32", "--batch-size", "4", "--test-mode", "--quiet",
                                      "--output-dir", str(out), "--export", "transformers"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["export"]["path"] == str(out / "export") and summary["export"]["format"] == "transformers"
    assert summary["export"]["num_attention_heads"] == 4 and summary["export"]["padded_query_slots"] == 0
    stock = AutoModelForCausalLM.from_pretrained(out / "export")
    final, _ = load_model(out / "model")
    ids = inputs(length=6)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, final(ids).logits, atol=1e-5, rtol=0)


def test_a_bad_export_setting_is_one_line():
    from sentinel_core.config import ExperimentConfig

    with pytest.raises(SentinelError, match="export must be one of transformers, dense or unset, got 'onnx'"):
        ExperimentConfig(export="onnx")
    with pytest.raises(SentinelError, match="export format 'onnx' is not one of"):
        export_checkpoint("x", "y", format="onnx")
