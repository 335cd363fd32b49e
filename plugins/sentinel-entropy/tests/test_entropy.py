"""The entropy scorer against entropies computed here from transformers' own attention maps."""

from __future__ import annotations

import math

import pytest
import sentinel_entropy
import torch
from sentinel_entropy import allowed_key_counts, entropy_scores, normalized_entropy_sums
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from sentinel_core.errors import SentinelError
from sentinel_core.strategies.selection import select_heads
from sentinel_core.surgery import get_head_map, mask_heads, prune_heads


def gpt2(seed: int = 0, n_layer: int = 2, n_head: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=32, vocab_size=100, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def sharpen(model: torch.nn.Module, factor: float = 20.0) -> None:
    """Scale query weights so that attention is far from uniform (random init is nearly uniform)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("c_attn.weight"):
                param[:, : param.shape[0]] *= factor
            elif name.endswith("q_proj.weight"):
                param *= factor


def right_padded(rows: list[list[int]], width: int | None = None) -> dict[str, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def reference_importance(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """1 - mean normalised entropy from ``output_attentions=True`` and explicit loops (slot order)."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        sums: dict[int, list[float]] = {}
        count = 0
        with torch.no_grad():
            for batch in batches:
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_attentions=True)
                mask = batch["attention_mask"]
                for layer, att in enumerate(out.attentions):
                    sums.setdefault(layer, [0.0] * att.shape[1])
                    for b in range(att.shape[0]):
                        for t in range(att.shape[2]):
                            n = int(mask[b, : t + 1].sum())
                            if mask[b, t] == 0 or n < 2:
                                continue
                            if layer == 0:
                                count += 1
                            for s in range(att.shape[1]):
                                p = att[b, s, t].double()
                                h = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
                                sums[layer][s] += h / math.log(n)
    finally:
        model.set_attn_implementation(impl)
    return torch.tensor([[1.0 - v / count for v in sums[layer]] for layer in sorted(sums)], dtype=torch.float64)


def test_reduction_of_a_hand_built_attention_matrix():
    # One sequence of 4 positions whose last position is padding; two heads.
    p = torch.tensor([
        [[1.0, 0.0, 0.0, 0.0], [0.3, 0.7, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0], [0.1, 0.2, 0.7, 0.0]],
        [[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.4, 0.0]],
    ]).unsqueeze(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    allowed = allowed_key_counts(p.shape, None, mask)
    assert allowed.tolist() == [[1, 2, 3, 3]]
    sums, count = normalized_entropy_sums(p, mask, allowed)

    def h(*probs):
        return -sum(x * math.log(x) for x in probs if x > 0)

    # Position 0 sees one key, position 3 is padding: only positions 1 (2 keys) and 2 (3 keys) count.
    expected = [h(0.3, 0.7) / math.log(2) + h(0.2, 0.3, 0.5) / math.log(3),
                h(0.5, 0.5) / math.log(2) + h(1.0) / math.log(3)]
    assert count == 2
    assert sums.tolist() == pytest.approx(expected, abs=1e-6)
    assert expected[1] == pytest.approx(1.0)  # uniform over 2 keys, then one-hot over 3


def test_allowed_counts_from_the_4d_mask_agree_with_causal_padding():
    lowest = torch.finfo(torch.float32).min
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    causal = torch.ones(5, 5).tril().bool()
    allowed = causal[None, None] & key_mask[:, None, None, :].bool()
    additive = torch.zeros(3, 1, 5, 5).masked_fill(~allowed, lowest)
    shape = torch.Size([3, 4, 5, 5])
    from_2d = allowed_key_counts(shape, None, key_mask)
    assert allowed_key_counts(shape, additive, key_mask).tolist() == from_2d.tolist()
    assert allowed_key_counts(shape, allowed, key_mask).tolist() == from_2d.tolist()
    # Right padding: padded keys are in every real query's future; left padding: in its past.
    assert from_2d.tolist() == [[1, 2, 3, 3, 3], [1, 2, 3, 4, 5], [0, 0, 1, 2, 3]]


def test_scores_equal_a_direct_computation_from_output_attentions():
    model = gpt2(1)
    sharpen(model)
    left = right_padded([[21, 22, 23, 24], [25, 26, 27, 28, 29, 30]])
    left = {k: torch.stack([v[0].roll(2), v[1]]) for k, v in left.items()}  # first row left-padded
    assert left["attention_mask"][0].tolist() == [0, 0, 1, 1, 1, 1]
    batches = [right_padded([[5, 9, 2, 7, 7, 1, 3], [4, 4, 8]]), right_padded([[11, 12, 13, 14, 15]]), left]
    result = entropy_scores(model, batches)
    assert result.strategy == "entropy"
    assert result.tokens_seen == 25
    assert result.scores.shape == (2, 4)
    assert torch.allclose(result.scores.double(), reference_importance(model, batches), atol=1e-5)


def test_a_head_with_zero_query_and_key_weights_is_uniform_and_goes_first():
    model = gpt2(2)
    sharpen(model)
    hd, e = 8, 32
    with torch.no_grad():
        attn = model.transformer.h[1].attn
        for block in (0, 1):  # q and k columns of head 2
            attn.c_attn.weight[:, block * e + 2 * hd: block * e + 3 * hd] = 0
            attn.c_attn.bias[block * e + 2 * hd: block * e + 3 * hd] = 0
    batches = [right_padded([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]])]
    result = entropy_scores(model, batches)
    # Equal logits give uniform attention over the n_t visible keys: entropy log(n_t), normalised 1.
    assert float(result.scores[1, 2]) == pytest.approx(0.0, abs=1e-6)
    others = torch.cat([result.scores[0], result.scores[1, [0, 1, 3]]])
    assert float(others.min()) > 0.01
    chosen = select_heads(result.scores, get_head_map(model), 1 / 8, min_heads_per_layer=1, normalize=False)
    assert chosen == {1: [2]}


