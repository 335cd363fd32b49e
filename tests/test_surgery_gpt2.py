"""Head surgery on GPT-2 (fused Conv1D c_attn / c_proj), under eager and sdpa."""

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
    tiny_gpt2,
    zero_heads_reference,
)
from transformers import BertConfig, BertLMHeadModel, OPTConfig, OPTForCausalLM

from sentinel_core.errors import SentinelError
from sentinel_core.surgery import (
    gate_tensors,
    get_adapter,
    get_head_map,
    grow_heads,
    is_headless,
    mask_heads,
    prune_heads,
    unmask_heads,
)

SEL = {0: [1, 3], 1: [2]}


@pytest.mark.parametrize("attn", ATTN)
def test_mask_matches_zeroed_weights_and_is_reversible(attn: str) -> None:
    model, x = tiny_gpt2(attn), inputs()
    before = logits(model, x)
    reference = logits(zero_heads_reference(model, SEL), x)
    hm = mask_heads(model, SEL)
    masked = logits(model, x)
    assert (masked - before).abs().max() > 1e-3  # masking changed something
    torch.testing.assert_close(masked, reference, atol=1e-5, rtol=0)
    assert hm.masked(0) == [1, 3] and hm.masked(1) == [2] and hm.present(0) == [0, 1, 2, 3]
    assert hm.active(0) == [0, 2]
    unmask_heads(model)
    assert torch.equal(logits(model, x), before)
    assert not hasattr(model.config, "sentinel_head_map")


@pytest.mark.parametrize("attn", ATTN)
def test_pruned_equals_masked(attn: str) -> None:
    model, x = tiny_gpt2(attn), inputs()
    masked = copy.deepcopy(model)
    mask_heads(masked, SEL)
    hm = prune_heads(model, SEL)
    torch.testing.assert_close(logits(model, x), logits(masked, x), atol=1e-5, rtol=0)
    attn0 = model.transformer.h[0].attn
    assert attn0.c_attn.weight.shape == (32, 3 * 2 * 8) and attn0.c_proj.weight.shape == (16, 32)
    assert hm.layers == [[0, 2], [0, 1, 3]] and hm.group_sizes == [1, 1]
    assert model.config.n_head == 4  # config keeps original counts so it still validates


@pytest.mark.parametrize("attn", ATTN)
def test_generation_with_cache_after_pruning(attn: str) -> None:
    model, x = tiny_gpt2(attn), inputs(batch=1, length=5)
    prune_heads(model, {0: [0, 1, 2], 1: [3]})
    assert torch.equal(greedy(model, x, True), greedy(model, x, False))


@pytest.mark.parametrize("attn", ATTN)
def test_prune_every_head_of_a_layer_equals_masking_them(attn: str) -> None:
    model, x = tiny_gpt2(attn), inputs()
    masked = copy.deepcopy(model)
    mask_heads(masked, {1: [0, 1, 2, 3]})
    hm = prune_heads(model, {1: [0, 1, 2, 3]})
    assert hm.layers[1] == [] and hm.group_sizes[1] == 0
    assert is_headless(model.transformer.h[1].attn)
    torch.testing.assert_close(logits(model, x), logits(masked, x), atol=1e-5, rtol=0)
    one = inputs(batch=1, length=4)
    assert torch.equal(greedy(model, one, True), greedy(model, one, False))
    lm_loss(model.train(), x).backward()  # training still works with a zero-output layer


def test_repeated_prunes_compose_in_original_numbering() -> None:
    x = inputs()
    once, twice = tiny_gpt2(), tiny_gpt2()
    prune_heads(once, {0: [1, 2], 1: [0]})
    prune_heads(twice, {0: [1]})
    hm = prune_heads(twice, {0: [2], 1: [0]})  # id 2 is still "2" after id 1 is gone
    assert hm.layers == get_head_map(once).layers == [[0, 3], [1, 2, 3]]
    assert torch.equal(logits(once, x), logits(twice, x))
    assert hm.removed(0) == [1, 2]
    with pytest.raises(SentinelError, match="head 1 of layer 0 was removed"):
        prune_heads(twice, {0: [1]})
    with pytest.raises(SentinelError, match="never existed"):
        mask_heads(twice, {0: [9]})


def test_pruning_a_masked_head_is_fine() -> None:
    model, x = tiny_gpt2(), inputs()
    mask_heads(model, {0: [1, 2]})
    expected = logits(model, x)
    hm = prune_heads(model, {0: [1]})
    assert hm.masked(0) == [2] and hm.present(0) == [0, 2, 3]
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
def test_growth_is_invisible_at_birth_and_trainable(attn: str) -> None:
    model, x = tiny_gpt2(attn), inputs()
    prune_heads(model, {0: [1]})
    before = logits(model, x)
    new = grow_heads(model, {0: 2, 1: 1}, generator=torch.Generator().manual_seed(0))
    assert new == {0: [4, 5], 1: [4]}
    hm = get_head_map(model)
    assert hm.layers[0] == [0, 2, 3, 4, 5] and hm.grown(0) == [4, 5] and hm.width == 6
    # zero output blocks add exact zeros; only BLAS accumulation order may differ
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    model.train()
    lm_loss(model, x).backward()
    attn0 = model.transformer.h[0].attn
    hd = attn0.head_dim
    grad_rows = attn0.c_proj.weight.grad[3 * hd : 5 * hd]  # slots 3, 4 hold heads 4, 5
    assert grad_rows.abs().sum(dim=1).gt(0).all()
    # after one step the grown heads speak
    with torch.no_grad():
        attn0.c_proj.weight -= 0.5 * attn0.c_proj.weight.grad
    assert not torch.equal(logits(model.eval(), x), before)
    # grown ids are never reused, even after pruning them
    prune_heads(model, {0: [5]})
    assert grow_heads(model, {0: 1}) == {0: [6]}


