"""KV-group-aware selection (the ``kv-groups`` and ``per-group`` prune strategies), as pure functions.

The expected choices are computed independently: by brute force over every subset of groups
(kv-groups) or of heads within a group (per-group), never by the code under test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sentinel_core.errors import SentinelError
from sentinel_core.results import HeadScores
from sentinel_core.strategies.group_selection import (
    describe_choice,
    group_importance,
    select_kv_groups,
    select_per_group,
)
from sentinel_core.strategies.selection import select_heads
from sentinel_core.surgery.headmap import HeadMap


def gqa_map(layers: int = 2, heads: int = 8, kv: int = 4, *, masked=None) -> HeadMap:
    return HeadMap(family="llama", original_num_heads=heads, original_num_kv_heads=kv,
                   layers=[list(range(heads)) for _ in range(layers)], group_sizes=[heads // kv] * layers,
                   masked_ids=masked or [[] for _ in range(layers)])


def mha_map(layers: int = 3, heads: int = 4) -> HeadMap:
    return HeadMap(family="gpt2", original_num_heads=heads, original_num_kv_heads=heads,
                   layers=[list(range(heads)) for _ in range(layers)], group_sizes=[1] * layers)


def scores_for(hm: HeadMap, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Layers on different scales, as gradient scores are: normalisation has to matter.
    return torch.rand(hm.num_layers, hm.width, generator=g) * torch.logspace(0, 2, hm.num_layers).unsqueeze(1)


def groups_removed(selection: dict[int, list[int]], group: int) -> dict[int, list[int]]:
    return {layer: sorted({h // group for h in ids}) for layer, ids in selection.items()}


def normalised(scores: torch.Tensor) -> torch.Tensor:
    return scores.double() / scores.double().norm(dim=1, keepdim=True)


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("percent", [0.1, 0.25, 0.3, 0.5, 0.7])
def test_uniform_kv_groups_removes_each_layers_weakest_whole_groups(seed, percent):
    hm, group = gqa_map(layers=3), 2
    scores = scores_for(hm, seed)
    chosen = select_kv_groups(scores, hm, percent)
    k = half_up(percent * 4)  # groups per layer: the fraction of query heads, rounded to whole groups
    per_layer = groups_removed(chosen, group)
    assert all(len(per_layer.get(layer, [])) == k for layer in range(3))
    for layer, ids in chosen.items():
        assert ids == sorted(h for kv in per_layer[layer] for h in range(kv * group, (kv + 1) * group))
        # brute force: no other k groups of this layer carry less summed score
        sums = [float(scores[layer, kv * group:(kv + 1) * group].sum()) for kv in range(4)]
        best = min(itertools.combinations(range(4), k), key=lambda c: sum(sums[i] for i in c))
        assert math.isclose(sum(sums[i] for i in per_layer[layer]), sum(sums[i] for i in best))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("percent", [0.1, 0.25, 0.5])
def test_global_kv_groups_removes_the_lowest_groups_of_all_layers(seed, percent, normalize):
    hm, group = gqa_map(layers=3), 2
    scores = scores_for(hm, seed)
    chosen = select_kv_groups(scores, hm, percent, uniform=False, normalize=normalize)
    n = half_up(percent * 12)
    flat = [(layer, kv) for layer, kvs in groups_removed(chosen, group).items() for kv in kvs]
    assert len(flat) == n
    ranked = normalised(scores) if normalize else scores.double()
    value = {(layer, kv): float(ranked[layer, kv * group:(kv + 1) * group].sum()) for layer in range(3) for kv in range(4)}
    feasible = [c for c in itertools.combinations(value, n)
                if all(sum(1 for layer, _ in c if layer == x) < 4 for x in range(3))]  # min 1 head per layer
    best = min(feasible, key=lambda c: sum(value[g] for g in c))
    assert math.isclose(sum(value[g] for g in flat), sum(value[g] for g in best))


def test_normalisation_keeps_a_small_scale_layer_from_being_emptied_first():
    hm = gqa_map(layers=2, heads=4, kv=2)
    scores = torch.tensor([[0.010, 0.011, 0.012, 0.013], [1.0, 2.0, 3.0, 4.0]])
    assert select_kv_groups(scores, hm, 0.25, uniform=False, normalize=False) == {0: [0, 1]}
    # normalised: layer 0's groups are 0.021/0.025 vs 0.023/0.025, layer 1's 3/5.48 vs 7/5.48
    assert select_kv_groups(scores, hm, 0.25, uniform=False, normalize=True) == {1: [0, 1]}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("percent,drop", [(0.25, 1), (0.3, 1), (0.5, 2), (0.6, 2), (0.9, 3)])
def test_per_group_trims_every_group_by_the_same_count_keeping_every_kv_head(seed, percent, drop):
    hm = gqa_map(layers=2, heads=16, kv=4)  # groups of 4
    scores = scores_for(hm, seed)
    chosen = select_per_group(scores, hm, percent)
    for layer in range(2):
        for kv in range(4):
            members = list(range(kv * 4, kv * 4 + 4))
            gone = [h for h in chosen.get(layer, []) if h in members]
            assert len(gone) == drop  # the same in every group; drop 3 of 4 still keeps the KV head
            weakest = sorted(members, key=lambda h: (float(scores[layer, h]), h))[:drop]
            assert sorted(gone) == sorted(weakest)


def test_nothing_is_chosen_when_the_target_is_already_met_or_rounds_to_zero():
    hm = gqa_map()
    scores = scores_for(hm, 0)
    assert select_kv_groups(scores, hm, 0.0) == {}
    # 5% of 16 heads is 1 head: removing no group (1 short) is nearer than a group per layer (3 over)
    assert select_kv_groups(scores, hm, 0.05) == {}
    assert select_per_group(scores, hm, 0.0) == {}


def test_ties_round_to_the_larger_removal_and_fall_on_lower_layers_and_slots():
    hm = gqa_map(layers=2, heads=4, kv=2)
    flat = torch.ones(2, 4)
    # 25% of 8 heads = 2 heads = 1 group of 2 in total: global takes layer 0's slot 0.
    assert select_kv_groups(flat, hm, 0.25, uniform=False) == {0: [0, 1]}
    # uniform: 0.5 group per layer is a tie between 0 and 1 group: the larger removal wins.
    assert select_kv_groups(flat, hm, 0.25) == {0: [0, 1], 1: [0, 1]}


def test_masked_heads_count_as_gone_and_go_with_their_group():
    # Layer 0: head 1 masked, so group {0, 1} has one active head and is the cheapest to drop.
    hm = gqa_map(layers=2, heads=4, kv=2, masked=[[1], []])
    scores = torch.tensor([[0.5, float("nan"), 0.4, 0.45], [0.9, 0.8, 0.7, 0.6]])
    chosen = select_kv_groups(scores, hm, 0.5, uniform=False, normalize=False)
    # 8 heads, 1 already gone: 3 more must go. Groups by active size: (0,0)=1 head, (0,1)=2, (1,*)=2.
    assert chosen[0] == [0, 1]  # the masked head leaves with its group, freeing the KV head
    active_chosen = sum(len([h for h in ids if h not in hm.masked(layer)]) for layer, ids in chosen.items())
    assert active_chosen in (3, 2)


def test_scorer_supplied_group_scores_replace_the_sum_of_head_scores():
    hm = gqa_map(layers=2, heads=4, kv=2)
    heads = torch.tensor([[0.9, 0.9, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]])
    assert select_kv_groups(heads, hm, 0.5) == {0: [2, 3], 1: [2, 3]}
    group_scores = [[0.1, 5.0], [0.2, 4.0]]  # the scorer says the first group is the weak one
    assert select_kv_groups(heads, hm, 0.5, group_scores=group_scores) == {0: [0, 1], 1: [0, 1]}
    via_extra = HeadScores(scores=heads, strategy="t", extra={"group_scores": group_scores})
    assert select_kv_groups(via_extra, hm, 0.5) == {0: [0, 1], 1: [0, 1]}
    importance = group_importance(heads, hm, group_scores=group_scores)
    assert importance[(0, 0)] == pytest.approx(0.1 / math.hypot(0.1, 5.0))


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [[1.0], [1.0, 2.0]], [[1.0, float("nan")], [1.0, 2.0]],
                                 [[1.0, None], [1.0, 2.0]], "scores"])
def test_malformed_group_scores_are_one_line_errors(bad):
    hm = gqa_map(layers=2, heads=4, kv=2)
    with pytest.raises(SentinelError, match="group_scores") as err:
        select_kv_groups(torch.ones(2, 4), hm, 0.5, group_scores=bad)
    assert "\n" not in str(err.value)


def test_min_heads_per_layer_keeps_groups_it_would_empty():
    hm = gqa_map(layers=2, heads=4, kv=2)
    scores = torch.tensor([[0.1, 0.1, 0.2, 0.2], [0.9, 0.9, 0.8, 0.8]])
    # min 3 heads per layer: no group of 2 may go from a layer of 4.
    assert select_kv_groups(scores, hm, 0.5, min_heads_per_layer=3) == {}
    assert select_kv_groups(scores, hm, 0.5, uniform=False, min_heads_per_layer=3) == {}
    # per-group: keeping 1 of 2 per group leaves 2 heads, fewer than 3: the layer keeps its groups whole
    assert select_per_group(scores, hm, 0.5, min_heads_per_layer=3) == {}


def test_on_multi_head_models_kv_groups_selects_as_per_layer_or_global():
    hm = mha_map()
    scores = scores_for(hm, 3)
    for percent in (0.25, 0.3, 0.5):
        assert select_kv_groups(scores, hm, percent) == select_heads(scores, hm, percent, scope="per-layer")
        assert select_kv_groups(scores, hm, percent, uniform=False) == select_heads(scores, hm, percent,
                                                                                     scope="global")


def test_per_group_refuses_a_multi_head_model_in_one_line():
    with pytest.raises(SentinelError, match="per-group.*grouped-query attention.*per-layer or kv-groups") as err:
        select_per_group(torch.ones(3, 4), mha_map(), 0.3)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False)])
def test_the_uniform_option_is_a_declared_bool(value, expected):
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.strategies.group_selection import UNIFORM

    assert UNIFORM.value(ExperimentConfig(options={"uniform": value})) is expected
    assert UNIFORM.value(ExperimentConfig()) is True
    assert UNIFORM.rule.check("-o uniform", "false", from_text=True) is False
    with pytest.raises(SentinelError, match="option uniform must be bool, got 'sometimes'"):
        UNIFORM.value(ExperimentConfig(options={"uniform": "sometimes"}))


def test_the_choice_is_described_in_groups_and_query_heads():
    hm = gqa_map(layers=16, heads=32, kv=8)
    scores = scores_for(hm, 0)
    chosen = select_kv_groups(scores, hm, 0.3)
    choice = describe_choice("kv-groups", hm, chosen, 0.3)
    assert choice.message == ("kv-groups: removing 2 of 8 KV groups in each of 16 layers "
                              "(25.0% of query heads; 30% asked)")
    assert choice.values["kv_groups_removed"] == 32 and choice.values["heads_chosen"] == 128
    chosen = select_per_group(scores, hm, 0.3)
    choice = describe_choice("per-group", hm, chosen, 0.3)
    assert choice.message.startswith("per-group: removing 1 of 4 query heads from each of 128 KV groups")
    assert choice.values["kv_groups_removed"] == 0 and choice.values["fraction_chosen"] == 0.25
