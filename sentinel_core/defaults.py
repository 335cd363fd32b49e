"""Which model and data a run uses when the user did not say, or when the Hub is out of reach.

The documented defaults are distilgpt2 on WikiText-2. When the Hugging Face Hub cannot be
reached (or ``--model demo`` is given) Sentinel uses its embedded demo model and corpus
instead, and says so in one line. ``--model demo-llama`` names the embedded LLaMA with
grouped-query attention.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlparse

from .config import DEFAULT_HUB_DATA, DEFAULT_HUB_MODEL, ExperimentConfig
from .log import get_logger

log = get_logger()

DEMO = "demo"
DEMO_LLAMA = "demo-llama"
_TRUTHY = {"1", "true", "yes", "on"}

# Settings for the demo model where the user left the general defaults (which suit distilgpt2
# on WikiText-2): the demo was trained from scratch at lr 1e-3, so 5e-5 barely moves it (1e-4
# recovered more than 3e-4 in bench/bench_adaptive.py), and a full epoch (about 1,200 steps) plus full-split evaluations would not fit the promise that a
# repeated `sentinel run` finishes in about five minutes on 2 CPU cores.
DEMO_RUN_DEFAULTS = {"learning_rate": 1e-4, "max_steps": 200, "eval_every": 50, "checkpoint_every": 50,
                     "max_eval_blocks": 128}


def demo_run_config(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with DEMO_RUN_DEFAULTS filled in wherever it still holds the general default."""
    defaults = ExperimentConfig()
    changes = {key: value for key, value in DEMO_RUN_DEFAULTS.items()
               if getattr(config, key) == getattr(defaults, key)}
    return config.replace(**changes)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host accepts a TCP connection (respects HF_HUB_OFFLINE and HF_ENDPOINT)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUTHY:
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _is_local(source: str) -> bool:
    return os.path.exists(source)


def resolve_model_and_data(config: ExperimentConfig, *, announce: bool = True) -> tuple[str, str]:
    """Return ``(model_source, data_name)``: what ``load_model`` opens and the data to load.

    ``model_source`` is a hub name, a local directory, or the path of the cached demo model
    (trained on first use); ``data_name`` goes through :func:`resolve_data` before ``load_data``.
    """
    model, data = config.model_name, config.data
    needs_hub = model is None or data is None
    online = hub_reachable() if needs_hub else True
    if model is None:
        model = DEFAULT_HUB_MODEL if online else DEMO
        if model == DEMO and announce:
            log.info(f"Hugging Face Hub unreachable: using the embedded demo model instead of {DEFAULT_HUB_MODEL}.")
    if data is None:
        if is_demo_name(model) or not online:
            data = DEMO
            if not is_demo_name(model) and announce:
                log.info(f"Hugging Face Hub unreachable: using the embedded demo corpus instead of {DEFAULT_HUB_DATA}.")
        else:
            data = DEFAULT_HUB_DATA
    if is_demo_name(model) and announce and config.model_name == model:
        kind = "a small LLaMA with grouped-query attention" if model == DEMO_LLAMA else "a small GPT-2"
        log.info(f"Using the embedded demo model ({kind} trained on Shakespeare).")
    return resolve_model(model, quiet=config.quiet), data


def resolve_model(name: str, *, quiet: bool = False) -> str:
    """``demo`` and ``demo-llama`` -> the folder of that embedded demo model (trained on first use);
    other names as given."""
    if is_demo_name(name):
        from .demo import demo_spec_for, ensure_demo_model

        return str(ensure_demo_model(quiet=quiet, spec=demo_spec_for(name)))
    return name


def resolve_data(spec: Any) -> Any:
    """``demo`` -> the embedded corpus as :class:`sentinel_core.data.FileSplits`; other specs as given."""
    if spec == DEMO:
        from .data import FileSplits
        from .demo import demo_corpus_files

        files = {split: [os.fspath(p) for p in paths] for split, paths in demo_corpus_files().items()}
        return FileSplits(DEMO, files)
    return spec


def is_demo_name(model: str | None) -> bool:
    """Whether ``model`` names an embedded demo model (``demo`` or ``demo-llama``)."""
    return model in (DEMO, DEMO_LLAMA)


def is_demo_model(source: str) -> bool:
    """Whether ``source`` is a directory built by :func:`sentinel_core.demo.ensure_demo_model`."""
    from pathlib import Path

    from .demo.model import INFO_FILE

    return (Path(source) / INFO_FILE).is_file()
