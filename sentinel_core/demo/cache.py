"""Sentinel's cache folder: ``SENTINEL_CACHE_DIR`` if set, else the user cache folder."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SENTINEL_CACHE_DIR"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder for Sentinel's cached demo corpus and model (not created here).

    ``cache_dir`` wins, then the ``SENTINEL_CACHE_DIR`` environment variable (for tests and CI),
    then ``platformdirs.user_cache_dir("sentinel")``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sentinel"))
