"""Offline set-up for the trackers' tests: no network, W&B kept inside the test's folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def write_model_and_corpus(folder: Path) -> tuple[str, str]:
    """A tiny GPT-2 with a byte-level BPE tokenizer saved as an HF folder, and a text file to train on."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sentinel_core.testing import save_run_assets, tiny_corpus, tiny_tokenizer

    tokenizer = tiny_tokenizer(tiny_corpus(300, seed=1))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    saved = save_run_assets(folder, model, tokenizer, tiny_corpus(600, seed=7))
    return saved["model"], saved["data"]


@pytest.fixture(scope="session")
def model_and_corpus(tmp_path_factory):
    """``(model_dir, corpus_file)`` of the tiny model, built once per session."""
    return write_model_and_corpus(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(autouse=True, scope="session")
def _trackers_kept_local(tmp_path_factory):
    """W&B writes settings and caches under the home folder and looks for a login in ~/.netrc;
    all of that goes to a scratch folder, with no key, so the tracker decides on offline mode.
    Tracker settings from the developer's environment are cleared for the session."""
    home = tmp_path_factory.getbasetemp() / "tracker-home"
    home.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
                     "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
            mp.delenv(name, raising=False)
        mp.setenv("HOME", str(home))
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(home / name.lower()))
        mp.setenv("SENTINEL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "sentinel-cache"))
        yield
