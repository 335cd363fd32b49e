"""The ``random`` scorer: seeded random importance, the baseline every report compares against."""

from __future__ import annotations

import time

import torch

from ..hookspecs import hookimpl
from ..results import HeadScores, Strategy
from ..surgery import get_head_map

NAME = "random"


@hookimpl
def register_strategies():
    return [Strategy("score_heads", NAME, "seeded uniform random scores: the baseline to beat", function=random_scores)]


def random_scores(model, config) -> HeadScores:
    """Uniform draws from a generator seeded by ``config.seed``; NaN for heads not active."""
    start = time.perf_counter()
    head_map = get_head_map(model)
    # A private generator: the same seed gives the same scores whatever else drew from torch's RNG.
    generator = torch.Generator().manual_seed(config.seed)
    scores = torch.rand(head_map.num_layers, head_map.width, generator=generator, dtype=torch.float64).float()
    for layer in range(head_map.num_layers):
        # Masked heads count as removed, as in every other scorer.
        active = set(head_map.active(layer))
        for head in range(head_map.width):
            if head not in active:
                scores[layer, head] = float("nan")
    # Uniform draws are on one scale in every layer: per-layer normalisation would only add noise.
    return HeadScores(scores=scores, strategy=NAME, seconds=time.perf_counter() - start,
                      extra={"seed": config.seed, "cross_layer_comparable": True})
