"""The one training loop, shared by every fine-tuner, growth's recovery and the demo model.

:func:`train` runs on Hugging Face Accelerate: it places the model on the configured device,
uses mixed precision on GPUs (``mixed_precision="auto"``: bf16 where the GPU supports it, fp16
otherwise, none on the CPU), and trains data-parallel when started with ``torchrun`` or
``accelerate launch`` on several processes, without any change to the calling code.

The recipe: AdamW (no weight decay on biases and normalisation weights), linear warm-up then
cosine decay, gradient clipping, gradient accumulation, evaluation on held-out blocks every
``eval_every`` steps, the best model by the chosen validation metric kept and restored at the
end, early stopping after ``patience`` evaluations without improvement.

Seams (docs/fine-tuning.md): a loss of your own (:mod:`.losses`), callbacks that see every
step and may wrap the model (:mod:`.callbacks`), and a state that is saved with every step
checkpoint so they survive resume (:mod:`.state`).

Reliability: a step whose loss (or gradient norm) is not finite is skipped (decided on the
device, the step's numbers read back one step late: :mod:`.deferred_step`); after
``max_bad_steps`` of them in a row the run rolls back to its last good checkpoint and halves the
learning rate. Step checkpoints (:mod:`.checkpoints`) are written every ``checkpoint_every``
steps and when the run is stopped by Ctrl-C or SIGTERM, so a later call with the same
``output_dir`` and ``stage`` continues where it stopped and ends with the same weights as a run
that was never interrupted.
"""

from .callbacks import TrainerCallback, TrainingContext
from .loop import SELECT_ON, TrainingDivergedError, step_checkpoint_dir, train
from .losses import LossFn, causal_lm_loss, lm_loss, logits_of
from .schedule import cosine_schedule
from .setup import BASE_GROUP, TRAINING_OPTIONS, LrMultiplier, resolve_mixed_precision
from .state import TrainerState

__all__ = [
    "BASE_GROUP",
    "SELECT_ON",
    "TRAINING_OPTIONS",
    "LossFn",
    "LrMultiplier",
    "TrainerCallback",
    "TrainerState",
    "TrainingContext",
    "TrainingDivergedError",
    "causal_lm_loss",
    "cosine_schedule",
    "lm_loss",
    "logits_of",
    "resolve_mixed_precision",
    "step_checkpoint_dir",
    "train",
]
