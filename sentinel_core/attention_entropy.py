"""Each head's mean normalised attention entropy, streamed over calibration batches.

For query position t of a sequence, with ``n_t`` key positions it may attend to (causal and
not padding), the normalised entropy of head h is

    e_{h,t} = -sum_k p_{h,t,k} log p_{h,t,k} / log(n_t)

which is 0 for attention on a single key and 1 for uniform attention over the ``n_t`` keys.
Positions that may attend to only one key (``n_t = 1``, e.g. position 0) have no spread to
measure and are left out, as are padded query positions. Padded keys get probability 0 from
the mask and so add nothing to the sum.

Attention probabilities exist only under eager attention, so the model is switched to eager
while measuring and switched back afterwards. Forward hooks on every attention module reduce
the ``[B, S, T, T]`` probabilities to per-slot sums as soon as a layer has computed them and
hand ``None`` on in their place, so no attention map outlives its layer: memory is
O(layers x heads) whatever the number of batches.

Used by the ``sentinel-entropy`` scorer and the ``sentinel-growth`` plugin's ``entropy-gap``
strategy; it lives in the core so that neither plugin depends on the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .surgery import get_adapter, get_head_map


def allowed_key_counts(
    weights_shape: torch.Size,
    attention_mask_4d: torch.Tensor | None,
    attention_mask_2d: torch.Tensor | None,
) -> torch.Tensor:
    """``[B, T_q]`` number of key positions each query may attend to.

    Taken from the 4-D mask the attention module received when there is one (so sliding
    windows or prefix masks count right); otherwise causal attention over the non-padding keys.
    """
    batch, _, t_q, t_k = weights_shape
    if (isinstance(attention_mask_4d, torch.Tensor) and attention_mask_4d.dim() == 4
            and tuple(attention_mask_4d.shape[-2:]) == (t_q, t_k)):
        if attention_mask_4d.dtype == torch.bool:
            allowed = attention_mask_4d
        else:
            # Additive masks hold 0 (or a small bias) where allowed and the dtype's minimum where not.
            allowed = attention_mask_4d > torch.finfo(attention_mask_4d.dtype).min / 2
        return allowed[:, 0].sum(-1).expand(batch, t_q)
    if attention_mask_2d is None:
        keys = torch.ones(batch, t_k, dtype=torch.long)
    else:
        keys = attention_mask_2d.to(torch.long)
    counts = keys.cumsum(-1)
    # Queries are the last t_q positions of the keys (t_q == t_k without a cache).
    return counts[:, t_k - t_q:]


def normalized_entropy_sums(
    weights: torch.Tensor,
    query_mask: torch.Tensor | None,
    allowed: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """Per-head sum of normalised entropy over the counted query positions, and their number.

    :param weights: ``[B, S, T_q, T_k]`` attention probabilities (rows sum to 1 over allowed keys).
    :param query_mask: ``[B, T_q]`` 1 for real query positions, 0 for padding (None: all real).
    :param allowed: ``[B, T_q]`` number of keys each query may attend to.
    :return: (``[S]`` float64 sums of ``e_{h,t}``, number of counted (batch, position) pairs).
    """
    allowed = allowed.to(weights.device)
    counted = allowed >= 2
    if query_mask is not None:
        counted = counted & query_mask.to(device=weights.device, dtype=torch.bool)
    # 1/log(n_t) where counted, 0 elsewhere: one weighted contraction replaces masking + division.
    scale = torch.where(counted, 1.0 / torch.log(allowed.clamp(min=2).to(torch.float64)),
                        torch.zeros((), dtype=torch.float64, device=weights.device))
    # entr(p) = -p log p with entr(0) = 0, so masked keys (p = 0) contribute nothing.
    entropy = torch.special.entr(weights.float()).sum(-1)
    sums = torch.einsum("bst,bt->s", entropy.double(), scale)
    return sums, int(counted.sum())


@dataclass
class AttentionEntropy:
    """What :func:`measure_attention_entropy` found.

    ``means[layer]`` is a float64 CPU tensor with one mean ``e_h`` per head slot of that layer
    (``HeadMap.layers[layer]`` order), or None where no query position was counted (a layer
    with no heads, or sequences too short to spread attention). ``counts[layer]`` is the number
    of counted (batch row, position) pairs; ``tokens`` the real tokens fed through the model.
    """

    means: list[torch.Tensor | None]
    counts: list[int]
    tokens: int


class _Accumulator:
    """Per-layer running sums, fed by the attention hooks."""

    def __init__(self, num_slots: list[int], device: torch.device) -> None:
        self.sums = [torch.zeros(n, dtype=torch.float64, device=device) for n in num_slots]
        self.counts = [0] * len(num_slots)
        self.query_mask: torch.Tensor | None = None

    def hook(self, layer: int):
        def reduce_weights(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                return None  # a layer with no heads left returns no weights
            weights = output[1]
            allowed = allowed_key_counts(weights.shape, kwargs.get("attention_mask"), self.query_mask)
            sums, count = normalized_entropy_sums(weights, self.query_mask, allowed)
            self.sums[layer] += sums
            self.counts[layer] += count
            return (output[0], None, *output[2:])

        return reduce_weights


def measure_attention_entropy(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> AttentionEntropy:
    """Stream ``batches`` (``input_ids``, optional ``attention_mask``) through ``model``'s base
    model and average each head's normalised attention entropy (see the module doc).

    The model comes back as it was: attention implementation, train/eval mode, no hooks.
    """
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
    means = [(sums / count).cpu() if count else None for sums, count in zip(acc.sums, acc.counts, strict=True)]
    return AttentionEntropy(means=means, counts=acc.counts, tokens=tokens)
