"""The plugin layer, in one place: the manager, loading, strategy routing, the typed calls the
pipeline makes, and the broadcast of events to observers.

Strategies. A plugin declares its strategies with ``register_strategies``; each
:class:`~sentinel_core.results.Strategy` names its hook, its options and, usually, the function
that implements it. Sentinel calls that function (or, for a strategy without one, the plugin's
own hook implementation) on the owning plugin only, so implementations never check the name.
Two plugins declaring one name block only the runs that use that name.

Failures are contained and named. A plugin that fails to load is reported and left out. A
strategy that raises stops the run with one line naming the plugin, its version and the hook.
An observer (``on_metric`` and the other broadcast hooks) that raises is reported once and
switched off for the rest of the run, so it cannot abort a long fine-tune.

Environment variables:

- ``SENTINEL_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (built-ins still load).
- ``SENTINEL_PLUGINS=a,b``: load only these entry-point plugins (entry-point or distribution names).
- ``SENTINEL_BLOCK_PLUGINS=a,b``: load neither of these plugins, built-in ones included (names
  as ``sentinel plugins`` lists them, or entry-point names).
- ``SENTINEL_STRICT_PLUGINS=1``: a plugin that fails to load raises instead of being reported.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import importlib_metadata
import pluggy

from . import __version__, distributed, hookspecs
from .errors import SentinelError
from .log import get_logger
from .metrics import MetricEvent
from .options import Option, merge_declarations, parse_assignments, resolve_options
from .results import HOOK_KINDS, FineTuneResult, GrowthResult, HeadScores, PruneResult, Strategy

log = get_logger()

if TYPE_CHECKING:  # pragma: no cover
    import click
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import ExperimentConfig
    from .data import LMData

ENTRY_POINT_GROUP = "sentinel"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "sentinel_core.strategies.random_scorer",
    "sentinel_core.strategies.gradient_scorer",
    "sentinel_core.strategies.selection",
    "sentinel_core.strategies.group_selection",
    "sentinel_core.strategies.plain_finetune",
)

# What users call each kind of strategy, for messages; and the config field that picks it.
STRATEGY_KINDS = {
    "score_heads": ("scorer", "scorer"),
    "prune": ("prune strategy", "prune_strategy"),
    "fine_tune": ("fine-tuning strategy", "fine_tune"),
    "grow_heads": ("growth strategy", "growth_strategy"),
}

pm = pluggy.PluginManager("sentinel")
pm.add_hookspecs(hookspecs)


class PluginLoadError(SentinelError):
    """A plugin failed to load while ``SENTINEL_STRICT_PLUGINS=1`` asked for failures to stop the run."""


class PluginError(SentinelError):
    """A plugin raised inside a hook; the message names the plugin, its version and the hook."""


@dataclass(frozen=True)
class PluginFailure:
    """An entry-point plugin that could not be loaded, kept so it can be reported."""

    entry_point: str
    name: str
    version: str | None
    error: str

    def describe(self) -> str:
        version = f" {self.version}" if self.version else ""
        return f"plugin {self.name}{version} failed to load: {self.error}"


_loaded = False
failures: list[PluginFailure] = []
# registered plugin name -> (distribution name, version), for messages and listings.
_distributions: dict[str, tuple[str, str | None]] = {}
# (plugin name, hook) of observers switched off after they raised, until the next run starts.
_switched_off: set[tuple[str, str]] = set()
# Observers of a run: under a multi-process launch only the main process tells them (one
# metrics.jsonl, one tracker run, each event once).
_REPORTING_HOOKS = ("on_metric", "on_run_start", "on_run_end")


# -- loading ---------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _env_names(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _blocked(*names: str | None) -> bool:
    return bool((_env_names("SENTINEL_BLOCK_PLUGINS") or set()) & {n for n in names if n})


def _register_checked(plugin: object, name: str) -> None:
    """Register ``plugin`` and make sure it only implements hooks that exist.

    ``check_pending`` is what turns a misspelled hook name into an error instead of a hook that
    silently never runs.
    """
    pm.register(plugin, name=name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError:
        pm.unregister(plugin)
        raise


def _fail(entry_point: str, name: str, version: str | None, exc: BaseException) -> None:
    failure = PluginFailure(entry_point, name, version, (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0])
    if _env_flag("SENTINEL_STRICT_PLUGINS"):
        raise PluginLoadError(failure.describe() + " (SENTINEL_STRICT_PLUGINS=1)") from exc
    failures.append(failure)
    log.warning(f"Warning: {failure.describe()}")


def load_plugins() -> None:
    """Register the built-in plugins and the entry-point plugins. Safe to call more than once.

    Loading counts as done only once it has finished, so a failure (in strict mode) is raised
    again on the next call instead of leaving a half-loaded manager behind silently.
    """
    global _loaded
    if _loaded:
        return
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None and not _blocked(module_name):
            _register_checked(importlib.import_module(module_name), module_name)
            _distributions[module_name] = (module_name, __version__)
    if not _env_flag("SENTINEL_DISABLE_PLUGIN_AUTOLOAD"):
        _load_entry_points()
    _register_adapters()
    _loaded = True


def _load_entry_points() -> None:
    allowed = _env_names("SENTINEL_PLUGINS")
    failed = {failure.entry_point for failure in failures}
    for entry_point in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        dist_name = dist.name if dist is not None else None
        version = dist.version if dist is not None else None
        if allowed is not None and not allowed & {entry_point.name, dist_name}:
            continue
        if _blocked(entry_point.name, dist_name):
            continue
        if pm.get_plugin(entry_point.name) is not None or entry_point.name in failed:
            continue
        try:
            plugin = entry_point.load()
            _register_checked(plugin, entry_point.name)
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            _fail(entry_point.name, dist_name or entry_point.name, version, exc)
            continue
        _distributions[entry_point.name] = (dist_name or entry_point.name, version)


def _register_adapters() -> None:
    from .surgery import register_adapter

    for adapters in pm.hook.register_head_adapters():
        for adapter in adapters or ():
            register_adapter(adapter)


def plugin_label(plugin_name: str) -> str:
    """How messages name a plugin: its distribution name and version, as ``sentinel plugins`` lists it."""
    dist, version = _distributions.get(plugin_name, (plugin_name, None))
    return f"{dist} {version}" if version else dist


def register_commands(group: click.Group) -> None:
    """Let plugins add commands to the ``sentinel`` group (the ``register_commands`` hook)."""
    load_plugins()
    notify("register_commands", cli=group)


# -- strategies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Declared:
    plugin: str  # registered name
    strategy: Strategy


def _declarations() -> list[_Declared]:
    load_plugins()
    out: list[_Declared] = []
    for impl in pm.hook.register_strategies.get_hookimpls():
        try:
            strategies = list(impl.function() or ())
        except Exception as exc:  # noqa: BLE001 - named and reported like a failed load
            raise PluginError(f"plugin {plugin_label(impl.plugin_name)} failed in register_strategies: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
        for strategy in strategies:
            if not isinstance(strategy, Strategy):
                raise PluginError(f"plugin {plugin_label(impl.plugin_name)}'s register_strategies returned "
                                  f"{type(strategy).__name__}; give sentinel_core.Strategy objects")
            out.append(_Declared(impl.plugin_name, strategy))
    return out


def strategies_by_plugin() -> dict[str, list[Strategy]]:
    """Plugin name (as registered) -> the strategies it declared."""
    declared: dict[str, list[Strategy]] = {}
    for item in _declarations():
        declared.setdefault(item.plugin, []).append(item.strategy)
    return declared


def _owners(hook: str) -> dict[str, list[_Declared]]:
    if hook not in HOOK_KINDS:
        raise ValueError(f"{hook!r} is not a strategy hook; expected one of {', '.join(HOOK_KINDS)}")
    owners: dict[str, list[_Declared]] = {}
    for item in _declarations():
        if item.strategy.hook == hook:
            owners.setdefault(item.strategy.name, []).append(item)
    return owners


def available_strategies(hook: str) -> dict[str, str]:
    """Strategy name -> owning plugin name (as registered), for one strategy hook.

    A name declared by two plugins maps to the first; :func:`clashes` lists such names.
    """
    return {name: items[0].plugin for name, items in _owners(hook).items()}


def clashes() -> list[str]:
    """One line per strategy name that two plugins declare (for ``sentinel plugins``)."""
    lines = []
    for hook in HOOK_KINDS:
        for name, items in sorted(_owners(hook).items()):
            if len({i.plugin for i in items}) > 1:
                lines.append(_clash_message(hook, name, items))
    return lines


def _clash_message(hook: str, name: str, items: list[_Declared]) -> str:
    plugins = sorted({i.plugin for i in items})
    labels = " and ".join(plugin_label(p) for p in plugins)
    return (f"{STRATEGY_KINDS[hook][0]} {name!r} is declared by both {labels}; block one with "
            f"SENTINEL_BLOCK_PLUGINS={_distributions.get(plugins[-1], (plugins[-1],))[0]} (or uninstall it)")


def find_strategy(hook: str, name: str) -> _Declared:
    """The declaration of strategy ``name``, or a one-line error listing the choices (or the clash)."""
    owners = _owners(hook)
    if name not in owners:
        choices = ", ".join(sorted(owners)) or "none installed"
        raise SentinelError(f"unknown {STRATEGY_KINDS[hook][0]} {name!r}; available: {choices}")
    items = owners[name]
    if len({i.plugin for i in items}) > 1:
        raise SentinelError(_clash_message(hook, name, items))
    return items[0]


def check_strategy(hook: str, name: str) -> str:
    """Return the plugin (as registered) that owns ``name``, or raise a one-line error."""
    return find_strategy(hook, name).plugin


def _accepts(function: Callable) -> tuple[set[str], bool]:
    parameters = inspect.signature(function).parameters.values()
    return ({p.name for p in parameters}, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters))


def _call_function(function: Callable, kwargs: dict[str, Any]) -> Any:
    names, takes_all = _accepts(function)
    return function(**(kwargs if takes_all else {k: v for k, v in kwargs.items() if k in names}))


def call_strategy(hook: str, name: str, expected: type, **kwargs: Any) -> Any:
    """Call strategy ``name`` of ``hook`` on its owner only; check what comes back.

    A :class:`SentinelError` from the strategy (a user mistake it explains) and Ctrl-C pass
    through; any other exception becomes a :class:`PluginError` naming the plugin.
    """
    declared = find_strategy(hook, name)
    label = plugin_label(declared.plugin)
    kwargs = {"strategy": name, **kwargs}
    try:
        if declared.strategy.function is not None:
            result = _call_function(declared.strategy.function, kwargs)
        else:  # the hook contract: the plugin's own implementation, which may serve several names
            others = [p for n, p in pm.list_name_plugin() if n != declared.plugin and p is not None]
            result = pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)
    except (SentinelError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise PluginError(f"plugin {label} failed in {hook} ({STRATEGY_KINDS[hook][0]} {name!r}): "
                          f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if result is None:
        raise PluginError(f"plugin {label} declared {hook} strategy {name!r} but returned nothing for it")
    if not isinstance(result, expected):
        raise PluginError(f"plugin {label}'s {hook} strategy {name!r} returned {type(result).__name__}, "
                          f"expected {expected.__name__}")
    return result


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# -- strategy options ----------------------------------------------------------------------------


def _chosen(config: ExperimentConfig) -> list[tuple[str, str]]:
    """The (hook, name) of every strategy ``config`` uses."""
    chosen = []
    for hook, (_, field_name) in STRATEGY_KINDS.items():
        name = getattr(config, field_name)
        if name:
            chosen.append((hook, name))
    return chosen


def _declared_options(config: ExperimentConfig) -> tuple[dict[str, Option], dict[str, str]]:
    groups = []
    for hook, name in _chosen(config):
        declared = find_strategy(hook, name)
        groups.append((f"{STRATEGY_KINDS[hook][0]} {name!r}", declared.strategy.options))
    return merge_declarations(groups)


def check_run(config: ExperimentConfig) -> ExperimentConfig:
    """Check every strategy name and option of ``config`` before any work; returns ``config`` with
    every declared option filled in (defaults included), converted to its kind.

    :raises SentinelError: one line for an unknown strategy, an unknown option or a bad value.
    """
    declared, owners = _declared_options(config)
    return config.replace(options=resolve_options(declared, config.options, owners=owners))


def parse_cli_options(config: ExperimentConfig, pairs: Iterable[str]) -> dict[str, Any]:
    """``-o KEY=VALUE`` pairs, typed by the declarations of ``config``'s strategies.

    Keys no chosen strategy declares stay text; :func:`check_run` then names them.
    """
    raw = parse_assignments(pairs)
    try:
        declared, owners = _declared_options(config)
    except SentinelError:
        return raw  # an unknown strategy: check_run reports it
    return {key: declared[key].rule.check(f"-o {key}", value, from_text=True) if key in declared else value
            for key, value in raw.items()}


def describe_strategy(name: str) -> str:
    """Every strategy called ``name`` (of any hook), its plugin, description and options."""
    found = [item for item in _declarations() if item.strategy.name == name]
    if not found:
        known = sorted({item.strategy.name for item in _declarations()})
        raise SentinelError(f"no strategy is called {name!r}; known: {', '.join(known)}")
    lines = []
    for item in found:
        s = item.strategy
        lines.append(f"{STRATEGY_KINDS[s.hook][0]} {s.name} ({plugin_label(item.plugin)}): {s.description}")
        if s.options:
            lines.append("  options (-o KEY=VALUE):")
            lines += [f"    {option.describe()}" for option in s.options]
        else:
            lines.append("  no options")
    return "\n".join(lines)


def list_plugins() -> list[dict[str, Any]]:
    """Describe every registered plugin: ``[{name, version, hooks, strategies}]``, built-ins first."""
    by_plugin = strategies_by_plugin()
    listing = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist_name, version = _distributions.get(name, (name, None))
        listing.append(
            {
                "name": name if name in DEFAULT_PLUGINS else dist_name,
                "version": version,
                "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or []),
                "strategies": [
                    {"hook": s.hook, "name": s.name, "description": s.description,
                     "options": [{"name": o.name, "kind": o.kind.__name__, "default": o.default, "help": o.help,
                                  "valid": o.rule.describe()} for o in s.options]}
                    for s in by_plugin.get(name, [])
                ],
            }
        )
    return sorted(listing, key=lambda item: (item["name"] not in DEFAULT_PLUGINS, item["name"]))


# -- the calls the pipeline makes ---------------------------------------------------------------------


def score_heads(strategy: str, *, model: PreTrainedModel, batches: Sequence[dict[str, torch.Tensor]],
                config: ExperimentConfig) -> HeadScores:
    return call_strategy("score_heads", strategy, HeadScores, model=model, batches=batches, config=config)


def prune(strategy: str, *, model: PreTrainedModel, scores: HeadScores, config: ExperimentConfig) -> PruneResult:
    return call_strategy("prune", strategy, PruneResult, model=model, scores=scores, config=config)


def fine_tune(strategy: str, *, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: LMData,
              config: ExperimentConfig, stage: str = "fine_tune", original_model: str | None = None,
              run_dir: str | None = None) -> FineTuneResult:
    return call_strategy("fine_tune", strategy, FineTuneResult, model=model, tokenizer=tokenizer, data=data,
                         config=config, stage=stage, original_model=original_model, run_dir=run_dir)


def grow_heads(strategy: str, *, model: PreTrainedModel, data: LMData, config: ExperimentConfig) -> GrowthResult:
    return call_strategy("grow_heads", strategy, GrowthResult, model=model, data=data, config=config)


def collect_training_callbacks(*, model: Any, config: ExperimentConfig, stage: str) -> list[Any]:
    """Every plugin's callbacks for a training stage (the ``register_training_callbacks`` hook).

    A plugin that raises here stops training with one line naming it: its callback may be what
    keeps the stage correct (a gate warm-up, say), so going on without it would be wrong.
    """
    load_plugins()
    found: list[Any] = []
    for impl in reversed(pm.hook.register_training_callbacks.get_hookimpls()):
        kwargs = {"model": model, "config": config, "stage": stage}
        try:
            found.extend(impl.function(**{arg: kwargs[arg] for arg in impl.argnames}) or ())
        except (SentinelError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin_label(impl.plugin_name)} failed in register_training_callbacks: "
                              f"{type(exc).__name__}: {_first_line(exc)}") from exc
    return found


# -- broadcasts to observers ------------------------------------------------------------------------


def notify(hook: str, **kwargs: Any) -> None:
    """Call every implementation of broadcast hook ``hook``, one by one.

    One that raises is reported once, in one line naming the plugin and the hook, and is not
    called again for this hook until :func:`start_run`. Ctrl-C (``KeyboardInterrupt``) passes
    through: a hook may ask the run to stop. Under a multi-process launch, the run's
    observers (``on_metric``, ``on_run_start``, ``on_run_end``) hear from the main process only.
    """
    if hook in _REPORTING_HOOKS and not distributed.is_main():
        return
    caller = getattr(pm.hook, hook)
    # pluggy calls the newest registration first; so do we.
    for impl in reversed(caller.get_hookimpls()):
        key = (impl.plugin_name, hook)
        if key in _switched_off:
            continue
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames if arg in kwargs})
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - an observer must not abort the run
            _switched_off.add(key)
            log.warning(f"Warning: plugin {plugin_label(impl.plugin_name)} failed in {hook} and is switched off for the "
                  f"rest of this run: {type(exc).__name__}: {_first_line(exc)}")


def emit(stage: str, step: int | None = None, **values: Any) -> MetricEvent:
    """Broadcast a metric event to every ``on_metric`` implementation and return it."""
    event = MetricEvent(stage=stage, step=step, values=values)
    notify("on_metric", event=event)
    return event


def start_run() -> None:
    """A new run begins: observers switched off in an earlier run get another chance."""
    _switched_off.clear()
