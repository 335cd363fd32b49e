"""The magnitude scorer against norms of weight slices cut here by hand."""

from __future__ import annotations

import math

import pytest
import sentinel_magnitude
import torch
from sentinel_magnitude import magnitude_scores
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sentinel_core.strategies.selection import select_heads
from sentinel_core.surgery import get_head_map, grow_heads, mask_heads, prune_heads

E, H, HD = 32, 4, 8


def gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=H, n_embd=E, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=H, num_key_value_heads=2, hidden_size=E,
                         intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def gpt2_norm(model: GPT2LMHeadModel, layer: int, head: int) -> float:
    """Conv1D c_attn weight is [in, 3E]: q | k | v column blocks; c_proj weight is [E, E], head rows."""
    attn = model.transformer.h[layer].attn
    w = attn.c_attn.weight.detach().double()
    cols = slice(head * HD, (head + 1) * HD)
    q, k, v = w[:, 0:E][:, cols], w[:, E:2 * E][:, cols], w[:, 2 * E:3 * E][:, cols]
    o = attn.c_proj.weight.detach().double()[head * HD:(head + 1) * HD, :]
    return math.sqrt(sum(float((t ** 2).sum()) for t in (q, k, v, o)))


def llama_norm(model: LlamaForCausalLM, layer: int, head: int, group: int = 2) -> float:
    """nn.Linear weights are [out, in]: q/k/v rows per head (k/v shared by a group), o_proj columns."""
    attn = model.model.layers[layer].self_attn
    kv = head // group
    q = attn.q_proj.weight.detach().double()[head * HD:(head + 1) * HD]
    k = attn.k_proj.weight.detach().double()[kv * HD:(kv + 1) * HD]
    v = attn.v_proj.weight.detach().double()[kv * HD:(kv + 1) * HD]
    o = attn.o_proj.weight.detach().double()[:, head * HD:(head + 1) * HD]
    return math.sqrt(sum(float((t ** 2).sum()) for t in (q, k, v, o)))


def test_gpt2_scores_are_the_norms_of_each_heads_slices():
    model = gpt2(1)
    scores = magnitude_scores(model).scores
    for layer in range(2):
        for head in range(H):
            assert float(scores[layer, head]) == pytest.approx(gpt2_norm(model, layer, head), rel=1e-6)
    # Heads differ: a scorer that mixed up slices would still give H distinct numbers, but not these.
    assert len({round(float(s), 6) for s in scores.flatten()}) == 2 * H


def test_llama_gqa_scores_count_the_shared_kv_head_for_each_query_head():
    model = llama(2)
    scores = magnitude_scores(model).scores
    for layer in range(2):
        for head in range(H):
            assert float(scores[layer, head]) == pytest.approx(llama_norm(model, layer, head), rel=1e-6)


def test_biases_are_left_out():
    model = gpt2(3)
    before = magnitude_scores(model).scores
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.bias.fill_(5.0)
    assert torch.equal(magnitude_scores(model).scores, before)


def test_a_scaled_down_head_is_removed_first():
    model = gpt2(4)
    with torch.no_grad():
        attn = model.transformer.h[1].attn
        for block in range(3):
            attn.c_attn.weight[:, block * E + 3 * HD: block * E + 4 * HD] *= 0.1
        attn.c_proj.weight[3 * HD: 4 * HD] *= 0.1
    scores = magnitude_scores(model).scores
    for normalize in (False, True):
        assert select_heads(scores, get_head_map(model), 1 / 8, normalize=normalize) == {1: [3]}


def test_pruned_grown_and_masked_layouts_are_read_from_the_head_map():
    model = gpt2(5)
    original = magnitude_scores(model).scores
    prune_heads(model, {0: [1]})
    grow_heads(model, {0: 1}, generator=torch.Generator().manual_seed(0))
    mask_heads(model, {1: [2]})
    head_map = get_head_map(model)
    assert head_map.layers[0] == [0, 2, 3, 4]
    result = magnitude_scores(model)
    assert result.scores.shape == (2, 5)
    for layer, head in [(0, 0), (0, 2), (0, 3), (1, 0), (1, 1), (1, 3)]:
        assert float(result.scores[layer, head]) == pytest.approx(float(original[layer, head]), rel=1e-6)
    for layer, head in [(0, 1), (1, 2), (1, 4)]:
        assert math.isnan(result.scores[layer, head])
    # The grown head (id 4, slot 3) has fresh q/k/v weights and a zero output block.
    attn = model.transformer.h[0].attn
    w = attn.c_attn.weight.detach().double()
    width = 4 * HD
    grown = math.sqrt(sum(float((w[:, b * width + 3 * HD: b * width + 4 * HD] ** 2).sum()) for b in range(3)))
    assert float(result.scores[0, 4]) == pytest.approx(grown, rel=1e-6)


def test_llama_with_a_dead_gqa_slot():
    model = llama(6)
    original = magnitude_scores(model).scores
    prune_heads(model, {0: [1]})
    assert get_head_map(model).layers[0] == [0, None, 2, 3]
    scores = magnitude_scores(model).scores
    assert math.isnan(scores[0, 1])
    for head in (0, 2, 3):
        assert float(scores[0, head]) == pytest.approx(float(original[0, head]), rel=1e-6)


def test_the_model_is_not_changed_and_the_strategy_is_declared_with_its_function():
    model = gpt2(7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    (declared,) = sentinel_magnitude.register_strategies()
    assert (declared.hook, declared.name, declared.function) == ("score_heads", "magnitude",
                                                                 sentinel_magnitude.magnitude_scores)
    result = declared.function(model=model)
    assert result.strategy == "magnitude" and result.tokens_seen == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(p.grad is not None for p in model.parameters())
