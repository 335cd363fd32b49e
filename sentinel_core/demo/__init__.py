"""Sentinel's embedded demo: a Shakespeare corpus, and a small GPT-2 (``demo``) and a small LLaMA with
grouped-query attention (``demo-llama``) pre-trained on it on first use.

Used when the Hugging Face Hub is out of reach or ``--model demo`` / ``--data demo`` is given.
``python -m sentinel_core.demo`` builds the model (if needed) and prints its test perplexity
beside a unigram model's. Importing this package is cheap: torch and transformers are imported
only when a model is built or evaluated.
"""

from __future__ import annotations

from .cache import CACHE_ENV, cache_root
from .corpus import MISSING_MESSAGE, POEMS, clean_text, demo_corpus_files, split_works
from .model import (
    DEMO_MODELS,
    FULL,
    LLAMA,
    LLAMA_SPEC_ENV,
    LLAMA_TINY,
    SPEC_ENV,
    SPECS,
    TINY,
    DemoSpec,
    demo_model_dir,
    demo_spec_for,
    ensure_demo_model,
    read_build_info,
    resolve_spec,
)
from .unigram import unigram_perplexity

__all__ = [
    "CACHE_ENV", "DEMO_MODELS", "FULL", "LLAMA", "LLAMA_SPEC_ENV", "LLAMA_TINY", "MISSING_MESSAGE", "POEMS",
    "SPECS", "SPEC_ENV", "TINY", "DemoSpec", "cache_root", "clean_text", "demo_corpus_files", "demo_model_dir",
    "demo_spec_for", "ensure_demo_model", "read_build_info",
    "resolve_spec", "split_works", "unigram_perplexity",
]
