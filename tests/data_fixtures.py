"""Offline test helpers: a tiny real byte-level BPE tokenizer, sample text and tiny models.

Everything here is built locally in well under a second, so tests never touch the Hub.
"""

from __future__ import annotations

import functools
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"

_WORDS = (
    "the a one two three red green blue king queen castle river stone light dark "
    "runs walks sings speaks holds sees loves fears quickly slowly under over "
    "through with without and but or because when while night day morning sword "
    "crown ship storm wind fire water earth sky song tale old young brave quiet"
).split()


def sample_lines(n: int, seed: int = 0, *, min_words: int = 4, max_words: int = 14) -> list[str]:
    """Deterministic pseudo-English lines (no trailing newline)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(min_words, max_words)
        words = [rng.choice(_WORDS) for _ in range(k)]
        lines.append(" ".join(words).capitalize() + ".")
    return lines


@functools.lru_cache(maxsize=4)
def _trained_tokenizer_json(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample_lines(400, seed=1234), trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 400, *, pad: bool = True) -> PreTrainedTokenizerFast:
    """A fresh tokenizer object (safe to mutate) wrapping a byte-level BPE trained on sample_lines.

    EOS is ``<|endoftext|>``; with ``pad=False`` the tokenizer has no pad token, like GPT-2.
    """
    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    kwargs = {"eos_token": EOS}
    if pad:
        kwargs["pad_token"] = PAD
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def tiny_gpt2(vocab_size: int, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 32,
              n_positions: int = 64, seed: int = 0, **config_kwargs) -> GPT2LMHeadModel:
    """A randomly initialised (seeded) tiny GPT-2 in eval mode."""
    import torch

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size,
                        n_positions=n_positions, **config_kwargs)
    return GPT2LMHeadModel(config).eval()
