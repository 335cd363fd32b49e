"""The measures behind ``gradient`` and ``entropy-gap``, checked against independent computations,
and constructed models where the right layer is known in advance."""

from __future__ import annotations

import copy
import math

import torch
from sentinel_growth.entropy import layer_entropies
from sentinel_growth.gain import candidate_gains

from sentinel_core import plugins
from sentinel_core.surgery import get_head_map, grow_heads, prune_heads


def _batches(n: int = 2, seed: int = 0, vocab: int = 100, length: int = 12):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(vocab, (2, length), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ gradient


def test_candidate_gain_matches_activations_and_finite_differences(build):
    model = build.gpt2(n_layer=2, n_head=4, n_embd=16, vocab_size=50).double()
    prune_heads(model, {0: [1], 1: [0, 2]})
    batches = _batches(2, vocab=50, length=8)
    gains = candidate_gains(model, batches, candidates=2, init_std=0.05, seed=9)
    assert torch.allclose(gains.per_layer, gains.per_candidate.mean(dim=1))

    # The same candidates, grown independently.
    probe = copy.deepcopy(model)
    new = grow_heads(probe, {0: 2, 1: 2}, init_std=0.05, generator=torch.Generator().manual_seed(9))
    head_map = get_head_map(probe)

    def loss_of(batch):
        # Cross-entropy in float64 by hand: transformers' own loss upcasts only to float32,
        # too coarse for a finite difference.
        logits = probe(input_ids=batch["input_ids"]).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 batch["labels"][:, 1:].reshape(-1))

    # Route 1: for a linear output projection y = x W, dL/dW = x^T dL/dy, from activations alone.
    inputs, grads = {}, {}
    handles = []
    for layer, block in enumerate(probe.transformer.h):
        def keep(module, args, output, layer=layer):
            inputs[layer] = args[0].detach()
            output.register_hook(lambda g: grads.__setitem__(layer, g.detach()))
        handles.append(block.attn.c_proj.register_forward_hook(keep))
    per_head = {}
    for batch in batches:
        loss_of(batch).backward()
        for layer in range(2):
            hd = probe.transformer.h[layer].attn.head_dim
            for candidate, head in enumerate(new[layer]):
                slot = head_map.layers[layer].index(head)
                x = inputs[layer][..., slot * hd:(slot + 1) * hd].reshape(-1, hd)
                g = x.T @ grads[layer].reshape(-1, grads[layer].shape[-1]) / len(batches)
                per_head[layer, candidate] = per_head.get((layer, candidate), 0) + g
    for handle in handles:
        handle.remove()
    probe.zero_grad()
    for (layer, candidate), g in per_head.items():
        assert math.isclose(float(gains.per_candidate[layer, candidate]), float(g.pow(2).sum()), rel_tol=1e-5)

    # Route 2: a central finite difference of the loss along the unit direction u = G / |G|
    # must equal |G| = sqrt(gain).
    eps = 1e-4
    for layer, candidate in [(0, 1), (1, 0)]:
        attn = probe.transformer.h[layer].attn
        slot = head_map.layers[layer].index(new[layer][candidate])
        rows = attn.c_proj.weight.data[slot * attn.head_dim:(slot + 1) * attn.head_dim]
        assert torch.count_nonzero(rows) == 0
        g = per_head[layer, candidate]
        u = g / g.norm()
        with torch.no_grad():
            rows.copy_(eps * u)
            up = sum(float(loss_of(b)) for b in batches) / len(batches)
            rows.copy_(-eps * u)
            down = sum(float(loss_of(b)) for b in batches) / len(batches)
            rows.zero_()
        assert math.isclose((up - down) / (2 * eps), math.sqrt(float(gains.per_candidate[layer, candidate])),
                            rel_tol=1e-4)


def test_candidate_gain_leaves_the_model_untouched(build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1]})
    model.train()
    before, head_map = _state(model), get_head_map(model)
    flags = [p.requires_grad for p in model.parameters()]
    candidate_gains(model, _batches(1), candidates=3)
    assert get_head_map(model) == head_map
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training


def test_gradient_strategy_grows_where_a_new_head_can_act(growth_plugin, build):
    # Layers 0 and 2 see an all-zero input (their ln_1 is zeroed), so a fresh head there has zero
    # values and its output weights get zero gradient: only layer 1 can gain from a head.
    model = build.gpt2(n_layer=3, n_head=4)
    for layer in (0, 2):
        ln = model.transformer.h[layer].ln_1
        ln.weight.data.zero_()
        ln.bias.data.zero_()
    prune_heads(model, {0: [0, 1], 1: [2, 3], 2: [1, 2]})
    config = build.config(growth_strategy="gradient", growth_percent=1 / 6)  # 2 heads
    result = plugins.grow_heads("gradient", model=model, data=build.data(), config=config)
    scores = result.extra["layer_scores"]
    assert scores[0] == 0.0 and scores[2] == 0.0 and scores[1] > 0
    assert result.heads == {1: [4, 5]}


