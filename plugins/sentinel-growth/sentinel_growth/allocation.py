"""How many heads to grow and which layers get them: pure bookkeeping on a HeadMap, no model.

Counts are in query heads. ``room`` is, per layer, how many more heads the layer may take:
``original_num_heads - active heads`` (never negative), or ``None`` for no limit when
``growth_allow_exceed`` is on. Every allocator is deterministic; ties go to the lower layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sentinel_core.errors import SentinelError
from sentinel_core.surgery import HeadMap

Room = list[int | None]


def growth_target(head_map: HeadMap, growth_percent: float) -> int:
    """``round(growth_percent * num_layers * original_num_heads)``: how many heads to add."""
    if isinstance(growth_percent, bool) or not isinstance(growth_percent, (int, float)) or not 0.0 <= growth_percent < 1.0:
        raise SentinelError(f"growth_percent must be a fraction in [0, 1), e.g. 0.1, got {growth_percent!r}")
    return round(growth_percent * head_map.num_layers * head_map.original_num_heads)


def layer_room(head_map: HeadMap, *, allow_exceed: bool = False) -> Room:
    """Per layer, how many heads may be added: up to the original count, or unlimited (None)."""
    if allow_exceed:
        return [None] * head_map.num_layers
    h = head_map.original_num_heads
    return [max(0, h - len(head_map.active(layer))) for layer in range(head_map.num_layers)]


def total_room(room: Room) -> float:
    """Sum of ``room`` (infinite when any layer is unlimited)."""
    return math.inf if any(r is None for r in room) else float(sum(room))


def _has_room(room: Room, given: list[int], layer: int) -> bool:
    limit = room[layer]
    return limit is None or given[layer] < limit


def allocate_by_score(scores: Sequence[float], room: Room, n: int) -> list[int]:
    """Fill layers in descending ``scores`` order, each up to its room, until ``n`` heads are placed.

    The score of a layer is taken as the gain of *every* head added there (first-order, so
    additive), which makes greedy one-head-at-a-time allocation the same as filling the best
    layer first. Ties go to the lower layer. Returns heads per layer (sum may fall short of
    ``n`` when the rooms do).
    """
    _check_n(n)
    if len(scores) != len(room):
        raise ValueError(f"{len(scores)} layer scores for {len(room)} layers")
    bad = [layer for layer, s in enumerate(scores) if not math.isfinite(float(s))]
    if bad:
        raise SentinelError(f"growth score of layer {bad[0]} is {scores[bad[0]]}; scores must be finite numbers")
    counts = [0] * len(room)
    left = n
    for layer in sorted(range(len(room)), key=lambda i: (-float(scores[i]), i)):
        if left == 0:
            break
        take = left if room[layer] is None else min(left, room[layer])
        counts[layer] = take
        left -= take
    return counts


def allocate_balanced(head_map: HeadMap, room: Room, n: int) -> list[int]:
    """One head at a time to the layer that has lost the most heads (active vs original), lower layer on ties.

    A layer's deficit drops by one with each head it gets, so heads go round-robin among the
    layers that lost the same number, and the result is as even as the target allows.
    """
    _check_n(n)
    h = head_map.original_num_heads
    deficit = [h - len(head_map.active(layer)) for layer in range(head_map.num_layers)]
    given = [0] * head_map.num_layers
    for _ in range(n):
        open_layers = [layer for layer in range(head_map.num_layers) if _has_room(room, given, layer)]
        if not open_layers:
            break
        layer = max(open_layers, key=lambda i: (deficit[i] - given[i], -i))
        given[layer] += 1
    return given


def allocate_random(room: Room, n: int, seed: int) -> list[int]:
    """Each head to a layer drawn uniformly from those with room left (a private, seeded generator)."""
    _check_n(n)
    generator = torch.Generator().manual_seed(int(seed))
    given = [0] * len(room)
    for _ in range(n):
        open_layers = [layer for layer in range(len(room)) if _has_room(room, given, layer)]
        if not open_layers:
            break
        pick = int(torch.randint(len(open_layers), (1,), generator=generator))
        given[open_layers[pick]] += 1
    return given


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SentinelError(f"number of heads to grow must be an integer >= 0, got {n!r}")
