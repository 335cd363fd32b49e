"""Growth on real (tiny) models: function preserved, targets and caps, training, exact reload, GQA."""

from __future__ import annotations

import pytest
import torch

from sentinel_core import plugins
from sentinel_core.model_io import load_model, save_model
from sentinel_core.surgery import get_head_map, prune_heads

STRATEGIES = ["gradient", "entropy-gap", "balanced", "random"]


def _ids(seed: int = 1, vocab: int = 100) -> torch.Tensor:
    return torch.randint(vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_plugin_declares_the_four_strategies(growth_plugin):
    owners = plugins.available_strategies("grow_heads")
    for name in STRATEGIES:
        assert owners[name] == "growth"


def test_every_strategy_is_declared_with_its_function_and_options(growth_plugin):
    declared = {s.name: s for s in growth_plugin.register_strategies()}
    assert sorted(declared) == sorted(STRATEGIES)
    for name, strategy in declared.items():
        assert strategy.hook == "grow_heads" and strategy.function is growth_plugin.grow
        options = {o.name for o in strategy.options}
        assert {"growth_allow_exceed", "growth_warmup_steps", "growth_init_std"} <= options
        assert ("growth_candidates" in options) == (name == "gradient")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_logits_unchanged_right_after_growth_and_target_met(growth_plugin, build, strategy):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {0: [1, 2], 1: [0, 1, 3]})
    x = _ids()
    with torch.no_grad():
        before = model(x).logits
    config = build.config(growth_strategy=strategy, growth_percent=0.25)
    result = plugins.grow_heads(strategy, model=model, data=build.data(), config=config)
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    hm = get_head_map(model)
    assert result.count == round(0.25 * 2 * 4) == 2
    assert result.heads == {layer: hm.grown(layer) for layer in range(2) if hm.grown(layer)}
    for layer in range(2):
        assert len(hm.active(layer)) <= 4
    assert all(i >= 4 for ids in result.heads.values() for i in ids)
    assert result.extra["per_layer"] == [len(hm.grown(layer)) for layer in range(2)]


def test_growth_respects_the_cap_and_warns_when_the_target_does_not_fit(growth_plugin, build):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {0: [0]})  # room for one head only
    config = build.config(growth_percent=0.25)  # asks for 2
    with pytest.warns(UserWarning, match="only 1 fit"):
        result = plugins.grow_heads("balanced", model=model, data=build.data(), config=config)
    assert result.heads == {0: [4]}
    assert [len(get_head_map(model).active(layer)) for layer in range(2)] == [4, 4]


def test_allow_exceed_goes_past_the_original_count(growth_plugin, build):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {0: [0]})
    config = build.config(growth_percent=0.25, options={"growth_allow_exceed": True})
    result = plugins.grow_heads("balanced", model=model, data=build.data(), config=config)
    assert result.count == 2
    # Deficits [1, 0]: layer 0 first, then a tie at 0 goes to the lower layer again.
    assert [len(get_head_map(model).active(layer)) for layer in range(2)] == [5, 4]


def test_bad_option_is_a_one_line_error(growth_plugin, build):
    from sentinel_core.errors import SentinelError

    model = build.gpt2()
    prune_heads(model, {0: [0, 1]})
    with pytest.raises(SentinelError, match="option growth_candidates must be a positive integer, got 0"):
        plugins.grow_heads("gradient", model=model, data=build.data(), config=build.config(options={"growth_candidates": 0}))


def test_random_strategy_is_reproducible(growth_plugin, build):
    def run(seed):
        model = build.gpt2(n_layer=4, n_head=4)
        prune_heads(model, {layer: [0, 1] for layer in range(4)})
        result = plugins.grow_heads("random", model=model, data=build.data(), config=build.config(seed=seed))
        weights = [attn.c_attn.weight.detach().clone() for attn in (b.attn for b in model.transformer.h)]
        return result.heads, weights

    heads_a, weights_a = run(5)
    heads_b, weights_b = run(5)
    assert heads_a == heads_b
    assert all(torch.equal(a, b) for a, b in zip(weights_a, weights_b, strict=True))
    assert len({str(run(seed)[0]) for seed in range(6)}) > 1