def test_gradient_strategy_spills_to_the_next_best_layer_when_full(growth_plugin, build):
    model = build.gpt2(n_layer=3, n_head=4)
    for layer in (0, 2):
        ln = model.transformer.h[layer].ln_1
        ln.weight.data.zero_()
        ln.bias.data.zero_()
    prune_heads(model, {0: [0, 1], 1: [3], 2: [1, 2]})  # layer 1 has room for one head only
    config = build.config(growth_strategy="gradient", growth_percent=1 / 6)
    result = plugins.grow_heads("gradient", model=model, data=build.data(), config=config)
    assert result.heads[1] == [4]
    assert result.count == 2  # the second head went to a zero-gain layer: lower layer on the tie
    assert result.heads.get(0) == [4]


# ------------------------------------------------------------------ entropy


def _manual_entropies(model, batches):
    """Per layer, mean over active heads of the normalised entropy, from output_attentions under eager."""
    m = copy.deepcopy(model)
    m.set_attn_implementation("eager")
    m.eval()
    head_map = get_head_map(m)
    sums = None
    count = 0
    with torch.no_grad():
        for batch in batches:
            attentions = m(input_ids=batch["input_ids"], output_attentions=True).attentions
            if sums is None:
                sums = [torch.zeros(a.shape[1], dtype=torch.float64) for a in attentions]
            t_len = batch["input_ids"].shape[1]
            for layer, probs in enumerate(attentions):
                for t in range(1, t_len):
                    p = probs[:, :, t, : t + 1].double()
                    h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1) / math.log(t + 1)  # [B, S]
                    sums[layer] += h.sum(0)
            count += batch["input_ids"].shape[0] * (t_len - 1)
    out = []
    for layer, slots in enumerate(head_map.layers):
        active = set(head_map.active(layer))
        values = [float(sums[layer][s] / count) for s, head in enumerate(slots) if head in active]
        out.append(sum(values) / len(values))
    return out


def test_layer_entropy_matches_a_direct_computation(build):
    model = build.gpt2(n_layer=2, n_head=4)
    # Larger query/key weights make the attention far from uniform, so the check has teeth.
    for block in model.transformer.h:
        block.attn.c_attn.weight.data[:, :64] *= 30
    prune_heads(model, {0: [2]})
    batches = _batches(2)
    measured = layer_entropies(model, batches)
    expected = _manual_entropies(model, batches)
    assert max(expected) < 0.95
    for a, b in zip(measured, expected, strict=True):
        assert math.isclose(a, b, rel_tol=1e-5)


def test_layer_entropy_ignores_masked_heads_and_restores_the_model(build):
    from sentinel_core.surgery import mask_heads

    model = build.gpt2(n_layer=2, n_head=4)
    c_attn = model.transformer.h[1].attn.c_attn
    c_attn.weight.data[:, :64] *= 30
    hd = 8
    # Head 0 of layer 1 attends uniformly (zero query), the others sharply; masking head 0 must drop it.
    c_attn.weight.data[:, 0:hd] = 0
    c_attn.bias.data[0:hd] = 0
    batches = _batches(1)
    with_uniform = layer_entropies(model, batches)[1]
    mask_heads(model, {1: [0]})
    model.train()
    impl = model.config._attn_implementation
    without = layer_entropies(model, batches)[1]
    assert without < with_uniform
    assert math.isclose(without, _manual_entropies(model, batches)[1], rel_tol=1e-5)
    assert model.config._attn_implementation == impl == "sdpa"
    assert model.training


def test_entropy_gap_grows_the_layer_whose_heads_attend_uniformly(growth_plugin, build):
    model = build.gpt2(n_layer=3, n_head=4)
    for block in model.transformer.h:
        block.attn.c_attn.weight.data[:, :64] *= 30
    prune_heads(model, {0: [0, 1], 1: [1, 2], 2: [0, 3]})
    # Zero query and key weights in layer 2: every surviving head there attends uniformly.
    attn = model.transformer.h[2].attn
    width = attn.split_size
    attn.c_attn.weight.data[:, : 2 * width] = 0
    attn.c_attn.bias.data[: 2 * width] = 0
    config = build.config(growth_strategy="entropy-gap", growth_percent=1 / 6)
    result = plugins.grow_heads("entropy-gap", model=model, data=build.data(), config=config)
    scores = result.extra["layer_scores"]
    assert math.isclose(scores[2], 1.0, rel_tol=1e-6)
    assert max(scores[0], scores[1]) < 0.99
    assert result.heads == {2: [4, 5]}


def test_a_layer_with_no_heads_counts_as_fully_diffuse(build):
    model = build.gpt2(n_layer=2, n_head=4)
    prune_heads(model, {1: [0, 1, 2, 3]})
    assert layer_entropies(model, _batches(1))[1] == 1.0
