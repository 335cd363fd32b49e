"""``kv-groups`` and ``per-group`` on real (tiny) LLaMA, Qwen2, Qwen3 and Mistral models, eager and sdpa.

What is checked against an independent measurement: the KV cache that ``generate()`` holds (the
bytes of its key and value tensors), the projection shapes, and logits against a copy whose
removed heads are zeroed in the weights (no Sentinel code involved).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from surgery_fixtures import (
    ATTN,
    inputs,
    logits,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_qwen2,
    tiny_qwen3,
    zero_heads_reference,
)

from sentinel_core import plugins
from sentinel_core.cli import cli, commands  # noqa: F401  (registers the subcommands)
from sentinel_core.config import ExperimentConfig
from sentinel_core.errors import SentinelError
from sentinel_core.plugins import load_plugins
from sentinel_core.results import HeadScores
from sentinel_core.surgery import get_head_map

# 8 query heads of width 8 in 4 KV groups of 2 (Mistral: 2 groups of 4), 3 layers.
SHAPE = dict(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=3)
FAMILIES = {
    "llama": lambda attn: tiny_llama(attn, **SHAPE),
    "qwen2": lambda attn: tiny_qwen2(attn, **SHAPE),
    "qwen3": lambda attn: tiny_qwen3(attn, **SHAPE),
    "mistral": lambda attn: tiny_mistral(attn, **{**SHAPE, "num_key_value_heads": 2}),
}


def random_scores(model, seed: int = 0) -> HeadScores:
    hm = get_head_map(model)
    g = torch.Generator().manual_seed(seed)
    return HeadScores(scores=torch.rand(hm.num_layers, hm.width, generator=g), strategy="test")


def prune(model, strategy: str, percent: float, **config):
    load_plugins()
    cfg = ExperimentConfig(pruning_percent=percent, prune_strategy=strategy, **config)
    return plugins.prune(strategy, model=model, scores=random_scores(model), config=cfg)


def cache_bytes(model, ids: torch.Tensor, new_tokens: int = 4) -> int:
    """Bytes of the key and value tensors in the cache that generate() hands back."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    cache = out.past_key_values
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def kv_rows(model) -> list[int]:
    return [layer.self_attn.k_proj.weight.shape[0] for layer in model.model.layers]


CASES = [(family, attn, 0.5) for family in sorted(FAMILIES) for attn in ATTN] + [
    ("llama", "eager", 0.25), ("qwen3", "sdpa", 0.25), ("mistral", "sdpa", 0.25)]


@pytest.mark.parametrize("family,attn,percent", CASES)
def test_kv_groups_removes_whole_groups_and_the_kv_cache_shrinks_by_that_fraction(family, attn, percent, capsys):
    model = FAMILIES[family](attn)
    original = get_head_map(model)
    group = original.original_num_heads // original.original_num_kv_heads
    ids = inputs(batch=2, length=7)
    dense_cache = cache_bytes(model, ids)
    result = prune(model, "kv-groups", percent)
    assert "kv-groups: removing" in capsys.readouterr().err
    reference = zero_heads_reference(FAMILIES[family](attn), result.heads)

    hm = get_head_map(model)
    removed_groups = 0
    for layer in range(hm.num_layers):
        gone = set(result.heads.get(layer, []))
        for kv in range(original.original_num_kv_heads):
            members = set(range(kv * group, (kv + 1) * group))
            assert not gone & members or members <= gone  # a group goes whole or not at all
            removed_groups += members <= gone
        assert hm.group_sizes[layer] == group  # no dead alignment slots: whole groups left
        assert None not in hm.layers[layer]
    # uniform (the default): the same number of groups from every layer
    assert len({len(result.heads.get(layer, [])) for layer in range(hm.num_layers)}) == 1
    total_groups = hm.num_layers * original.original_num_kv_heads
    kept = (total_groups - removed_groups) / total_groups
    assert 0 < removed_groups < total_groups
    assert sum(kv_rows(model)) == kept * sum(kv_rows(FAMILIES[family](attn)))
    assert cache_bytes(model, ids) == kept * dense_cache  # exactly the kept fraction
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_group_leaves_equal_group_sizes_and_every_kv_head(family, attn):
    model = FAMILIES[family](attn)
    original = get_head_map(model)
    group = original.original_num_heads // original.original_num_kv_heads
    ids = inputs(batch=2, length=7)
    dense_cache = cache_bytes(model, ids)
    result = prune(model, "per-group", 0.5)
    reference = zero_heads_reference(FAMILIES[family](attn), result.heads)
    hm = get_head_map(model)
    sizes = {len([h for h in members if h is not None]) for layer in range(hm.num_layers)
             for members in hm.kv_groups(layer)}
    assert sizes == {group // 2}
    assert all(hm.num_kv_slots(layer) == original.original_num_kv_heads for layer in range(hm.num_layers))
    assert all(None not in slots for slots in hm.layers)  # equal groups: no padding slots
    assert cache_bytes(model, ids) == dense_cache  # every KV head kept
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-5, rtol=0)


