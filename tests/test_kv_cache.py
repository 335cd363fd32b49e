"""KV-cache bytes per token from the head layout, against the cache a forward pass really fills."""

from __future__ import annotations

import pytest
import torch
from surgery_fixtures import tiny_gpt2, tiny_llama

from sentinel_core.kv_cache import kv_cache_bytes_per_token
from sentinel_core.surgery import grow_heads, mask_heads, prune_heads


def measured_bytes_per_token(model, batch=2, length=7) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    total = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                for layer in cache.layers)
    return total / (batch * length)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama-gqa"])
@pytest.mark.parametrize("change", ["none", "prune", "prune-a-whole-layer", "mask", "grow"])
def test_kv_bytes_match_the_filled_cache(build, change):
    model = build()
    if change == "prune":
        prune_heads(model, {0: [0, 1], 1: [3]})
    elif change == "prune-a-whole-layer":
        prune_heads(model, {1: list(range(model.config.num_attention_heads))})
    elif change == "mask":
        mask_heads(model, {0: [0, 1]})
    elif change == "grow":
        prune_heads(model, {0: [0, 1]})
        grow_heads(model, {0: 2}, generator=torch.Generator().manual_seed(0))
    assert kv_cache_bytes_per_token(model) == measured_bytes_per_token(model)


def test_pruning_shrinks_the_cache_and_masking_does_not():
    model = tiny_gpt2()
    full = kv_cache_bytes_per_token(model)
    mask_heads(model, {0: [0, 1]})
    assert kv_cache_bytes_per_token(model) == full
    prune_heads(model, {0: [0, 1]})
    head_dim = model.config.n_embd // model.config.n_head
    assert kv_cache_bytes_per_token(model) == full - 2 * 2 * head_dim * 4  # 2 heads x (K and V) x head_dim x fp32


def test_half_precision_halves_it():
    model = tiny_gpt2()
    assert kv_cache_bytes_per_token(model.to(torch.bfloat16)) * 2 == kv_cache_bytes_per_token(tiny_gpt2())
