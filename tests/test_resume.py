"""Interrupted, crashed and diverging training: checkpoints, resume, skips and rollbacks."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_training import Recorder, recording
from training_fixtures import make_data, make_model, state_equal

from sentinel_core.config import ExperimentConfig
from sentinel_core.hookspecs import hookimpl
from sentinel_core.training import TrainingDivergedError, cosine_schedule, step_checkpoint_dir, train
from sentinel_core.training.checkpoints import list_step_checkpoints


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP's spin-waiting
    made these tests 20x slower; the setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STAGE = "fine_tune"
TOTAL = 12  # 48 blocks / (batch 2 x accumulation 2)


def config(output_dir, **overrides) -> ExperimentConfig:
    values = dict(device="cpu", batch_size=2, gradient_accumulation_steps=2, learning_rate=3e-3, num_epochs=1,
                  eval_every=3, checkpoint_every=4, patience=0, warmup_fraction=0.2, output_dir=str(output_dir),
                  quiet=True, seed=3, max_eval_blocks=4)
    values.update(overrides)
    return ExperimentConfig(**values)


def dropout_model():
    # Dropout makes the result depend on the random generators, so resume must restore them.
    return make_model(seed=0, dropout=0.1)


@pytest.fixture(scope="module")
def data():
    return make_data(48)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    model = dropout_model()
    with recording(Recorder()) as rec:
        result = train(model, data, config(tmp_path_factory.mktemp("ref")), stage=STAGE)
    return {"losses": {e.step: e.values["loss"] for e in rec.steps()},
            "evals": {e.step: e.values["eval_loss"] for e in rec.evals()},
            "state": model.state_dict(), "result": result}


class StopAt:
    """Raises KeyboardInterrupt (or sends SIGTERM) from on_metric once, at step ``k``."""

    def __init__(self, k, action="raise"):
        self.k, self.action, self.fired = k, action, False
        self.losses, self.evals = {}, {}

    @hookimpl
    def on_metric(self, event):
        if event.stage != STAGE:
            return
        if "eval_loss" in event.values:
            self.evals[event.step] = event.values["eval_loss"]
        if "loss" not in event.values:
            return
        self.losses[event.step] = event.values["loss"]
        if event.step == self.k and not self.fired:
            self.fired = True
            if self.action == "raise":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)


def resume_and_compare(output_dir, data, uninterrupted, first_losses, first_evals, resumed_from):
    model = dropout_model()  # the pipeline reloads the stage's starting model from checkpoints/<stage>
    with recording(Recorder()) as rec:
        result = train(model, data, config(output_dir), stage=STAGE)
    resumed = [e for e in rec.events if e.values.get("resumed")]
    assert resumed and resumed[0].values["resumed_from_step"] == resumed_from
    losses = {**first_losses, **{e.step: e.values["loss"] for e in rec.steps()}}
    evals = {**first_evals, **{e.step: e.values["eval_loss"] for e in rec.evals()}}
    assert sorted(losses) == list(range(1, TOTAL + 1))
    assert losses == pytest.approx(uninterrupted["losses"], abs=1e-6)
    assert evals == pytest.approx(uninterrupted["evals"], abs=1e-6)
    assert state_equal(model.state_dict(), uninterrupted["state"], atol=1e-6)
    assert result.steps == TOTAL
    assert result.best_eval_loss == pytest.approx(uninterrupted["result"].best_eval_loss, abs=1e-6)
    assert result.extra["best_step"] == uninterrupted["result"].extra["best_step"]
    return result


def test_keyboard_interrupt_saves_and_resume_matches(tmp_path, data, uninterrupted, capsys):
    out = tmp_path / "run"
    stopper = StopAt(5)
    with recording(stopper), pytest.raises(KeyboardInterrupt):
        train(dropout_model(), data, config(out), stage=STAGE)
    # Interrupted mid-epoch between checkpoints: the interrupt itself wrote step 5.
    steps = [s for s, _ in list_step_checkpoints(step_checkpoint_dir(out, STAGE))]
    assert steps[-1] == 5 and max(stopper.losses) == 5
    assert "Interrupted:" in capsys.readouterr().err
    resume_and_compare(out, data, uninterrupted, stopper.losses, stopper.evals, resumed_from=5)


def test_sigterm_stops_gracefully_and_says_how_to_resume(tmp_path, data, uninterrupted, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "experiment.json").write_text("{}")  # what `sentinel run` leaves in a run folder
    old_handler = signal.getsignal(signal.SIGTERM)
    stopper = StopAt(7, action="sigterm")
    with recording(stopper), pytest.raises(KeyboardInterrupt):
        train(dropout_model(), data, config(out), stage=STAGE)
    assert signal.getsignal(signal.SIGTERM) is old_handler
    assert f"Interrupted: resume with `sentinel run --resume {out}`" in capsys.readouterr().err
    assert max(stopper.losses) == 7
    resume_and_compare(out, data, uninterrupted, stopper.losses, stopper.evals, resumed_from=7)


class CrashAt:
    """A forward hook that raises at the n-th training forward pass: a crash, not an interrupt."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, module, args, output):
        if module.training:
            self.calls += 1
            if self.calls == self.n:
                raise RuntimeError("simulated crash")


