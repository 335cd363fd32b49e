"""The plugin distributions install like anybody's, and are found through their entry points.

Each distribution is pip-installed (no dependencies, no build isolation) into a temporary
target folder that a subprocess puts first on its path, so what the developer or CI happens
to have installed does not decide the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Each declares its strategies with the functions that run them (no strategy hooks of its own).
PLUGINS = {
    "sentinel-entropy": ["register_strategies"],
    "sentinel-magnitude": ["register_strategies"],
    "sentinel-adaptive": ["register_strategies"],
    "sentinel-growth": ["register_strategies", "register_training_callbacks"],
    "sentinel-distill": ["register_strategies"],
}


def _pip_install(target: Path, *projects: Path) -> None:
    # Build from copies: setuptools leaves build/ and *.egg-info in the source folder, and an
    # egg-info there would make the plugin discoverable from the checkout itself.
    copies = target.parent / f"{target.name}-src"
    for project in projects:
        shutil.copytree(project, copies / project.name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(target), *(str(copies / p.name) for p in projects)],
        check=True, capture_output=True, text=True, timeout=600,
    )


def _sentinel(target: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    environ.pop("SENTINEL_DISABLE_PLUGIN_AUTOLOAD", None)
    return subprocess.run([sys.executable, "-m", "sentinel_core", *args], capture_output=True, text=True,
                          env=environ, timeout=900)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    _pip_install(target, *(ROOT / "plugins" / name for name in PLUGINS), ROOT / "docs" / "example-plugin")
    return target


def test_plugins_json_lists_the_plugin_distributions_with_their_hooks(installed):
    run = _sentinel(installed, "plugins", "--json")
    assert run.returncode == 0, run.stderr
    listing = {item["name"]: item for item in json.loads(run.stdout)}
    for name, hooks in PLUGINS.items():
        assert name in listing, f"{name} not discovered: {sorted(listing)}"
        assert listing[name]["version"] == "0.1.0"
        assert sorted(listing[name]["hooks"]) == hooks
        assert listing[name]["strategies"], name


def test_version_names_the_plugins(installed):
    run = _sentinel(installed, "--version")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "sentinel-core 0.1.0"
    assert "sentinel-entropy 0.1.0" in run.stdout


def test_example_third_party_plugin_runs_a_whole_experiment(installed, tiny_assets):
    listing = {item["name"]: item for item in json.loads(_sentinel(installed, "plugins", "--json").stdout)}
    assert listing["sentinel-output-norm"]["strategies"][0]["name"] == "output-norm"
    out = tiny_assets["tmp"] / "run"
    run = _sentinel(installed, "run", "--model", tiny_assets["model"], "--data", tiny_assets["data"],
                    "--scorer", "output-norm", "--pruning-percent", "0.25", "--block-size", "32",
                    "--batch-size", "4", "--test-mode", "--quiet", "--output-dir", str(out))
    assert run.returncode == 0, run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["scorer"] == "output-norm"
    assert summary["heads"]["removed"] == 2  # 25% of 2 layers x 4 heads
    scores = json.loads((out / "state.json").read_text())["results"]["scores"]
    assert scores["strategy"] == "output-norm" and scores["tokens_seen"] > 0