def _grown_blocks(model, layer: int, head: int):
    """(q, k, v columns, output-projection rows) of one GPT-2 head, as views."""
    attn = model.transformer.h[layer].attn
    slot = get_head_map(model).layers[layer].index(head)
    hd, width = attn.head_dim, attn.split_size
    cols = [slice(part * width + slot * hd, part * width + (slot + 1) * hd) for part in range(3)]
    return attn.c_attn.weight, cols, attn.c_proj.weight, slice(slot * hd, (slot + 1) * hd)


def test_grown_heads_receive_gradient_and_train(growth_plugin, build):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    result = plugins.grow_heads("balanced", model=model, data=build.data(), config=build.config())
    layer, head = next((layer, ids[0]) for layer, ids in result.heads.items())
    c_attn, cols, c_proj, rows = _grown_blocks(model, layer, head)
    assert torch.count_nonzero(c_proj[rows]) == 0
    q_before = c_attn[:, cols[0]].detach().clone()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = _ids(3)

    loss = model(x, labels=x).loss
    loss.backward()
    # Zero output rows: the first gradient reaches only those rows, not q/k/v.
    assert c_proj.grad[rows].abs().sum() > 0
    assert c_attn.grad[:, cols[0]].abs().sum() == 0
    optimizer.step()
    optimizer.zero_grad()
    assert torch.count_nonzero(c_proj[rows]) > 0

    loss = model(x, labels=x).loss
    loss.backward()
    for part in cols:
        assert c_attn.grad[:, part].abs().sum() > 0
    optimizer.step()
    assert not torch.equal(c_attn[:, cols[0]], q_before)


def test_grown_model_reloads_exactly(growth_plugin, build, tmp_path):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {0: [0, 3], 1: [1]})
    plugins.grow_heads("gradient", model=model, data=build.data(), config=build.config(growth_strategy="gradient"))
    # One training step so the new heads actually contribute.
    model.train()
    x = _ids(4)
    model(x, labels=x).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    save_model(model, None, tmp_path / "grown")
    reloaded, _ = load_model(tmp_path / "grown")
    assert get_head_map(reloaded) == get_head_map(model)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_gqa_growth_preserves_function_and_reloads(growth_plugin, build, tmp_path):
    model = build.llama(layers=2, heads=4, kv_heads=2)
    prune_heads(model, {0: [0, 1], 1: [3]})
    x = _ids(5)
    with torch.no_grad():
        before = model(x).logits
    result = plugins.grow_heads("gradient", model=model, data=build.data(),
                              config=build.config(growth_strategy="gradient", growth_percent=0.375))
    assert result.count == 3
    hm = get_head_map(model)
    assert all(len(hm.active(layer)) <= 4 for layer in range(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)
    save_model(model, None, tmp_path / "gqa")
    reloaded, _ = load_model(tmp_path / "gqa")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


@pytest.mark.parametrize("strategy", ["gradient", "entropy-gap"])
def test_growth_into_a_layer_with_no_heads_left(growth_plugin, build, strategy):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {1: [0, 1, 2, 3]})
    x = _ids(6)
    with torch.no_grad():
        before = model(x).logits
    config = build.config(growth_strategy=strategy, growth_percent=0.25)
    result = plugins.grow_heads(strategy, model=model, data=build.data(), config=config)
    # Layer 0 is full, so both heads can only go to the empty layer.
    assert result.heads == {1: [4, 5]}
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)
    assert get_head_map(model).active(1) == [4, 5]


def test_entropy_gap_on_a_gqa_model(growth_plugin, build):
    model = build.llama(layers=2, heads=4, kv_heads=2)
    prune_heads(model, {0: [0], 1: [2, 3]})
    x = _ids(7)
    with torch.no_grad():
        before = model(x).logits
    result = plugins.grow_heads("entropy-gap", model=model, data=build.data(),
                              config=build.config(growth_strategy="entropy-gap", growth_percent=0.25))
    assert result.count == 2
    assert len(result.extra["layer_scores"]) == 2
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)


def test_masked_heads_do_not_count_towards_the_cap(growth_plugin, build):
    from sentinel_core.surgery import mask_heads

    model = build.gpt2(n_layer=2, n_head=4)
    mask_heads(model, {0: [0, 1], 1: [3]})
    result = plugins.grow_heads("balanced", model=model, data=build.data(), config=build.config())
    assert result.heads == {0: [4, 5]}
    hm = get_head_map(model)
    assert hm.present(0) == [0, 1, 2, 3, 4, 5] and hm.active(0) == [2, 3, 4, 5]
