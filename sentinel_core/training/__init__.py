"""The one training loop, shared by the ``plain`` and ``adaptive`` fine-tuners and the demo model.

:func:`train` runs on Hugging Face Accelerate: it places the model on the configured device,
uses mixed precision on GPUs (``mixed_precision="auto"``: bf16 where the GPU supports it, fp16
otherwise, none on the CPU), and trains data-parallel when started with ``torchrun`` or
``accelerate launch`` on several processes, without any change to the calling code.

The recipe: AdamW (no weight decay on biases and normalisation weights), linear warm-up then
cosine decay, gradient clipping, gradient accumulation, evaluation on held-out blocks every
``eval_every`` steps, the best model by validation loss kept and restored at the end, early
stopping after ``patience`` evaluations without improvement.

Reliability: a step whose loss (or gradient norm) is not finite is skipped; after
``max_bad_steps`` of them in a row the run rolls back to its last good checkpoint and halves the
learning rate. Step checkpoints (see :mod:`sentinel_core.training.checkpoints`) are written every
``checkpoint_every`` steps and when the run is stopped by Ctrl-C or SIGTERM, so a later call with
the same ``output_dir`` and ``stage`` continues where it stopped and ends with the same weights
as a run that was never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig, resolve_device
from ..data import IGNORE_INDEX
from ..errors import RunInterrupted, SentinelError
from ..options import Option
from ..plugins import emit
from ..results import FineTuneResult
from ..run_files import RUN_CONFIG_FILE
from . import checkpoints as ckpt

__all__ = [
    "BASE_GROUP",
    "IGNORE_INDEX",
    "TRAINING_OPTIONS",
    "LrMultiplier",
    "TrainingDivergedError",
    "causal_lm_loss",
    "cosine_schedule",
    "resolve_mixed_precision",
    "step_checkpoint_dir",
    "train",
]

BASE_GROUP = "base"
LrMultiplier = Callable[[int, int, str], float]

# The config.options this loop reads. Every fine-tuner that trains with this loop declares them
# among its strategy options (``Strategy(..., options=(*TRAINING_OPTIONS, ...))``).
TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("weight_decay", float, 0.01, "AdamW weight decay on 2-D weights (biases and norms get none)",
           minimum=0.0, maximum=1.0, max_exclusive=True),
    Option("max_bad_steps", int, 3, "non-finite steps in a row before rolling back to the last good checkpoint",
           minimum=1),
    Option("max_rollbacks", int, 3, "rollbacks (each halving the learning rate) before giving up", minimum=0),
    Option("keep_checkpoints", int, 2, "step checkpoints kept on disk (plus the last good one)", minimum=1),
)
_RESUME_COMMAND = "Interrupted: resume with `sentinel run --resume {output_dir}`"


class TrainingDivergedError(SentinelError):
    """Training could not recover from non-finite losses or weights; the message says what to change."""


class _GracefulStop(RunInterrupted):
    """Raised after a requested stop (Ctrl-C, SIGTERM) once the checkpoint is on disk."""


# -- small public helpers ----------------------------------------------------------------------


def cosine_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """The learning-rate factor of 0-based optimizer step ``step``: linear warm-up from 0 over
    ``warmup_steps``, then half a cosine down to 0 at ``total_steps`` (the same values as
    ``transformers.get_cosine_schedule_with_warmup``)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of tokens it covers.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels equal to -100 (padding)
    are left out of both the sum and the count. The loss is computed in float32.
    """
    # Shift the labels rather than the logits, so the large logits tensor is not copied.
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1).to(logits.device),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (shifted != IGNORE_INDEX).sum()


def resolve_mixed_precision(setting: str, device: str) -> str:
    """``auto`` -> ``bf16`` on a GPU that supports it, ``fp16`` on other GPUs, ``no`` elsewhere."""
    is_cuda = device == "cuda" or device.startswith("cuda:")
    if setting == "auto":
        if not is_cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and not is_cuda:
        raise SentinelError(f"mixed_precision 'fp16' needs a CUDA GPU but the device is {device!r}; "
                            "use 'bf16', 'no' or 'auto'")
    return setting


def step_checkpoint_dir(output_dir: str | os.PathLike, stage: str) -> Path:
    """Where :func:`train` keeps the step checkpoints of ``stage``."""
    return ckpt.stage_dir(output_dir, stage)


# -- the loop's state --------------------------------------------------------------------------


@dataclass
class _LoopState:
    step: int = 0
    best_eval_loss: float = math.inf
    best_step: int | None = None
    evals_since_best: int = 0
    last_eval_step: int = -1
    lr_scale: float = 1.0
    rollbacks: int = 0
    bad_in_row: int = 0
    skipped_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_loss: float = math.nan
    stopped_early: bool = False
    eval_history: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("best_eval_loss", "last_loss"):
            if not math.isfinite(out[key]):
                out[key] = None
        out["eval_history"] = [[s, v if math.isfinite(v) else None] for s, v in self.eval_history]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _LoopState:
        values = dict(data)
        if values.get("best_eval_loss") is None:
            values["best_eval_loss"] = math.inf
        if values.get("last_loss") is None:
            values["last_loss"] = math.nan
        values["eval_history"] = [[s, math.nan if v is None else v] for s, v in values.get("eval_history", [])]
        return cls(**values)


@dataclass
class _Group:
    name: str
    lr_scale: float
    params: list[nn.Parameter]


class _StopSignals:
    """Turns SIGINT/SIGTERM into a request to stop after the current step.

    A second Ctrl-C raises KeyboardInterrupt at once. Handlers are installed only in the main
    thread, never over a signal that the process ignores, and restored on exit.
    """

    def __init__(self, announce: bool) -> None:
        self.requested = False
        self.reason = ""
        self._announce = announce
        self._old: dict[int, Any] = {}

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.request("Ctrl-C")
        if self._announce:
            print("\nStopping after this step (press Ctrl-C again to stop at once)...", file=sys.stderr)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.request("SIGTERM")
        if self._announce:
            print("\nSIGTERM received: stopping after this step...", file=sys.stderr)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in ((signal.SIGINT, self._on_sigint), (signal.SIGTERM, self._on_sigterm)):
                old = signal.getsignal(signum)
                if old is signal.SIG_IGN:
                    continue
                self._old[signum] = old
                signal.signal(signum, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
        self._old.clear()


# -- options and set-up helpers ------------------------------------------------------------------


def _options(config: ExperimentConfig) -> dict[str, Any]:
    return {option.name: option.value(config) for option in TRAINING_OPTIONS}


def _check_stage(stage: str) -> None:
    if not isinstance(stage, str) or not stage or not all(c.isalnum() or c in "_-." for c in stage) \
            or stage.startswith("."):
        raise SentinelError(f"stage {stage!r} must be a word of letters, digits, '_', '-' or '.', e.g. 'fine_tune'")


def _make_accelerator(config: ExperimentConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    device = resolve_device(config.device)
    precision = resolve_mixed_precision(config.mixed_precision, device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device.startswith("cuda:") and not launched:
        torch.cuda.set_device(int(device.partition(":")[2]))
    # Accelerate keeps its settings in process-wide singletons; a later train() call with other
    # settings (e.g. the demo's pre-training, then a run) must not be refused for that.
    partial = PartialState._shared_state
    if partial and not launched and (device == "cpu") != (str(partial.get("device", "cpu")).startswith("cpu")):
        AcceleratorState._reset_state(reset_partial_state=True)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
    return Accelerator(cpu=device == "cpu", mixed_precision=precision)


def _build_groups(model: nn.Module, param_groups: Sequence[Mapping[str, Any]] | None) -> list[_Group]:
    """Named groups in model order; trainable parameters nobody claimed go to ``base``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise SentinelError("the model has no trainable parameters; unfreeze some (requires_grad=True) to train it")
    order = {id(p): i for i, (_, p) in enumerate(named)}
    names = {id(p): n for n, p in named}
    owner: dict[int, str] = {}
    groups: list[_Group] = []
    for index, spec in enumerate(param_groups or ()):
        if not isinstance(spec, Mapping) or "name" not in spec or "params" not in spec:
            raise SentinelError(f"param_groups[{index}] must be a dict with 'name', 'params' and optional "
                                f"'lr_scale', got {spec!r}")
        name = spec["name"]
        if not isinstance(name, str) or not name or any(g.name == name for g in groups):
            raise SentinelError(f"param_groups[{index}] has name {name!r}; names must be distinct non-empty strings")
        scale = spec.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
            raise SentinelError(f"param group {name!r} has lr_scale {scale!r}; it must be a positive number")
        params = []
        for p in spec["params"]:
            if not isinstance(p, torch.Tensor):
                raise SentinelError(f"param group {name!r} holds {type(p).__name__}; give the model's parameters")
            if not p.requires_grad:
                continue
            if id(p) not in order:
                raise SentinelError(f"param group {name!r} holds a tensor of shape {tuple(p.shape)} that is not a "
                                    "parameter of the model being trained")
            if id(p) in owner:
                raise SentinelError(f"parameter {names[id(p)]} is in param groups {owner[id(p)]!r} and {name!r}; "
                                    "put each parameter in one group")
            owner[id(p)] = name
            params.append(p)
        groups.append(_Group(name, float(scale), sorted(params, key=lambda q: order[id(q)])))
    rest = [p for _, p in named if id(p) not in owner]
    if rest:
        base = next((g for g in groups if g.name == BASE_GROUP), None)
        if base is None:
            groups.insert(0, _Group(BASE_GROUP, 1.0, rest))
        else:
            base.params = sorted(base.params + rest, key=lambda q: order[id(q)])
    return groups


