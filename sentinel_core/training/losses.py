"""Losses for the training loop: the causal-LM loss, and the contract of a pluggable one.

A loss function is ``loss_fn(model, batch, state) -> (loss, logs)``:

- ``model`` is what trains (the module to call, wrapped for data-parallel training);
- ``batch`` is a micro-batch: ``input_ids`` and ``labels`` (``[batch, tokens]``, labels equal
  to the ids, -100 on positions no loss counts) on the training device;
- ``state`` is the loop's :class:`~sentinel_core.training.state.TrainerState`;
- ``loss`` is a scalar tensor: the **mean over the micro-batch's counted tokens** (the
  positions with a next-token label). The loop weights each micro-batch by its share of the
  step's tokens, so the step's loss is the exact token mean over the whole global batch, for
  any gradient accumulation and number of processes;
- ``logs`` maps names to scalar values (tensors or floats) measured the same way (per-token
  means); the loop reports their token-weighted step means as metrics (``kl``, ``ce``, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor], Any], tuple[torch.Tensor, Mapping[str, Any]]]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood and the number of tokens it covers.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels equal to -100 (padding)
    are left out of both the sum and the count. The loss is computed in float32.
    """
    # Shift the labels rather than the logits, so the large logits tensor is not copied.
    shifted = next_token_labels(labels)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1).to(logits.device),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, (shifted != IGNORE_INDEX).sum()


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` shifted left by one (what each position predicts), -100 at the end."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def counted_tokens(labels: torch.Tensor) -> int:
    """How many positions of ``labels`` have a next-token target (the loss's divisor)."""
    return int((next_token_labels(labels) != IGNORE_INDEX).sum())


def logits_of(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a micro-batch (an all-ones attention mask is left out: it would
    only send attention down a slower path)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        kwargs["attention_mask"] = mask
    output = model(**kwargs)
    return output.logits if hasattr(output, "logits") else output[0]


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], state: Any = None) -> tuple[torch.Tensor, dict]:
    """The default loss: mean next-token cross-entropy over the micro-batch's counted tokens."""
    nll, count = causal_lm_loss(logits_of(model, batch), batch["labels"])
    return nll / count.clamp(min=1), {}
