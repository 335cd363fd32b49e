"""The optional gate warm-up of grown heads: the ramp, its end, real training, resume mid-ramp."""

from __future__ import annotations

import copy

import pytest
import torch
from sentinel_growth.warmup import CONFIG_KEY, GateWarmup, pending_warmup, ramp

from sentinel_core import plugins
from sentinel_core.model_io import load_model, save_model
from sentinel_core.surgery import gates, get_head_map, prune_heads
from sentinel_core.training import TrainerState, TrainingContext


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


def _context(model, **extra):
    return TrainingContext(model=model, config=None, stage="fine_tune_growth", extra=extra)


def test_ramp_values():
    assert [ramp(k, 3) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert ramp(0, 1) == 0.5


def test_warmup_off_by_default(growth_plugin, build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    heads = plugins.grow_heads("balanced", model=model, data=build.data(), config=build.config()).heads
    assert _new_head_gates(model, heads) == [1.0, 1.0]
    assert pending_warmup(model) is None
    assert growth_plugin.register_training_callbacks(model=model) == []


def test_gates_follow_the_loops_steps_and_rollbacks(growth_plugin, build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    x = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    heads = _grow(build, model, 3)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-6)  # zero output rows
    assert _new_head_gates(model, heads) == [0.25, 0.25]
    (warmup,) = growth_plugin.register_training_callbacks(model=model)
    assert isinstance(warmup, GateWarmup) and warmup.steps == 3
    context = _context(model)
    warmup.on_train_begin(TrainerState(step=0), context)
    assert _new_head_gates(model, heads) == [0.25, 0.25]
    warmup.on_step_end(TrainerState(step=1), context, {})
    assert _new_head_gates(model, heads) == [0.5, 0.5]
    warmup.on_step_end(TrainerState(step=2), context, {})
    assert _new_head_gates(model, heads) == [0.75, 0.75]
    warmup.on_load(TrainerState(step=0), context, "step-00000000")  # a rollback to step 0
    assert _new_head_gates(model, heads) == [0.25, 0.25]
    warmup.on_step_end(TrainerState(step=3), context, {})
    assert _new_head_gates(model, heads) == [1.0, 1.0]
    # Fully on: the gate hook is off again, so the model runs the stock forward.
    assert not any(getattr(b.attn.c_proj, "_sentinel_gate_active", False) for b in model.transformer.h)


def test_the_end_folds_the_best_steps_gate_into_the_weights(growth_plugin, build):
    model = build.gpt2()
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    heads = _grow(build, model, 4)
    (warmup,) = growth_plugin.register_training_callbacks(model=model)
    warmup.on_step_end(TrainerState(step=2), _context(model), {})
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
    warmup.on_train_end(TrainerState(step=3, best_step=1), _context(model, restored_best=True))
    assert pending_warmup(model) is None and not hasattr(model.config, CONFIG_KEY)
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
                          output_dir=str(tmp_path / "run"), quiet=True)
    try:
        result = train(model, build.data(blocks=16), config, stage="fine_tune")  # any stage, any fine-tuner
    finally:
        handle.remove()
    assert result.steps == 4
    assert seen == [round(1 / 3, 6), round(2 / 3, 6), 1.0, 1.0]
    assert pending_warmup(model) is None
    assert _new_head_gates(model, heads) == [1.0] * sum(len(v) for v in heads.values())
    model.eval().cpu()  # train() put it on the best device; the reload below is on the CPU
    save_model(model, None, tmp_path / "saved")
    reloaded, _ = load_model(tmp_path / "saved")
    x = torch.randint(100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)


def test_a_run_stopped_mid_ramp_resumes_to_the_same_weights(growth_plugin, build, tmp_path):
    """The ramp travels with the saved model and follows the resumed step: an interrupted run ends
    where an uninterrupted one does (the pipeline reloads its grow checkpoint the same way)."""
    from sentinel_core.hookspecs import hookimpl
    from sentinel_core.plugins import pm
    from sentinel_core.training import train

    grown = build.gpt2()
    prune_heads(grown, {0: [0, 1], 1: [2, 3]})
    _grow(build, grown, 4)
    save_model(grown, None, tmp_path / "grown")
    data = build.data(blocks=32)

    def config(name):
        return build.config(max_steps=6, eval_every=3, patience=0, checkpoint_every=2, learning_rate=1e-2,
                            output_dir=str(tmp_path / name), quiet=True, device="cpu")

    whole, _ = load_model(tmp_path / "grown")
    train(whole, data, config("whole"), stage="fine_tune_growth")

    class StopAtStep3:
        @hookimpl
        def on_metric(self, event):
            if event.step == 3 and "loss" in event.values:
                raise KeyboardInterrupt

    cut, _ = load_model(tmp_path / "grown")
    stopper = StopAtStep3()
    pm.register(stopper)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cut, data, config("cut"), stage="fine_tune_growth")
    finally:
        pm.unregister(stopper)
    resumed, _ = load_model(tmp_path / "grown")
    assert pending_warmup(resumed) is not None
    train(resumed, data, config("cut"), stage="fine_tune_growth")
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert pending_warmup(resumed) is None


def test_the_plugin_adds_its_callback_through_the_training_hook(growth_plugin, build):
    from sentinel_core.plugins import collect_training_callbacks, pm

    def hook_names(plugin):
        return sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])

    assert hook_names(growth_plugin) == ["register_strategies", "register_training_callbacks"]
    model = build.gpt2()
    prune_heads(model, {0: [0, 1]})
    assert collect_training_callbacks(model=model, config=None, stage="x") == []
    _grow(build, model, 1)
    assert [c.name for c in collect_training_callbacks(model=model, config=None, stage="x")] == [GateWarmup.name]
