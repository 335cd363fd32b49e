"""Offline builders for the distill plugin's tests: tiny models, toy token data, the plugin registered."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB, BLOCK = 64, 16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spin-waiting
    makes them many times slower; the setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt2(*, seed: int = 0, dropout: float = 0.0, n_layer: int = 2, n_head: int = 4, n_embd: int = 32,
              vocab_size: int = VOCAB, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=BLOCK,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config).to(dtype)


def token_data(n_train: int = 48, n_val: int = 8, *, seed: int = 0):
    """A learnable toy language: every block is an arithmetic progression modulo the vocabulary."""
    from sentinel_core.data import LMData, TokenSplit

    def split(n: int, split_seed: int) -> TokenSplit:
        generator = torch.Generator().manual_seed(split_seed)
        starts = torch.randint(0, VOCAB, (n, 1), generator=generator)
        steps = torch.tensor([1, 2, 3, 5])[torch.randint(0, 4, (n, 1), generator=generator)]
        blocks = ((starts + steps * torch.arange(BLOCK)) % VOCAB).contiguous()
        return TokenSplit(ids=blocks.reshape(-1), blocks=blocks)

    return LMData(train=split(n_train, seed), validation=split(n_val, seed + 1000), test=None, block_size=BLOCK,
                  source="toy", validation_from_train=False)


def train_config(output_dir, **overrides):
    from sentinel_core.config import ExperimentConfig

    values = dict(device="cpu", batch_size=4, learning_rate=3e-3, num_epochs=1, eval_every=4, checkpoint_every=100,
                  patience=0, warmup_fraction=0.25, output_dir=str(output_dir), quiet=True, seed=3,
                  fine_tune="distill")
    values.update(overrides)
    return ExperimentConfig(**values)


def save_teacher(model, directory):
    """Save ``model`` as a Sentinel checkpoint (what a run's model source is); returns the path."""
    from sentinel_core.model_io import save_model

    save_model(model, None, directory)
    return str(directory)


def state_copy(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def trained_state(tmp_path_factory):
    """The weights of a tiny GPT-2 that has learnt the toy language (plain fine-tuning, 36 steps):
    a teacher that knows something, so pruning it costs something that distillation can win back."""
    from sentinel_core.training import train

    torch.set_num_threads(1)
    model = tiny_gpt2(seed=0)
    config = train_config(tmp_path_factory.mktemp("pre"), fine_tune="plain", learning_rate=1e-2, num_epochs=3)
    train(model, token_data(48), config, stage="pre")
    return state_copy(model)


@pytest.fixture
def build():
    """The builders above, for test modules (conftest is not importable under --import-mode=importlib)."""
    return SimpleNamespace(gpt2=tiny_gpt2, data=token_data, config=train_config, save_teacher=save_teacher,
                           state=state_copy, vocab=VOCAB, block=BLOCK)


@pytest.fixture
def distill_plugin():
    """The plugin module, registered with Sentinel's plugin manager (unless its entry point did it)."""
    import sentinel_distill

    from sentinel_core.testing import registered_plugin

    with registered_plugin(sentinel_distill, "distill") as plugin:
        yield plugin


@pytest.fixture
def tiny_run_assets(tmp_path, monkeypatch):
    """A tiny GPT-2 (dropout on) with a byte-level BPE tokenizer saved as an HF directory, and a text file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sentinel_core.testing import save_run_assets, tiny_corpus, tiny_tokenizer

    monkeypatch.setenv("SENTINEL_CACHE_DIR", str(tmp_path / "cache"))
    lines = tiny_corpus()
    tokenizer = tiny_tokenizer(lines)
    torch.manual_seed(0)
    # GPT-2's default dropout (0.1) stays on: resume must then restore the random generators exactly.
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=len(tokenizer), n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    return save_run_assets(tmp_path, model, tokenizer, lines)