def test_padding_does_not_change_scores():
    model = gpt2(3)
    sharpen(model)
    texts = [[5, 9, 2, 7, 7, 1, 3, 8, 8], [4, 4, 8, 1], [10, 20, 30, 40, 50, 60]]
    alone = [right_padded([t]) for t in texts]
    together = [right_padded(texts, width=14)]
    a = entropy_scores(model, alone).scores
    b = entropy_scores(model, together).scores
    assert torch.allclose(a, b, atol=1e-6)


def test_the_model_comes_back_unchanged():
    model = gpt2(4)
    model.set_attn_implementation("sdpa")
    model.train()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    torch.manual_seed(0)
    model.eval()
    before = model(input_ids=ids).logits
    model.train()
    entropy_scores(model, [right_padded([[1, 2, 3, 4, 5, 6]])])
    assert model.training
    assert model.config._attn_implementation == "sdpa"
    assert all(not block.attn._forward_hooks for block in model.transformer.h)
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, before)


def test_everything_is_restored_when_a_batch_fails():
    model = gpt2(5)
    bad = {"input_ids": torch.tensor([[1, 2, 500]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(IndexError):
        entropy_scores(model, [right_padded([[1, 2, 3]]), bad])
    assert model.config._attn_implementation == "sdpa"
    assert all(not block.attn._forward_hooks for block in model.transformer.h)


def test_pruned_masked_and_gqa_heads():
    model = llama(6)
    sharpen(model)
    prune_heads(model, {0: [1]})  # layer 0 keeps a dead, gated slot beside head 0
    mask_heads(model, {1: [3]})
    head_map = get_head_map(model)
    assert head_map.layers[0] == [0, None, 2, 3]
    batches = [right_padded([[5, 9, 2, 7, 7, 1], [4, 4, 8]])]
    result = entropy_scores(model, batches)
    reference = reference_importance(model, batches)
    assert math.isnan(result.scores[0, 1]) and math.isnan(result.scores[1, 3])
    for layer, slots in enumerate(head_map.layers):
        for slot, head in enumerate(slots):
            if head is not None and head not in head_map.masked(layer):
                assert float(result.scores[layer, head]) == pytest.approx(float(reference[layer, slot]), abs=1e-5)


def test_no_batches_or_no_countable_positions_is_a_user_error():
    model = gpt2(7)
    with pytest.raises(SentinelError, match="no batches"):
        entropy_scores(model, [])
    with pytest.raises(SentinelError, match="2 or more tokens"):
        entropy_scores(model, [right_padded([[4]])])


def test_the_strategy_is_dispatched_by_the_core_to_its_function():
    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.testing import registered_plugin

    model = gpt2(8)
    batches = [right_padded([[1, 2, 3, 4]])]
    (declared,) = sentinel_entropy.register_strategies()
    assert (declared.name, declared.function) == ("entropy", entropy_scores)
    with registered_plugin(sentinel_entropy, "entropy-test"):
        results = plugins.score_heads("entropy", model=model, batches=batches, config=ExperimentConfig())
    assert results.strategy == "entropy"
    assert torch.allclose(results.scores, entropy_scores(model, batches).scores)
