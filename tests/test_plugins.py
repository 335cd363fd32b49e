"""The plugin manager: built-ins, entry points, failures, blocking and strategy dispatch.

Entry-point plugins are made as real ``.dist-info`` folders on a temporary ``sys.path`` entry,
so these tests never depend on what happens to be installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pluggy
import pytest
import torch

from sentinel_core import HeadScores, SentinelError, Strategy, hookimpl, plugins
from sentinel_core.plugins import pm


class ConstantScorer:
    """A class plugin offering one scorer, registered in-process by the tests."""

    @hookimpl
    def register_strategies(self):
        return [Strategy("score_heads", "constant", "every head scores 1")]

    @hookimpl
    def score_heads(self, strategy, model):
        if strategy != "constant":
            return None
        return HeadScores(scores=torch.ones(2, 4), strategy=strategy)


def test_load_plugins_is_safe_to_call_twice():
    plugins.load_plugins()
    before = sorted(name for name, _ in pm.list_name_plugin())
    plugins.load_plugins()
    assert sorted(name for name, _ in pm.list_name_plugin()) == before
    for name in plugins.DEFAULT_PLUGINS:
        assert pm.get_plugin(name) is not None


def test_class_plugin_strategy_is_dispatched_by_name():
    plugin = ConstantScorer()
    pm.register(plugin, name="constant-scorer")
    try:
        assert plugins.available_strategies("score_heads")["constant"] == "constant-scorer"
        result = plugins.score_heads("constant", model=None, batches=[], config=None)
        assert torch.equal(result.scores, torch.ones(2, 4))
    finally:
        pm.unregister(plugin)
    assert "constant" not in plugins.available_strategies("score_heads")


def test_unknown_strategy_lists_the_available_names():
    with pytest.raises(SentinelError) as info:
        plugins.check_strategy("score_heads", "entropyy")
    message = str(info.value)
    assert message.startswith("unknown scorer 'entropyy'; available: ")
    assert "random" in message and "gradient" in message


def test_two_plugins_declaring_one_name_is_an_error():
    first, second = ConstantScorer(), ConstantScorer()
    pm.register(first, name="first")
    pm.register(second, name="second")
    try:
        with pytest.raises(SentinelError, match="'constant' is declared by both"):
            plugins.check_strategy("score_heads", "constant")
    finally:
        pm.unregister(first)
        pm.unregister(second)


def test_a_plugin_returning_the_wrong_type_is_caught():
    class Broken:
        @hookimpl
        def register_strategies(self):
            return [Strategy("score_heads", "broken")]

        @hookimpl
        def score_heads(self, strategy):
            return [1, 2, 3] if strategy == "broken" else None

    plugin = Broken()
    pm.register(plugin, name="broken")
    try:
        with pytest.raises(plugins.PluginError, match="returned list, expected HeadScores"):
            plugins.score_heads("broken", model=None, batches=[], config=None)
    finally:
        pm.unregister(plugin)


def test_a_misspelled_hook_fails_loudly_and_leaves_nothing_registered():
    class Misspelled:
        @hookimpl
        def score_head(self, strategy):  # not a hook: missing the "s"
            return None

    plugin = Misspelled()
    with pytest.raises(pluggy.PluginValidationError, match="score_head"):
        plugins._register_checked(plugin, "misspelled")
    assert pm.get_plugin("misspelled") is None


# -- entry-point plugins ------------------------------------------------------------------------

GOOD = """
from sentinel_core import Strategy, hookimpl

@hookimpl
def register_strategies():
    return [Strategy("score_heads", "ep-good", "from an entry point")]
"""
BROKEN = "raise ImportError('this plugin is broken on purpose')\n"
MISSPELLED = """
from sentinel_core import hookimpl

@hookimpl
def score_head(strategy):
    return None