def _optimizer_groups(groups: list[_Group], weight_decay: float) -> list[dict[str, Any]]:
    out = []
    for group in groups:
        decay = [p for p in group.params if p.ndim >= 2]
        # Biases and normalisation weights (1-D) are not decayed: shrinking them only hurts.
        no_decay = [p for p in group.params if p.ndim < 2]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "weight_decay": wd, "sentinel_group": group.name})
    return out


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


# -- the trainer -------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, model: nn.Module, data: Any, config: ExperimentConfig, stage: str,
                 param_groups: Sequence[Mapping[str, Any]] | None, lr_multiplier: LrMultiplier | None,
                 resume_hint: str | None = None) -> None:
        _check_stage(stage)
        self.resume_hint = resume_hint
        self.config, self.stage, self.model = config, stage, model
        self.opts = _options(config)
        self.lr_multiplier = lr_multiplier
        self.groups = _build_groups(model, param_groups)

        blocks = data.train.blocks
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[1] < 2:
            raise SentinelError("data.train.blocks must be a [n_blocks, block_size >= 2] tensor of token ids")
        self.train_blocks = blocks
        eval_blocks = data.validation.blocks
        if config.max_eval_blocks:
            eval_blocks = eval_blocks[: config.max_eval_blocks]
        self.eval_blocks = eval_blocks

        self.accelerator = _make_accelerator(config)
        acc = self.accelerator
        self.world, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        self.micro = config.batch_size
        self.accum = config.gradient_accumulation_steps
        self.global_batch = self.micro * self.accum * self.world
        n = int(blocks.shape[0])
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise SentinelError(
                f"the training data has {n} blocks, fewer than one global batch of {self.global_batch} "
                f"(batch_size {self.micro} x gradient_accumulation_steps {self.accum} x {self.world} processes); "
                "lower batch_size or use more text")
        total = config.num_epochs * self.steps_per_epoch
        self.total = min(total, config.max_steps) if config.max_steps else total
        self.warmup = math.ceil(config.warmup_fraction * self.total)
        self.directory = ckpt.stage_dir(config.output_dir, stage)
        self.state = _LoopState()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.signals = _StopSignals(announce=self.is_main and not config.quiet)
        self.phase = "setup"
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        self._seconds_before = 0.0
        self._session_start = time.perf_counter()
        self._saved_step: int | None = None
        self._bar = None
        self._rng_at_step_start: dict[str, torch.Tensor] | None = None

    # -- public entry ------------------------------------------------------------------------

    def run(self, resume: bool) -> FineTuneResult:
        from accelerate.utils import set_seed

        acc = self.accelerator
        was_training = self.model.training
        set_seed(self.config.seed, device_specific=True)
        use_fused = acc.device.type == "cuda"
        optimizer = torch.optim.AdamW(_optimizer_groups(self.groups, self.opts["weight_decay"]),
                                      lr=self.config.learning_rate, fused=use_fused or None)
        self.wrapped, self.optimizer = acc.prepare(self.model, optimizer)
        try:
            with self.signals:
                return self._run(resume)
        except KeyboardInterrupt as exc:
            self._on_interrupt(saved=isinstance(exc, _GracefulStop))
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            acc.unwrap_model(self.wrapped, keep_fp32_wrapper=False)  # undo the autocast wrapper on forward
            # Not acc.free_memory(): its gc.collect() costs ~0.3 s per call; dropping the
            # references is enough for the optimizer state to be freed.
            self.wrapped = self.optimizer = self.accelerator = None
            self.model.train(was_training)

    # -- main flow ---------------------------------------------------------------------------

    def _run(self, resume: bool) -> FineTuneResult:
        self.start_fingerprint = ckpt.weights_fingerprint(self.model.state_dict())
        self.settings = self._settings()
        found = self._find_resume_point() if resume else None
        if found is not None and found.name == ckpt.FINAL:
            return self._load_finished(found)
        if found is None:
            if self.is_main:
                ckpt.clear(self.directory)
            self._barrier()
        else:
            self._load_checkpoint(found)
            self._seconds_before = self.state.seconds
            self._say(f"Resuming {self.stage} from step {self.state.step} of {self.total} ({found})")
            self._emit(self.state.step, resumed=True, resumed_from_step=self.state.step)
        self._session_start = time.perf_counter()
        self._open_progress()
        self.model.train()
        self.phase = "idle"
        self._after_step()
        if found is None:
            self._save_checkpoint()  # the rollback target of last resort
        while self.state.step < self.total and not self.state.stopped_early:
            self._train_step()
            self._after_step()
        return self._finish()

    def _settings(self) -> dict[str, Any]:
        """What must be equal for a checkpoint to continue this run exactly."""
        c = self.config
        settings = {
            "stage": self.stage, "learning_rate": c.learning_rate, "num_epochs": c.num_epochs,
            "batch_size": c.batch_size, "max_steps": c.max_steps, "eval_every": c.eval_every,
            "patience": c.patience, "warmup_fraction": c.warmup_fraction,
            "gradient_accumulation_steps": c.gradient_accumulation_steps, "max_grad_norm": c.max_grad_norm,
            "seed": c.seed, "max_eval_blocks": c.max_eval_blocks,
            "mixed_precision": self.accelerator.mixed_precision, "world_size": self.world,
            "total_steps": self.total, "train_blocks": list(self.train_blocks.shape),
            "train_digest": _digest(self.train_blocks), "eval_blocks": list(self.eval_blocks.shape),
            "eval_digest": _digest(self.eval_blocks),
            "groups": [[g.name, g.lr_scale, len(g.params)] for g in self.groups],
            "options": c.options,
        }
        return json.loads(json.dumps(settings, sort_keys=True, default=str))

    # -- one step ----------------------------------------------------------------------------

    def _learning_rates(self, step: int) -> dict[str, float]:
        base = self.config.learning_rate * cosine_schedule(step, self.total, self.warmup) * self.state.lr_scale
        rates = {}
        for group in self.groups:
            factor = 1.0
            if self.lr_multiplier is not None:
                factor = float(self.lr_multiplier(step, self.total, group.name))
                if not (math.isfinite(factor) and factor >= 0):
                    raise RuntimeError(f"lr_multiplier returned {factor!r} for group {group.name!r} at step {step}; "
                                       "it must be a finite number >= 0")
            rates[group.name] = base * group.lr_scale * factor
        return rates

    def _indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.config.seed + epoch)
            self._perm = torch.randperm(int(self.train_blocks.shape[0]), generator=generator)
            self._perm_epoch = epoch
        g = self.global_batch
        return self._perm[position * g:(position + 1) * g]

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        """This process's micro-batches of ``step``: the global batch is laid out micro-batch by
        micro-batch, process by process, so any world size sees the same global batch."""
        idx = self._indices(step)
        out = []
        for m in range(self.accum):
            start = (m * self.world + self.rank) * self.micro
            out.append(self.train_blocks[idx[start:start + self.micro]].long())
        return out

    def _forward_nll(self, module: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
        if attention_mask is not None and not bool(attention_mask.all()):
            # An all-ones mask is left out: it would only make attention take a slower path.
            kwargs["attention_mask"] = attention_mask.to(device)
        output = module(**kwargs)
        logits = output.logits if hasattr(output, "logits") else output[0]
        return causal_lm_loss(logits, labels.to(device))

    def _train_step(self) -> None:
        acc, state = self.accelerator, self.state
        step = state.step
        # An interrupt inside this step saves torch's generators as they were before it, so the
        # resumed run draws the same dropout masks for it.
        self._rng_at_step_start = ckpt.torch_rng_state()
        self.phase = "step"
        rates = self._learning_rates(step)
        for group in self.optimizer.param_groups:
            group["lr"] = rates[group["sentinel_group"]]
        batches = self._micro_batches(step)
        counts = [int((F.pad(b, (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX).sum()) for b in batches]
        n_tokens = float(sum(counts))
        if self.world > 1:
            n_tokens = float(self._all_reduce(torch.tensor([n_tokens]))[0])
        # Each process scales by world size because DDP averages gradients over processes.
        scale = self.world / max(n_tokens, 1.0)
        loss_sum = torch.zeros((), device=acc.device)
        for m, ids in enumerate(batches):
            sync = acc.no_sync(self.wrapped) if m < len(batches) - 1 else nullcontext()
            with sync:
                nll, _ = self._forward_nll(self.wrapped, ids, ids)
                acc.backward(nll * scale)
            loss_sum += nll.detach().float()
        grad_norm = acc.clip_grad_norm_(self.wrapped.parameters(), self.config.max_grad_norm)
        if grad_norm is None:  # some back-ends clip without reporting the norm
            grad_norm = torch.zeros(())
        if self.world > 1:
            loss_sum = self._all_reduce(loss_sum.reshape(1))[0]
        loss_value, norm_value = torch.stack([loss_sum / max(n_tokens, 1.0),
                                              torch.as_tensor(grad_norm, device=loss_sum.device).float()]).tolist()
        # fp16's loss scaler skips overflowing steps and lowers the scale itself: that is not divergence.
        good = math.isfinite(loss_value) and (math.isfinite(norm_value) or acc.scaler is not None)
        self.phase = "update"
        if good:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        state.tokens += self.global_batch * int(self.train_blocks.shape[1])
        if good:
            state.bad_in_row = 0
            state.last_loss = loss_value
        else:
            state.bad_in_row += 1
            state.skipped_steps += 1
        self.phase = "idle"

        values: dict[str, Any] = {"loss": loss_value, "perplexity": _ppl(loss_value), "grad_norm": norm_value,
                                  "epoch": state.step / self.steps_per_epoch, "tokens": state.tokens}
        if len(rates) == 1:
            values["lr"] = next(iter(rates.values()))
        else:
            values.update({f"lr/{name}": rate for name, rate in rates.items()})
        if not good:
            values["skipped"] = True
        self._emit(state.step, **values)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss_value:.3f}", ppl=f"{_ppl(loss_value):.1f}", refresh=False)
        if not good:
            self._say(f"{self.stage}: step {state.step} has a non-finite loss or gradient; skipped it "
                      f"({state.bad_in_row} in a row)")
            if state.bad_in_row >= self.opts["max_bad_steps"]:
                self._rollback(f"{state.bad_in_row} non-finite steps in a row")

    def _after_step(self) -> None:
        """Work that belongs to the step just committed: evaluation, checkpoint, stop requests."""
        state = self.state
        self._maybe_evaluate()
        due = state.step % self.config.checkpoint_every == 0 and 0 < state.step < self.total
        if due and state.bad_in_row == 0 and self._saved_step != state.step:
            if not self._weights_finite():
                self._rollback("non-finite weights before a checkpoint")
            else:
                self._save_checkpoint()
        if self._stop_requested():
            if self._saved_step != state.step:
                if self._weights_finite():
                    self._save_checkpoint()
            raise _GracefulStop(self.signals.reason or "Ctrl-C")

    def _barrier(self) -> None:
        """Wait for every process. On CPU this is torch's plain barrier: Accelerate's
        ``wait_for_everyone`` passes ``device_ids=[local rank]``, and torch then runs even a gloo
        barrier on the machine's accelerator (``cuda:<local rank>``), so CPU training in two
        processes failed on a machine with one GPU (seen on an H100 machine)."""
        acc = self.accelerator
        if acc.num_processes > 1 and acc.device.type == "cpu":
            import torch.distributed as dist

            dist.barrier()
        else:
            acc.wait_for_everyone()

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        device = self.accelerator.device
        out = tensor.detach().to(device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
        dist.all_reduce(out)
        return out

    def _stop_requested(self) -> bool:
        flag = self.signals.requested
        if self.world > 1:
            flag = bool(self._all_reduce(torch.tensor([float(flag)]))[0] > 0)
            if flag:
                self.signals.request("another process")
        return flag

    def _weights_finite(self) -> bool:
        return ckpt.all_finite(self.model.parameters())

    # -- evaluation ----------------------------------------------------------------------------

    def _maybe_evaluate(self) -> None:
        state = self.state
        step = state.step
        if state.last_eval_step == step or not (step % self.config.eval_every == 0 or step == self.total):
            return
        self.phase = "eval"
        loss = self._evaluate()
        self.phase = "update"  # the bookkeeping below must happen as a whole
        improved = math.isfinite(loss) and loss < state.best_eval_loss
        if improved:
            self.best_state = ckpt.cpu_state_copy(self.model.state_dict())
            state.best_eval_loss, state.best_step, state.evals_since_best = loss, step, 0
        else:
            state.evals_since_best += 1
        state.last_eval_step = step
        state.eval_history.append([step, loss])
        patience = self.config.patience
        if patience and state.evals_since_best >= patience and step < self.total:
            state.stopped_early = True
        self.phase = "idle"
        self._emit(step, eval_loss=loss, eval_perplexity=_ppl(loss), best_eval_loss=state.best_eval_loss,
                   best_step=state.best_step)
        if state.stopped_early:
            self._say(f"{self.stage}: stopping early at step {step}: no better validation loss in "
                      f"{patience} evaluations (best {state.best_eval_loss:.4f} at step {state.best_step})")

    @torch.no_grad()
    def _evaluate(self) -> float:
        """Mean token loss on the held-out blocks (split over processes, summed back)."""
        self.model.eval()
        blocks = self.eval_blocks[self.rank::self.world]
        total = torch.zeros((), dtype=torch.float64, device=self.accelerator.device)
        count = 0
        for start in range(0, int(blocks.shape[0]), self.micro):
            ids = blocks[start:start + self.micro].long()
            # The bare module, not the DDP wrapper: processes may run different numbers of eval
            # batches, and DDP's forward would wait for the others.
            nll, n = self._forward_nll(self.model, ids, ids)
            total += nll.double()
            count += int(n)
        sums = torch.stack([total.to("cpu"), torch.tensor(float(count), dtype=torch.float64)])
        if self.world > 1:
            sums = self._all_reduce(sums).to("cpu")
        self.model.train()
        loss_sum, n_tokens = sums.tolist()
        return loss_sum / n_tokens if n_tokens else math.nan

    # -- checkpoints ---------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self._seconds_before + (time.perf_counter() - self._session_start)

    def _save_checkpoint(self, name: str | None = None, result: dict[str, Any] | None = None) -> None:
        acc, state = self.accelerator, self.state
        name = name or ckpt.step_dir_name(state.step)
        previous_phase, self.phase = self.phase, "checkpoint"
        state.seconds = self._elapsed()
        if self.is_main:
            ckpt.begin_checkpoint(self.directory, name)
        self._barrier()
        tmp = ckpt.temp_dir_for(self.directory, name)
        if result is None:
            mid_step = previous_phase == "step" and self._rng_at_step_start is not None
            rng_tensors, rng_meta = ckpt.rng_state(self._rng_at_step_start if mid_step else None)
            ckpt.save_tensors(tmp / f"rng-{self.rank}.safetensors", rng_tensors)
            ckpt.write_json(tmp / f"rng-{self.rank}.json", rng_meta)
        if self.is_main:
            model_state = self.model.state_dict()
            ckpt.save_tensors(tmp / ckpt.MODEL_FILE, model_state)
            record: dict[str, Any] = {
                "format": ckpt.STEP_CHECKPOINT_FORMAT, "stage": self.stage, "loop": state.to_dict(),
                "settings": self.settings, "start_fingerprint": self.start_fingerprint,
                "fingerprint": ckpt.weights_fingerprint(model_state),
            }
            if result is None:
                best = None
                if self.best_state is not None:
                    best = "current" if state.best_step == state.step else "file"
                    if best == "file":
                        ckpt.save_tensors(tmp / ckpt.BEST_FILE, self.best_state)
                record["best"] = best
                opt_tensors, opt_meta = ckpt.split_optimizer_state(self.optimizer.state_dict())
                ckpt.save_tensors(tmp / ckpt.OPTIMIZER_TENSORS, opt_tensors)
                ckpt.write_json(tmp / ckpt.OPTIMIZER_JSON, opt_meta)
                scaler = acc.scaler
                record["scaler"] = ckpt._jsonable(scaler.state_dict()) if scaler is not None else None
            else:
                record["result"] = result
            ckpt.write_json(tmp / ckpt.TRAINER_STATE_FILE, record)
        self._barrier()
        if self.is_main:
            ckpt.commit_checkpoint(self.directory, name)
            if result is None:
                ckpt.remove_old(self.directory, self.opts["keep_checkpoints"], protect=self._is_rollback_target)
        self._barrier()
        if result is None:
            self._saved_step = state.step
        self.phase = previous_phase

    def _rollback_target(self) -> Path | None:
        for _, path in reversed(ckpt.list_step_checkpoints(self.directory)):
            record = ckpt.read_state(path)
            if record is not None and record["loop"].get("bad_in_row", 0) == 0:
                return path
        return None

    def _is_rollback_target(self, path: Path) -> bool:
        target = self._rollback_target()
        return target is not None and target == path

    def _matches(self, record: Mapping[str, Any] | None) -> bool:
        if record is None or record.get("settings") != self.settings:
            return False
        return (ckpt.fingerprints_match(record.get("start_fingerprint"), self.start_fingerprint)
                or ckpt.fingerprints_match(record.get("fingerprint"), self.start_fingerprint))

    def _find_resume_point(self) -> Path | None:
        if not self.directory.is_dir():
            return None
        final = self.directory / ckpt.FINAL
        if self._matches(ckpt.read_state(final)):
            return final
        found = ckpt.list_step_checkpoints(self.directory)
        for _, path in reversed(found):
            if self._matches(ckpt.read_state(path)):
                return path
        if found or final.exists():
            self._say(f"Ignoring the checkpoints in {self.directory}: they belong to another run (other "
                      f"settings, data or starting weights); {self.stage} starts afresh.", force=True)
        return None

    def _load_checkpoint(self, path: Path) -> None:
        record = ckpt.read_state(path)
        if record is None:
            raise SentinelError(f"checkpoint {path} is unreadable; delete it to start the stage afresh")
        self.model.load_state_dict(ckpt.load_tensors(path / ckpt.MODEL_FILE), strict=True)
        opt_state = ckpt.join_optimizer_state(ckpt.load_tensors(path / ckpt.OPTIMIZER_TENSORS),
                                              ckpt.read_json(path / ckpt.OPTIMIZER_JSON))
        self.optimizer.load_state_dict(opt_state)
        if record.get("best") == "file":
            self.best_state = ckpt.load_tensors(path / ckpt.BEST_FILE)
        elif record.get("best") == "current":
            self.best_state = ckpt.cpu_state_copy(self.model.state_dict())
        else:
            self.best_state = None
        if self.accelerator.scaler is not None and record.get("scaler"):
            self.accelerator.scaler.load_state_dict(record["scaler"])
        rng_file = path / f"rng-{self.rank}.safetensors"
        if rng_file.is_file():
            ckpt.set_rng_state(ckpt.load_tensors(rng_file), ckpt.read_json(path / f"rng-{self.rank}.json"))
        self.state = _LoopState.from_dict(record["loop"])
        self._saved_step = self.state.step

    def _load_finished(self, path: Path) -> FineTuneResult:
        record = ckpt.read_state(path)
        self.model.load_state_dict(ckpt.load_tensors(path / ckpt.MODEL_FILE), strict=True)
        self.state = _LoopState.from_dict(record["loop"])
        self._say(f"{self.stage} already finished in {path}; loaded its weights")
        extra = record["result"]["extra"]
        self._emit(self.state.step, resumed=True, finished=True, best_eval_loss=self.state.best_eval_loss,
                   best_step=self.state.best_step, stopped_early=self.state.stopped_early,
                   restored_best=extra.get("restored_best", False), rollbacks=self.state.rollbacks,
                   skipped_steps=self.state.skipped_steps)
        return self._result(extra)

    def _rollback(self, reason: str) -> None:
        state = self.state
        target = self._rollback_target()
        if target is None or state.rollbacks >= self.opts["max_rollbacks"]:
            raise TrainingDivergedError(
                f"{self.stage} diverged at step {state.step} ({reason}) after {state.rollbacks} rollbacks with the "
                f"learning rate scaled to {state.lr_scale:g}x; lower learning_rate (now {self.config.learning_rate:g}) "
                f"or max_grad_norm, or check the data")
        keep = {"lr_scale": state.lr_scale * 0.5, "rollbacks": state.rollbacks + 1,
                "skipped_steps": state.skipped_steps, "tokens": state.tokens}
        from_step = state.step
        self.phase = "rollback"
        self._load_checkpoint(target)
        for key, value in keep.items():
            setattr(self.state, key, value)
        self.state.bad_in_row = 0
        self.phase = "idle"
        if self._bar is not None:
            self._bar.reset(total=self.total)
            self._bar.update(self.state.step)
        self._say(f"{self.stage}: {reason}; rolled back from step {from_step} to step {self.state.step} "
                  f"with the learning rate scaled to {self.state.lr_scale:g}x", force=True)
        self._emit(self.state.step, rollback=True, lr_scale=self.state.lr_scale, rolled_back_from=from_step,
                   reason=reason)

    # -- the end -------------------------------------------------------------------------------

    def _finish(self) -> FineTuneResult:
        state = self.state
        restored = False
        if self.best_state is not None and state.best_step is not None and state.best_step != state.step:
            self.model.load_state_dict(self.best_state, strict=True)
            restored = True
        if not self._weights_finite():
            raise TrainingDivergedError(f"{self.stage} ended with non-finite weights; lower learning_rate "
                                        f"(now {self.config.learning_rate:g}) and run the stage again")
        extra = self._extra(restored)
        self._save_checkpoint(ckpt.FINAL, result={"extra": extra})
        if self.is_main:
            ckpt.remove_step_checkpoints(self.directory)
        self._emit(state.step, finished=True, best_eval_loss=state.best_eval_loss, best_step=state.best_step,
                   stopped_early=state.stopped_early, restored_best=restored, rollbacks=state.rollbacks,
                   skipped_steps=state.skipped_steps)
        return self._result(extra)

    def _extra(self, restored: bool) -> dict[str, Any]:
        s = self.state
        return {"total_steps": self.total, "best_step": s.best_step, "stopped_early": s.stopped_early,
                "restored_best": restored, "rollbacks": s.rollbacks, "skipped_steps": s.skipped_steps,
                "lr_scale": s.lr_scale, "global_batch": self.global_batch, "world_size": self.world,
                "mixed_precision": self.accelerator.mixed_precision,
                "eval_history": [[st, v if math.isfinite(v) else None] for st, v in s.eval_history],
                "groups": {g.name: g.lr_scale for g in self.groups}}

    def _result(self, extra: dict[str, Any]) -> FineTuneResult:
        s = self.state
        best = s.best_eval_loss if math.isfinite(s.best_eval_loss) else math.nan
        return FineTuneResult(steps=s.step, strategy=self.config.fine_tune, best_eval_loss=best,
                              final_train_loss=s.last_loss, seconds=s.seconds, tokens=s.tokens, extra=extra)

    def _on_interrupt(self, saved: bool) -> None:
        """After Ctrl-C or SIGTERM: make sure a checkpoint exists and say how to resume."""
        if not saved and self.phase in ("idle", "step", "eval") and self.world == 1:
            try:
                if self._weights_finite() and self._saved_step != self.state.step:
                    self._save_checkpoint()
            except Exception as exc:  # the interrupt matters more than a failed save
                self._say(f"could not save a checkpoint on interrupt: {exc}", force=True)
        if not self.is_main:
            return
        output_dir = Path(self.config.output_dir)
        if self.resume_hint:
            print(self.resume_hint.format(step=self.state.step, stage=self.stage), file=sys.stderr)
        elif (output_dir / RUN_CONFIG_FILE).is_file():
            print(_RESUME_COMMAND.format(output_dir=output_dir), file=sys.stderr)
        else:
            print(f"Interrupted: {self.stage} checkpoint in {self.directory}; call train() again with the same "
                  f"output_dir and stage to resume", file=sys.stderr)

    # -- output --------------------------------------------------------------------------------

    def _open_progress(self) -> None:
        show = self.is_main and not self.config.quiet and sys.stderr.isatty()
        if not show:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.total, initial=self.state.step, desc=self.stage, unit="step",
                         dynamic_ncols=True, file=sys.stderr)

    def _emit(self, step: int, **values: Any) -> None:
        if not self.is_main:
            return
        try:
            emit(self.stage, step, **values)
        except KeyboardInterrupt:
            # A hook (or a Ctrl-C landing in one) asked to stop: stop at this step's end, cleanly.
            self.signals.request("interrupt")

    def _say(self, message: str, *, force: bool = False) -> None:
        if self.is_main and (force or not self.config.quiet):
            if self._bar is not None:
                self._bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)


def train(
    model: nn.Module,
    data: Any,
    config: ExperimentConfig,
    *,
    stage: str,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    lr_multiplier: LrMultiplier | None = None,
    resume: bool = True,
    resume_hint: str | None = None,
) -> FineTuneResult:
    """Train ``model`` in place on ``data.train.blocks``, evaluating on ``data.validation.blocks``.

    Args:
        model: a causal LM (returns ``.logits``). It is moved to the configured device, and
            comes back in the train/eval mode it had, holding the best weights seen.
        data: an :class:`sentinel_core.data.LMData` (only ``train.blocks`` and
            ``validation.blocks`` are used).
        config: ``learning_rate``, ``num_epochs``, ``batch_size`` (per process and micro-batch),
            ``gradient_accumulation_steps``, ``max_steps``, ``warmup_fraction``,
            ``max_grad_norm``, ``eval_every``, ``max_eval_blocks``, ``patience`` (0: no early
            stopping), ``checkpoint_every``, ``mixed_precision``, ``device``, ``seed``,
            ``quiet``, ``output_dir``; ``options``: ``weight_decay`` (0.01), ``max_bad_steps``
            (3), ``max_rollbacks`` (3), ``keep_checkpoints`` (2).
        stage: names the metrics and the checkpoint folder ``checkpoints/<stage>-steps``.
        param_groups: optional ``[{"name", "params", "lr_scale"}]``; parameters in no group
            train in group ``base`` at scale 1. A group without parameters is not optimized
            but its rate is still computed and reported (``lr/<name>``).
        lr_multiplier: optional ``f(step, total_steps, group_name) -> float``, called before
            every optimizer step (``step`` is 0-based) to multiply that group's scheduled rate.
        resume: continue from the newest step checkpoint of ``stage`` in ``output_dir`` when it
            belongs to this run (same settings, data and starting weights); otherwise, and when
            False, start afresh and overwrite them.
        resume_hint: what to print after Ctrl-C or SIGTERM, telling the user how to continue
            (``{step}`` and ``{stage}`` are filled in); by default the ``sentinel run --resume``
            command inside a run folder, else how to call ``train`` again.

    Returns:
        :class:`FineTuneResult`; ``extra`` holds ``best_step``, ``stopped_early``,
        ``rollbacks``, ``skipped_steps``, ``eval_history`` and more.

    Raises:
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once a checkpoint is saved.
        TrainingDivergedError: when non-finite losses persist through ``max_rollbacks`` rollbacks.
        SentinelError: for settings that cannot work (too little data, bad groups, ...).
    """
    return _Trainer(model, data, config, stage, param_groups, lr_multiplier, resume_hint).run(resume)
