"""Head selection (the ``global`` and ``per-layer`` prune strategies)."""

from __future__ import annotations

import math

import pytest
import torch
from data_fixtures import tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

from sentinel_core import plugins
from sentinel_core.config import ExperimentConfig
from sentinel_core.errors import SentinelError
from sentinel_core.results import HeadScores
from sentinel_core.strategies.selection import heads_to_remove, resolve_normalize, select_heads
from sentinel_core.surgery import get_head_map
from sentinel_core.surgery.headmap import HeadMap

NAN = float("nan")


def head_map(layers: int = 3, heads: int = 4, *, present=None, masked=None) -> HeadMap:
    return HeadMap(family="gpt2", original_num_heads=heads, original_num_kv_heads=heads,
                   layers=present or [list(range(heads)) for _ in range(layers)],
                   group_sizes=[1] * layers, masked_ids=masked or [[] for _ in range(layers)])


def count(selected: dict[int, list[int]]) -> int:
    return sum(len(v) for v in selected.values())


SCORES = torch.tensor([
    [0.9, 0.1, 0.8, 0.2],
    [0.7, 0.6, 0.5, 0.4],
    [0.05, 0.95, 0.3, 0.35],
])


def test_global_removes_the_lowest_scores_anywhere():
    chosen = select_heads(SCORES, head_map(), 0.5, scope="global", normalize=False)
    # 12 heads, 6 go: 0.05, 0.1, 0.2, 0.3, 0.35, 0.4.
    assert chosen == {0: [1, 3], 1: [3], 2: [0, 2, 3]}


def test_per_layer_removes_the_same_number_in_every_layer_by_rank():
    chosen = select_heads(SCORES, head_map(), 0.5, scope="per-layer", normalize=False)
    assert chosen == {0: [1, 3], 1: [2, 3], 2: [0, 2]}


def test_per_layer_gives_the_remainder_to_the_layer_with_the_weakest_next_head():
    # round(0.3 * 12) = 4: one per layer, then one more from the layer whose 2nd-weakest is lowest.
    chosen = select_heads(SCORES, head_map(), 0.3, scope="per-layer", normalize=False)
    assert count(chosen) == 4
    assert chosen == {0: [1, 3], 1: [3], 2: [0]}


def test_min_heads_per_layer_is_respected_and_the_shortfall_is_not_an_error():
    scores = torch.tensor([[0.01, 0.02, 0.03, 0.04], [0.5, 0.6, 0.7, 0.8]])
    chosen = select_heads(scores, head_map(2), 0.5, scope="global", min_heads_per_layer=3, normalize=False)
    assert chosen == {0: [0], 1: [0]}
    # 90% of 8 heads asks for 7; with 2 per layer kept only 4 can go.
    chosen = select_heads(scores, head_map(2), 0.9, scope="global", min_heads_per_layer=2, normalize=False)
    assert chosen == {0: [0, 1], 1: [0, 1]}
    chosen = select_heads(scores, head_map(2), 0.9, scope="per-layer", min_heads_per_layer=2, normalize=False)
    assert chosen == {0: [0, 1], 1: [0, 1]}
    # min 0 lets a layer go empty.
    assert select_heads(scores, head_map(2), 0.5, min_heads_per_layer=0, normalize=False) == {0: [0, 1, 2, 3]}


def test_ties_remove_the_lower_layer_then_the_lower_head_first():
    scores = torch.ones(3, 4)
    assert select_heads(scores, head_map(), 0.25, scope="global", normalize=False) == {0: [0, 1, 2]}
    assert select_heads(scores, head_map(), 0.25, scope="per-layer", normalize=False) == {0: [0], 1: [0], 2: [0]}
    assert select_heads(scores, head_map(), 0.25, scope="global", normalize=True) == {0: [0, 1, 2]}


def test_heads_already_gone_count_towards_the_target():
    hm = head_map(2, present=[[2, 3], [0, 1, 2, 3]])
    scores = torch.tensor([[NAN, NAN, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4]])
    assert heads_to_remove(hm, 0.25) == 0
    assert select_heads(scores, hm, 0.25, normalize=False) == {}
    assert select_heads(scores, hm, 0.5, normalize=False) == {1: [0, 1]}
    # per-layer evens the layers out: the fuller layer gives first.
    assert select_heads(scores, hm, 0.5, scope="per-layer", normalize=False) == {1: [0, 1]}
    # A masked head counts as gone as well, and is never chosen again.
    masked = head_map(2, masked=[[0, 1], []])
    scores = torch.tensor([[0.0, 0.0, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4]])
    assert select_heads(scores, masked, 0.5, normalize=False) == {1: [0, 1]}


