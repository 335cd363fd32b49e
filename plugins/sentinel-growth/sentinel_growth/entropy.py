"""The ``entropy-gap`` strategy's measure: how diffusely each layer's surviving heads attend.

For query position t with ``n_t`` key positions it may attend to (causal, not padding), the
normalised attention entropy of head h is

    e_{h,t} = -sum_k p_{h,t,k} log p_{h,t,k} / log(n_t)      (0 = one key, 1 = uniform)

averaged over the counted positions (``n_t >= 2``, real query tokens) of all calibration
batches. A layer's score is the mean of e_h over its active heads (present and not masked).
A layer with no active head scores 1.0: nothing in it attends sharply.

The measurement is :mod:`sentinel_core.attention_entropy`, the one the ``sentinel-entropy``
scorer uses; it lives in the core so that this plugin does not depend on that one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from sentinel_core.attention_entropy import measure_attention_entropy
from sentinel_core.errors import SentinelError
from sentinel_core.surgery import get_head_map

EMPTY_LAYER_ENTROPY = 1.0


def layer_entropies(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """Per layer, the mean normalised attention entropy of its active heads (see module doc).

    The model comes back as it was: attention implementation, train/eval mode, no hooks.
    """
    if not batches:
        raise SentinelError("the entropy-gap growth strategy got no calibration batches; give calibration_batches >= 1")
    head_map = get_head_map(model)
    measured = measure_attention_entropy(model, batches)
    result = []
    for layer, slots in enumerate(head_map.layers):
        active = set(head_map.active(layer))
        if not active:
            result.append(EMPTY_LAYER_ENTROPY)
            continue
        per_slot = measured.means[layer]
        if per_slot is None:
            raise SentinelError("the calibration batches have no position that attends to 2 or more tokens; "
                                "use blocks of at least 2 tokens")
        values = [float(per_slot[slot]) for slot, head in enumerate(slots) if head in active]
        result.append(sum(values) / len(values))
    return result
