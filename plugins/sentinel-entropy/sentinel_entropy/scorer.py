"""The entropy scorer: importance = 1 - a head's mean normalised attention entropy.

The measurement itself (streaming forward hooks, padding and causal key counts) is
:mod:`sentinel_core.attention_entropy`; this module turns it into :class:`HeadScores`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from sentinel_core.attention_entropy import measure_attention_entropy
from sentinel_core.errors import SentinelError
from sentinel_core.results import HeadScores
from sentinel_core.surgery import get_head_map

NAME = "entropy"


def entropy_scores(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> HeadScores:
    """Importance = 1 - mean normalised attention entropy, per head (NaN for heads not active).

    The model comes back as it was: attention implementation, train/eval mode, no hooks.
    """
    start = time.perf_counter()
    if not batches:
        raise SentinelError("the entropy scorer needs calibration text and got no batches; pass --data (or a data source)")
    head_map = get_head_map(model)
    measured = measure_attention_entropy(model, batches)
    scores = torch.full((head_map.num_layers, head_map.width), float("nan"), dtype=torch.float32)
    for layer, slots in enumerate(head_map.layers):
        active = set(head_map.active(layer))
        if not active:
            continue
        mean = measured.means[layer]
        if mean is None:
            raise SentinelError(
                "the calibration batches have no position that can attend to 2 or more tokens; "
                "use sequences of at least 2 tokens"
            )
        for slot, head in enumerate(slots):
            if head in active:
                scores[layer, head] = float(1.0 - mean[slot])
    return HeadScores(scores=scores, strategy=NAME, tokens_seen=measured.tokens, seconds=time.perf_counter() - start,
                      extra={"cross_layer_comparable": True, "query_positions": max(measured.counts, default=0)})
