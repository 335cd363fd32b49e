"""``distill`` in the core training loop: alpha = 0 is plain, the teacher stays frozen, keep-best
follows the objective, options are checked, and it trains grown and LoRA-wrapped students."""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import pytest
import torch
from sentinel_distill.loss import DistillationLoss
from sentinel_distill.teacher import Teacher

from sentinel_core import plugins
from sentinel_core.config import ExperimentConfig
from sentinel_core.errors import SentinelError
from sentinel_core.hookspecs import hookimpl
from sentinel_core.plugins import pm
from sentinel_core.training import TrainerCallback, train
from sentinel_core.training.checkpoints import weights_fingerprint


class Recorder:
    """The metric events of one stage."""

    def __init__(self, stage: str = "fine_tune"):
        self.stage, self.events = stage, []

    @hookimpl
    def on_metric(self, event):
        if event.stage == self.stage:
            self.events.append(event)

    def steps(self):
        return [e for e in self.events if "loss" in e.values]

    def evals(self):
        return [e for e in self.events if "eval_loss" in e.values]


@contextmanager
def recording(recorder):
    pm.register(recorder)
    try:
        yield recorder
    finally:
        pm.unregister(recorder)


def fine_tune(strategy, model, data, config, **context):
    return plugins.fine_tune(strategy, model=model, tokenizer=None, data=data, config=plugins.check_run(config),
                             stage="fine_tune", **context)


def test_alpha_zero_trains_exactly_like_plain(distill_plugin, build, tmp_path):
    """Same losses, evaluations and weights bit for bit; dropout is on, so this also shows that
    opening the teacher does not disturb the random generators the loop seeded."""
    data = build.data(48)
    teacher = build.save_teacher(build.gpt2(seed=9), tmp_path / "teacher")
    runs = {}
    for strategy, options in (("plain", {}), ("distill", {"distill_alpha": 0.0, "distill_temperature": 2.0})):
        model = build.gpt2(seed=0, dropout=0.1)
        config = build.config(tmp_path / strategy, fine_tune=strategy, options=options, gradient_accumulation_steps=2)
        with recording(Recorder()) as rec:
            result = fine_tune(strategy, model, data, config, original_model=teacher)
        runs[strategy] = (rec, model.state_dict(), result)
    (plain, plain_state, plain_result), (distill, distill_state, distill_result) = runs["plain"], runs["distill"]
    assert [e.values["loss"] for e in distill.steps()] == [e.values["loss"] for e in plain.steps()]
    assert len(plain.steps()) == 6
    assert [e.values["eval_loss"] for e in distill.evals()] == [e.values["eval_loss"] for e in plain.evals()]
    assert all(torch.equal(plain_state[k], distill_state[k]) for k in plain_state)
    assert distill_result.best_eval_loss == plain_result.best_eval_loss
    # The CE it trained on is the loss; the KL to the (unrelated) teacher was measured all along.
    assert all(e.values["ce"] == e.values["loss"] and e.values["kl"] > 0 for e in distill.steps())
    assert distill_result.strategy == "distill" and distill_result.extra["distill"]["alpha"] == 0.0


class TeacherWatch(TrainerCallback):
    """Checks the teacher at every step: frozen, in eval mode, holding the weights it was saved with."""

    def __init__(self, teacher: Teacher, saved_fingerprint):
        self.teacher, self.saved, self.checked = teacher, saved_fingerprint, 0

    def on_step_end(self, state, context, logs):
        model = self.teacher.model
        assert model is not None and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert all(p.grad is None for p in model.parameters())
        assert weights_fingerprint(model.state_dict()) == self.saved
        assert model is not context.model
        self.checked += 1


def test_teacher_stays_frozen_and_unchanged_while_the_student_learns(build, trained_state, tmp_path):
    original = build.gpt2(seed=0)
    original.load_state_dict(trained_state)
    source = build.save_teacher(original, tmp_path / "teacher")
    saved = weights_fingerprint(original.state_dict())
    student = build.gpt2(seed=0)
    student.load_state_dict(trained_state)
    from sentinel_core.surgery import prune_heads

    prune_heads(student, {0: [0, 1, 2], 1: [0, 1]})
    before = build.state(student)
    teacher = Teacher(source)
    watch = TeacherWatch(teacher, saved)
    config = build.config(tmp_path / "run", learning_rate=1e-3)
    with recording(Recorder()) as rec:
        result = train(student, build.data(48), config, stage="fine_tune", callbacks=[teacher, watch],
                       loss_fn=DistillationLoss(teacher, temperature=1.0, alpha=1.0), select_on="eval_objective")
    assert watch.checked == result.steps == 12
    assert teacher.model is None  # let go when the stage ended
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    evals = [e.values["eval_objective"] for e in rec.evals()]
    assert evals[-1] < 0.5 * evals[0]  # the pruned student moved towards its unpruned self


