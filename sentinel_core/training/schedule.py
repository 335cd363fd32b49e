"""The learning-rate schedule of the training loop."""

from __future__ import annotations

import math


def cosine_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate factor of 0-based optimizer step ``step``: linear warm-up from 0 over
    ``warmup_steps``, then half a cosine down to 0 at ``total_steps`` (the same values as
    ``transformers.get_cosine_schedule_with_warmup``)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


