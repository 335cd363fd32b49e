"""Small offline builders for the growth plugin's tests: tiny models, token data, the plugin registered."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_gpt2(*, n_layer: int = 2, n_head: int = 4, n_embd: int = 32, vocab_size: int = 100, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llama(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         hidden_size=32, intermediate_size=64, vocab_size=100, head_dim=8, bos_token_id=0,
                         eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def token_data(*, vocab_size: int = 100, block_size: int = 16, blocks: int = 12, seed: int = 0):
    """An LMData of random token ids: enough for calibration batches and training steps."""
    from sentinel_core.data import LMData, TokenSplit

    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> TokenSplit:
        ids = torch.randint(vocab_size, (n * block_size,), generator=generator)
        return TokenSplit(ids=ids, blocks=ids.view(n, block_size))

    return LMData(train=split(blocks), validation=split(4), test=None, block_size=block_size, source="random",
                  validation_from_train=False)


def growth_config(**changes):
    from sentinel_core.config import ExperimentConfig

    values = {"pruning_percent": 0.5, "growth_percent": 0.25, "growth_strategy": "balanced", "batch_size": 4,
              "calibration_batches": 2, "seed": 3}
    values.update(changes)
    return ExperimentConfig(**values)


@pytest.fixture
def growth_plugin():
    """The plugin module, registered with Sentinel's plugin manager for the test (unless an entry point did it)."""
    import sentinel_growth

    from sentinel_core.testing import registered_plugin

    with registered_plugin(sentinel_growth, "growth") as plugin:
        yield plugin


@pytest.fixture
def tiny_run_assets(tmp_path):
    """A tiny GPT-2 with a byte-level BPE tokenizer saved as an HF directory, and a text file."""
    from sentinel_core.testing import save_run_assets, tiny_corpus, tiny_tokenizer

    lines = tiny_corpus()
    tokenizer = tiny_tokenizer(lines)
    return save_run_assets(tmp_path, tiny_gpt2(vocab_size=len(tokenizer)), tokenizer, lines)


@pytest.fixture
def build():
    """The builders above, for test modules (conftest is not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(gpt2=tiny_gpt2, llama=tiny_llama, data=token_data, config=growth_config)
