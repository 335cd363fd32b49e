"""Every plugin example in docs/hooks.md and docs/plugin-guide.md runs, so none can drift (issue #13).

Each ``python`` block of docs/hooks.md that defines a ``@hookimpl`` is executed as a module of
its own, registered as a plugin, and exercised the way Sentinel uses it: its strategies run
through ``sentinel_core.plugins`` on a tiny model, its adapter does surgery, its command runs,
its observer receives an event. The plugin guide's blocks form one module, whose own test
(section 5) is then run.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from surgery_fixtures import inputs, logits, tiny_gpt2
from training_fixtures import make_data, make_model

from sentinel_core import ExperimentConfig, plugins
from sentinel_core.plugins import pm
from sentinel_core.surgery import get_head_map, mask_heads, prune_heads

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S)


HOOK_EXAMPLES = [block for page in ("hooks.md", "fine-tuning.md") for block in python_blocks(page)
                 if "@hookimpl" in block]


def as_module(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # noqa: S102 - the docs' own code
    return module


def exercise_strategies(module: types.ModuleType, tmp_path: Path) -> int:
    ran = 0
    for strategy in module.register_strategies():
        config = ExperimentConfig(pruning_percent=0.25, growth_percent=0.125, growth_strategy="x", max_steps=2,
                                  eval_every=1, batch_size=4, output_dir=str(tmp_path / strategy.name), quiet=True,
                                  device="cpu")
        if strategy.hook == "score_heads":
            model = tiny_gpt2()
            prune_heads(model, {0: [1]})
            batches = [{"input_ids": inputs(), "attention_mask": torch.ones_like(inputs())}]
            result = plugins.score_heads(strategy.name, model=model, batches=batches, config=config)
            assert result.scores.shape == (2, 4) and torch.isnan(result.scores[0, 1])
            assert not torch.isnan(result.scores[1]).any()
        elif strategy.hook == "prune":
            model = tiny_gpt2()
            scores = plugins.score_heads("random", model=model, batches=[], config=config)
            result = plugins.prune(strategy.name, model=model, scores=scores, config=config)
            assert result.count == 2
            assert sum(len(get_head_map(model).active(layer)) for layer in range(2)) == 6
        elif strategy.hook == "fine_tune":
            model = make_model(seed=0)
            result = plugins.fine_tune(strategy.name, model=model, tokenizer=None, data=make_data(16), config=config)
            assert result.steps == 2
        elif strategy.hook == "grow_heads":
            model = tiny_gpt2()
            prune_heads(model, {0: [1, 2], 1: [3]})
            result = plugins.grow_heads(strategy.name, model=model, data=None, config=config)
            assert result.count == 1 and len(get_head_map(model).present(0)) == 3
        ran += 1
    return ran


@pytest.mark.parametrize("index", range(len(HOOK_EXAMPLES)))
def test_each_hooks_page_example_works(index, register_plugin, tmp_path, capsys):
    source = HOOK_EXAMPLES[index]
    module = as_module(source, f"hooks_example_{index}")
    exercised = 0
    if hasattr(module, "register_strategies"):
        register_plugin(module, f"hooks-example-{index}")
        exercised += exercise_strategies(module, tmp_path)
    if hasattr(module, "register_head_adapters"):
        exercised += check_adapter_example(module)
    if hasattr(module, "register_commands"):
        exercised += check_command_example(module, tmp_path)
    if hasattr(module, "register_training_callbacks"):
        exercised += check_training_callbacks_example(module, tmp_path)
    for value in list(vars(module).values()):
        if isinstance(value, type) and hasattr(value, "on_metric"):
            register_plugin(value(), f"hooks-example-{index}-observer")
            plugins.emit("fine_tune", 3, loss=2.5)
            assert "fine_tune 3 2.5" in capsys.readouterr().out
            exercised += 1
        if isinstance(value, type) and hasattr(value, "on_run_start"):
            register_plugin(value(), f"hooks-example-{index}-run-start")
            plugins.notify("on_run_start", config=ExperimentConfig(scorer="random"), run_dir=tmp_path)
            assert f"run in {tmp_path}: random at 30%" in capsys.readouterr().out
            exercised += 1
        if isinstance(value, type) and hasattr(value, "on_run_end"):
            register_plugin(value(), f"hooks-example-{index}-run-end")
            summary = {"perplexity": {"baseline": 20.0, "final": 21.5}, "heads": {"original": 8, "final": 6}}
            plugins.notify("on_run_end", summary=summary, run_dir=tmp_path)
            assert f"{tmp_path}: perplexity 21.50" in capsys.readouterr().out
            exercised += 1
    assert exercised, f"docs/hooks.md example {index} was not exercised:\n{source}"


def check_adapter_example(module: types.ModuleType) -> int:
    from transformers import OlmoConfig, OlmoForCausalLM

    from sentinel_core.surgery import register_adapter

    for adapter in module.register_head_adapters():
        register_adapter(adapter)
    torch.manual_seed(0)
    config = OlmoConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    masked, removed = OlmoForCausalLM(config).eval(), None
    removed = OlmoForCausalLM(config).eval()
    removed.load_state_dict(masked.state_dict())
    mask_heads(masked, {0: [0, 1], 1: [2]})
    prune_heads(removed, {0: [0, 1], 1: [2]})
    assert get_head_map(removed).layers[0] == [2, 3]
    assert torch.allclose(logits(masked, inputs()), logits(removed, inputs()), atol=1e-5)
    return 1


def check_training_callbacks_example(module: types.ModuleType, tmp_path: Path) -> int:
    from sentinel_core.training import TrainerCallback, TrainerState, TrainingContext, train

    assert module.register_training_callbacks(config=None, stage="grow") == []
    (callback,) = module.register_training_callbacks(config=None, stage="fine_tune")
    assert isinstance(callback, TrainerCallback)
    state = TrainerState(step=3)
    callback.on_step_end(state, TrainingContext(model=None, config=None, stage="fine_tune"), {"loss": 0.1})
    assert state.stopped_early
    # And in a real stage, through the hook: a high threshold stops it after its first step.
    callback.threshold = 1e9
    from sentinel_core import hookimpl

    module.register_training_callbacks = hookimpl(lambda config, stage: [callback])
    pm.register(module, name="training-callbacks-example")
    try:
        config = ExperimentConfig(max_steps=5, eval_every=1, batch_size=4, output_dir=str(tmp_path / "stop"),
                                  quiet=True, device="cpu", patience=0)
        result = train(make_model(seed=0), make_data(32), config, stage="fine_tune")
    finally:
        pm.unregister(module)
    assert result.steps == 1 and result.extra["stopped_early"]
    return 1


def check_command_example(module: types.ModuleType, tmp_path: Path) -> int:
    from sentinel_core import save_model

    group = click.Group("sentinel")
    module.register_commands(cli=group)
    model = tiny_gpt2()
    prune_heads(model, {1: [0, 3]})
    save_model(model, None, tmp_path / "m")
    (name,) = group.commands
    result = CliRunner().invoke(group, [name, "--model", str(tmp_path / "m")], catch_exceptions=False)
    assert result.exit_code == 0 and result.output == "4 2\n", result.output
    return 1


def test_the_plugin_guide_builds_a_working_plugin_and_its_own_test_passes():
    source = "\n".join(block for block in python_blocks("plugin-guide.md"))
    module = as_module(source, "plugin_guide_example")
    plugin_module = types.ModuleType("output_norm_plugin")
    plugin_module.register_strategies = module.register_strategies
    module.test_output_norm_scores_every_head(plugin_module)
    scores = module.output_norm_scores(tiny_gpt2(), [{"input_ids": inputs()}])
    assert scores.strategy == "output-norm" and scores.tokens_seen == inputs().numel()
