"""Head surgery on the LLaMA family (separate q/k/v/o, grouped-query attention), eager and sdpa."""

from __future__ import annotations

import copy

import pytest
import torch
from surgery_fixtures import (
    ATTN,
    greedy,
    inputs,
    lm_loss,
    logits,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    zero_heads_reference,
)

from sentinel_core.errors import SentinelError
from sentinel_core.surgery import (
    HeadAdapter,
    HeadParam,
    get_adapter,
    get_head_map,
    grow_heads,
    mask_heads,
    prune_heads,
    register_adapter,
    registered_adapters,
)


def kv_heads(model, layer: int) -> int:
    return model.model.layers[layer].self_attn.k_proj.weight.shape[0] // 8


def q_slots(model, layer: int) -> int:
    return model.model.layers[layer].self_attn.q_proj.weight.shape[0] // 8


def assert_prune_matches_mask(make, heads, attn: str):
    model, x = make(attn), inputs()
    masked = copy.deepcopy(model)
    mask_heads(masked, heads)
    torch.testing.assert_close(logits(masked, x), logits(zero_heads_reference(model, heads), x), atol=1e-5, rtol=0)
    hm = prune_heads(model, heads)
    torch.testing.assert_close(logits(model, x), logits(masked, x), atol=1e-5, rtol=0)
    return model, hm


@pytest.mark.parametrize("attn", ATTN)
def test_gqa_kv_head_goes_only_with_its_whole_group(attn: str) -> None:
    # 4 query heads, 2 KV heads: groups {0, 1} -> kv 0 and {2, 3} -> kv 1
    model, hm = assert_prune_matches_mask(tiny_llama, {0: [1]}, attn)
    assert hm.layers[0] == [0, None, 2, 3] and hm.group_sizes[0] == 2
    assert kv_heads(model, 0) == 2 and q_slots(model, 0) == 4
    assert hm.kv_groups(0) == [[0, None], [2, 3]] and hm.present(0) == [0, 2, 3]

    model, hm = assert_prune_matches_mask(tiny_llama, {0: [0, 1], 1: [3]}, attn)
    assert hm.layers[0] == [2, 3] and kv_heads(model, 0) == 1  # whole group 0 gone -> kv 0 gone
    assert hm.layers[1] == [0, 1, 2, None] and kv_heads(model, 1) == 2


@pytest.mark.parametrize("attn", ATTN)
def test_partial_groups_shrink_to_the_largest_survivor(attn: str) -> None:
    model, hm = assert_prune_matches_mask(tiny_llama, {0: [1, 3]}, attn)
    assert hm.layers[0] == [0, 2] and hm.group_sizes[0] == 1
    assert kv_heads(model, 0) == 2 and model.model.layers[0].self_attn.num_key_value_groups == 1


@pytest.mark.parametrize("attn", ATTN)
def test_prune_every_head_of_a_layer_and_generate(attn: str) -> None:
    model, hm = assert_prune_matches_mask(tiny_llama, {0: [0, 1, 2, 3], 1: [2]}, attn)
    assert hm.layers[0] == [] and kv_heads(model, 0) == 0
    one = inputs(batch=1, length=5)
    assert torch.equal(greedy(model, one, True), greedy(model, one, False))
    model.train()
    lm_loss(model, inputs()).backward()


@pytest.mark.parametrize("attn", ATTN)
def test_generation_with_cache_after_pruning(attn: str) -> None:
    model, x = tiny_llama(attn), inputs(batch=1, length=5)
    prune_heads(model, {0: [1], 1: [0, 1]})
    assert torch.equal(greedy(model, x, True), greedy(model, x, False))
    batch = inputs(batch=3, length=6, seed=4)
    mask = torch.ones_like(batch)
    mask[0, :3] = 0  # left padding takes sdpa's repeat_kv path instead of enable_gqa
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(batch, **kw), model.generate(batch, use_cache=False, **kw))


def test_repeated_prunes_compose_in_original_numbering() -> None:
    once, twice, x = tiny_llama(), tiny_llama(), inputs()
    prune_heads(once, {0: [1, 3]})
    prune_heads(twice, {0: [1]})
    hm = prune_heads(twice, {0: [3]})
    assert hm.layers == get_head_map(once).layers
    torch.testing.assert_close(logits(once, x), logits(twice, x), atol=1e-6, rtol=0)
    hm = prune_heads(twice, {0: [0]})  # group of kv 0 now empty
    assert hm.layers[0] == [2] and kv_heads(twice, 0) == 1


