"""Per-head weight norms, sliced by the surgery adapter's description of each per-head tensor."""

from __future__ import annotations

import time

import torch
from torch import nn

from sentinel_core.results import HeadScores
from sentinel_core.surgery import HeadAdapter, get_adapter, get_head_map

NAME = "magnitude"


def _tensor(attn: nn.Module, path: str) -> torch.Tensor | None:
    module = attn
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part, None)
        if module is None:
            return None
    return getattr(module, name, None)


def head_sq_norms(adapter: HeadAdapter, attn: nn.Module, num_slots: int, group_size: int) -> torch.Tensor:
    """``[num_slots]`` float64: sum of squared weights of each query slot's q, k, v and o blocks.

    K/V blocks belong to key/value slot ``s // group_size`` and are added to every query slot
    of that group. Bias vectors (1-D tensors) are skipped.
    """
    num_kv = num_slots // group_size if group_size else 0
    head_dim = adapter.head_dim(attn)
    q_side = torch.zeros(num_slots, dtype=torch.float64)
    kv_side = torch.zeros(num_kv, dtype=torch.float64)
    for spec in adapter.head_params(attn):
        tensor = _tensor(attn, spec.path)
        if tensor is None or tensor.dim() < 2:
            continue
        dim = spec.dim % tensor.dim()
        counts = [num_kv if seg in ("k", "v") else num_slots for seg in spec.segments]
        pieces = tensor.detach().split([c * head_dim for c in counts], dim=dim)
        for seg, count, piece in zip(spec.segments, counts, pieces, strict=True):
            if count == 0:
                continue
            blocks = piece.movedim(dim, 0).reshape(count, head_dim, -1).double()
            sq = blocks.pow(2).sum(dim=(1, 2)).cpu()
            if seg in ("k", "v"):
                kv_side += sq
            else:
                q_side += sq
    if num_kv:
        q_side += kv_side.repeat_interleave(group_size)
    return q_side


def magnitude_scores(model: nn.Module) -> HeadScores:
    """Frobenius norm of each active head's weight blocks; NaN for heads not active."""
    start = time.perf_counter()
    adapter = get_adapter(model)
    head_map = get_head_map(model)
    scores = torch.full((head_map.num_layers, head_map.width), float("nan"), dtype=torch.float32)
    with torch.no_grad():
        for layer, attn in enumerate(adapter.attention_modules()):
            slots = head_map.layers[layer]
            active = set(head_map.active(layer))
            if not active:
                continue
            sq = head_sq_norms(adapter, attn, len(slots), head_map.group_sizes[layer])
            for slot, head in enumerate(slots):
                if head in active:
                    scores[layer, head] = float(sq[slot].sqrt())
    return HeadScores(scores=scores, strategy=NAME, tokens_seen=0, seconds=time.perf_counter() - start)