def test_crash_resumes_from_the_last_periodic_checkpoint(tmp_path, data, uninterrupted):
    out = tmp_path / "run"
    model = dropout_model()
    handle = model.register_forward_hook(CrashAt(2 * 7 + 1))  # first micro-batch of step 8
    first = StopAt(-1)
    try:
        with recording(first), pytest.raises(RuntimeError, match="simulated crash"):
            train(model, data, config(out), stage=STAGE)
    finally:
        handle.remove()
    assert [s for s, _ in list_step_checkpoints(step_checkpoint_dir(out, STAGE))] == [0, 4]
    # Steps 5-7 ran before the crash but were not saved: the resumed run redoes them identically.
    kept = {s: v for s, v in first.losses.items() if s <= 4}
    kept_evals = {s: v for s, v in first.evals.items() if s <= 4}
    resume_and_compare(out, data, uninterrupted, kept, kept_evals, resumed_from=4)


class InterruptAt(CrashAt):
    """A KeyboardInterrupt in the middle of a step (as a second Ctrl-C would land)."""

    def __call__(self, module, args, output):
        if module.training:
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt


def test_interrupt_inside_a_step_saves_the_step_before_it(tmp_path, data, uninterrupted):
    out = tmp_path / "run"
    model = dropout_model()
    handle = model.register_forward_hook(InterruptAt(2 * 5 + 2))  # second micro-batch of step 6
    first = StopAt(-1)
    try:
        with recording(first), pytest.raises(KeyboardInterrupt):
            train(model, data, config(out), stage=STAGE)
    finally:
        handle.remove()
    # Step 6 had drawn dropout masks for its first micro-batch; the checkpoint keeps the
    # generators from before it, so the resumed step 6 draws the same ones.
    assert [s for s, _ in list_step_checkpoints(step_checkpoint_dir(out, STAGE))][-1] == 5
    resume_and_compare(out, data, uninterrupted, first.losses, first.evals, resumed_from=5)


def test_checkpoints_are_safetensors_and_json_and_rotate(tmp_path, data):
    out = tmp_path / "run"
    stopper = StopAt(9)
    with recording(stopper), pytest.raises(KeyboardInterrupt):
        train(dropout_model(), data, config(out, checkpoint_every=2), stage=STAGE)
    folder = step_checkpoint_dir(out, STAGE)
    assert [s for s, _ in list_step_checkpoints(folder)] == [8, 9]
    suffixes = {p.suffix for p in folder.rglob("*") if p.is_file()}
    assert suffixes == {".safetensors", ".json"}
    newest = folder / "step-00000009"
    weights = load_file(newest / "model.safetensors")
    assert "transformer.wte.weight" in weights and "lm_head.weight" not in weights  # tied: stored once
    optimizer = load_file(newest / "optimizer.safetensors")
    assert any(k.endswith("/exp_avg_sq") for k in optimizer)


