"""The teacher of a distillation: the model as it was before pruning, frozen, for one training stage.

:class:`Teacher` is a training callback. It opens the teacher when the stage starts (or resumes)
and lets it go when the stage ends, so the second model occupies memory only while it is needed,
and a stage that had already finished (its weights only loaded back) never opens it.

Memory: a second copy of the unpruned model's weights on the teacher's device (parameters x bytes
per parameter: 4 for float32), plus one forward pass's activations without gradients and its
``[batch, tokens, vocab]`` logits per micro-batch. ``distill_teacher_device = "cpu"`` keeps the
weights in host memory instead of on the accelerator; the teacher's forward then runs on the CPU
and its logits are copied to the training device.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from sentinel_core.errors import SentinelError
from sentinel_core.training import TrainerCallback, logits_of, resolve_mixed_precision

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
MISSING_TEACHER = ("the distill fine-tuner needs its teacher, the model before pruning: pass original_model=<the "
                   "model folder or hub name that sentinel_core.load_model opens> (`sentinel run` passes the "
                   "run's --model itself)")


class Teacher(TrainerCallback):
    """A frozen teacher (eval mode, ``requires_grad`` False) that gives its logits for a batch.

    :param source: what :func:`sentinel_core.load_model` opens; or None with ``model``.
    :param placement: ``"same"`` (the training device) or ``"cpu"``.
    :param attn_implementation, trust_remote_code: passed to ``load_model``, as the run loads
        the student (the same attention implementation gives the same numerics).
    :param model: an already loaded teacher module to use instead of opening ``source``.
    """

    name = "distill_teacher"

    def __init__(self, source: str | os.PathLike | None, *, placement: str = "same",
                 attn_implementation: str | None = None, trust_remote_code: bool = False,
                 model: nn.Module | None = None) -> None:
        if source is None and model is None:
            raise SentinelError(MISSING_TEACHER)
        if placement not in ("same", "cpu"):
            raise SentinelError(f"distill_teacher_device must be one of same, cpu, got {placement!r}")
        self.source = None if source is None else os.fspath(source)
        self.placement = placement
        self.attn_implementation, self.trust_remote_code = attn_implementation, trust_remote_code
        self.given = model
        self.model: nn.Module | None = None
        self.device: torch.device | None = None
        self._autocast: torch.dtype | None = None

    def settings(self) -> Any:
        # Another teacher gives other targets: its checkpoints must not resume this run.
        return {"source": self.source, "given_module": self.given is not None, "placement": self.placement}

    # -- the stage -----------------------------------------------------------------------------

    def on_train_begin(self, state, context) -> None:
        device = torch.device(context.device) if context.device is not None else torch.device("cpu")
        self.load(device if self.placement == "same" else torch.device("cpu"))
        precision = resolve_mixed_precision(context.config.mixed_precision, str(device))
        # The teacher runs in the precision the student's forward runs in, where they share a device.
        self._autocast = _AUTOCAST.get(precision) if self.device == device else None
        if context.is_main and not context.config.quiet:
            print(f"{context.stage}: teacher {self.source or 'module'} on {self.device} "
                  f"({self.parameter_count():,} parameters, frozen)", file=sys.stderr)

    def on_train_end(self, state, context) -> None:
        self.release()

    # -- the teacher ---------------------------------------------------------------------------

    def load(self, device: torch.device) -> nn.Module:
        """Open (or take) the teacher on ``device``, frozen and in eval mode."""
        if self.given is not None:
            model = self.given
        else:
            from sentinel_core.model_io import load_model

            # Building a model draws its initial weights from torch's generator. Keep that
            # generator as the loop left it (restored from the checkpoint on resume), or a
            # resumed run would draw other dropout masks than an uninterrupted one.
            cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
                if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                model, _ = load_model(self.source, attn_implementation=self.attn_implementation,
                                      trust_remote_code=self.trust_remote_code)
        model.to(device).eval()
        model.requires_grad_(False)
        self.model, self.device = model, device
        return model

    def release(self) -> None:
        """Let the teacher go (a teacher given as a module stays the caller's)."""
        self.model = self.device = None

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) if self.model is not None else 0

    def parameter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) if self.model is not None else 0

    @torch.no_grad()
    def logits(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The teacher's logits for ``batch``, on ``device``."""
        if self.model is None:
            raise RuntimeError("the teacher is not loaded: it lives from on_train_begin to on_train_end of a "
                               "train() call that has this callback (or call load(device) first)")
        moved = {key: value.to(self.device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
        autocast = torch.autocast(self.device.type, dtype=self._autocast) if self._autocast else nullcontext()
        with autocast:
            out = logits_of(self.model, moved)
        return out.to(device)