def test_non_uniform_kv_groups_may_take_more_groups_from_one_layer():
    model = tiny_llama("sdpa", **SHAPE)
    hm = get_head_map(model)
    # Layer 2's groups are the weakest after normalisation (one strong head dominates its norm).
    scores = torch.full((3, 8), 1.0)
    scores[2] = torch.tensor([10.0, 10.0, 0.1, 0.1, 0.1, 0.1, 0.2, 0.2])
    load_plugins()
    cfg = ExperimentConfig(pruning_percent=0.25, prune_strategy="kv-groups", options={"uniform": False})
    result = plugins.prune("kv-groups", model=model, scores=HeadScores(scores=scores, strategy="t"), config=cfg)
    assert result.heads == {2: [2, 3, 4, 5, 6, 7]}
    assert kv_rows(model) == [32, 32, 8] and hm.num_layers == 3


def test_kv_groups_in_mask_mode_masks_the_same_groups_that_removal_takes():
    removed, masked = tiny_llama("sdpa", **SHAPE), tiny_llama("sdpa", **SHAPE)
    r = prune(removed, "kv-groups", 0.5)
    m = prune(masked, "kv-groups", 0.5, prune_mode="mask")
    assert r.heads == m.heads and m.mode == "mask"
    ids = inputs()
    torch.testing.assert_close(logits(masked, ids), logits(removed, ids), atol=1e-5, rtol=0)
    # masked heads count as gone: the same target again removes nothing more
    assert prune(masked, "kv-groups", 0.5).heads == {}


def test_kv_groups_on_gpt2_selects_as_per_layer(capsys):
    a, b = tiny_gpt2(n_layer=3), tiny_gpt2(n_layer=3)
    assert prune(a, "kv-groups", 0.5).heads == prune(b, "per-layer", 0.5).heads
    assert "selects as per-layer" in capsys.readouterr().err


def test_per_group_on_gpt2_is_refused_in_one_line():
    with pytest.raises(SentinelError, match="needs grouped-query attention") as err:
        prune(tiny_gpt2(), "per-group", 0.5)
    assert "\n" not in str(err.value)


def test_the_choice_goes_to_the_metric_log_and_stderr(capsys):
    from sentinel_core.hookspecs import hookimpl
    from sentinel_core.metrics import MetricEvent
    from sentinel_core.plugins import pm

    events: list[MetricEvent] = []

    class Collect:
        @hookimpl
        def on_metric(self, event):
            events.append(event)

    collector = Collect()
    load_plugins()
    pm.register(collector)
    try:
        prune(tiny_llama("sdpa", **SHAPE), "kv-groups", 0.3)
    finally:
        pm.unregister(collector)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "kv-groups: removing 1 of 4 KV groups in each of 3 layers (25.0% of query heads; 30% asked)"
    values = next(e.values for e in events if e.stage == "prune")
    assert values["kv_groups_removed"] == 3 and values["fraction_chosen"] == 0.25
    assert values["fraction_asked"] == 0.3 and values["uniform"] is True


def test_both_strategies_are_listed_and_work_from_the_cli(tmp_path):
    model = tiny_llama("sdpa", **SHAPE)
    from data_fixtures import make_tokenizer

    model.save_pretrained(tmp_path / "m")
    make_tokenizer(100).save_pretrained(tmp_path / "m")
    runner = CliRunner()
    listing = runner.invoke(cli, ["plugins"], catch_exceptions=False).output
    assert "prune:kv-groups" in listing and "prune:per-group" in listing
    run = runner.invoke(cli, ["prune", "--model", str(tmp_path / "m"), "--scorer", "magnitude",
                              "--prune-strategy", "kv-groups", "--pruning-percent", "0.5",
                              "--output-dir", str(tmp_path / "out")], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "removing 2 of 4 KV groups in each of 3 layers" in run.output
    assert "removed 12 heads" in run.output