def test_finished_stage_is_not_trained_again(tmp_path, data):
    out = tmp_path / "run"
    first_model = dropout_model()
    first = train(first_model, data, config(out, max_steps=4), stage=STAGE)
    model = dropout_model()
    with recording(Recorder()) as rec:
        result = train(model, data, config(out, max_steps=4), stage=STAGE)
    assert not rec.steps() and any(e.values.get("finished") for e in rec.events)
    assert state_equal(model.state_dict(), first_model.state_dict())
    assert (result.steps, result.best_eval_loss, result.extra) == (first.steps, first.best_eval_loss, first.extra)


def test_checkpoints_of_another_run_are_ignored(tmp_path, data, capsys):
    out = tmp_path / "run"
    with recording(StopAt(5)), pytest.raises(KeyboardInterrupt):
        train(dropout_model(), data, config(out), stage=STAGE)
    capsys.readouterr()
    other = make_model(seed=1, dropout=0.1)
    with recording(Recorder()) as rec:
        train(other, data, config(out, max_steps=3), stage=STAGE)
    assert "Ignoring the checkpoints" in capsys.readouterr().err
    assert [e.step for e in rec.steps()] == [1, 2, 3]
    with recording(Recorder()) as rec:  # resume=False starts afresh even over a matching checkpoint
        train(make_model(seed=1, dropout=0.1), data, config(out, max_steps=3), stage=STAGE, resume=False)
    assert [e.step for e in rec.steps()] == [1, 2, 3]


class NaNAt:
    """Makes the logits NaN at the given training forward passes (1-based)."""

    def __init__(self, calls):
        self.bad, self.calls = set(calls), 0

    def __call__(self, module, args, output):
        if not module.training:
            return None
        self.calls += 1
        if self.calls in self.bad or "all" in self.bad:
            output.logits = output.logits * float("nan")
        return output


def nan_config(output_dir, **overrides):
    return config(output_dir, batch_size=4, gradient_accumulation_steps=1, checkpoint_every=2, eval_every=100,
                  **overrides)


def test_non_finite_steps_are_skipped_then_rolled_back_with_a_lower_rate(tmp_path, data):
    model = make_model(seed=0)
    handle = model.register_forward_hook(NaNAt({5, 6, 7}))
    try:
        with recording(Recorder(model=model)) as rec:
            result = train(model, data, nan_config(tmp_path), stage=STAGE)
    finally:
        handle.remove()
    steps = rec.steps()
    first_pass = steps[:7]
    assert [e.step for e in first_pass] == list(range(1, 8))
    assert [bool(e.values.get("skipped")) for e in first_pass] == [False] * 4 + [True] * 3
    assert all(math.isnan(e.values["loss"]) for e in first_pass[4:])
    # Skipped steps leave the weights alone.
    snapshots = [e for e in rec.events if "loss" in e.values]
    assert snapshots  # the recorder snapshots by step; steps 4..7 are the first pass's
    rollbacks = [e for e in rec.events if e.values.get("rollback")]
    assert len(rollbacks) == 1
    back = rollbacks[0]
    assert back.step == 4 and back.values["lr_scale"] == 0.5 and back.values["rolled_back_from"] == 7
    # After the rollback, steps 5.. run again at half the scheduled rate.
    second_pass = steps[7:]
    assert [e.step for e in second_pass] == list(range(5, TOTAL + 1))
    total = TOTAL
    warmup = math.ceil(0.2 * total)
    for event in second_pass:
        expected = 3e-3 * cosine_schedule(event.step - 1, total, warmup) * 0.5
        assert event.values["lr"] == pytest.approx(expected)
        assert not event.values.get("skipped") and math.isfinite(event.values["loss"])
    assert first_pass[4].values["lr"] == pytest.approx(2 * second_pass[0].values["lr"])
    assert result.extra["rollbacks"] == 1 and result.extra["skipped_steps"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skipped_steps_do_not_change_the_weights(tmp_path, data):
    model = make_model(seed=0)
    handle = model.register_forward_hook(NaNAt({3, 4}))
    recorder = Recorder(model=model)
    try:
        with recording(recorder):
            train(model, data, nan_config(tmp_path, max_steps=6), stage=STAGE)
    finally:
        handle.remove()
    snaps = recorder.snapshots
    assert state_equal(snaps[2], snaps[3]) and state_equal(snaps[3], snaps[4])
    assert not state_equal(snaps[4], snaps[5])


def test_persistent_nan_raises_a_clear_error_and_saves_no_nan(tmp_path, data):
    model = make_model(seed=0)
    handle = model.register_forward_hook(NaNAt({"all"}))
    try:
        with recording(Recorder()) as rec, pytest.raises(TrainingDivergedError, match="learning_rate"):
            train(model, data, nan_config(tmp_path), stage=STAGE)
    finally:
        handle.remove()
    assert [e.values["lr_scale"] for e in rec.events if e.values.get("rollback")] == [0.5, 0.25, 0.125]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for path in step_checkpoint_dir(tmp_path, STAGE).rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point())


