"""The ``entropy-gap`` strategy's measure: how diffusely each layer's surviving heads attend.

For query position t with ``n_t`` key positions it may attend to (causal, not padding), the
normalised attention entropy of head h is

    e_{h,t} = -sum_k p_{h,t,k} log p_{h,t,k} / log(n_t)      (0 = one key, 1 = uniform)

averaged over the counted positions (``n_t >= 2``, real query tokens) of all calibration
batches. A layer's score is the mean of e_h over its active heads (present and not masked).
A layer with no active head scores 1.0: nothing in it attends sharply. This is the same
reduction as the ``sentinel-entropy`` scorer, written out here so that this plugin does not
depend on that one.

Attention probabilities exist only under eager attention, so the model is switched to eager
while measuring and switched back afterwards; forward hooks reduce each layer's ``[B, S, T, T]``
probabilities to per-slot sums at once and drop them, so memory stays O(layers x heads).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sentinel_core.errors import SentinelError
from sentinel_core.surgery import get_adapter, get_head_map

EMPTY_LAYER_ENTROPY = 1.0


def _allowed_keys(shape: torch.Size, mask_4d: Any, mask_2d: torch.Tensor) -> torch.Tensor:
    """``[B, T_q]`` keys each query may attend to: from the 4-D mask if the layer got one, else causal."""
    batch, _, t_q, t_k = shape
    if isinstance(mask_4d, torch.Tensor) and mask_4d.dim() == 4 and tuple(mask_4d.shape[-2:]) == (t_q, t_k):
        allowed = mask_4d if mask_4d.dtype == torch.bool else mask_4d > torch.finfo(mask_4d.dtype).min / 2
        return allowed[:, 0].sum(-1).expand(batch, t_q)
    return mask_2d.to(torch.long).cumsum(-1)[:, t_k - t_q:]


class _Sums:
    def __init__(self, num_slots: list[int]) -> None:
        self.sums = [torch.zeros(n, dtype=torch.float64) for n in num_slots]
        self.counts = [0] * len(num_slots)
        self.mask: torch.Tensor | None = None

    def hook(self, layer: int):
        def reduce(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
                return None  # a layer without heads returns no probabilities
            weights = output[1]
            allowed = _allowed_keys(weights.shape, kwargs.get("attention_mask"), self.mask).to(weights.device)
            counted = (allowed >= 2) & self.mask.to(device=weights.device, dtype=torch.bool)
            scale = torch.where(counted, 1.0 / torch.log(allowed.clamp(min=2).double()),
                                torch.zeros((), dtype=torch.float64, device=weights.device))
            entropy = torch.special.entr(weights.float()).sum(-1).double()  # [B, S, T_q]
            self.sums[layer] += torch.einsum("bst,bt->s", entropy, scale).cpu()
            self.counts[layer] += int(counted.sum())
            return (output[0], None, *output[2:])

        return reduce


def layer_entropies(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """Per layer, the mean normalised attention entropy of its active heads (see module doc).

    The model comes back as it was: attention implementation, train/eval mode, no hooks.
    """
    if not batches:
        raise SentinelError("the entropy-gap growth strategy got no calibration batches; give calibration_batches >= 1")
    head_map = get_head_map(model)
    modules = get_adapter(model).attention_modules()
    device = next(model.parameters()).device
    acc = _Sums([len(slots) for slots in head_map.layers])
    original_impl = model.config._attn_implementation
    was_training = model.training
    handles = []
    try:
        if original_impl != "eager":
            model.set_attn_implementation("eager")
        model.eval()
        handles = [m.register_forward_hook(acc.hook(i), with_kwargs=True) for i, m in enumerate(modules)]
        with torch.inference_mode():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                acc.mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                model.base_model(input_ids=input_ids, attention_mask=acc.mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        acc.mask = None
        if model.config._attn_implementation != original_impl:
            model.set_attn_implementation(original_impl)
        model.train(was_training)

    result = []
    for layer, slots in enumerate(head_map.layers):
        active = set(head_map.active(layer))
        if not active:
            result.append(EMPTY_LAYER_ENTROPY)
            continue
        if acc.counts[layer] == 0:
            raise SentinelError("the calibration batches have no position that attends to 2 or more tokens; "
                                "use blocks of at least 2 tokens")
        per_slot = acc.sums[layer] / acc.counts[layer]
        values = [float(per_slot[slot]) for slot, head in enumerate(slots) if head in active]
        result.append(sum(values) / len(values))
    return result