def test_normalisation_makes_layers_comparable():
    # Layer 1 is layer 0 quartered: unnormalised, layer 1 loses both heads; normalised, the layers tie.
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.25, 0.5, 0.75, 1.0]])
    assert select_heads(scores, head_map(2), 0.25, normalize=False) == {1: [0, 1]}
    assert select_heads(scores, head_map(2), 0.25, normalize=True) == {0: [0], 1: [0]}


def test_resolve_normalize():
    assert resolve_normalize("auto", {"cross_layer_comparable": True}) is False
    assert resolve_normalize("auto", {}) is True
    assert resolve_normalize("false") is False and resolve_normalize(True) is True
    with pytest.raises(SentinelError, match="normalize_scores"):
        resolve_normalize("sometimes")


def test_bad_inputs_are_user_errors():
    with pytest.raises(SentinelError, match="NaN or infinite for active head 1 of layer 0"):
        select_heads(torch.tensor([[0.1, NAN], [0.1, 0.2]]), head_map(2, 2), 0.5)
    with pytest.raises(SentinelError, match="shape"):
        select_heads(torch.zeros(3, 4), head_map(2), 0.5)
    with pytest.raises(SentinelError, match="per_layer"):
        select_heads(SCORES, head_map(), 0.5, scope="per_layer")
    with pytest.raises(SentinelError, match="pruning_percent"):
        select_heads(SCORES, head_map(), 1.0)


def test_gqa_selection_is_a_valid_removal():
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    scores = HeadScores(torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.3, 0.4, 0.5, 0.6]]), strategy="test")
    result = plugins.prune("global", model=model, scores=scores,
                           config=ExperimentConfig(pruning_percent=0.375, options={"normalize_scores": "false"}))
    assert result.heads == {0: [0, 2], 1: [0]}
    hm = get_head_map(model)
    assert hm.present(0) == [1, 3] and hm.present(1) == [1, 2, 3]
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


@pytest.mark.parametrize("mode", ["remove", "mask"])
def test_the_prune_hook_applies_the_selection_and_is_idempotent(mode):
    model = tiny_gpt2(100)
    scores = HeadScores(torch.tensor([[0.1, 0.9, 0.2, 0.8], [0.3, 0.4, 0.5, 0.6]]), strategy="test")
    config = ExperimentConfig(pruning_percent=0.5, prune_mode=mode, options={"normalize_scores": "false"})
    with pytest.raises(SentinelError, match="unknown prune strategy 'magnitude'"):
        plugins.prune("magnitude", model=model, scores=scores, config=config)
    result = plugins.prune("global", model=model, scores=scores, config=config)
    assert (result.heads, result.mode, result.strategy, result.count) == ({0: [0, 2], 1: [0, 1]}, mode, "global", 4)
    hm = get_head_map(model)
    assert hm.active(0) == [1, 3] and hm.active(1) == [2, 3]
    if mode == "mask":
        assert hm.masked(0) == [0, 2] and hm.present(0) == [0, 1, 2, 3]
    else:
        assert hm.present(0) == [1, 3]
    # Pruning again to the same fraction takes nothing more away.
    later = scores.scores.clone()
    for layer, heads in result.heads.items():
        later[layer, heads] = NAN
    again = plugins.prune("per-layer", model=model, scores=HeadScores(later, strategy="test"), config=config)
    assert again.count == 0


def test_an_unreachable_target_prunes_what_it_may_and_warns():
    model = tiny_gpt2(100)
    scores = HeadScores(torch.rand(2, 4, generator=torch.Generator().manual_seed(0)), strategy="test")
    config = ExperimentConfig(pruning_percent=0.9, min_heads_per_layer=3)
    with pytest.warns(UserWarning, match="allows only 2"):
        result = plugins.prune("global", model=model, scores=scores, config=config)
    assert result.count == 2
    assert all(len(get_head_map(model).present(layer)) == 3 for layer in range(2))
    assert not any(math.isnan(v) for v in scores.scores.flatten().tolist())
