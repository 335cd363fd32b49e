"""A unigram language model: the floor a trained model must clearly beat."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import SentinelError

if TYPE_CHECKING:
    import torch


def unigram_perplexity(
    train_ids: torch.Tensor | Sequence[int],
    test_ids: torch.Tensor | Sequence[int],
    vocab_size: int,
    *,
    block_size: int | None = None,
) -> float:
    """Test perplexity of an add-one-smoothed unigram model estimated on ``train_ids``.

    ``p(w) = (count(w) + 1) / (N + vocab_size)`` from the training token counts. With
    ``block_size`` the score covers exactly the tokens that
    ``sentinel_core.evaluation.evaluate(..., block_size=block_size)`` scores (non-overlapping
    windows, each window's first token unscored), so the two perplexities are comparable.
    """
    import torch

    train = torch.as_tensor(train_ids, dtype=torch.long).reshape(-1)
    test = torch.as_tensor(test_ids, dtype=torch.long).reshape(-1)
    if vocab_size < 1:
        raise SentinelError(f"vocab_size={vocab_size} must be at least 1")
    for name, ids in (("train_ids", train), ("test_ids", test)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise SentinelError(f"{name} has ids outside 0..{vocab_size - 1}; pass the tokenizer's full vocab size")
    if block_size is not None:
        from ..evaluation import sliding_windows

        keep = torch.zeros(test.numel(), dtype=torch.bool)
        for _, end, first in sliding_windows(test.numel(), block_size, block_size):
            keep[first:end] = True
        test = test[keep]
    if test.numel() == 0:
        raise SentinelError("test_ids has no token to score; give a longer test stream")
    counts = torch.bincount(train, minlength=vocab_size).double()
    log_p = torch.log(counts + 1.0) - math.log(train.numel() + vocab_size)
    return math.exp(-float(log_p[test].mean()))
