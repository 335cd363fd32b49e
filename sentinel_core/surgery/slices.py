"""One head's weights, for any architecture: where its blocks lie in the attention tensors.

An adapter describes each per-head tensor as runs of ``head_dim``-wide blocks
(:class:`~sentinel_core.surgery.base.HeadParam`); this module turns that description and the
head map into the blocks of one head, so scorers and fine-tuners need not rebuild the slot
layout themselves. Under grouped-query attention a head's ``k`` and ``v`` blocks are those of
the key/value slot its query slot reads, shared with the other heads of its group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sentinel_core.errors import SentinelError
from sentinel_core.surgery.base import get_adapter
from sentinel_core.surgery.layout import group_size_of, slots_of

PARTS = ("q", "k", "v", "o")


@dataclass(frozen=True)
class HeadSlice:
    """The ``length`` entries from ``start`` along ``dim`` of ``parameter`` that belong to one head.

    :param part: ``"q"``, ``"k"``, ``"v"`` (the head's query, key and value projections) or
        ``"o"`` (its block of the output projection's input side).
    :param path: the tensor within the attention module, e.g. ``"c_attn.weight"``.
    :param is_bias: True for a bias vector.
    """

    part: str
    path: str
    is_bias: bool
    parameter: torch.Tensor
    dim: int
    start: int
    length: int

    def view(self) -> torch.Tensor:
        """The block itself (a view: writing to it changes the model; detached from autograd)."""
        return self.parameter.detach().narrow(self.dim, self.start, self.length)

    def grad(self) -> torch.Tensor | None:
        """The same block of the parameter's ``.grad``, or None when there is no gradient."""
        grad = getattr(self.parameter, "grad", None)
        return None if grad is None else grad.narrow(self.dim, self.start, self.length)

    @property
    def key(self) -> str:
        """``"q"``, ``"k"``, ``"v"``, ``"o"`` for weights, ``"q_bias"`` ... for biases."""
        return f"{self.part}_bias" if self.is_bias else self.part


def _tensor(attn: nn.Module, path: str) -> torch.Tensor | None:
    module = attn
    *parents, name = path.split(".")
    for part in parents:
        module = getattr(module, part, None)
        if module is None:
            return None
    return getattr(module, name, None)


def head_slices(model: nn.Module, layer: int, head: int, *, parts: tuple[str, ...] = PARTS) -> list[HeadSlice]:
    """Every block of head ``head`` (original numbering) of ``layer``, in the adapter's tensor order.

    :param parts: which kinds of block to return (``"q"``, ``"k"``, ``"v"``, ``"o"``).
    :raises SentinelError: when the layer or head does not exist or the head is not present.
    """
    adapter = get_adapter(model)
    attns = adapter.attention_modules()
    if not 0 <= layer < len(attns):
        raise SentinelError(f"layer {layer} does not exist; layers are 0..{len(attns) - 1}")
    attn = attns[layer]
    slots = slots_of(adapter, attn)
    if head not in slots:
        present = sorted(i for i in slots if i is not None)
        raise SentinelError(f"head {head} of layer {layer} is not present; present heads are {present}")
    slot = slots.index(head)
    group = group_size_of(adapter, attn)
    num_q, num_kv = len(slots), len(slots) // group
    head_dim = adapter.head_dim(attn)
    out = []
    for spec in adapter.head_params(attn):
        tensor = _tensor(attn, spec.path)
        if tensor is None:
            continue
        dim = spec.dim % tensor.dim()
        offset = 0
        for segment in spec.segments:
            count = num_kv if segment in ("k", "v") else num_q
            index = slot // group if segment in ("k", "v") else slot
            if segment in parts:
                out.append(HeadSlice(segment, spec.path, tensor.dim() == 1, tensor, dim,
                                     offset + index * head_dim, head_dim))
            offset += count * head_dim
        if offset != tensor.shape[dim]:
            raise RuntimeError(f"{spec.path} of layer {layer} has {tensor.shape[dim]} entries along dim {dim}, "
                               f"expected {offset} from the recorded slots; the model was resized outside Sentinel")
    return out


def head_weights(model: nn.Module, layer: int, head: int) -> dict[str, torch.Tensor]:
    """One head's blocks by kind: ``q``, ``k``, ``v``, ``o`` and, where the model has them,
    ``q_bias``, ``k_bias``, ``v_bias``. The tensors are views in the layout the model stores
    (for GPT-2's ``Conv1D``, ``[hidden, head_dim]``; for LLaMA's ``Linear``, ``[head_dim, hidden]``
    for q/k/v and ``[hidden, head_dim]`` for o)."""
    return {s.key: s.view() for s in head_slices(model, layer, head)}
