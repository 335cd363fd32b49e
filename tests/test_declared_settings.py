"""One fact, one home (issue #13): settings declared once, the plugin layer containing failures,
strategy options checked before any work, and the helpers plugins build on."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, one_error_line
from surgery_fixtures import ATTN, inputs, logits, tiny_gpt2, tiny_llama

from sentinel_core import HeadScores, Option, SentinelError, Strategy, hookimpl, plugins
from sentinel_core.cli import SentinelGroup, cli
from sentinel_core.cli.run import run_command
from sentinel_core.config import ExperimentConfig, field_info, field_kind, flag_name, reference_markdown
from sentinel_core.surgery import get_head_map, head_slices, head_weights, mask_heads, prune_heads

ROOT = Path(__file__).resolve().parents[1]




# -- config fields: declared once ------------------------------------------------------------------


def test_the_config_reference_page_is_generated_from_the_declarations():
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8").rstrip() == reference_markdown().rstrip()


def test_every_field_has_help_and_a_flag_that_shows_its_default():
    text = invoke("run", "--help").output
    for f in dataclasses.fields(ExperimentConfig):
        assert f.metadata["help"], f.name
        assert flag_name(f.name) in text, f.name
    assert text.count("[default:") == len(dataclasses.fields(ExperimentConfig))


def _sample_value(name: str) -> tuple[list[str], object]:
    kind, _ = field_kind(name)
    meta = field_info(name).metadata
    flag = flag_name(name)
    if kind is bool:
        return [flag], True
    if meta["choices"]:
        return [flag, meta["choices"][-1]], meta["choices"][-1]
    value = {int: 7, float: 0.25, str: "some-text"}.get(kind)
    return [flag, str(value)], value


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "options"])
def test_each_flag_sets_its_own_field(name):
    argv, expected = _sample_value(name)
    ctx = run_command.make_context("run", argv)
    given = {k: v for k, v in ctx.params.items() if v is not None and v != ()}
    assert given == {name: expected}


def test_strategy_options_from_the_command_line_are_typed_by_their_declarations():
    config = ExperimentConfig(fine_tune="plain")
    typed = plugins.parse_cli_options(config, ["max_bad_steps=5", "weight_decay=0", "normalize_scores=false"])
    assert typed == {"max_bad_steps": 5, "weight_decay": 0.0, "normalize_scores": "false"}
    with pytest.raises(SentinelError, match="-o max_bad_steps must be int, got 'lots'"):
        plugins.parse_cli_options(config, ["max_bad_steps=lots"])
    with pytest.raises(SentinelError, match="-o 'oops' is not KEY=VALUE"):
        plugins.parse_cli_options(config, ["oops"])


def test_check_run_fills_in_every_declared_option():
    config = plugins.check_run(ExperimentConfig(scorer="random", options={"max_rollbacks": 0}))
    assert config.options["max_rollbacks"] == 0
    assert config.options["keep_checkpoints"] == 2 and config.options["normalize_scores"] == "auto"


# -- #12 case 10: a bad option stops the run before any stage ----------------------------------------------


def test_a_bad_option_in_toml_is_refused_before_anything_is_written(tiny_assets):
    toml = tiny_assets["tmp"] / "exp.toml"
    out = tiny_assets["tmp"] / "run"
    toml.write_text(f'model_name = "{tiny_assets["model"]}"\ndata = "{tiny_assets["data"]}"\nscorer = "random"\n'
                    f'output_dir = "{out}"\n[options]\nmax_bad_steps = "x"\n')
    one_error_line(invoke("run", "--config", toml), "option max_bad_steps (of fine-tuning strategy 'plain') must be "
                                                    "int, got 'x'")
    assert not out.exists()


def test_an_unknown_option_names_what_the_strategies_take(tiny_assets):
    result = invoke("run", "--scorer", "random", "-o", "max_bad_step=3", "--output-dir", tiny_assets["tmp"] / "o")
    one_error_line(result, "unknown option 'max_bad_step' for this run's strategies; they take: ", "max_bad_steps")


def test_help_strategy_lists_the_options():
    result = invoke("run", "--help-strategy", "plain")
    assert result.exit_code == 0
    assert "fine-tuning strategy plain (sentinel_core.strategies.plain_finetune" in result.output
    assert "max_bad_steps (int, default 3; a positive integer)" in result.output
    one_error_line(invoke("run", "--help-strategy", "nope"), "no strategy is called 'nope'")


def test_resume_takes_display_flags_only(tmp_path):
    result = invoke("run", "--resume", tmp_path / "none", "--seed", "3")
    assert result.exit_code == 2 and "drop --seed" in result.output
    one_error_line(invoke("run", "--resume", tmp_path / "none", "--quiet"), "holds no Sentinel run to resume")


# -- the plugin layer: failures contained and named -------------------------------------------------------


class Raising:
    @hookimpl
    def register_strategies(self):
        return [Strategy("score_heads", "explodes", "raises inside", function=self.explode),
                Strategy("score_heads", "explains", "raises a user error", function=self.explain)]

    @staticmethod
    def explode(model):
        raise ZeroDivisionError("the plugin's own bug\nline two")

    @staticmethod
    def explain(model):
        raise SentinelError("your model needs more heads")


def test_a_strategy_that_raises_is_named_in_one_line(register_plugin, tiny_assets):
    register_plugin(Raising(), "sentinel-raising")
    with pytest.raises(plugins.PluginError, match=r"^plugin sentinel-raising failed in score_heads \(scorer "
                                                  r"'explodes'\): ZeroDivisionError: the plugin's own bug$"):
        plugins.score_heads("explodes", model=None, batches=[], config=None)
    with pytest.raises(SentinelError, match="^your model needs more heads$"):
        plugins.score_heads("explains", model=None, batches=[], config=None)
    result = invoke("score", "--model", tiny_assets["model"], "--scorer", "explodes")
    one_error_line(result, "plugin sentinel-raising failed in score_heads (scorer 'explodes'): ZeroDivisionError")


class FailingObserver:
    calls = 0

    @hookimpl
    def on_metric(self, event):
        FailingObserver.calls += 1
        raise RuntimeError("observer broke")


def test_a_failing_observer_is_reported_once_and_switched_off(register_plugin, capsys):
    register_plugin(FailingObserver(), "sentinel-observer")
    seen = []

    class Recorder:
        @hookimpl
        def on_metric(self, event):
            seen.append(event.step)

    register_plugin(Recorder(), "recorder")
    plugins.start_run()
    for step in range(3):
        plugins.emit("fine_tune", step, loss=1.0)
    assert FailingObserver.calls == 1 and seen == [0, 1, 2]
    err = capsys.readouterr().err
    assert err.count("Warning: plugin sentinel-observer failed in on_metric and is switched off") == 1
    plugins.start_run()  # the next run gives it another chance
    plugins.emit("fine_tune", 0, loss=1.0)
    assert FailingObserver.calls == 2


class Duplicate:
    def __init__(self, label):
        self.label = label

    @hookimpl
    def register_strategies(self):
        return [Strategy("score_heads", "same-name", self.label, function=lambda model: None)]


def test_a_clash_blocks_only_runs_that_use_the_name(register_plugin):
    register_plugin(Duplicate("a"), "sentinel-a")
    register_plugin(Duplicate("b"), "sentinel-b")
    with pytest.raises(SentinelError, match="scorer 'same-name' is declared by both sentinel-a and sentinel-b; block "
                                            "one with SENTINEL_BLOCK_PLUGINS=sentinel-b"):
        plugins.check_run(ExperimentConfig(scorer="same-name"))
    plugins.check_run(ExperimentConfig(scorer="random"))  # other scorers still work
    assert any("'same-name' is declared by both" in line for line in plugins.clashes())
    listing = invoke("plugins").output
    assert "! scorer 'same-name' is declared by both sentinel-a and sentinel-b" in listing


def test_built_in_plugins_can_be_blocked(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path),
           "SENTINEL_BLOCK_PLUGINS": "sentinel_core.strategies.random_scorer,sentinel-magnitude"}
    run = subprocess.run([sys.executable, "-m", "sentinel_core", "plugins", "--json"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    names = {item["name"] for item in json.loads(run.stdout)}
    assert "sentinel_core.strategies.random_scorer" not in names and "sentinel-magnitude" not in names
    assert "sentinel_core.strategies.gradient_scorer" in names


def test_options_must_be_declared_the_same_way_by_every_strategy_of_a_run(register_plugin):
    class Other:
        @hookimpl
        def register_strategies(self):
            clash = Option("max_bad_steps", str, "x", "a different meaning")
            return [Strategy("score_heads", "other", "declares max_bad_steps too", options=(clash,),
                             function=lambda model: HeadScores(torch.zeros(1, 1), "other"))]

    register_plugin(Other(), "sentinel-other")
    with pytest.raises(SentinelError, match="option 'max_bad_steps' is declared differently by scorer 'other' and "
                                            "fine-tuning strategy 'plain'"):
        plugins.check_run(ExperimentConfig(scorer="other"))


def test_plugins_add_commands(register_plugin):
    import click

    class Commands:
        @hookimpl
        def register_commands(self, cli):
            @cli.command("hello-plugin")
            @click.argument("name")
            def hello(name):
                """Say hello."""
                click.echo(f"hello {name}")

    register_plugin(Commands(), "sentinel-commands")
    SentinelGroup._plugin_commands_loaded = False
    try:
        result = invoke("hello-plugin", "world")
        assert result.exit_code == 0 and result.output == "hello world\n"
        assert "hello-plugin" in invoke("--help").output
    finally:
        cli.commands.pop("hello-plugin", None)
        SentinelGroup._plugin_commands_loaded = False


# -- one head's weights -------------------------------------------------------------------------------


def test_head_weights_slice_the_fused_gpt2_tensors():
    model = tiny_gpt2()
    hd = model.config.n_embd // model.config.n_head
    h = 2
    w = head_weights(model, 1, h)
    attn = model.transformer.h[1].attn
    width = model.config.n_embd
    assert torch.equal(w["q"], attn.c_attn.weight[:, h * hd:(h + 1) * hd])
    assert torch.equal(w["k"], attn.c_attn.weight[:, width + h * hd:width + (h + 1) * hd])
    assert torch.equal(w["v_bias"], attn.c_attn.bias[2 * width + h * hd:2 * width + (h + 1) * hd])
    assert torch.equal(w["o"], attn.c_proj.weight[h * hd:(h + 1) * hd])
    assert set(w) == {"q", "k", "v", "o", "q_bias", "k_bias", "v_bias"}


@pytest.mark.parametrize("attn_impl", ATTN)
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_zeroing_a_heads_output_block_equals_masking_it_after_surgery(build, attn_impl):
    """The slices follow the compacted layout: prune, then for every head left, zeroing its
    ``o`` block through head_slices gives the masked model's logits."""
    model = build(attn_impl)
    prune_heads(model, {0: [1]})
    x = inputs()
    for layer in range(2):
        for head in get_head_map(model).present(layer):
            zeroed = build(attn_impl)
            prune_heads(zeroed, {0: [1]})
            for piece in head_slices(zeroed, layer, head, parts=("o",)):
                piece.view().zero_()
            masked = build(attn_impl)
            prune_heads(masked, {0: [1]})
            mask_heads(masked, {layer: [head]})
            assert torch.allclose(logits(zeroed, x), logits(masked, x), atol=1e-5), (layer, head)


def test_gqa_heads_share_their_groups_key_and_value_blocks():
    model = tiny_llama()  # 4 query heads, 2 key/value heads of width 8
    attn = model.model.layers[0].self_attn
    for head in range(4):
        w = head_weights(model, 0, head)
        kv = head // 2
        assert torch.equal(w["k"], attn.k_proj.weight[kv * 8:(kv + 1) * 8])
        assert torch.equal(w["q"], attn.q_proj.weight[head * 8:(head + 1) * 8])
    with pytest.raises(SentinelError, match="head 9 of layer 0 is not present"):
        head_weights(model, 0, 9)