def test_keep_best_follows_the_distillation_objective_and_optionally_ce(distill_plugin, build, trained_state,
                                                                        tmp_path):
    """A student that has learnt the data, and a teacher that knows nothing of it: distilling lowers
    the KL but raises the validation CE. Keep-best on the objective keeps the later weights; on CE,
    the starting ones."""
    teacher = build.save_teacher(build.gpt2(seed=5), tmp_path / "random-teacher")
    start = trained_state
    results = {}
    for select in ("objective", "ce"):
        student = build.gpt2(seed=0)
        student.load_state_dict(start)
        config = build.config(tmp_path / select, learning_rate=1e-2, options={"distill_select_on": select})
        with recording(Recorder()) as rec:
            result = fine_tune("distill", student, build.data(48), config, original_model=teacher)
        results[select] = (rec, result, build.state(student))
    rec, objective, weights = results["objective"]
    evals = rec.evals()
    assert [e.step for e in evals] == [0, 4, 8, 12]
    assert evals[-1].values["eval_objective"] < evals[0].values["eval_objective"]
    assert evals[-1].values["eval_loss"] > evals[0].values["eval_loss"]  # the conflict this test is about
    best = min(evals, key=lambda e: e.values["eval_objective"])
    assert objective.extra["select_on"] == "eval_objective"
    assert objective.extra["best_step"] == best.step > 0
    assert objective.best_eval_loss == best.values["eval_loss"]
    assert any(not torch.equal(start[k], weights[k]) for k in start)

    rec, ce, weights = results["ce"]
    assert ce.extra["select_on"] == "eval_loss"
    assert ce.extra["best_step"] == 0 and ce.extra["restored_best"]
    assert all(torch.equal(start[k], weights[k]) for k in start)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("distill_alpha", 1.5, r"distill_alpha .*must be in \[0, 1\], got 1\.5"),
    ("distill_alpha", -0.1, r"distill_alpha .*must be in \[0, 1\], got -0\.1"),
    ("distill_temperature", 0.0, r"distill_temperature .*must be positive, got 0\.0"),
    ("distill_teacher_device", "gpu", r"distill_teacher_device .*must be one of same, cpu, got 'gpu'"),
    ("distill_select_on", "kl", r"distill_select_on .*must be one of objective, ce, got 'kl'"),
])
def test_options_are_checked_with_one_line_errors(distill_plugin, option, value, message):
    with pytest.raises(SentinelError, match=message) as caught:
        plugins.check_run(ExperimentConfig(fine_tune="distill", options={option: value}))
    assert "\n" not in str(caught.value)


def test_the_core_loops_options_apply(distill_plugin):
    config = plugins.check_run(ExperimentConfig(fine_tune="distill", options={"weight_decay": 0.2}))
    assert config.options["weight_decay"] == 0.2 and config.options["distill_alpha"] == 1.0


def test_outside_a_run_it_says_what_to_pass(distill_plugin, build, tmp_path):
    with pytest.raises(SentinelError, match=r"needs its teacher.*original_model=") as caught:
        fine_tune("distill", build.gpt2(), build.data(48), build.config(tmp_path / "run"))
    assert "\n" not in str(caught.value)


def test_distills_a_pruned_and_grown_student_from_the_original(distill_plugin, build, trained_state, tmp_path):
    from sentinel_core.surgery import get_head_map, grow_heads, prune_heads

    original = build.gpt2(seed=0)
    original.load_state_dict(trained_state)
    teacher = build.save_teacher(original, tmp_path / "teacher")
    student = build.gpt2(seed=0)
    student.load_state_dict(trained_state)
    prune_heads(student, {0: [0, 1], 1: [2]})
    grow_heads(student, {0: 1, 1: 2}, generator=torch.Generator().manual_seed(1))
    assert [len(get_head_map(student).active(layer)) for layer in (0, 1)] == [3, 5]
    before = build.state(student)
    with recording(Recorder()) as rec:
        result = fine_tune("distill", student, build.data(48), build.config(tmp_path / "run", learning_rate=1e-3),
                           original_model=teacher)
    steps, evals = rec.steps(), rec.evals()
    assert result.steps == len(steps) == 12
    assert evals[-1].values["eval_objective"] < 0.5 * evals[0].values["eval_objective"]
    grown = student.transformer.h[1].attn.c_attn.weight
    assert not torch.equal(grown, before["transformer.h.1.attn.c_attn.weight"])


def _has_lora() -> bool:
    return "lora_rank" in {f.name for f in dataclasses.fields(ExperimentConfig)}


@pytest.mark.skipif(not _has_lora(), reason="ExperimentConfig has no lora_rank yet (--lora-rank lands in the core)")
def test_distill_with_lora_trains_low_rank_updates_and_gives_an_ordinary_model(distill_plugin, build, trained_state,
                                                                              tmp_path):
    pytest.importorskip("peft")
    from sentinel_core.surgery import prune_heads

    rank = 2
    original = build.gpt2(seed=0)
    original.load_state_dict(trained_state)
    teacher_source = build.save_teacher(original, tmp_path / "teacher")
    student = build.gpt2(seed=0)
    student.load_state_dict(trained_state)
    prune_heads(student, {0: [1], 1: [0, 3]})
    before = build.state(student)
    config = build.config(tmp_path / "run", learning_rate=1e-3).replace(lora_rank=rank)
    with recording(Recorder()) as rec:
        result = fine_tune("distill", student, build.data(48), config, original_model=teacher_source)
    steps = rec.steps()
    assert result.steps == len(steps) == 12
    assert all(torch.isfinite(torch.tensor([e.values["kl"], e.values["ce"]])).all() for e in steps)
    after = student.state_dict()
    assert after.keys() == before.keys()  # adapters merged: an ordinary model again
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed
    for key in changed:
        if after[key].dim() == 2:
            # float32 rounding of W + BA adds noise far below the update: count singular values above it.
            singular = torch.linalg.svdvals((after[key] - before[key]).double())
            assert int((singular > singular[0] * 1e-4).sum()) <= rank, key