"""


def _make_dist(root, dist, version, module, source):
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[sentinel]\n{dist} = {module}\n")


@pytest.fixture
def fake_dists(tmp_path):
    _make_dist(tmp_path, "sentinel-epgood", "1.2.3", "ep_good_plugin", GOOD)
    _make_dist(tmp_path, "sentinel-epbroken", "0.0.1", "ep_broken_plugin", BROKEN)
    _make_dist(tmp_path, "sentinel-epmisspelled", "0.2", "ep_misspelled_plugin", MISSPELLED)
    return tmp_path


@pytest.fixture
def fresh_load(fake_dists, monkeypatch, capsys):
    """Run load_plugins() again with the fake dists on sys.path; undo everything afterwards."""
    monkeypatch.syspath_prepend(str(fake_dists))
    before = {name for name, _ in pm.list_name_plugin()}
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "failures", [])
    for var in ("SENTINEL_PLUGINS", "SENTINEL_STRICT_PLUGINS", "SENTINEL_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(var, raising=False)

    def load():
        plugins.load_plugins()
        return {name for name, _ in pm.list_name_plugin()} - before

    try:
        yield load
    finally:
        for name in {name for name, _ in pm.list_name_plugin()} - before:
            pm.unregister(name=name)


def test_entry_points_load_and_failures_are_reported(fresh_load, capsys):
    added = fresh_load()
    assert "sentinel-epgood" in added
    assert "sentinel-epbroken" not in added and "sentinel-epmisspelled" not in added
    described = {f.name: f for f in plugins.failures}
    assert described["sentinel-epbroken"].version == "0.0.1"
    assert "ImportError: this plugin is broken on purpose" in described["sentinel-epbroken"].error
    assert "score_head" in described["sentinel-epmisspelled"].error
    assert "plugin sentinel-epbroken 0.0.1 failed to load" in capsys.readouterr().err
    assert plugins.available_strategies("score_heads")["ep-good"] == "sentinel-epgood"
    listed = {p["name"]: p for p in plugins.list_plugins()}
    assert listed["sentinel-epgood"]["version"] == "1.2.3"
    assert listed["sentinel-epgood"]["strategies"][0]["name"] == "ep-good"


def test_strict_mode_raises_on_a_broken_plugin(fresh_load, monkeypatch):
    monkeypatch.setenv("SENTINEL_STRICT_PLUGINS", "1")
    with pytest.raises(plugins.PluginLoadError, match="sentinel-ep(broken|misspelled)"):
        fresh_load()


def test_allow_list_loads_only_the_named_plugins(fresh_load, monkeypatch):
    monkeypatch.setenv("SENTINEL_PLUGINS", "sentinel-epgood")
    added = fresh_load()
    assert added == {"sentinel-epgood"}
    assert plugins.failures == []


def test_autoload_can_be_disabled(fresh_load, monkeypatch):
    monkeypatch.setenv("SENTINEL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert fresh_load() == set()
    assert pm.get_plugin("sentinel_core.strategies.random_scorer") is not None


def _sentinel(args, fake_dists, **env):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_dists), *sys.path]), **env}
    return subprocess.run([sys.executable, "-m", "sentinel_core", *args], capture_output=True, text=True,
                          env=environ, timeout=120)


def test_a_plugin_whose_import_raises_does_not_break_the_cli(fake_dists):
    help_run = _sentinel(["--help"], fake_dists)
    assert help_run.returncode == 0, help_run.stderr
    assert "Usage: sentinel" in help_run.stdout
    listing = _sentinel(["plugins"], fake_dists, SENTINEL_PLUGINS="sentinel-epgood,sentinel-epbroken")
    assert listing.returncode == 0, listing.stderr
    assert "sentinel-epgood" in listing.stdout
    assert "plugin sentinel-epbroken 0.0.1 failed to load: ImportError" in listing.stderr


def test_strict_cli_error_is_one_line_without_traceback(fake_dists):
    run = _sentinel(["plugins"], fake_dists, SENTINEL_STRICT_PLUGINS="1",
                    SENTINEL_PLUGINS="sentinel-epbroken")
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("Error: plugin sentinel-epbroken 0.0.1 failed to load")
    assert "Traceback" not in run.stderr
