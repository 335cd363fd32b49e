"""The training loop: :func:`train` and the trainer behind it (see the package docstring)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ExperimentConfig
from ..errors import SentinelError
from ..log import get_logger
from ..plugins import collect_training_callbacks, emit
from ..results import FineTuneResult
from ..run_files import RUN_CONFIG_FILE
from . import checkpoints as ckpt
from .callbacks import CallbackList, TrainerCallback, TrainingContext
from .deferred_step import PendingStep, StepLogs, fused_adamw_on, non_finite, skips_on_device, step_unless
from .lora import lora_callback
from .losses import LossFn, causal_lm_loss, counted_tokens, lm_loss
from .progress import ProgressReporter
from .schedule import cosine_schedule
from .setup import (
    LrMultiplier,
    build_groups,
    check_stage,
    loop_options,
    make_accelerator,
    model_dtype,
    optimizer_groups,
    training_precision,
)
from .signals import GracefulStop, StopSignals
from .state import TrainerState

log = get_logger("training")
_DEFAULT = object()  # select_on not given: follow the loss the loop trains with
_RESUME_COMMAND = "Interrupted: resume with `sentinel run --resume {output_dir}`"
SELECT_ON = ("eval_loss", "eval_objective")


class TrainingDivergedError(SentinelError):
    """Training could not recover from non-finite losses or weights; the message says what to change."""


def _qualified_name(function: Any) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def step_checkpoint_dir(output_dir, stage: str) -> Path:
    """Where :func:`train` keeps the step checkpoints of ``stage``."""
    return ckpt.stage_dir(output_dir, stage)


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().to("cpu").contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _ppl(loss: float) -> float:
    return math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf


# -- the trainer -------------------------------------------------------------------------------


class _Trainer:
    def __init__(self, model: nn.Module, data: Any, config: ExperimentConfig, stage: str, *,
                 param_groups: Sequence[Mapping[str, Any]] | None, lr_multiplier: LrMultiplier | None,
                 resume_hint: str | None, callbacks: Sequence[TrainerCallback], loss_fn: LossFn | None,
                 select_on: str | None | object) -> None:
        check_stage(stage)
        self.resume_hint = resume_hint
        self.config, self.stage, self.model = config, stage, model
        self.original_model = model
        self.opts = loop_options(config)
        self.lr_multiplier = lr_multiplier
        self.param_groups = param_groups
        # Groups as the caller described them, before any callback wraps the model: they are
        # part of the run's settings, which must not depend on the wrapping.
        self.groups = build_groups(model, param_groups)
        self.loss_fn = loss_fn or lm_loss
        if select_on is _DEFAULT:
            select_on = "eval_objective" if loss_fn is not None else "eval_loss"
        if select_on not in (*SELECT_ON, None):
            raise SentinelError(f"select_on {select_on!r} must be one of {', '.join(SELECT_ON)} or None (keep-best "
                                "and early stopping off)")
        if select_on == "eval_objective" and loss_fn is None:
            raise SentinelError("select_on='eval_objective' needs a loss_fn; the default loss's objective is eval_loss")
        self.select_on = select_on
        # LoRA first: it wraps first and merges last, around whatever the others do.
        self.progress = ProgressReporter()
        self.callbacks = CallbackList([*lora_callback(config), *callbacks,
                                       *collect_training_callbacks(model=model, config=config, stage=stage),
                                       self.progress])

        blocks = data.train.blocks
        if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[1] < 2:
            raise SentinelError("data.train.blocks must be a [n_blocks, block_size >= 2] tensor of token ids")
        self.train_blocks = blocks
        eval_blocks = data.validation.blocks
        if config.max_eval_blocks:
            eval_blocks = eval_blocks[: config.max_eval_blocks]
        self.eval_blocks = eval_blocks

        # A bf16/fp16 model trains as a float32 master copy (config.master_weights) and goes back
        # to its own dtype at the end, so the saved model keeps the dtype the user loaded. Under
        # LoRA with autocast only the adapters train, so only they get the master copy (in
        # _prepare), as in peft's usual recipe. A float32 copy of the frozen base would double its
        # memory: autocast casts its matrices back to the same half-precision values at every
        # forward, so all it buys is a float32 residual stream (measured: the adapters' update
        # differs by about 1%). mixed_precision "no" computes in float32 and keeps the whole copy.
        self.loaded_dtype = model_dtype(model)
        master, precision = training_precision(config, self.loaded_dtype)
        self.master_for_trained_only = master if master is not None and config.lora_rank and precision != "no" \
            else None
        if master is not None and self.master_for_trained_only is None:
            model.to(master)
        self.accelerator = make_accelerator(config, precision)
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
        self.state = TrainerState(total_steps=self.total, stage=stage, metric=select_on)
        self.context = TrainingContext(model=model, config=config, stage=stage, world_size=self.world, rank=self.rank,
                                       is_main=self.is_main, device=self.accelerator.device)
        self.best_state: dict[str, torch.Tensor] | None = None
        self.signals = StopSignals(announce=self.is_main and not config.quiet)
        self.phase = "setup"
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)
        self._seconds_before = 0.0
        self._session_start = time.perf_counter()
        self._saved_step: int | None = None
        self._rng_at_step_start: dict[str, torch.Tensor] | None = None
        self._pending: PendingStep | None = None  # the last step, until its numbers are read
        self._skip_on_device = False

    # -- public entry ------------------------------------------------------------------------

    def run(self, resume: bool) -> FineTuneResult:
        from accelerate.utils import set_seed

        was_training = self.model.training
        set_seed(self.config.seed, device_specific=True)
        self.wrapped = self.optimizer = None
        self._checkpointing_enabled = False
        try:
            with self.signals:
                return self._run(resume)
        except KeyboardInterrupt as exc:
            self._on_interrupt(saved=isinstance(exc, GracefulStop))
            raise
        finally:
            self.progress.close()
            if self.wrapped is not None:
                self.accelerator.unwrap_model(self.wrapped, keep_fp32_wrapper=False)  # undo autocast on forward
            # Not acc.free_memory(): its gc.collect() costs ~0.3 s per call; dropping the
            # references is enough for the optimizer state to be freed.
            self.wrapped = self.optimizer = self.accelerator = self.context.optimizer = None
            if self._checkpointing_enabled:
                _checkpointing(self.original_model, "disable")()
            if model_dtype(self.original_model) != self.loaded_dtype:
                self.original_model.to(self.loaded_dtype)
            self.original_model.train(was_training)

    def _prepare(self) -> None:
        """Wrap the model (callbacks), then build the optimizer on what trains."""
        if self.config.gradient_checkpointing and not _is_checkpointing(self.model):
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise SentinelError(f"{type(self.model).__name__} does not support gradient checkpointing; "
                                    "drop --gradient-checkpointing")
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self._checkpointing_enabled = True
        self.model = self.callbacks.wrap(self.model, self.state, self.context)
        if self.master_for_trained_only is not None:
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(self.master_for_trained_only)
        # The parameters that train now (a wrapper may have frozen some and added others).
        groups = self.train_groups = build_groups(self.model, self.param_groups)
        # Fused AdamW can skip a non-finite step on a device flag (deferred_step).
        use_fused = fused_adamw_on(self.accelerator.device)
        optimizer = torch.optim.AdamW(optimizer_groups(groups, self.opts["weight_decay"]),
                                      lr=self.config.learning_rate, fused=use_fused or None)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self._skip_on_device = skips_on_device(self.optimizer, self.accelerator.scaler)
        self.context.model, self.context.optimizer = self.model, self.optimizer

    # -- main flow ---------------------------------------------------------------------------

    def _run(self, resume: bool) -> FineTuneResult:
        self.start_fingerprint = ckpt.weights_fingerprint(self.model.state_dict())
        self.settings = self._settings()
        found = self._find_resume_point() if resume else None
        if found is not None and found.name == ckpt.FINAL:
            return self._load_finished(found)
        self._prepare()
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
        self.model.train()
        self.callbacks.fire("on_train_begin", self.state, self.context)
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
            "dtype": str(self.loaded_dtype).removeprefix("torch."), "master_weights": c.master_weights,
            "total_steps": self.total, "train_blocks": list(self.train_blocks.shape),
            "train_digest": _digest(self.train_blocks), "eval_blocks": list(self.eval_blocks.shape),
            "eval_digest": _digest(self.eval_blocks),
            "groups": [[g.name, g.lr_scale, len(g.params)] for g in self.groups],
            "options": c.options,
            "loss": None if self.loss_fn is lm_loss else _qualified_name(self.loss_fn),
            "select_on": self.select_on, "callbacks": self.callbacks.settings(),
        }
        return json.loads(json.dumps(settings, sort_keys=True, default=str))

    # -- one step ----------------------------------------------------------------------------

    def _learning_rates(self, step: int) -> dict[str, float]:
        base = self.config.learning_rate * cosine_schedule(step, self.total, self.warmup) * self.state.lr_scale
        rates = {}
        for group in self.train_groups:
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

    def _batch(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        ids = ids.to(self.accelerator.device)
        return {"input_ids": ids, "labels": ids}

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
        self.callbacks.fire("on_step_begin", state, self.context)
        batches = self._micro_batches(step)
        counts = [counted_tokens(b) for b in batches]
        n_tokens = float(sum(counts))
        if self.world > 1:
            n_tokens = float(self._all_reduce(torch.tensor([n_tokens]))[0])
        # Each micro-batch counts by its share of the step's tokens, so the step's loss is the
        # token mean over the global batch; DDP averages gradients over processes, hence world.
        log_names: list[str] = []
        sums: list[torch.Tensor] = [torch.zeros((), device=acc.device)]
        for m, ids in enumerate(batches):
            sync = acc.no_sync(self.wrapped) if m < len(batches) - 1 else nullcontext()
            with sync:
                loss, logs = self.loss_fn(self.wrapped, self._batch(ids), state)
                acc.backward(loss * (counts[m] * self.world / max(n_tokens, 1.0)))
            sums[0] = sums[0] + loss.detach().float() * counts[m]
            for name, value in logs.items():
                if name not in log_names:
                    log_names.append(name)
                    sums.append(torch.zeros((), device=acc.device))
                index = log_names.index(name) + 1
                sums[index] = sums[index] + torch.as_tensor(value, device=acc.device).detach().float() * counts[m]
        grad_norm = acc.clip_grad_norm_(self.wrapped.parameters(), self.config.max_grad_norm)
        if grad_norm is None:  # some back-ends clip without reporting the norm
            grad_norm = torch.zeros(())
        totals = torch.stack(sums)
        if self.world > 1:
            totals = self._all_reduce(totals)
        # The loss, the loop's logs and the gradient norm in one tensor, read back as one.
        record = torch.cat([totals / max(n_tokens, 1.0),
                            torch.as_tensor(grad_norm, device=totals.device).float().reshape(1)])
        if self._skip_on_device:
            found_inf = non_finite(record[0], record[-1])
            pending = PendingStep(torch.cat([record, found_inf.to(record.dtype).reshape(1)]), log_names)
            # The previous step's numbers are on the host by now: count and report it while this
            # step's work runs. If that rolled back, or a hook asked to stop at the end of that
            # step (one process only: processes agree on stops in _after_step), this step never
            # happened: its gradients go, and its random draws are undone for the resumed run.
            rolled_back = self._settle_pending()
            if rolled_back or (self.signals.requested and self.world == 1):
                self.optimizer.zero_grad(set_to_none=True)
                if not rolled_back:
                    ckpt.set_rng_state(*ckpt.rng_state(self._rng_at_step_start))
                self.phase = "idle"
                return
            self.phase = "update"
            step_unless(self.optimizer, found_inf)
        else:
            values_read = record.tolist()
            # fp16's loss scaler skips overflowing steps and lowers the scale itself: that is not divergence.
            good = math.isfinite(values_read[0]) and (math.isfinite(values_read[-1]) or acc.scaler is not None)
            pending = PendingStep([*values_read, 0.0 if good else 1.0], log_names)
            self.phase = "update"
            if good:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.step = step + 1
        state.tokens += self.global_batch * int(self.train_blocks.shape[1])
        pending.step = step + 1
        pending.known = {"epoch": state.step / self.steps_per_epoch, "tokens": state.tokens}
        if len(rates) == 1:
            pending.known["lr"] = next(iter(rates.values()))
        else:
            pending.known.update({f"lr/{name}": rate for name, rate in rates.items()})
        self._pending = pending
        if not self._skip_on_device:
            self._count(pending)
        self.phase = "idle"
        perplexity = _ppl if self.loss_fn is lm_loss else None  # ppl of another objective would mislead
        self.callbacks.fire("on_step_end", state, self.context,
                            StepLogs(pending.known, lambda: pending.values(perplexity)))
        if not self._skip_on_device:
            self._settle_pending()

    def _count(self, pending: PendingStep) -> None:
        """Count a step as good or skipped (the state max_bad_steps and rollbacks read)."""
        state, previous_phase = self.state, self.phase
        self.phase = "update"
        if pending.skipped:
            state.bad_in_row += 1
            state.skipped_steps += 1
        else:
            state.bad_in_row = 0
            state.last_loss = pending.loss
        pending.counted = True
        self.phase = previous_phase

    def _settle_pending(self) -> bool:
        """Count (if not yet) and report the step whose numbers were still pending: its metric
        event, and the rollback when it completes ``max_bad_steps`` skipped steps in a row.
        Returns whether it rolled back. With the deferred step this runs one step late (inside
        the next step, before its update), or when the host needs the state: see _after_step."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        if not pending.counted:
            self._count(pending)
        state = self.state
        self._emit(pending.step, **pending.values(_ppl if self.loss_fn is lm_loss else None))
        if pending.skipped:
            self._say(f"{self.stage}: step {pending.step} has a non-finite loss or gradient; skipped it "
                      f"({state.bad_in_row} in a row)")
            if state.bad_in_row >= self.opts["max_bad_steps"]:
                self._rollback(f"{state.bad_in_row} non-finite steps in a row")
                return True
        return False

    def _after_step(self) -> None:
        """Work that belongs to the step just committed: evaluation, checkpoint, stop requests."""
        if self._pending is not None and self._host_needs_the_step():
            self._settle_pending()  # may roll back, which replaces self.state
        state = self.state
        self._maybe_evaluate()
        due = state.step % self.config.checkpoint_every == 0 and 0 < state.step < self.total
        if due and state.bad_in_row == 0 and self._saved_step != state.step:
            if not self._weights_finite():
                self._rollback("non-finite weights before a checkpoint")
            else:
                self._save_checkpoint()
        if self._stop_requested():
            self._settle_pending()
            state = self.state
            if self._saved_step != state.step:
                if self._weights_finite():
                    self._save_checkpoint()
            raise GracefulStop(self.signals.reason or "Ctrl-C")

    def _host_needs_the_step(self) -> bool:
        """Whether what follows the step just queued reads the loop's state (an evaluation, a
        checkpoint, the end), so the step must be counted first (a stop settles it itself)."""
        step = self.state.step
        return self._evaluation_due(step) or step % self.config.checkpoint_every == 0 or step >= self.total

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

    def _frozen_keys(self) -> set[str]:
        """State-dict keys of the parameters that do not train (under LoRA: the whole base)."""
        frozen = {id(p) for p in self.model.parameters() if not p.requires_grad}
        return {k for k, v in self.model.state_dict(keep_vars=True).items() if id(v) in frozen}

    def _copy_what_trains(self) -> dict[str, torch.Tensor]:
        """A CPU copy of what training can change: trained parameters and every buffer.

        Keep-best holds one such copy. Frozen parameters never change within a stage, so
        under LoRA the copy is the adapters' size rather than the model's.
        """
        frozen = self._frozen_keys()
        return ckpt.cpu_state_copy({k: v for k, v in self.model.state_dict().items() if k not in frozen})

    def _restore(self, best: Mapping[str, torch.Tensor]) -> None:
        """Load a keep-best copy; whatever it leaves out must be frozen (unchanged since)."""
        result = self.model.load_state_dict(best, strict=False)
        left_out = set(result.missing_keys) - self._frozen_keys()
        if result.unexpected_keys or left_out:
            raise RuntimeError(f"the kept best weights do not fit the model: unexpected {result.unexpected_keys}, "
                               f"missing trained tensors {sorted(left_out)}")

    def _weights_finite(self) -> bool:
        return ckpt.all_finite(self.model.parameters())

    # -- evaluation ----------------------------------------------------------------------------

    def _maybe_evaluate(self) -> None:
        state = self.state
        step = state.step
        if not self._evaluation_due(step):
            return
        self.phase = "eval"
        metrics = self._evaluate()
        loss = metrics["eval_loss"]
        self.phase = "update"  # the bookkeeping below must happen as a whole
        if self.select_on is None:  # keep-best and early stopping off: the last weights count
            state.best_eval_loss, state.best_step = loss, step
        else:
            value = metrics[self.select_on]
            if math.isfinite(value) and value < state.best_metric:
                self.best_state = self._copy_what_trains()
                state.best_metric, state.best_eval_loss, state.best_step, state.evals_since_best = value, loss, step, 0
            else:
                state.evals_since_best += 1
        state.last_eval_step = step
        state.eval_history.append([step, loss])
        patience = self.config.patience if self.select_on is not None else 0
        if patience and state.evals_since_best >= patience and step < self.total:
            state.stopped_early = True
        self.phase = "idle"
        self.callbacks.fire("on_evaluate", state, self.context, metrics)
        extra = {"eval_objective": metrics["eval_objective"], "best_metric": state.best_metric} \
            if "eval_objective" in metrics else {}
        self._emit(step, eval_loss=loss, eval_perplexity=_ppl(loss), best_eval_loss=state.best_eval_loss,
                   best_step=state.best_step, **extra)
        if state.stopped_early:
            self._say(f"{self.stage}: stopping early at step {step}: no better {self.select_on} in "
                      f"{patience} evaluations (best {state.best_metric:.4f} at step {state.best_step})")

    def _evaluation_due(self, step: int) -> bool:
        return self.state.last_eval_step != step and (step % self.config.eval_every == 0 or step == self.total)

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Mean token loss on the held-out blocks (split over processes, summed back), and the
        mean of a custom loss_fn there (``eval_objective``)."""
        self.model.eval()
        blocks = self.eval_blocks[self.rank::self.world]
        device = self.accelerator.device
        sums = torch.zeros(3, dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
        custom = self.loss_fn is not lm_loss
        for start in range(0, int(blocks.shape[0]), self.micro):
            batch = self._batch(blocks[start:start + self.micro].long())
            # The bare module, not the DDP wrapper: processes may run different numbers of eval
            # batches, and DDP's forward would wait for the others.
            nll, n = causal_lm_loss(self._logits(batch), batch["labels"])
            sums[0] += nll.to(sums.dtype)
            sums[1] += n.to(sums.dtype)
            if custom:
                objective, _ = self.loss_fn(self.model, batch, self.state)
                sums[2] += objective.detach().to(sums.dtype) * n.to(sums.dtype)
        if self.world > 1:
            sums = self._all_reduce(sums)
        self.model.train()
        loss_sum, n_tokens, objective_sum = sums.tolist()
        metrics = {"eval_loss": loss_sum / n_tokens if n_tokens else math.nan}
        if custom:
            metrics["eval_objective"] = objective_sum / n_tokens if n_tokens else math.nan
        return metrics

    def _logits(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from .losses import logits_of

        return logits_of(self.model, batch)

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
                "callbacks": self.callbacks.state_dicts(),
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
            self.callbacks.fire("on_save", state, self.context, self.directory / name)
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
            self.best_state = self._copy_what_trains()
        else:
            self.best_state = None
        if self.accelerator.scaler is not None and record.get("scaler"):
            self.accelerator.scaler.load_state_dict(record["scaler"])
        rng_file = path / f"rng-{self.rank}.safetensors"
        if rng_file.is_file():
            ckpt.set_rng_state(ckpt.load_tensors(rng_file), ckpt.read_json(path / f"rng-{self.rank}.json"))
        self.state = TrainerState.from_dict(record["loop"])
        self.callbacks.load_state_dicts(record.get("callbacks") or {})
        self._saved_step = self.state.step
        self.callbacks.fire("on_load", self.state, self.context, path)

    def _load_finished(self, path: Path) -> FineTuneResult:
        record = ckpt.read_state(path)
        self.model.load_state_dict(ckpt.load_tensors(path / ckpt.MODEL_FILE), strict=True)
        self.state = TrainerState.from_dict(record["loop"])
        self.callbacks.load_state_dicts(record.get("callbacks") or {})
        self.context.from_final_record = True
        self.callbacks.fire("on_train_end", self.state, self.context)
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
        self._say(f"{self.stage}: {reason}; rolled back from step {from_step} to step {self.state.step} "
                  f"with the learning rate scaled to {self.state.lr_scale:g}x", force=True)
        self._emit(self.state.step, rollback=True, lr_scale=self.state.lr_scale, rolled_back_from=from_step,
                   reason=reason)

    # -- the end -------------------------------------------------------------------------------

    def _finish(self) -> FineTuneResult:
        state = self.state
        restored = False
        if self.best_state is not None and state.best_step is not None and state.best_step != state.step:
            self._restore(self.best_state)
            restored = True
        self.accelerator.unwrap_model(self.wrapped, keep_fp32_wrapper=False)
        self.wrapped = None
        self.context.extra["restored_best"] = restored
        self.model = self.callbacks.unwrap(self.model, state, self.context)
        if self.model is not self.original_model:
            raise RuntimeError("a training callback's unwrap_model did not give back the model that train() got; "
                               "wrap_model may return another module, but unwrap_model must return the original")
        self.callbacks.fire("on_train_end", state, self.context)
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
                "groups": {g.name: g.lr_scale for g in self.groups}, "select_on": self.select_on,
                "best_metric": s.best_metric if math.isfinite(s.best_metric) else None}

    def _result(self, extra: dict[str, Any]) -> FineTuneResult:
        s = self.state
        best = s.best_eval_loss if math.isfinite(s.best_eval_loss) else math.nan
        return FineTuneResult(steps=s.step, strategy=self.config.fine_tune, best_eval_loss=best,
                              final_train_loss=s.last_loss, seconds=s.seconds, tokens=s.tokens, extra=extra)

    def _on_interrupt(self, saved: bool) -> None:
        """After Ctrl-C or SIGTERM: make sure a checkpoint exists and say how to resume."""
        if not saved and self.phase in ("idle", "step", "eval") and self.world == 1:
            try:
                self._settle_pending()  # the step before the interrupt counts, and its event is sent
                if self._weights_finite() and self._saved_step != self.state.step:
                    self._save_checkpoint()
            except Exception as exc:  # the interrupt matters more than a failed save
                self._say(f"could not save a checkpoint on interrupt: {exc}", force=True)
        if not self.is_main:
            return
        output_dir = Path(self.config.output_dir)
        if self.resume_hint:
            log.warning(self.resume_hint.format(step=self.state.step, stage=self.stage))
        elif (output_dir / RUN_CONFIG_FILE).is_file():
            log.warning(_RESUME_COMMAND.format(output_dir=output_dir))
        else:
            log.warning(f"Interrupted: {self.stage} checkpoint in {self.directory}; call train() again with the same "
                        f"output_dir and stage to resume")

    # -- output --------------------------------------------------------------------------------

    def _emit(self, step: int, **values: Any) -> None:
        if not self.is_main:
            return
        try:
            emit(self.stage, step, **values)
        except KeyboardInterrupt:
            # A hook (or a Ctrl-C landing in one) asked to stop: stop at this step's end, cleanly.
            self.signals.request("interrupt")

    def _say(self, message: str, *, force: bool = False) -> None:
        """Tell the user (main process only): information, or with ``force`` a warning that
        ``quiet`` does not hide."""
        if not self.is_main:
            return
        if force:
            log.warning(message)
        elif not self.config.quiet:
            log.info(message)


def train(
    model: nn.Module,
    data: Any,
    config: ExperimentConfig,
    *,
    stage: str,
    param_groups: Sequence[Mapping[str, Any]] | None = None,
    lr_multiplier: LrMultiplier | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    loss_fn: LossFn | None = None,
    select_on: str | None | object = _DEFAULT,
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
            ``quiet``, ``output_dir``; the options in :data:`TRAINING_OPTIONS`.
        stage: names the metrics and the checkpoint folder ``checkpoints/<stage>-steps``.
        param_groups: optional ``[{"name", "params", "lr_scale"}]``; parameters in no group
            train in group ``base`` at scale 1. A group without parameters is not optimized
            but its rate is still computed and reported (``lr/<name>``).
        lr_multiplier: optional ``f(step, total_steps, group_name) -> float``, called before
            every optimizer step (``step`` is 0-based) to multiply that group's scheduled rate.
        callbacks: :class:`~sentinel_core.training.callbacks.TrainerCallback` objects, fired in
            this order before those plugins add (``register_training_callbacks``).
        loss_fn: ``loss_fn(model, batch, state) -> (loss, logs)`` (see
            :mod:`sentinel_core.training.losses`); default the causal-LM cross-entropy.
        select_on: what keep-best and early stopping follow: ``"eval_loss"`` (validation
            cross-entropy), ``"eval_objective"`` (``loss_fn`` on the validation blocks), or None
            (both off: the last weights come back). Default: the objective of the loss trained
            with (``eval_objective`` when ``loss_fn`` is given, else ``eval_loss``).
        resume: continue from the newest step checkpoint of ``stage`` in ``output_dir`` when it
            belongs to this run (same settings, data and starting weights); otherwise, and when
            False, start afresh and overwrite them.
        resume_hint: what to print after Ctrl-C or SIGTERM, telling the user how to continue
            (``{step}`` and ``{stage}`` are filled in); by default the ``sentinel run --resume``
            command inside a run folder, else how to call ``train`` again.

    Returns:
        :class:`FineTuneResult`; ``extra`` holds ``best_step``, ``stopped_early``,
        ``rollbacks``, ``skipped_steps``, ``eval_history``, ``select_on`` and more.

    Raises:
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once a checkpoint is saved.
        TrainingDivergedError: when non-finite losses persist through ``max_rollbacks`` rollbacks.
        SentinelError: for settings that cannot work (too little data, bad groups, ...).
    """
    trainer = _Trainer(model, data, config, stage, param_groups=param_groups, lr_multiplier=lr_multiplier,
                       resume_hint=resume_hint, callbacks=callbacks, loss_fn=loss_fn, select_on=select_on)
    return trainer.run(resume)


# transformers 5 renamed gradient checkpointing to activation checkpointing (the old names warn
# and go in v6); use the new names where they exist.
def _checkpointing(model: nn.Module, action: str):
    new = getattr(model, f"activation_checkpointing_{action}", None)
    return new if new is not None else getattr(model, f"gradient_checkpointing_{action}")


def _is_checkpointing(model: nn.Module) -> bool:
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))
