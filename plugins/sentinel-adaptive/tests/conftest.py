"""Offline set-up for the adaptive plugin's tests, and the plugin registered for the test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def adaptive_plugin():
    """The plugin module, registered with Sentinel's plugin manager (unless its entry point did it)."""
    import sentinel_adaptive

    from sentinel_core.testing import registered_plugin

    with registered_plugin(sentinel_adaptive, "adaptive") as plugin:
        yield plugin
