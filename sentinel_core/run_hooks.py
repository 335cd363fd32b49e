"""Calls of the run-level observer hooks, ``on_run_start`` and ``on_run_end``.

Observers (experiment trackers, notifiers) must not be able to abort a run: each plugin is called
on its own, and an exception in one is reported in one line naming the plugin and the hook while
the others still run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .plugins import pm


def run_started(config: Any, run_dir: str | Path) -> None:
    """Broadcast ``on_run_start(config, run_dir)``."""
    _broadcast("on_run_start", config=config, run_dir=Path(run_dir))


def run_ended(summary: dict[str, Any], run_dir: str | Path) -> None:
    """Broadcast ``on_run_end(summary, run_dir)``."""
    _broadcast("on_run_end", summary=summary, run_dir=Path(run_dir))


def _broadcast(hook: str, **kwargs: Any) -> None:
    implementations = getattr(pm.hook, hook).get_hookimpls()
    # pluggy calls the most recently registered implementation first; keep that order.
    for impl in reversed(implementations):
        others = [plugin for name, plugin in pm.list_name_plugin() if plugin is not None and plugin is not impl.plugin]
        caller = pm.subset_hook_caller(hook, remove_plugins=others)
        try:
            caller(**kwargs)
        except Exception as exc:  # an observer's failure is reported, never fatal
            message = (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0]
            print(f"Warning: plugin {impl.plugin_name} failed in {hook} ({message}); the run goes on without it",
                  file=sys.stderr)
