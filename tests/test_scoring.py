"""Built-in scorers (gradient, random) and the ``sentinel score`` / ``sentinel prune`` commands."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from data_fixtures import tiny_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

from sentinel_core.config import ExperimentConfig
from sentinel_core.errors import SentinelError
from sentinel_core.strategies import random_scorer
from sentinel_core.strategies.gradient_scorer import gradient_scores
from sentinel_core.strategies.selection import select_heads
from sentinel_core.surgery import gate_tensors, get_head_map, mask_heads, prune_heads


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                         intermediate_size=64, vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def batch_of(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_with_gate(model, batch, layer: int, slot: int, value: float) -> tuple[float, float]:
    """Loss with one gate set to ``value``; also the value actually stored (gates are float32,
    and 1 +- k/10 for small k is stored exactly enough for a 1e-4 comparison).

    The loss is computed here in float64 from the logits: transformers' own loss upcasts to
    float32, whose rounding would swamp a finite difference.
    """
    with torch.no_grad(), gate_tensors(model) as gates:
        gates[layer][slot] = value
        stored = float(gates[layer][slot])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    return float(loss), stored


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gradient_matches_a_central_finite_difference(family):
    model = (tiny_gpt2(100, seed=1) if family == "gpt2" else llama(1)).double()
    if family == "llama":
        prune_heads(model, {1: [2]})  # a dead GQA slot must not shift the slot -> head mapping
    batch = batch_of([[5, 9, 2, 7, 7, 1, 3, 8], [4, 4, 8, 1, 2]])
    scores = gradient_scores(model, [batch]).scores
    head_map = get_head_map(model)
    # Five-point central difference: error O(h^4), so h can stay large enough that the float32
    # parts of the forward (LLaMA's RMSNorm upcasts, gates are float32) add no visible noise.
    h = 0.1
    for layer, slots in enumerate(head_map.layers):
        for slot, head in enumerate(slots):
            if head is None:
                continue
            f = {k: loss_with_gate(model, batch, layer, slot, 1 + k * h)[0] for k in (-2, -1, 1, 2)}
            estimate = abs((-f[2] + 8 * f[1] - 8 * f[-1] + f[-2]) / (12 * h))
            assert float(scores[layer, head]) == pytest.approx(estimate, rel=1e-4, abs=1e-8), (layer, head)
    if family == "llama":
        assert math.isnan(scores[1, 2])


def test_gradient_is_the_mean_of_per_batch_absolute_gradients():
    model = tiny_gpt2(100, seed=2).double()
    first, second = batch_of([[5, 9, 2, 7, 7, 1]]), batch_of([[3, 3, 1, 4, 1, 5, 9]])
    both = gradient_scores(model, [first, second]).scores
    one, two = gradient_scores(model, [first]).scores, gradient_scores(model, [second]).scores
    assert torch.allclose(both, (one + two) / 2, rtol=1e-6)


def test_gradient_leaves_the_model_as_it_was():
    model = tiny_gpt2(100, seed=3)
    model.transformer.wte.weight.requires_grad_(False)  # a frozen parameter must stay frozen
    model.train()
    batch = batch_of([[1, 2, 3, 4, 5, 6]])
    model.eval()
    before = model(input_ids=batch["input_ids"]).logits
    model.train()
    result = gradient_scores(model, [batch])
    assert result.strategy == "gradient" and result.tokens_seen == 6
    assert model.training
    assert not model.transformer.wte.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "wte" not in n)
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    assert torch.equal(model(input_ids=batch["input_ids"]).logits, before)


def test_gradient_gives_nan_for_removed_and_masked_heads():
    model = tiny_gpt2(100, seed=4)
    prune_heads(model, {0: [0]})
    mask_heads(model, {1: [3]})
    scores = gradient_scores(model, [batch_of([[1, 2, 3, 4, 5, 6]])]).scores
    nan = torch.isnan(scores)
    assert nan[0, 0] and nan[1, 3] and int(nan.sum()) == 2
    assert (scores[~nan] > 0).all()


def test_gradient_without_data_is_a_user_error():
    model = tiny_gpt2(100)
    with pytest.raises(SentinelError, match="no batches"):
        gradient_scores(model, [])
    with pytest.raises(SentinelError, match="no label tokens"):
        gradient_scores(model, [batch_of([[7]])])


def test_random_is_reproducible_by_seed_and_marks_heads_not_active():
    model = tiny_gpt2(100)
    prune_heads(model, {0: [1]})
    mask_heads(model, {1: [0]})

    def scores(seed):
        return random_scorer.random_scores(model=model, config=ExperimentConfig(seed=seed)).scores

    a, b, c = scores(1), scores(1), scores(2)
    assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    assert not torch.equal(a.nan_to_num(-1), c.nan_to_num(-1))
    assert torch.isnan(a[0, 1]) and torch.isnan(a[1, 0]) and int(torch.isnan(a).sum()) == 2
    (declared,) = random_scorer.register_strategies()
    assert (declared.name, declared.function) == ("random", random_scorer.random_scores)


# ---------------------------------------------------------------- the commands


def invoke(*args):
    import sentinel_core.cli.prune  # noqa: F401  (registers the command)
    import sentinel_core.cli.score  # noqa: F401
    from sentinel_core.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_score_json_equals_the_scorer_on_the_same_batches(tiny_assets):
    from sentinel_core.data import batches, load_data
    from sentinel_core.model_io import load_model

    result = invoke("score", "--model", tiny_assets["model"], "--data", tiny_assets["data"], "--scorer", "gradient",
                    "--batch-size", "2", "--calibration-batches", "2", "--block-size", "16", "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["strategy"] == "gradient" and record["tokens_seen"] == 2 * 2 * 16

    model, tokenizer = load_model(tiny_assets["model"])
    data = load_data(tiny_assets["data"], tokenizer, block_size=16, seed=5)
    calibration = list(batches(data.train.blocks, 2, shuffle=True, seed=5))[:2]
    expected = gradient_scores(model, calibration).scores
    assert torch.allclose(torch.tensor(record["scores"]), expected, rtol=1e-5)


def test_score_table_shows_removed_heads_as_dashes(tiny_assets):
    out = tiny_assets["tmp"] / "pruned"
    pruned = invoke("prune", "--model", tiny_assets["model"], "--scorer", "random", "--pruning-percent", "0.25",
                    "--output-dir", str(out), "--seed", "3")
    assert pruned.exit_code == 0, pruned.output
    table = invoke("score", "--model", str(out), "--scorer", "random", "--seed", "3")
    assert table.exit_code == 0, table.output
    rows = [line.split() for line in table.output.strip().splitlines()[2:]]
    assert [row[0] for row in rows] == ["0", "1"]
    assert sum(row[1:].count("-") for row in rows) == 2
    assert all(len(row) == 5 for row in rows)


@pytest.mark.parametrize(("mode", "export"), [("remove", "compact"), ("mask", "compact"), ("remove", "dense")])
def test_prune_removes_the_heads_selection_picks_and_saves(tiny_assets, mode, export):
    from sentinel_core.model_io import load_model

    out = tiny_assets["tmp"] / f"out-{mode}-{export}"
    result = invoke("prune", "--model", tiny_assets["model"], "--scorer", "random", "--pruning-percent", "0.5",
                    "--prune-strategy", "per-layer", "--prune-mode", mode, "--export", export,
                    "--output-dir", str(out), "--seed", "11")
    assert result.exit_code == 0, result.output
    summary = [line for line in result.output.splitlines() if "heads" in line]
    assert len(summary) == 1 and "4 heads" in summary[0] and "8 -> 4 of 8" in summary[0], result.output

    original, _ = load_model(tiny_assets["model"])
    random_scores = random_scorer.random_scores(model=original, config=ExperimentConfig(seed=11))
    expected = select_heads(random_scores.scores, get_head_map(original), 0.5, scope="per-layer", normalize=False)
    assert sum(len(v) for v in expected.values()) == 4

    if export == "dense":
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(out)
        for layer, heads in expected.items():
            weight = plain.transformer.h[layer].attn.c_proj.weight
            for head in heads:
                assert not weight[head * 8:(head + 1) * 8].any()
        return
    saved, _ = load_model(out)
    head_map = get_head_map(saved)
    for layer in range(2):
        gone = set(range(4)) - set(head_map.active(layer))
        assert sorted(gone) == expected.get(layer, [])
        if mode == "mask":
            assert head_map.masked(layer) == expected.get(layer, [])


def test_prune_with_an_unknown_scorer_is_one_error_line(tiny_assets):
    result = invoke("prune", "--model", tiny_assets["model"], "--scorer", "nope", "--pruning-percent", "0.5",
                    "--output-dir", str(tiny_assets["tmp"] / "x"))
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("Error: unknown scorer 'nope'; available:")
