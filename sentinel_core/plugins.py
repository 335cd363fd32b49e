"""The plugin manager: built-in plugins, entry-point plugins, and what failed to load.

Environment variables:

- ``SENTINEL_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (built-ins still load).
- ``SENTINEL_PLUGINS=a,b``: load only these entry-point plugins (entry-point or distribution names).
- ``SENTINEL_STRICT_PLUGINS=1``: a plugin that fails to load raises instead of being reported.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any

import importlib_metadata
import pluggy

from . import hookspecs
from .errors import SentinelError

ENTRY_POINT_GROUP = "sentinel"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "sentinel_core.strategies.random_scorer",
    "sentinel_core.strategies.gradient_scorer",
    "sentinel_core.strategies.selection",
    "sentinel_core.strategies.group_selection",
    "sentinel_core.strategies.plain_finetune",
)

pm = pluggy.PluginManager("sentinel")
pm.add_hookspecs(hookspecs)


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
# entry-point name -> (distribution name, version), for listings.
_distributions: dict[str, tuple[str, str]] = {}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _allow_list() -> set[str] | None:
    raw = os.environ.get("SENTINEL_PLUGINS")
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


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


class PluginLoadError(SentinelError):
    """A plugin failed to load while ``SENTINEL_STRICT_PLUGINS=1`` asked for failures to stop the run."""


def _fail(entry_point: str, name: str, version: str | None, exc: BaseException) -> None:
    failure = PluginFailure(entry_point, name, version, (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0])
    if _env_flag("SENTINEL_STRICT_PLUGINS"):
        raise PluginLoadError(failure.describe() + " (SENTINEL_STRICT_PLUGINS=1)") from exc
    failures.append(failure)
    print(f"Warning: {failure.describe()}", file=sys.stderr)


def load_plugins() -> None:
    """Register the built-in plugins and the entry-point plugins. Safe to call more than once.

    Loading counts as done only once it has finished, so a failure (in strict mode) is raised
    again on the next call instead of leaving a half-loaded manager behind silently.
    """
    global _loaded
    if _loaded:
        return
    for module_name in DEFAULT_PLUGINS:
        if pm.get_plugin(module_name) is None:
            _register_checked(importlib.import_module(module_name), module_name)
    if not _env_flag("SENTINEL_DISABLE_PLUGIN_AUTOLOAD"):
        _load_entry_points()
    _register_adapters()
    _loaded = True


def _load_entry_points() -> None:
    allowed = _allow_list()
    for entry_point in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = entry_point.dist
        dist_name = dist.name if dist is not None else None
        version = dist.version if dist is not None else None
        if allowed is not None and not allowed & {entry_point.name, dist_name}:
            continue
        if pm.get_plugin(entry_point.name) is not None or entry_point.name in _failed_names():
            continue
        try:
            plugin = entry_point.load()
            _register_checked(plugin, entry_point.name)
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            _fail(entry_point.name, dist_name or entry_point.name, version, exc)
            continue
        if dist is not None:
            _distributions[entry_point.name] = (dist.name, dist.version)


def _failed_names() -> set[str]:
    return {failure.entry_point for failure in failures}


def _register_adapters() -> None:
    from .surgery import register_adapter

    for adapters in pm.hook.register_head_adapters():
        for adapter in adapters or ():
            register_adapter(adapter)


def list_plugins() -> list[dict[str, Any]]:
    """Describe every registered plugin: ``[{name, version, hooks, strategies}]``."""
    from . import __version__
    from .hooks import strategies_by_plugin

    load_plugins()
    by_plugin = strategies_by_plugin()
    listing = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist_name, version = _distributions.get(name, (name, __version__ if name in DEFAULT_PLUGINS else None))
        listing.append(
            {
                "name": dist_name,
                "version": version,
                "hooks": sorted(caller.name for caller in pm.get_hookcallers(plugin) or []),
                "strategies": [
                    {"hook": s.hook, "name": s.name, "description": s.description}
                    for s in by_plugin.get(name, [])
                ],
            }
        )
    return sorted(listing, key=lambda item: (item["name"] not in DEFAULT_PLUGINS, item["name"]))
