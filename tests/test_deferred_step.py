"""The non-finite skip decided on the device (fused AdamW's ``found_inf``) against the host's
decision and against plain torch references; the step's logs read only when used."""

from __future__ import annotations

import math

import pytest
import torch
from test_training import Recorder, config, recording, reference_training
from training_fixtures import make_data, make_model, state_equal

from sentinel_core.training import TrainerCallback, deferred_step, train
from sentinel_core.training.deferred_step import PendingStep, StepLogs, non_finite, step_unless


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_device_flag_is_one_exactly_for_a_non_finite_loss_or_norm():
    one, inf, nan = torch.tensor(1.0), torch.tensor(math.inf), torch.tensor(math.nan)
    assert [float(non_finite(a, b)) for a, b in ((one, one), (inf, one), (one, inf), (nan, one), (one, nan))] \
        == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert non_finite(one, one).dtype == torch.float32  # what the fused kernel reads


def test_a_flagged_step_changes_nothing_and_the_next_matches_an_optimizer_that_never_saw_it():
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    reference = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    ours = torch.optim.AdamW(weights, lr=1e-2, fused=True)
    plain = torch.optim.AdamW(reference, lr=1e-2, fused=True)
    grads = [[torch.randn_like(w) for w in weights] for _ in range(4)]
    grads[2][0][1, 1] = math.inf
    for i, step_grads in enumerate(grads):
        for w, g in zip(weights, step_grads, strict=True):
            w.grad = g.clone()
        flag = non_finite(torch.tensor(0.5), torch.linalg.vector_norm(torch.cat([g.flatten() for g in step_grads])))
        before = [w.detach().clone() for w in weights], {k: v.clone() for k, v in ours.state[weights[0]].items()} \
            if i else None
        step_unless(ours, flag)
        assert not hasattr(ours, "found_inf")  # no stale flag for a later step
        if i == 2:  # skipped: weights and every optimizer state tensor (step count included) unchanged
            assert all(torch.equal(a, b) for a, b in zip(before[0], weights, strict=True))
            assert all(torch.equal(before[1][k], ours.state[weights[0]][k]) for k in before[1])
            continue
        for w, g in zip(reference, step_grads, strict=True):
            w.grad = g.clone()
        plain.step()
        assert all(torch.equal(a, b) for a, b in zip(weights, reference, strict=True))
    assert float(ours.state[weights[0]]["step"]) == 3


class InfGradientAt:
    """Makes one weight's gradient infinite at the given backward passes (1-based): the loss stays
    finite, only the gradient norm says the step is bad."""

    def __init__(self, calls):
        self.bad, self.calls = set(calls), 0

    def __call__(self, grad):
        self.calls += 1
        return torch.full_like(grad, math.inf) if self.calls in self.bad else grad


class OptimizerState(TrainerCallback):
    name = "optimizer-state"

    def __init__(self, param):
        self.param, self.seen = param, {}

    def on_step_end(self, state, context, logs):
        inner = getattr(context.optimizer, "optimizer", context.optimizer)
        entry = inner.state[self.param]
        self.seen[state.step] = (float(entry["step"]), entry["exp_avg"].clone(), entry["exp_avg_sq"].clone())


@pytest.mark.parametrize("host_sync", [False, True], ids=["device", "host"])
def test_an_inf_gradient_step_is_skipped_on_the_device_as_on_the_host(tmp_path, monkeypatch, host_sync):
    monkeypatch.setattr(deferred_step, "HOST_SYNC_EVERY_STEP", host_sync)
    data, cfg = make_data(64), config(tmp_path, max_steps=6)
    model = make_model(seed=0)
    param = model.transformer.h[0].mlp.c_fc.weight
    handle = param.register_hook(InfGradientAt({3}))
    watch = OptimizerState(param)
    try:
        with recording(Recorder(model=model)) as rec:
            result = train(model, data, cfg, stage="fine_tune", callbacks=[watch])
    finally:
        handle.remove()
    steps = rec.steps()
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert [bool(e.values.get("skipped")) for e in steps] == [False, False, True, False, False, False]
    assert math.isfinite(steps[2].values["loss"]) and not math.isfinite(steps[2].values["grad_norm"])
    assert result.extra["skipped_steps"] == 1 and result.extra["rollbacks"] == 0
    # The skipped step left the weights and AdamW's state (moments, step count) alone.
    assert state_equal(rec.snapshots[2], rec.snapshots[3])
    assert watch.seen[3][0] == watch.seen[2][0] == 2.0 and watch.seen[4][0] == 3.0
    assert torch.equal(watch.seen[3][1], watch.seen[2][1]) and torch.equal(watch.seen[3][2], watch.seen[2][2])
    # ...and every later step is the plain recipe that skipped step 3 (same AdamW kernel).
    reference = make_model(seed=0)
    ref_losses = reference_training(reference, data, cfg, 6, skip={3}, fused=not host_sync)
    assert [round(e.values["loss"], 5) for e in steps] == [round(v, 5) for v in ref_losses]
    assert state_equal(rec.snapshots[6], reference.state_dict(), atol=1e-6)


def test_step_logs_read_the_device_only_for_what_the_host_does_not_know():
    reads = []

    class Counting(PendingStep):
        def read(self):
            reads.append(1)
            return super().read()

    pending = Counting(torch.tensor([2.0, 0.5, 1.5, 0.0]), ["aux"])
    pending.step, pending.known = 7, {"epoch": 0.5, "tokens": 64, "lr": 1e-3}
    logs = StepLogs(pending.known, lambda: pending.values(math.exp))
    assert logs["lr"] == 1e-3 and logs["tokens"] == 64 and not reads
    assert logs["loss"] == 2.0 and logs["aux"] == 0.5 and logs["grad_norm"] == 1.5
    assert logs["perplexity"] == pytest.approx(math.exp(2.0)) and "skipped" not in logs
    assert list(logs) == ["loss", "perplexity", "grad_norm", "epoch", "tokens", "aux", "lr"]
    flagged = PendingStep(torch.tensor([math.nan, 1.0, 1.0]), [])
    flagged.known = {"epoch": 1.0, "tokens": 1}
    assert flagged.skipped and flagged.values(None)["skipped"] is True and flagged.values(None)["perplexity"] is None
