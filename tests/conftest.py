"""Shared test set-up: no network, no user cache, small thread counts."""

from __future__ import annotations

import os

# Set before transformers/datasets import anywhere: tests never reach the Hub, and never
# write into the developer's own caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_working_folder(tmp_path_factory, monkeypatch):
    """Every test runs in an empty folder of its own: nothing a user (or the README's main job,
    which writes ./sentinel_output) left in the working folder can change a result."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "sentinel-cache"
    monkeypatch.setenv("SENTINEL_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture
def tiny_assets(tmp_path):
    """A tiny GPT-2 saved as an ordinary HF model directory, and a text file to train on."""
    from data_fixtures import make_tokenizer, sample_lines, tiny_gpt2

    tokenizer = make_tokenizer(400)
    model = tiny_gpt2(len(tokenizer), n_layer=2, n_head=4, n_embd=32, n_positions=64,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(sample_lines(600, seed=7)) + "\n", encoding="utf-8")
    return {"model": str(model_dir), "data": str(text), "tmp": tmp_path}
