"""Allocation rules on hand-built head maps: targets, caps, ties, balanced order, seeded random."""

from __future__ import annotations

import pytest
from sentinel_growth.allocation import (
    allocate_balanced,
    allocate_by_score,
    allocate_random,
    growth_target,
    layer_room,
)

from sentinel_core.errors import SentinelError
from sentinel_core.surgery import HeadMap


def head_map(alive_per_layer: list[list[int]], heads: int = 4, masked: list[list[int]] | None = None) -> HeadMap:
    return HeadMap(family="gpt2", original_num_heads=heads, original_num_kv_heads=heads,
                   layers=[list(ids) for ids in alive_per_layer], group_sizes=[1 if ids else 0 for ids in alive_per_layer],
                   masked_ids=masked or [])


@pytest.mark.parametrize(("percent", "layers", "heads", "expected"), [
    (0.1, 3, 4, 1),      # 1.2 -> 1
    (0.2, 3, 4, 2),      # 2.4 -> 2
    (0.3, 3, 4, 4),      # 3.6 -> 4
    (0.25, 2, 4, 2),
    (0.0, 6, 12, 0),
    (0.1, 6, 12, 7),     # 7.2 -> 7: distilgpt2's shape
])
def test_target_is_round_of_percent_of_original_heads(percent, layers, heads, expected):
    hm = head_map([list(range(heads))] * layers, heads)
    assert growth_target(hm, percent) == expected


def test_target_rejects_a_bad_percent():
    with pytest.raises(SentinelError, match="growth_percent must be a fraction"):
        growth_target(head_map([[0, 1]], 2), 1.5)


def test_room_counts_active_heads_and_masked_heads_leave_room():
    hm = head_map([[0, 1, 2, 3], [0, 3], []], masked=[[1], [], []])
    assert layer_room(hm) == [1, 2, 4]
    assert layer_room(hm, allow_exceed=True) == [None, None, None]


def test_score_allocation_fills_best_layer_first_up_to_its_room():
    assert allocate_by_score([0.1, 0.9, 0.5], [3, 1, 2], 3) == [0, 1, 2]
    assert allocate_by_score([0.1, 0.9, 0.5], [3, 1, 2], 5) == [2, 1, 2]
    # More than fits: everything that fits, nothing beyond the rooms.
    assert allocate_by_score([0.1, 0.9, 0.5], [3, 1, 2], 9) == [3, 1, 2]


def test_score_allocation_breaks_ties_by_lower_layer():
    assert allocate_by_score([0.5, 0.7, 0.7, 0.5], [1, 1, 1, 1], 3) == [1, 1, 1, 0]
    assert allocate_by_score([0.5, 0.5], [1, 1], 1) == [1, 0]


def test_score_allocation_without_cap_puts_everything_in_the_best_layer():
    assert allocate_by_score([0.2, 0.3], [None, None], 5) == [0, 5]


def test_score_allocation_refuses_nan():
    with pytest.raises(SentinelError, match="layer 1"):
        allocate_by_score([0.2, float("nan")], [1, 1], 1)


def test_balanced_gives_the_layer_that_lost_most_first_then_round_robin():
    # Layer 0 lost 1 head, layer 1 lost 3: two heads to layer 1, then a tie at deficit 1 -> lower layer.
    hm = head_map([[0, 1, 2], [2]])
    room = layer_room(hm)
    assert allocate_balanced(hm, room, 1) == [0, 1]
    assert allocate_balanced(hm, room, 2) == [0, 2]
    assert allocate_balanced(hm, room, 3) == [1, 2]
    assert allocate_balanced(hm, room, 4) == [1, 3]
    assert allocate_balanced(hm, room, 10) == [1, 3]  # capped at the original count


def test_balanced_with_exceed_keeps_going_round_robin():
    hm = head_map([[0, 1, 2, 3], [0, 1, 2, 3]])
    assert allocate_balanced(hm, layer_room(hm, allow_exceed=True), 3) == [2, 1]


def test_random_is_seeded_and_respects_room():
    room = [2, 0, 3, 1]
    first = allocate_random(room, 4, seed=11)
    assert first == allocate_random(room, 4, seed=11)
    assert sum(first) == 4
    assert all(c <= r for c, r in zip(first, room, strict=True))
    assert first[1] == 0
    draws = {tuple(allocate_random(room, 3, seed=s)) for s in range(12)}
    assert len(draws) > 1, "different seeds should give different allocations"
    assert allocate_random(room, 10, seed=0) == room


def test_random_ignores_the_global_torch_generator():
    import torch

    torch.manual_seed(0)
    a = allocate_random([3, 3, 3], 4, seed=5)
    torch.manual_seed(1)
    torch.rand(10)
    assert allocate_random([3, 3, 3], 4, seed=5) == a
