"""The training loop's recipe, checked against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from training_fixtures import VOCAB, make_data, make_model, state_equal
from transformers import get_cosine_schedule_with_warmup

from sentinel_core.config import ExperimentConfig
from sentinel_core.errors import SentinelError
from sentinel_core.hookspecs import hookimpl
from sentinel_core.plugins import pm
from sentinel_core.training import (
    causal_lm_loss,
    cosine_schedule,
    resolve_mixed_precision,
    step_checkpoint_dir,
    train,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spin-waiting
    made these tests 20x slower; the setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recorder:
    """Collects the events of one stage; optionally snapshots the model at every step event."""

    def __init__(self, stage: str = "fine_tune", model=None):
        self.stage, self.model = stage, model
        self.events = []
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl
    def on_metric(self, event):
        if event.stage != self.stage:
            return
        self.events.append(event)
        if self.model is not None and "loss" in event.values:
            self.snapshots[event.step] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def steps(self):
        return [e for e in self.events if "loss" in e.values]

    def evals(self):
        return [e for e in self.events if "eval_loss" in e.values]


class recording:
    def __init__(self, recorder):
        self.recorder = recorder

    def __enter__(self):
        pm.register(self.recorder)
        return self.recorder

    def __exit__(self, *exc):
        pm.unregister(self.recorder)


def config(tmp_path, **overrides) -> ExperimentConfig:
    values = dict(device="cpu", batch_size=4, learning_rate=3e-3, num_epochs=1, eval_every=100, patience=0,
                  warmup_fraction=0.25, checkpoint_every=100, output_dir=str(tmp_path / "run"), quiet=True, seed=5,
                  max_eval_blocks=4)
    values.update(overrides)
    return ExperimentConfig(**values)


def reference_training(model, data, cfg, n_steps, *, scales=None, weight_decay=0.01, skip=(), fused=True):
    """The documented recipe written out with plain torch/transformers: AdamW with decay only on
    >= 2-D parameters, HF's cosine schedule, clipping, the model's own loss, the seeded order.
    Steps in ``skip`` (1-based) get no optimizer step, as the loop skips a non-finite one."""
    scales = scales or {}
    groups = []
    for name, param in model.named_parameters():
        groups.append({"params": [param], "weight_decay": weight_decay if param.ndim >= 2 else 0.0,
                       "lr": cfg.learning_rate * scales.get(name, 1.0)})
    # Fused, as train() builds it: fused and foreach AdamW round differently (~3e-6 apart after 6 steps).
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=fused or None)
    blocks = data.train.blocks
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps
    total = min(cfg.num_epochs * (blocks.shape[0] // global_batch), cfg.max_steps or 10**9)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_fraction * total), total)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    losses = []
    for step in range(n_steps):
        ids = blocks[order[step * global_batch:(step + 1) * global_batch]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step + 1 not in skip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_cosine_schedule_matches_transformers():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, 7, 50)
    for step in range(50):
        assert cosine_schedule(step, 50, 7) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_causal_lm_loss_ignores_padding_and_matches_the_model_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, 1]])
    total, count = causal_lm_loss(logits, labels)
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])
            if target != -100:
                expected -= float(torch.log_softmax(logits[b, t], -1)[target])
                n += 1
    assert int(count) == n == 6
    assert float(total) == pytest.approx(expected, rel=1e-6)

    model = make_model().eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    masked = ids.clone()
    masked[0, 10:] = -100
    with torch.no_grad():
        hf = model(input_ids=ids, labels=masked).loss
        total, count = causal_lm_loss(model(input_ids=ids).logits, masked)
    assert float(total / count) == pytest.approx(float(hf), rel=1e-5)


def test_steps_match_a_plain_torch_reference(tmp_path):
    data = make_data(64)
    cfg = config(tmp_path)
    model = make_model(seed=0)
    with recording(Recorder(model=model)) as rec:
        result = train(model, data, cfg, stage="fine_tune")
    reference = make_model(seed=0)
    ref_losses = reference_training(reference, data, cfg, 6)
    assert [round(e.values["loss"], 5) for e in rec.steps()[:6]] == [round(v, 5) for v in ref_losses]
    assert state_equal(rec.snapshots[6], reference.state_dict(), atol=1e-6)
    assert result.steps == 16 == len(rec.steps())
    assert result.tokens == 16 * 4 * 16
    lrs = [e.values["lr"] for e in rec.steps()]
    assert lrs == pytest.approx([cfg.learning_rate * cosine_schedule(s, 16, 4) for s in range(16)])


def test_training_lowers_held_out_loss_and_keeps_the_best(tmp_path):
    data = make_data(96)
    cfg = config(tmp_path, num_epochs=2, eval_every=4, learning_rate=5e-3)
    model = make_model(seed=0).eval()
    with recording(Recorder(model=model)) as rec:
        result = train(model, data, cfg, stage="fine_tune")
    evals = {e.step: e.values["eval_loss"] for e in rec.evals()}
    assert sorted(evals) == list(range(0, 49, 4))
    assert evals[48] < evals[0] - 1.0  # the toy language is learnable: a real drop, not noise
    best_step = min(evals, key=evals.get)
    assert result.best_eval_loss == pytest.approx(evals[best_step])
    assert result.extra["best_step"] == best_step
    if best_step == 0:
        pytest.fail("training never improved on the starting model")
    assert state_equal(model.state_dict(), rec.snapshots[best_step])
    assert math.isfinite(result.final_train_loss) and result.seconds > 0
    assert not model.training  # back in the mode it came in


def test_early_stopping_and_best_restore(tmp_path):
    data = make_data(64, learnable=False)
    cfg = config(tmp_path, learning_rate=2e-2, eval_every=1, patience=2, warmup_fraction=0.0)
    model = make_model(seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with recording(Recorder(model=model)) as rec:
        result = train(model, data, cfg, stage="fine_tune")
    rec.snapshots[0] = start
    losses = [(e.step, e.values["eval_loss"]) for e in rec.evals()]
    best, since, stop = math.inf, 0, None
    for step, loss in losses:
        if loss < best:
            best, since, best_step = loss, 0, step
        else:
            since += 1
        if since >= 2:
            stop = step
            break
    assert stop is not None, "random tokens at a high rate should stop improving"
    assert result.extra["stopped_early"] and result.steps == stop == losses[-1][0] < 16
    assert result.extra["best_step"] == best_step
    assert state_equal(model.state_dict(), rec.snapshots[best_step])


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    data = make_data(64)
    runs = []
    for batch, accumulation in ((4, 1), (1, 4)):
        model = make_model(seed=0)
        cfg = config(tmp_path / f"b{batch}", batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=6)
        with recording(Recorder()) as rec:
            train(model, data, cfg, stage="fine_tune")
        runs.append(([e.values["loss"] for e in rec.steps()], model.state_dict()))
    for losses, state in runs[1:]:
        assert losses == pytest.approx(runs[0][0], abs=1e-6)
        # Adam divides by sqrt(v): near-zero gradients (e.g. key biases) turn summation-order
        # rounding into ~1e-6 differences.
        assert state_equal(state, runs[0][1], atol=1e-5)


def test_param_groups_and_multiplier_set_the_real_step_sizes(tmp_path):
    data = make_data(64)
    cfg = config(tmp_path, max_steps=4)
    model = make_model(seed=0)
    head = [model.transformer.ln_f.weight, model.transformer.ln_f.bias, model.transformer.h[1].mlp.c_fc.weight]
    groups = [{"name": "touched", "params": head, "lr_scale": 2.0}, {"name": "ghost", "params": [], "lr_scale": 3.0}]
    calls = []

    def multiplier(step, total, name):
        calls.append((step, total, name))
        return 1.5 if name == "touched" else 1.0

    with recording(Recorder(model=model)) as rec:
        train(model, data, cfg, stage="fine_tune", param_groups=groups, lr_multiplier=multiplier)
    for event in rec.steps():
        base = event.values["lr/base"]
        assert base == pytest.approx(cfg.learning_rate * cosine_schedule(event.step - 1, 4, 1))
        assert event.values["lr/touched"] == pytest.approx(base * 3.0)
        assert event.values["lr/ghost"] == pytest.approx(base * 3.0)
    assert {(s, t) for s, t, _ in calls} == {(s, 4) for s in range(4)}

    reference = make_model(seed=0)
    names = {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.1.mlp.c_fc.weight"}
    reference_training(reference, data, cfg, 4, scales={n: 3.0 for n in names})
    assert state_equal(rec.snapshots[4], reference.state_dict(), atol=1e-6)
    plain = make_model(seed=0)
    reference_training(plain, data, cfg, 4)
    assert not state_equal(rec.snapshots[4], plain.state_dict(), atol=1e-6)


@pytest.mark.parametrize("groups, message", [
    (lambda m: [{"name": "a", "params": [m.lm_head.weight]}, {"name": "b", "params": [m.lm_head.weight]}],
     "in param groups"),
    (lambda m: [{"name": "a", "params": [torch.nn.Parameter(torch.zeros(3))]}], "not a parameter"),
    (lambda m: [{"name": "a", "params": [], "lr_scale": 0}], "lr_scale"),
    (lambda m: [{"params": []}], "must be a dict"),
])
def test_bad_param_groups_are_user_errors(tmp_path, groups, message):
    model = make_model()
    with pytest.raises(SentinelError, match=message):
        train(model, make_data(16), config(tmp_path), stage="fine_tune", param_groups=groups(model))


def test_too_little_data_and_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(SentinelError, match="fewer than one global batch"):
        train(make_model(), make_data(3), config(tmp_path), stage="fine_tune")
    with pytest.raises(SentinelError, match="stage"):
        train(make_model(), make_data(16), config(tmp_path), stage="../x")
    with pytest.raises(SentinelError, match="max_bad_steps"):
        train(make_model(), make_data(16), config(tmp_path, options={"max_bad_steps": 0}), stage="fine_tune")


def test_mixed_precision_resolution():
    assert resolve_mixed_precision("auto", "cpu") == "no"
    assert resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert resolve_mixed_precision("no", "cuda") == "no"
    with pytest.raises(SentinelError, match="fp16"):
        resolve_mixed_precision("fp16", "cpu")


def test_bf16_autocast_then_full_precision_in_one_process(tmp_path):
    model = make_model(seed=0)
    seen = []
    handle = model.transformer.h[0].mlp.c_fc.register_forward_hook(
        lambda mod, args, out: seen.append(out.dtype) if mod.training else None)
    try:
        result = train(model, make_data(16), config(tmp_path / "a", mixed_precision="bf16", max_steps=2),
                       stage="fine_tune")
    finally:
        handle.remove()
    assert torch.bfloat16 in seen and math.isfinite(result.final_train_loss)
    assert result.extra["mixed_precision"] == "bf16"
    # The autocast wrapper Accelerate puts on forward is taken off again.
    assert "_original_forward" not in model.__dict__ and not hasattr(model.forward, "__wrapped__")
    assert model.transformer.wte.weight.dtype == torch.float32
    seen.clear()
    handle = model.transformer.h[0].mlp.c_fc.register_forward_hook(
        lambda mod, args, out: seen.append(out.dtype) if mod.training else None)
    try:
        result = train(model, make_data(16), config(tmp_path / "b", max_steps=2), stage="fine_tune")
    finally:
        handle.remove()
    assert set(seen) == {torch.float32} and result.extra["mixed_precision"] == "no"


def test_finished_stage_leaves_only_a_final_record(tmp_path):
    cfg = config(tmp_path, max_steps=3, checkpoint_every=1)
    train(make_model(), make_data(16), cfg, stage="fine_tune")
    folder = step_checkpoint_dir(cfg.output_dir, "fine_tune")
    assert sorted(p.name for p in folder.iterdir()) == ["final"]
    assert sorted(p.name for p in (folder / "final").iterdir()) == ["model.safetensors", "trainer_state.json"]