class PoisonWeights:
    """Sets one weight to NaN at step ``k`` (once), as a numerical blow-up in the update would."""

    def __init__(self, model, k):
        self.model, self.k, self.done = model, k, False

    @hookimpl
    def on_metric(self, event):
        if event.stage == STAGE and event.step == self.k and "loss" in event.values and not self.done:
            self.done = True
            with torch.no_grad():
                self.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")


def test_nan_weights_are_never_checkpointed(tmp_path, data):
    model = make_model(seed=0)
    with recording(PoisonWeights(model, 2)), recording(Recorder()) as rec:
        result = train(model, data, nan_config(tmp_path), stage=STAGE)
    rollbacks = [e for e in rec.events if e.values.get("rollback")]
    assert len(rollbacks) == 1 and "non-finite weights" in rollbacks[0].values["reason"]
    assert rollbacks[0].step == 0
    assert result.steps == TOTAL and all(torch.isfinite(p).all() for p in model.parameters())
    final = load_file(step_checkpoint_dir(tmp_path, STAGE) / "final" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in final.values())


def test_pipeline_run_interrupted_in_fine_tuning_resumes_to_the_same_model(tiny_assets, capsys):
    from safetensors.torch import load_file as load_weights

    from sentinel_core.pipeline import resume_experiment, run_experiment

    def run_config(name):
        return ExperimentConfig(model_name=tiny_assets["model"], data=tiny_assets["data"], scorer="random",
                                pruning_percent=0.25, block_size=32, batch_size=4, max_steps=6, eval_every=3,
                                checkpoint_every=2, max_eval_blocks=4, device="cpu", quiet=True, seed=4,
                                output_dir=str(tiny_assets["tmp"] / name))

    _, _, reference = run_experiment(run_config("whole"))
    stopper = StopAt(3)
    with recording(stopper), pytest.raises(KeyboardInterrupt):
        run_experiment(run_config("cut"))
    out = tiny_assets["tmp"] / "cut"
    assert f"Interrupted: resume with `sentinel run --resume {out}`" in capsys.readouterr().err
    with recording(Recorder()) as rec:
        _, _, summary = resume_experiment(out)
    assert [e.step for e in rec.steps()] == [4, 5, 6]
    assert summary["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-6)
    assert summary["fine_tune"] == pytest.approx(reference["fine_tune"], rel=1e-6)
    whole = load_weights(next((tiny_assets["tmp"] / "whole" / "model").glob("*.safetensors")))
    resumed = load_weights(next((out / "model").glob("*.safetensors")))
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6, rtol=0) for k in whole)
