"""The distillation loss against independent computations: by hand, a closed-form gradient,
finite differences, and the KL of a model to itself."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from sentinel_distill.loss import DistillationLoss
from sentinel_distill.teacher import Teacher
from torch import nn

from sentinel_core.errors import SentinelError

IGNORE = -100


class FixedLogits(nn.Module):
    """A stand-in model whose logits are a given tensor (a parameter, so gradients reach it)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.value = nn.Parameter(logits.clone())

    def forward(self, input_ids, use_cache=None, attention_mask=None):
        return SimpleNamespace(logits=self.value)


def teacher_of(model: nn.Module) -> Teacher:
    teacher = Teacher(None, model=model)
    teacher.load(torch.device("cpu"))
    return teacher


def batch_with_ignored_labels(vocab: int):
    ids = torch.tensor([[1, 4, 2, 6, 0], [3, 3, 5, 1, 2]])
    labels = ids.clone()
    labels[0, 3] = IGNORE  # position 2 of row 0 predicts nothing
    labels[1, 1:3] = IGNORE  # padding in the middle: positions 0 and 1 of row 1 predict nothing
    mask = torch.ones_like(ids)
    return {"input_ids": ids % vocab, "labels": labels, "attention_mask": mask}


def by_hand(student, teacher, labels, temperature, alpha):
    """alpha*T^2*KL + (1-alpha)*CE with Python floats, position by position."""
    def softmax(row, t):
        top = max(row)
        exps = [math.exp((v - top) / t) for v in row]
        total = sum(exps)
        return [e / total for e in exps]

    kl_total, ce_total, count = 0.0, 0.0, 0
    rows, tokens, _ = student.shape
    for b in range(rows):
        for t in range(tokens - 1):
            target = int(labels[b, t + 1])
            if target == IGNORE:
                continue
            s_row, t_row = student[b, t].tolist(), teacher[b, t].tolist()
            p, q = softmax(t_row, temperature), softmax(s_row, temperature)
            kl_total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
            ce_total += -math.log(softmax(s_row, 1.0)[target])
            count += 1
    kl, ce = kl_total / count, ce_total / count
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce, kl, ce


