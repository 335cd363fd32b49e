"""Sentinel plugin: the ``magnitude`` head scorer (needs no data).

Importance of query head h = sqrt(||W_q,h||^2 + ||W_k,h||^2 + ||W_v,h||^2 + ||W_o,h||^2):
the Frobenius norm of every weight block that belongs to the head, read through the surgery
adapter's per-head layout (``HeadAdapter.head_params``), so fused GPT-2 ``Conv1D`` columns,
separate LLaMA projections and already pruned or grown layouts are all sliced the same way.
Biases are left out: they are not multiplied with the input, so their size says little about
how much a head does. Under grouped-query attention a shared key/value block is counted in
full for each query head of its group. Masked heads count as removed and score NaN.
"""

from __future__ import annotations

import sentinel_core
from sentinel_core.results import Strategy

from .scorer import NAME, head_sq_norm, magnitude_scores

__all__ = ["NAME", "magnitude_scores", "head_sq_norm"]
__version__ = "0.1.0"


@sentinel_core.hookimpl
def register_strategies():
    return [Strategy("score_heads", NAME, "norm of each head's Q/K/V/O weights (no data needed)",
                     function=magnitude_scores)]
