"""Reduce one layer's attention probabilities to per-head sums of normalised entropy.

For query position t of a sequence, with ``n_t`` key positions it may attend to (causal and
not padding), the normalised entropy of head h is

    e_{h,t} = -sum_k p_{h,t,k} log p_{h,t,k} / log(n_t)

which is 0 for attention on a single key and 1 for uniform attention over the ``n_t`` keys.
Positions that may attend to only one key (``n_t = 1``, e.g. position 0) have no spread to
measure and are left out, as are padded query positions. Padded keys get probability 0 from
the mask and so add nothing to the sum.
"""

from __future__ import annotations

import torch


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
    if attention_mask_4d is not None and attention_mask_4d.dim() == 4 and tuple(attention_mask_4d.shape[-2:]) == (t_q, t_k):
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