@pytest.mark.parametrize(("temperature", "alpha"), [(2.0, 0.3), (1.0, 1.0), (0.5, 0.0), (4.0, 0.75)])
def test_loss_equals_a_hand_computation_with_ignored_labels(temperature, alpha):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 7, generator=generator) * 3
    teacher = torch.randn(2, 5, 7, generator=generator) * 3
    batch = batch_with_ignored_labels(7)
    loss_fn = DistillationLoss(teacher_of(FixedLogits(teacher)), temperature=temperature, alpha=alpha)
    loss, logs = loss_fn(FixedLogits(student), batch, None)
    want, kl, ce = by_hand(student, teacher, batch["labels"], temperature, alpha)
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(logs["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(logs["ce"]) == pytest.approx(ce, rel=1e-5)


def test_gradient_of_the_kl_term_is_t_times_student_minus_teacher():
    """d(T^2 KL(p_T || q_T)) / d(student logits) = T (q_T - p_T) / counted tokens, zero where nothing counts."""
    generator = torch.Generator().manual_seed(1)
    student = FixedLogits(torch.randn(2, 5, 7, generator=generator))
    teacher = torch.randn(2, 5, 7, generator=generator)
    batch = batch_with_ignored_labels(7)
    t = 3.0
    loss, _ = DistillationLoss(teacher_of(FixedLogits(teacher)), temperature=t, alpha=1.0)(student, batch, None)
    loss.backward()
    counted = torch.zeros(2, 5, dtype=torch.bool)
    counted[:, :-1] = batch["labels"][:, 1:] != IGNORE
    q = torch.softmax(student.value.detach() / t, -1)
    p = torch.softmax(teacher / t, -1)
    want = t * (q - p) * counted[..., None] / counted.sum()
    assert torch.allclose(student.value.grad, want, atol=1e-7)


def test_gradient_through_a_model_matches_finite_differences(build):
    """The whole loss (KL and CE) through a tiny float64 GPT-2, against central differences."""
    student = build.gpt2(seed=0, dtype=torch.float64).eval()
    teacher = build.gpt2(seed=1, dtype=torch.float64)
    ids = build.data(4).train.blocks[:2].long()
    labels = ids.clone()
    labels[1, 5:9] = IGNORE
    batch = {"input_ids": ids, "labels": labels}
    loss_fn = DistillationLoss(teacher_of(teacher), temperature=2.0, alpha=0.4)
    weight = student.transformer.h[0].attn.c_attn.weight
    loss, _ = loss_fn(student, batch, None)
    assert loss.dtype == torch.float64
    (grad,) = torch.autograd.grad(loss, weight)
    generator = torch.Generator().manual_seed(2)
    h = 1e-6
    for flat in torch.randint(0, weight.numel(), (6,), generator=generator).tolist():
        index = divmod(flat, weight.shape[1])
        with torch.no_grad():
            weight[index] += h
            up = float(loss_fn(student, batch, None)[0].detach())
            weight[index] -= 2 * h
            down = float(loss_fn(student, batch, None)[0].detach())
            weight[index] += h
        assert (up - down) / (2 * h) == pytest.approx(float(grad[index]), rel=1e-5, abs=1e-9)


def test_kl_is_zero_when_student_and_teacher_are_the_same_model(build, tmp_path):
    from sentinel_core.model_io import load_model

    source = build.save_teacher(build.gpt2(seed=4), tmp_path / "teacher")
    student, _ = load_model(source)
    teacher = Teacher(source)
    teacher.load(torch.device("cpu"))
    batch = {"input_ids": build.data(4).train.blocks[:4].long(), "labels": build.data(4).train.blocks[:4].long()}
    for t in (1.0, 2.5):
        loss, logs = DistillationLoss(teacher, temperature=t, alpha=1.0)(student, batch, None)
        assert abs(float(logs["kl"])) < 1e-6
        assert float(logs["ce"]) > 1.0  # the models are untrained: the data is not what makes KL vanish
        student.zero_grad()
        loss.backward()
        assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5


def test_teacher_logits_on_another_device_placement_are_the_same(build, tmp_path):
    source = build.save_teacher(build.gpt2(seed=4), tmp_path / "teacher")
    batch = {"input_ids": build.data(4).train.blocks[:2].long()}
    same, cpu = Teacher(source, placement="same"), Teacher(source, placement="cpu")
    same.load(torch.device("cpu"))
    cpu.load(torch.device("cpu"))
    assert torch.equal(same.logits(batch, torch.device("cpu")), cpu.logits(batch, torch.device("cpu")))
    assert all(not p.requires_grad for p in same.model.parameters()) and not same.model.training


def test_bad_settings_are_one_line_errors():
    teacher = teacher_of(FixedLogits(torch.zeros(1, 2, 3)))
    with pytest.raises(SentinelError, match=r"^distill_temperature must be positive, got 0\.0$"):
        DistillationLoss(teacher, temperature=0.0, alpha=0.5)
    with pytest.raises(SentinelError, match=r"^distill_alpha must be in \[0, 1\], got 1\.5$"):
        DistillationLoss(teacher, temperature=1.0, alpha=1.5)
    with pytest.raises(SentinelError, match="original_model="):
        Teacher(None)


def test_a_teacher_with_another_vocabulary_is_refused():
    loss_fn = DistillationLoss(teacher_of(FixedLogits(torch.zeros(2, 5, 9))), temperature=1.0, alpha=0.5)
    batch = batch_with_ignored_labels(7)
    with pytest.raises(SentinelError, match=r"teacher's logits have shape \(2, 5, 9\) but the student's \(2, 5, 7\)"):
        loss_fn(FixedLogits(torch.zeros(2, 5, 7)), batch, None)
