"""Offline set-up for the trackers' tests: no network, W&B kept inside the test's folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

WORDS = (
    "the a one two three red green blue king queen castle river stone light dark runs walks sings "
    "speaks holds sees loves fears quickly slowly under over through with and but or when night day"
).split()


def lines(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n)]


def write_model_and_corpus(folder: Path) -> tuple[str, str]:
    """A tiny GPT-2 with a byte-level BPE tokenizer saved as an HF folder, and a text file to train on."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(lines(300, seed=1), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                                       bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id))
    model_dir = folder / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines(600, seed=7)) + "\n", encoding="utf-8")
    return str(model_dir), str(corpus)


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
