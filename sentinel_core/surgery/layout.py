"""Slot bookkeeping and the one physical operation: rebuilding a layer's per-head blocks.

Removal, growth, rebuilding a compact model at load time and dense export are all a
``relayout``: a list saying, for every new query slot and every new key/value slot, where
its weights come from (an old slot index, ``"new"`` for fresh random weights, or ``None``
for zeros).
"""

from __future__ import annotations

import torch
from torch import nn

from sentinel_core.surgery import gates
from sentinel_core.surgery.base import HeadAdapter, HeadParam
from sentinel_core.surgery.headless import set_headless

Source = int | str | None
NEW = "new"

_SLOTS = "_sentinel_slots"
_GROUP = "_sentinel_group_size"
_NEXT = "_sentinel_next_id"


def slots_of(adapter: HeadAdapter, attn: nn.Module) -> list[int | None]:
    """Head id per query slot of ``attn`` (``None`` = dead alignment slot)."""
    slots = getattr(attn, _SLOTS, None)
    return list(range(adapter.original_num_heads())) if slots is None else list(slots)


def group_size_of(adapter: HeadAdapter, attn: nn.Module) -> int:
    """Query slots per key/value slot of ``attn`` (0 when the layer has no heads)."""
    return getattr(attn, _GROUP, adapter.original_group_size())


def next_id_of(adapter: HeadAdapter, attn: nn.Module) -> int:
    """The id the next grown head of ``attn`` gets."""
    return getattr(attn, _NEXT, adapter.original_num_heads())


def set_state(attn: nn.Module, slots: list[int | None], group_size: int, next_id: int) -> None:
    """Record the slot layout on the module (module attributes survive deepcopy)."""
    setattr(attn, _SLOTS, list(slots))
    setattr(attn, _GROUP, group_size)
    setattr(attn, _NEXT, next_id)


def _resolve(attn: nn.Module, path: str) -> tuple[nn.Module, str]:
    *parents, name = path.split(".")
    module = attn
    for p in parents:
        module = getattr(module, p)
    return module, name


def gather_param(
    tensor: torch.Tensor,
    spec: HeadParam,
    head_dim: int,
    q_src: list[Source],
    kv_src: list[Source],
    num_q_old: int,
    num_kv_old: int,
    *,
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The new value of one per-head tensor after a relayout (``tensor`` is not modified)."""
    dim = spec.dim % tensor.dim()
    widths = [(num_kv_old if seg in ("k", "v") else num_q_old) * head_dim for seg in spec.segments]
    if sum(widths) != tensor.shape[dim]:
        raise RuntimeError(
            f"{spec.path} has {tensor.shape[dim]} entries along dim {dim}, expected {sum(widths)} "
            f"from the recorded slots; the model was resized outside Sentinel"
        )
    is_bias = tensor.dim() == 1
    block_shape = list(tensor.shape)
    block_shape[dim] = head_dim
    out: list[torch.Tensor] = []
    for seg, piece in zip(spec.segments, tensor.split(widths, dim), strict=True):
        for src in kv_src if seg in ("k", "v") else q_src:
            if isinstance(src, int):
                out.append(piece.narrow(dim, src * head_dim, head_dim))
            elif src == NEW and seg != "o" and not is_bias:
                fresh = torch.empty(block_shape, dtype=torch.float32).normal_(0.0, init_std, generator=generator)
                out.append(fresh.to(device=tensor.device, dtype=tensor.dtype))
            else:
                # zero output-projection blocks make a grown head's birth a no-op; zero
                # blocks elsewhere keep dead slots inert.
                out.append(tensor.new_zeros(block_shape))
    if not out:
        return tensor.narrow(dim, 0, 0).clone()
    return torch.cat(out, dim=dim).contiguous()


def relayout(
    adapter: HeadAdapter,
    attn: nn.Module,
    q_src: list[Source],
    kv_src: list[Source],
    group_size: int,
    *,
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> None:
    """Rebuild every per-head tensor of ``attn`` in place and update the forward's attributes."""
    if group_size * len(kv_src) != len(q_src):
        raise RuntimeError(f"relayout: {len(q_src)} query slots do not fill {len(kv_src)} groups of {group_size}")
    old_slots = slots_of(adapter, attn)
    old_group = group_size_of(adapter, attn)
    num_q_old = len(old_slots)
    num_kv_old = num_q_old // old_group if old_group else 0
    head_dim = adapter.head_dim(attn)
    for spec in adapter.head_params(attn):
        module, name = _resolve(attn, spec.path)
        old = getattr(module, name)
        if old is None:
            continue
        new = gather_param(
            old.data, spec, head_dim, q_src, kv_src, num_q_old, num_kv_old, init_std=init_std, generator=generator
        )
        if isinstance(old, nn.Parameter):
            setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            setattr(module, name, new)
    adapter.set_head_counts(attn, len(q_src), len(kv_src), group_size)
    proj = adapter.output_projection(attn)
    old_gate = gates.read_gate(proj, num_q_old)
    new_gate = torch.tensor(
        [float(old_gate[s]) if isinstance(s, int) else (1.0 if s == NEW else 0.0) for s in q_src], dtype=torch.float32
    )
    gates.write_gate(proj, new_gate)
    set_headless(attn, len(q_src) == 0, type(adapter).zero_output)
