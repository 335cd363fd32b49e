"""Stream calibration batches through the model and average each head's normalised attention entropy.

Forward hooks on every attention module reduce the ``[B, S, T, T]`` probabilities to per-head
sums as soon as a layer has computed them and hand ``None`` on in their place, so no
attention map outlives its layer: memory is O(layers x heads) whatever the number of batches.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from sentinel_core.errors import SentinelError
from sentinel_core.results import HeadScores
from sentinel_core.surgery import get_adapter, get_head_map

from .reduction import allowed_key_counts, normalized_entropy_sums

NAME = "entropy"


class _Accumulator:
    """Per-layer running sums, fed by the attention hooks."""

    def __init__(self, num_slots: list[int], device: torch.device) -> None:
        self.sums = [torch.zeros(n, dtype=torch.float64, device=device) for n in num_slots]
        self.counts = [0] * len(num_slots)
        self.query_mask: torch.Tensor | None = None

    def hook(self, layer: int):
        def reduce_weights(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                return None  # a layer with no heads left returns no weights
            weights = output[1]
            allowed = allowed_key_counts(weights.shape, kwargs.get("attention_mask"), self.query_mask)
            sums, count = normalized_entropy_sums(weights, self.query_mask, allowed)
            self.sums[layer] += sums
            self.counts[layer] += count
            return (output[0], None, *output[2:])

        return reduce_weights


def entropy_scores(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> HeadScores:
    """Importance = 1 - mean normalised attention entropy, per head (NaN for heads not active).

    The model comes back as it was: attention implementation, train/eval mode, no hooks.
    """
    start = time.perf_counter()
    if not batches:
        raise SentinelError("the entropy scorer needs calibration text and got no batches; pass --data (or a data source)")
    head_map = get_head_map(model)
    attention = get_adapter(model).attention_modules()
    device = next(model.parameters()).device
    acc = _Accumulator([len(slots) for slots in head_map.layers], device)
    original_impl = model.config._attn_implementation
    was_training = model.training
    handles = []
    tokens = 0
    try:
        if original_impl != "eager":
            model.set_attn_implementation("eager")
        model.eval()
        for layer, module in enumerate(attention):
            handles.append(module.register_forward_hook(acc.hook(layer), with_kwargs=True))
        with torch.inference_mode():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                acc.query_mask = mask
                # The base model is enough: attention is all we read, the LM head would be wasted work.
                model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                tokens += int(mask.sum())
    finally:
        for handle in handles:
            handle.remove()
        acc.query_mask = None
        if model.config._attn_implementation != original_impl:
            model.set_attn_implementation(original_impl)
        model.train(was_training)

    scores = torch.full((head_map.num_layers, head_map.width), float("nan"), dtype=torch.float32)
    for layer, slots in enumerate(head_map.layers):
        active = set(head_map.active(layer))
        if not active:
            continue
        if acc.counts[layer] == 0:
            raise SentinelError(
                "the calibration batches have no position that can attend to 2 or more tokens; "
                "use sequences of at least 2 tokens"
            )
        mean = (acc.sums[layer] / acc.counts[layer]).cpu()
        for slot, head in enumerate(slots):
            if head in active:
                scores[layer, head] = float(1.0 - mean[slot])
    return HeadScores(scores=scores, strategy=NAME, tokens_seen=tokens, seconds=time.perf_counter() - start,
                      extra={"cross_layer_comparable": True, "query_positions": max(acc.counts, default=0)})
