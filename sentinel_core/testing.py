"""Helpers for testing plugins (yours and Sentinel's own).

A plugin that is installed is registered by :func:`sentinel_core.plugins.load_plugins` through
its entry point; one that is only importable (a checkout, a test's own module) is not. Tests
want the plugin registered either way, and want to leave the manager as they found it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def registered_plugin(plugin: ModuleType | object, name: str) -> Iterator[object]:
    """Make sure ``plugin`` is registered with Sentinel's plugin manager while the block runs.

    Loads the installed plugins first; registers ``plugin`` under ``name`` only if its entry
    point has not already done so, and unregisters it afterwards only in that case.

    :param plugin: the plugin module (or object with hook implementations).
    :param name: the name to register it under when it is not registered yet.
    """
    from .plugins import load_plugins, pm

    load_plugins()
    registered_here = not pm.is_registered(plugin)
    if registered_here:
        pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        if registered_here:
            pm.unregister(plugin)


def tiny_tokenizer(lines: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``lines``, with ``<|endoftext|>`` (EOS) and
    ``<|pad|>`` (padding): enough for a plugin's tests to save a tiny model folder with one.

    :param lines: the text to learn the merges from.
    :param vocab_size: the vocabulary's size, special tokens included.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


# Words for a tiny corpus: a few dozen, so a 300-word BPE vocabulary covers them well.
WORDS = (
    "the a one two three red green blue king queen castle river stone light dark runs walks sings "
    "speaks holds sees loves fears quickly slowly under over through with and but or when night day"
).split()


def tiny_corpus(n_lines: int = 500, seed: int = 7) -> list[str]:
    """``n_lines`` random sentences of 4-12 of :data:`WORDS`, the same for the same ``seed``."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(n_lines)]


def save_run_assets(folder, model, tokenizer, lines: list[str]) -> dict:
    """Save ``model`` and ``tokenizer`` as an HF folder and ``lines`` as a text file under
    ``folder``: what ``sentinel run --model ... --data ...`` needs in a plugin's end-to-end test.

    :returns: ``{"model": folder/tiny-model, "data": folder/corpus.txt, "tmp": folder}``.
    """
    from pathlib import Path

    folder = Path(folder)
    model_dir = folder / "tiny-model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    text = folder / "corpus.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model": str(model_dir), "data": str(text), "tmp": folder}
