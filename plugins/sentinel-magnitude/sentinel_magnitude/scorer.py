"""Per-head weight norms, read through Sentinel's per-head slices (``sentinel_core.surgery.head_slices``)."""

from __future__ import annotations

import time

import torch
from torch import nn

from sentinel_core.results import HeadScores
from sentinel_core.surgery import get_head_map, head_slices

NAME = "magnitude"


def head_sq_norm(model: nn.Module, layer: int, head: int) -> float:
    """Sum of squared weights of the head's q, k, v and o blocks (biases left out). Under
    grouped-query attention the shared key/value blocks count in full for every head of the group."""
    return float(sum(s.view().double().pow(2).sum() for s in head_slices(model, layer, head) if not s.is_bias))


def magnitude_scores(model: nn.Module) -> HeadScores:
    """Frobenius norm of each active head's weight blocks; NaN for heads not active."""
    start = time.perf_counter()
    head_map = get_head_map(model)
    scores = torch.full((head_map.num_layers, head_map.width), float("nan"), dtype=torch.float32)
    with torch.no_grad():
        for layer in range(head_map.num_layers):
            for head in head_map.active(layer):
                scores[layer, head] = head_sq_norm(model, layer, head) ** 0.5
    return HeadScores(scores=scores, strategy=NAME, tokens_seen=0, seconds=time.perf_counter() - start)
