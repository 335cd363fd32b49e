"""A typed wrapper over ``pm.hook``, so the pipeline reads like plain Python.

Each strategy call goes only to the plugin that declared the strategy's name, so two plugins
never race for the same name and an unknown name is an error that lists the known ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .errors import SentinelError
from .plugins import load_plugins, pm
from .results import HOOK_KINDS, FineTuneResult, GrowthResult, HeadScores, PruneResult, Strategy

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import ExperimentConfig
    from .data import LMData

# What users call each kind of strategy, for error messages.
_OPTION_FOR_HOOK = {
    "score_heads": "scorer",
    "prune": "prune strategy",
    "fine_tune": "fine-tuning strategy",
    "grow_heads": "growth strategy",
}


def strategies_by_plugin() -> dict[str, list[Strategy]]:
    """Plugin name -> the strategies it declared."""
    load_plugins()
    declared: dict[str, list[Strategy]] = {}
    for impl in pm.hook.register_strategies.get_hookimpls():
        declared[impl.plugin_name] = list(impl.function() or ())
    return declared


def available_strategies(hook: str) -> dict[str, str]:
    """Strategy name -> owning plugin name, for one strategy hook."""
    if hook not in HOOK_KINDS:
        raise ValueError(f"{hook!r} is not a strategy hook; expected one of {', '.join(HOOK_KINDS)}")
    owners: dict[str, str] = {}
    for plugin_name, strategies in strategies_by_plugin().items():
        for strategy in strategies:
            if strategy.hook != hook:
                continue
            if strategy.name in owners and owners[strategy.name] != plugin_name:
                raise SentinelError(
                    f"{_OPTION_FOR_HOOK[hook]} {strategy.name!r} is declared by both "
                    f"{owners[strategy.name]} and {plugin_name}; uninstall or block one "
                    f"(SENTINEL_PLUGINS=...)"
                )
            owners[strategy.name] = plugin_name
    return owners


def check_strategy(hook: str, name: str) -> str:
    """Return the plugin that owns ``name``, or raise a one-line error listing the choices."""
    owners = available_strategies(hook)
    if name not in owners:
        choices = ", ".join(sorted(owners)) or "none installed"
        raise SentinelError(f"unknown {_OPTION_FOR_HOOK[hook]} {name!r}; available: {choices}")
    return owners[name]


def _call_owner(hook: str, strategy: str, expected: type, **kwargs: Any) -> Any:
    owner = check_strategy(hook, strategy)
    others = [plugin for name, plugin in pm.list_name_plugin() if name != owner and plugin is not None]
    caller = pm.subset_hook_caller(hook, remove_plugins=others)
    result = caller(strategy=strategy, **kwargs)
    if result is None:
        raise RuntimeError(f"plugin {owner} declared {hook} strategy {strategy!r} but returned nothing for it")
    if not isinstance(result, expected):
        raise TypeError(
            f"plugin {owner}'s {hook} strategy {strategy!r} returned {type(result).__name__}, "
            f"expected {expected.__name__}"
        )
    return result


def score_heads(
    strategy: str,
    *,
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    config: ExperimentConfig,
) -> HeadScores:
    return _call_owner("score_heads", strategy, HeadScores, model=model, batches=batches, config=config)


def prune(strategy: str, *, model: PreTrainedModel, scores: HeadScores, config: ExperimentConfig) -> PruneResult:
    return _call_owner("prune", strategy, PruneResult, model=model, scores=scores, config=config)


def fine_tune(
    strategy: str,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: LMData,
    config: ExperimentConfig,
    stage: str = "fine_tune",
) -> FineTuneResult:
    return _call_owner(
        "fine_tune", strategy, FineTuneResult, model=model, tokenizer=tokenizer, data=data, config=config, stage=stage
    )


def grow_heads(strategy: str, *, model: PreTrainedModel, data: LMData, config: ExperimentConfig) -> GrowthResult:
    return _call_owner("grow_heads", strategy, GrowthResult, model=model, data=data, config=config)
