"""Measure a built demo model: test perplexity beside a unigram model's on the same tokens."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .model import encode_texts, read_build_info, read_split_texts, resolve_spec
from .unigram import unigram_perplexity


def measure_demo_model(model_dir: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None,
                       device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Test-split perplexity of the demo model in ``model_dir`` and of an add-one unigram model.

    Both are scored on exactly the same test tokens (the model's tokenizer, non-overlapping windows
    of the spec's block size); the unigram counts come from the training split.
    """
    from ..evaluation import count_parameters, evaluate
    from ..model_io import load_model
    from .corpus import demo_corpus_files

    info = read_build_info(model_dir)
    spec = resolve_spec(info["spec"]["name"])
    model, tokenizer = load_model(Path(model_dir), device=device)
    files = demo_corpus_files(cache_dir)
    train_ids = encode_texts(tokenizer, read_split_texts(files["train"], spec.max_train_chars))
    test_ids = encode_texts(tokenizer, read_split_texts(files["test"], spec.max_eval_chars))
    result = evaluate(model, test_ids, block_size=spec.block_size, batch_size=16, progress=progress)
    unigram = unigram_perplexity(train_ids, test_ids, len(tokenizer), block_size=spec.block_size)
    return {
        "model_dir": str(model_dir),
        "spec": spec.name,
        "test_perplexity": result.perplexity,
        "test_loss": result.loss,
        "unigram_test_perplexity": unigram,
        "test_tokens_scored": result.tokens,
        "eval_tokens_per_second": result.tokens_per_second,
        "parameters": count_parameters(model),
        "build": info,
    }