def test_masked_head_stays_silent_under_training() -> None:
    model, x = tiny_gpt2(), inputs()
    mask_heads(model, {0: [2]})
    assert not any("gate" in n for n, _ in model.named_parameters())
    assert not any("gate" in k for k in model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        lm_loss(model, x).backward()
        opt.step()
    model.eval()
    assert get_head_map(model).masked(0) == [2]
    # the trained masked model equals its own copy with head 2 physically removed
    pruned = copy.deepcopy(model)
    prune_heads(pruned, {0: [2]})
    torch.testing.assert_close(logits(model, x), logits(pruned, x), atol=1e-5, rtol=0)
    hd = model.transformer.h[0].attn.head_dim
    assert model.transformer.h[0].attn.c_proj.weight.grad[2 * hd : 3 * hd].abs().max() == 0


def double_loss(model, x: torch.Tensor) -> torch.Tensor:
    # HF's loss upcasts to float32; a float64 loss keeps the finite difference exact enough.
    out = model(x).logits[:, :-1]
    return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x[:, 1:].reshape(-1))


def test_gate_gradients_match_finite_differences() -> None:
    model, x = tiny_gpt2(), inputs()
    model.double()
    mask_heads(model, {1: [0]})
    with gate_tensors(model) as g:
        assert g[1].tolist() == [0.0, 1.0, 1.0, 1.0] and g[0].requires_grad
        double_loss(model, x).backward()
        grads = {layer: t.grad.clone() for layer, t in g.items()}
    for layer, head in [(0, 2), (1, 3)]:
        values, points = [], []
        for sign in (1, -1):
            with gate_tensors(model) as g, torch.no_grad():
                g[layer][head] += sign * 1e-3
                points.append(g[layer][head].item())
                values.append(double_loss(model, x).item())
        numeric = (values[0] - values[1]) / (points[0] - points[1])
        assert grads[layer][head].item() == pytest.approx(numeric, rel=1e-4, abs=1e-9)
    # restored: the mask is back and the gate is a plain buffer again
    proj = model.transformer.h[1].attn.c_proj
    assert not proj.sentinel_gate.requires_grad and proj.sentinel_gate.tolist() == [0.0, 1.0, 1.0, 1.0]


def test_deepcopy_keeps_gates_independent() -> None:
    model, x = tiny_gpt2(), inputs()
    clone = copy.deepcopy(model)
    mask_heads(clone, {0: [0, 1]})
    base = tiny_gpt2()
    assert torch.equal(logits(model, x), logits(base, x))
    mask_heads(model, {1: [3]})
    clone2 = copy.deepcopy(model)
    unmask_heads(model)
    assert get_head_map(clone2).masked(1) == [3]
    assert not torch.equal(logits(clone2, x), logits(model, x))


def test_training_step_after_surgery() -> None:
    model, x = tiny_gpt2(), inputs()
    prune_heads(model, {0: [0]})
    grow_heads(model, {1: 1})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    first = lm_loss(model, x)
    first.backward()
    opt.step()
    assert lm_loss(model, x).item() < first.item()


def test_bad_selections_raise_one_line_errors() -> None:
    model = tiny_gpt2()
    for bad, pattern in [
        ([1, 2], "dict"),
        ({5: [0]}, "layer 5 does not exist"),
        ({0: "1"}, "list of head ids"),
        ({0: [1.5]}, "must be ints"),
    ]:
        with pytest.raises(SentinelError, match=pattern) as info:
            prune_heads(model, bad)
        assert "\n" not in str(info.value)
    with pytest.raises(SentinelError, match="non-negative int"):
        grow_heads(model, {0: -1})


@pytest.mark.parametrize(
    "make",
    [
        lambda: OPTForCausalLM(
            OPTConfig(
                vocab_size=100,
                hidden_size=16,
                num_hidden_layers=1,
                ffn_dim=32,
                num_attention_heads=2,
                max_position_embeddings=32,
                word_embed_proj_dim=16,
            )
        ),
        lambda: BertLMHeadModel(
            BertConfig(
                vocab_size=100,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                is_decoder=True,
            )
        ),
    ],
)
def test_unsupported_architecture_names_supported_ones(make) -> None:
    model = make()
    for op in (get_adapter, get_head_map, lambda m: mask_heads(m, {0: [0]}), lambda m: prune_heads(m, {0: [0]})):
        with pytest.raises(SentinelError, match="supported: gpt2 .*llama") as info:
            op(model)
        assert "\n" not in str(info.value)