def test_pruning_masked_heads_and_masking_dead_slots() -> None:
    model, x = tiny_llama(), inputs()
    mask_heads(model, {0: [0, 2]})
    expected = logits(model, x)
    hm = prune_heads(model, {0: [2]})
    assert hm.masked(0) == [0] and hm.layers[0] == [0, 1, 3, None]
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)
    with pytest.raises(SentinelError, match="head 2 of layer 0 was removed"):
        mask_heads(model, {0: [2]})


@pytest.mark.parametrize("attn", ATTN)
def test_growth_adds_kv_groups_and_is_invisible_at_birth(attn: str) -> None:
    model, x = tiny_llama(attn), inputs()
    prune_heads(model, {1: [1]})
    before = logits(model, x)
    new = grow_heads(model, {0: 3, 1: 1}, generator=torch.Generator().manual_seed(0))
    assert new == {0: [4, 5, 6], 1: [4]}
    hm = get_head_map(model)
    # new heads form new groups of the layer's group size (2), each with a fresh KV head
    assert hm.layers[0] == [0, 1, 2, 3, 4, 5, 6, None] and kv_heads(model, 0) == 4
    assert hm.layers[1] == [0, None, 2, 3, 4, None] and kv_heads(model, 1) == 3
    # zero output blocks add exact zeros; only BLAS accumulation order may differ
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    one = inputs(batch=1, length=5)
    assert torch.equal(greedy(model, one, True), greedy(model, one, False))
    model.train()
    lm_loss(model, x).backward()
    o_grad = model.model.layers[0].self_attn.o_proj.weight.grad
    for slot in (4, 5, 6):
        assert o_grad[:, slot * 8 : (slot + 1) * 8].abs().sum() > 0
    assert o_grad[:, 7 * 8 :].abs().sum() == 0  # dead padding slot is gated


def test_grown_heads_can_be_pruned_and_groups_close() -> None:
    model, x = tiny_llama(), inputs()
    grow_heads(model, {0: 2})
    expected = logits(model, x)
    hm = prune_heads(model, {0: [4, 5]})
    assert hm.layers[0] == [0, 1, 2, 3] and kv_heads(model, 0) == 2 and hm.next_ids[0] == 6
    torch.testing.assert_close(logits(model, x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_qwen2_with_qkv_bias_uses_the_llama_adapter(attn: str) -> None:
    assert get_adapter(tiny_qwen2(attn)).family == "llama"
    assert tiny_qwen2().model.layers[0].self_attn.q_proj.bias is not None
    model, hm = assert_prune_matches_mask(tiny_qwen2, {0: [1], 1: [2, 3]}, attn)
    assert hm.layers == [[0, None, 2, 3], [0, 1]]
    x = inputs()
    before = logits(model, x)
    grow_heads(model, {1: 2})
    # zero output blocks add exact zeros; only BLAS accumulation order may differ
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    one = inputs(batch=1, length=5)
    assert torch.equal(greedy(model, one, True), greedy(model, one, False))


def test_mistral_single_kv_head() -> None:
    # one KV head for all 4 query heads: removing 3 keeps the KV head; removing all removes it
    model, hm = assert_prune_matches_mask(tiny_mistral, {0: [0, 1, 3]}, "sdpa")
    assert hm.layers[0] == [2] and model.model.layers[0].self_attn.k_proj.weight.shape[0] == 8
    model, hm = assert_prune_matches_mask(tiny_mistral, {0: [0, 1, 2, 3]}, "eager")
    assert hm.layers[0] == [] and model.model.layers[0].self_attn.k_proj.weight.shape[0] == 0


def test_plugin_adapter_registration() -> None:
    class Broken:  # not an adapter
        family = "x"

    with pytest.raises(SentinelError, match="HeadAdapter subclass"):
        register_adapter(Broken)  # type: ignore[arg-type]

    class Dup(HeadAdapter):
        family = "gpt2"

    with pytest.raises(SentinelError, match="already registered"):
        register_adapter(Dup)
    assert [a.family for a in registered_adapters()][:2] == ["gpt2", "llama"]
    assert HeadParam("q_proj.weight", 0, ("q",)).segments == ("q",)
