"""The optional gate warm-up of grown heads: the ramp, its end, and a real training run."""

from __future__ import annotations

import copy

import pytest
import torch
from sentinel_growth.warmup import active_warmups, ramp

from sentinel_core import plugins
from sentinel_core.model_io import load_model, save_model
from sentinel_core.plugins import emit
from sentinel_core.surgery import gates, get_head_map, prune_heads


def _new_head_gates(model, heads):
    """Gate value of every grown head, read from the surgery's buffer."""
    hm = get_head_map(model)
    out = []
    for layer, ids in sorted(heads.items()):
        proj = model.transformer.h[layer].attn.c_proj
        gate = gates.read_gate(proj, len(hm.layers[layer]))
        out += [float(gate[hm.layers[layer].index(i)]) for i in ids]
    return out


def _grow(build, model, steps):
    config = build.config(options={"growth_warmup_steps": steps})
    return plugins.grow_heads("balanced", model=model, data=build.data(), config=config).heads


@pytest.fixture(autouse=True)
def _no_leftover_warmups():
    yield
    for warmup in active_warmups():
        warmup.finish()


def test_ramp_values():
    assert [ramp(k, 3) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp(0, 1) == 0.5


def test_warmup_off_by_default(growth_plugin, build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    heads = plugins.grow_heads("balanced", model=model, data=build.data(), config=build.config()).heads
    assert _new_head_gates(model, heads) == [1.0, 1.0]
    assert active_warmups() == []


def test_gates_follow_the_reported_steps_of_the_bound_stage(growth_plugin, build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    x = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    heads = _grow(build, model, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)  # zero output rows
    assert _new_head_gates(model, heads) == [0.25, 0.25]
    emit("evaluate", label="pruned", loss=1.0)  # no step: not a training event, ignored
    assert _new_head_gates(model, heads) == [0.25, 0.25]
    emit("fine_tune_growth", 1, loss=2.0)
    assert _new_head_gates(model, heads) == [0.5, 0.5]
    emit("some_other_stage", 2, loss=2.0)  # bound to the first stage that reported a step
    assert _new_head_gates(model, heads) == [0.5, 0.5]
    emit("fine_tune_growth", 2, loss=2.0)
    assert _new_head_gates(model, heads) == [0.75, 0.75]
    emit("fine_tune_growth", 0, rollback=True)
    assert _new_head_gates(model, heads) == [0.25, 0.25]
    emit("fine_tune_growth", 3, loss=2.0)
    assert _new_head_gates(model, heads) == [1.0, 1.0]
    assert active_warmups() == []
    # Fully on: the gate hook is off again, so the model runs the stock forward.
    assert not any(getattr(b.attn.c_proj, "_sentinel_gate_active", False) for b in model.transformer.h)


def test_finish_folds_the_best_steps_gate_into_the_weights(growth_plugin, build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    heads = _grow(build, model, 4)
    emit("fine_tune_growth", 2, loss=2.0)
    # Stand-in for training: give the new heads non-zero output weights.
    hm = get_head_map(model)
    for layer, ids in heads.items():
        attn = model.transformer.h[layer].attn
        for head in ids:
            slot = hm.layers[layer].index(head)
            rows = attn.c_proj.weight.data[slot * attn.head_dim:(slot + 1) * attn.head_dim]
            rows.copy_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(slot)))
    # The loop restored the weights of step 1, which it evaluated with gate g(1) = 0.4.
    reference = copy.deepcopy(model)
    for layer, ids in heads.items():
        proj = reference.transformer.h[layer].attn.c_proj
        gate = gates.read_gate(proj, len(hm.layers[layer]))
        for head in ids:
            gate[hm.layers[layer].index(head)] = 0.4
        gates.write_gate(proj, gate)
    x = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x).logits
    emit("fine_tune_growth", 3, finished=True, best_step=1, restored_best=True)
    assert active_warmups() == []
    assert _new_head_gates(model, heads) == [1.0, 1.0]
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Without the fold the saved model would differ from the evaluated one:
    assert not torch.allclose(got, _unfolded(reference, x), atol=1e-4)


def _unfolded(reference, x):
    """Logits with the gates at 1 and the weights not folded: what a forgotten warm-up would save."""
    m = copy.deepcopy(reference)
    for block in m.transformer.h:
        proj = block.attn.c_proj
        gates.write_gate(proj, torch.ones_like(gates.read_gate(proj, proj.weight.shape[0] // block.attn.head_dim)))
    with torch.no_grad():
        return m(x).logits


def test_warmup_during_real_training_ends_resolved_and_reloads_exactly(growth_plugin, build, tmp_path):
    from sentinel_core.training import train

    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    heads = _grow(build, model, 2)
    layer, head = next(iter(sorted(heads.items())))
    head = head[0]
    proj = model.transformer.h[layer].attn.c_proj
    seen = []

    def record(module, args):
        if module.training:
            slot = get_head_map(model).layers[layer].index(head)
            seen.append(round(float(module.sentinel_gate[slot]), 6))

    handle = proj.register_forward_pre_hook(record)
    config = build.config(max_steps=4, eval_every=2, patience=0, checkpoint_every=100, learning_rate=1e-2,
                          output_dir=str(tmp_path / "run"), quiet=True, options={"growth_warmup_steps": 2})
    try:
        result = train(model, build.data(blocks=16), config, stage="fine_tune_growth")
    finally:
        handle.remove()
    assert result.steps == 4
    assert seen == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 1.0]
    assert active_warmups() == []
    assert _new_head_gates(model, heads) == [1.0] * sum(len(v) for v in heads.values())
    model.eval().cpu()  # train() put it on the best device; the reload below is on the CPU
    save_model(model, None, tmp_path / "saved")
    reloaded, _ = load_model(tmp_path / "saved")
    x = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_warmup_is_refused_under_multi_process_training(growth_plugin, build, monkeypatch):
    from sentinel_core.errors import SentinelError

    monkeypatch.setenv("WORLD_SIZE", "2")
    model = build.gpt2()
    prune_heads(model, {0: [0, 1]})
    with pytest.raises(SentinelError, match="growth_warmup_steps=2 is not supported with multi-process"):
        _grow(build, model, 2)
    assert get_head_map(model).grown(0) == []


def test_the_plugin_implements_only_its_strategy_hooks(growth_plugin, build):
    """The warm-up listens to metrics through a helper registered only while a ramp runs."""
    from sentinel_core.plugins import pm

    def hook_names(plugin):
        return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])

    assert hook_names(growth_plugin) == ["register_strategies"]
    model = build.gpt2()
    prune_heads(model, {0: [0, 1]})
    _grow(build, model, 1)
    assert pm.get_plugin("sentinel-growth-warmup") is not None
    emit("fine_tune_growth", 1, loss=1.0)  # g(1) = 1: the ramp is over
    assert active_warmups() == []
    assert pm.get_plugin("sentinel-growth-warmup") is None
