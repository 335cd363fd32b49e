"""Public head-surgery operations: masks, removal, growth, head maps, dense export."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from sentinel_core.errors import SentinelError
from sentinel_core.surgery import gates
from sentinel_core.surgery.base import HeadAdapter, get_adapter
from sentinel_core.surgery.headmap import HeadMap
from sentinel_core.surgery.layout import (
    NEW,
    Source,
    gather_param,
    group_size_of,
    next_id_of,
    relayout,
    set_state,
    slots_of,
)

CONFIG_KEY = "sentinel_head_map"


# ---------------------------------------------------------------- reading


def get_head_map(model: nn.Module) -> HeadMap:
    """The current head layout of ``model``: present, grown and masked heads per layer."""
    adapter = get_adapter(model)
    return _head_map(adapter)


def _head_map(adapter: HeadAdapter) -> HeadMap:
    layers, groups, masked, nexts = [], [], [], []
    for attn in adapter.attention_modules():
        slots = slots_of(adapter, attn)
        gate = gates.read_gate(adapter.output_projection(attn), len(slots))
        layers.append(slots)
        groups.append(group_size_of(adapter, attn) if slots else 0)
        masked.append(sorted(i for i, v in zip(slots, gate.tolist(), strict=True) if i is not None and v == 0.0))
        nexts.append(next_id_of(adapter, attn))
    return HeadMap(
        family=adapter.family,
        original_num_heads=adapter.original_num_heads(),
        original_num_kv_heads=adapter.original_num_kv_heads(),
        layers=layers,
        group_sizes=groups,
        masked_ids=masked,
        next_ids=nexts,
    )


def _sync_config(adapter: HeadAdapter) -> HeadMap:
    """Mirror the head map into the live config so that any config.json written describes the weights."""
    hm = _head_map(adapter)
    if hm.is_original():
        if hasattr(adapter.config, CONFIG_KEY):
            delattr(adapter.config, CONFIG_KEY)
    else:
        setattr(adapter.config, CONFIG_KEY, hm.to_dict())
    return hm


# ---------------------------------------------------------------- argument checks


def _selection(heads: object, num_layers: int, what: str) -> dict[int, list[int]]:
    if not isinstance(heads, Mapping):
        raise SentinelError(f"{what} takes a dict {{layer: [head ids]}}, got {type(heads).__name__}")
    out: dict[int, list[int]] = {}
    for layer, ids in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise SentinelError(f"{what}: layer {layer!r} does not exist; layers are 0..{num_layers - 1}")
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise SentinelError(f"{what}: layer {layer} needs a list of head ids, got {ids!r}")
        ids = list(ids)
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise SentinelError(f"{what}: layer {layer} head ids must be ints, got {ids!r}")
        out[layer] = sorted(set(out.get(layer, []) + ids))
    return out


def _check_present(hm: HeadMap, layer: int, ids: list[int], what: str) -> None:
    alive = set(hm.present(layer))
    for i in ids:
        if i not in alive:
            state = "was removed" if 0 <= i < hm.next_ids[layer] else "never existed"
            raise SentinelError(f"{what}: head {i} of layer {layer} {state}; present heads are {sorted(alive)}")


# ---------------------------------------------------------------- masks


def _set_gate_values(adapter: HeadAdapter, layer: int, ids: list[int], value: float) -> None:
    attn = adapter.attention_modules()[layer]
    slots = slots_of(adapter, attn)
    proj = adapter.output_projection(attn)
    gate = gates.read_gate(proj, len(slots))
    for slot, head in enumerate(slots):
        if head is not None and head in ids:
            gate[slot] = value
    gates.write_gate(proj, gate)


def mask_heads(model: nn.Module, heads: Mapping[int, list[int]]) -> HeadMap:
    """Gate heads off: they contribute nothing, shapes stay, :func:`unmask_heads` undoes it.

    The gate is a non-trainable buffer multiplied into the output projection's input, so a
    masked head stays silent under fine-tuning (its weights get no gradient through it).
    """
    adapter = get_adapter(model)
    hm = _head_map(adapter)
    selection = _selection(heads, hm.num_layers, "mask_heads")
    for layer, ids in selection.items():
        _check_present(hm, layer, ids, "mask_heads")
    for layer, ids in selection.items():
        _set_gate_values(adapter, layer, ids, 0.0)
    return _sync_config(adapter)


def unmask_heads(model: nn.Module, heads: Mapping[int, list[int]] | None = None) -> HeadMap:
    """Gate heads back on (all masked heads when ``heads`` is None). Dead alignment slots stay off."""
    adapter = get_adapter(model)
    hm = _head_map(adapter)
    if heads is None:
        selection = {layer: hm.masked(layer) for layer in range(hm.num_layers)}
    else:
        selection = _selection(heads, hm.num_layers, "unmask_heads")
        for layer, ids in selection.items():
            _check_present(hm, layer, ids, "unmask_heads")
    for layer, ids in selection.items():
        if ids:
            _set_gate_values(adapter, layer, ids, 1.0)
    return _sync_config(adapter)


@contextmanager
def gate_tensors(model: nn.Module) -> Iterator[dict[int, torch.Tensor]]:
    """Make every layer's gate a leaf tensor with ``requires_grad=True`` for the duration.

    Yields ``{layer: Tensor[n_slots]}`` holding the current mask values (1 = on, 0 = masked
    or dead slot); slot ``s`` of layer ``l`` is head ``get_head_map(model).layers[l][s]``.
    After a backward pass, ``gate.grad`` is d(loss)/d(gate). The buffers are restored on exit.
    """
    adapter = get_adapter(model)
    saved: list[tuple[nn.Module, tuple]] = []
    leaves: dict[int, torch.Tensor] = {}
    try:
        for layer, attn in enumerate(adapter.attention_modules()):
            proj = adapter.output_projection(attn)
            current = gates.ensure_gate(proj, len(slots_of(adapter, attn)))
            leaf = current.detach().clone().float().requires_grad_(True)
            saved.append((proj, gates.swap_in_leaf(proj, leaf)))
            leaves[layer] = leaf
        yield leaves
    finally:
        for proj, old in reversed(saved):
            gates.restore(proj, old)


# ---------------------------------------------------------------- removal


def prune_heads(model: nn.Module, heads: Mapping[int, list[int]]) -> HeadMap:
    """Physically remove heads (ids in original numbering); returns the new head map.

    Grouped-query attention: a key/value head is removed only when every query head of its
    group is gone. A layer keeps one group size, so groups that lost some but not all of their
    query heads are padded with dead, gated, zero-weight query slots up to the largest
    surviving group (``None`` in ``HeadMap.layers``). Removing every head of a layer leaves a
    zero-output layer equal to masking all its heads. Parameters are replaced, so build any
    optimizer after surgery.
    """
    adapter = get_adapter(model)
    hm = _head_map(adapter)
    selection = _selection(heads, hm.num_layers, "prune_heads")
    for layer, ids in selection.items():
        _check_present(hm, layer, ids, "prune_heads")
    attns = adapter.attention_modules()
    for layer, ids in selection.items():
        if not ids:
            continue
        attn = attns[layer]
        slots = slots_of(adapter, attn)
        group = group_size_of(adapter, attn)
        gone = set(ids)
        kept_groups: list[tuple[int, list[int]]] = []
        for kv in range(len(slots) // group if group else 0):
            members = [s for s in range(kv * group, (kv + 1) * group) if slots[s] is not None and slots[s] not in gone]
            if members:
                kept_groups.append((kv, members))
        new_group = max((len(m) for _, m in kept_groups), default=0)
        q_src: list[Source] = []
        new_slots: list[int | None] = []
        for _, members in kept_groups:
            pad = new_group - len(members)
            q_src += members + [None] * pad
            new_slots += [slots[s] for s in members] + [None] * pad
        kv_src: list[Source] = [kv for kv, _ in kept_groups]
        relayout(adapter, attn, q_src, kv_src, new_group)
        set_state(attn, new_slots, new_group, next_id_of(adapter, attn))
    return _sync_config(adapter)


# ---------------------------------------------------------------- growth


def grow_heads(
    model: nn.Module,
    heads: Mapping[int, int],
    *,
    init_std: float = 0.02,
    generator: torch.Generator | None = None,
) -> dict[int, list[int]]:
    """Add ``n`` new heads to each given layer; returns their ids per layer.

    New query/key/value weights are drawn from N(0, init_std) (biases 0) and the new heads'
    output-projection blocks are zero, so the model's output is unchanged at birth while the
    output projection still receives gradient. Under grouped-query attention the new heads of
    one call form new groups of the layer's current group size, each with a fresh key/value
    head; the last group is padded with dead slots if ``n`` does not fill it.
    """
    adapter = get_adapter(model)
    hm = _head_map(adapter)
    if not isinstance(heads, Mapping):
        raise SentinelError(f"grow_heads takes a dict {{layer: number of new heads}}, got {type(heads).__name__}")
    if not isinstance(init_std, (int, float)) or not init_std > 0:
        raise SentinelError(f"grow_heads: init_std must be a positive number, got {init_std!r}")
    for layer, n in heads.items():
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < hm.num_layers:
            raise SentinelError(f"grow_heads: layer {layer!r} does not exist; layers are 0..{hm.num_layers - 1}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise SentinelError(f"grow_heads: layer {layer} needs a non-negative int number of heads, got {n!r}")
    attns = adapter.attention_modules()
    new_ids: dict[int, list[int]] = {}
    for layer, n in heads.items():
        if n == 0:
            new_ids[layer] = []
            continue
        attn = attns[layer]
        slots = slots_of(adapter, attn)
        group = group_size_of(adapter, attn) or adapter.original_group_size()
        first = next_id_of(adapter, attn)
        ids = list(range(first, first + n))
        num_groups = math.ceil(n / group)
        q_src: list[Source] = list(range(len(slots)))
        new_slots: list[int | None] = list(slots)
        for g in range(num_groups):
            chunk = ids[g * group : (g + 1) * group]
            q_src += [NEW] * len(chunk) + [None] * (group - len(chunk))
            new_slots += chunk + [None] * (group - len(chunk))
        old_kv = len(slots) // group if slots else 0
        kv_src: list[Source] = list(range(old_kv)) + [NEW] * num_groups
        relayout(adapter, attn, q_src, kv_src, group, init_std=float(init_std), generator=generator)
        set_state(attn, new_slots, group, first + n)
        new_ids[layer] = ids
    _sync_config(adapter)
    return new_ids


# ---------------------------------------------------------------- rebuilding and export


def apply_head_map(model: nn.Module, head_map: HeadMap) -> None:
    """Give a freshly built, original-shaped model the layout of ``head_map`` (weights not loaded).

    Used when loading a Sentinel checkpoint: the model is built from the unchanged HF config,
    reshaped here, then the saved tensors are loaded strictly on top.
    """
    adapter = get_adapter(model)
    current = _head_map(adapter)
    if not current.is_original():
        raise SentinelError("apply_head_map needs an unmodified model; this one already had surgery")
    if (head_map.family, head_map.original_num_heads, head_map.original_num_kv_heads, head_map.num_layers) != (
        adapter.family,
        current.original_num_heads,
        current.original_num_kv_heads,
        current.num_layers,
    ):
        raise SentinelError(
            f"sentinel_head_map describes a {head_map.family} model with {head_map.num_layers} layers x "
            f"{head_map.original_num_heads} heads, but the config builds a {adapter.family} model with "
            f"{current.num_layers} x {current.original_num_heads}; the checkpoint is inconsistent"
        )
    h = current.original_num_heads
    g0 = adapter.original_group_size()
    for layer, attn in enumerate(adapter.attention_modules()):
        target = head_map.layers[layer]
        group = head_map.group_sizes[layer]
        if target != list(range(h)) or group != g0:
            q_src: list[Source] = [None if i is None else (i if i < h else NEW) for i in target]
            kv_src: list[Source] = []
            for members in head_map.kv_groups(layer):
                first = next(i for i in members if i is not None)
                kv_src.append(first // g0 if first < h else NEW)
            relayout(adapter, attn, q_src, kv_src, group)
        set_state(attn, target, group, head_map.next_ids[layer])
        if head_map.masked_ids[layer]:
            _set_gate_values(adapter, layer, head_map.masked_ids[layer], 0.0)
    _sync_config(adapter)


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with the original head shapes: removed, masked and dead heads zeroed.

    Loading it into a model built from the unchanged config gives the same outputs (up to
    float rounding of the differently shaped matmuls). Raises SentinelError if an unmasked
    grown head exists, since it has no place in the original shapes.
    """
    adapter = get_adapter(model)
    hm = _head_map(adapter)
    grown = {layer: [i for i in hm.grown(layer) if i not in hm.masked_ids[layer]] for layer in range(hm.num_layers)}
    grown = {k: v for k, v in grown.items() if v}
    if grown:
        raise SentinelError(
            f"dense export keeps the original shapes, but grown heads {grown} (layer: ids) are active; "
            f"prune or mask them first, or save without dense=True"
        )
    h = hm.original_num_heads
    g0 = adapter.original_group_size()
    layouts: list[tuple[list[Source], list[Source]]] = []
    for layer in range(hm.num_layers):
        slots = hm.layers[layer]
        active = set(hm.active(layer))
        group = hm.group_sizes[layer]
        q_src: list[Source] = [slots.index(i) if i in active else None for i in range(h)]
        kv_src: list[Source] = [None] * hm.original_num_kv_heads
        for s, i in enumerate(slots):
            if i in active:
                kv_src[i // g0] = s // group
        layouts.append((q_src, kv_src))
    return relaid_state_dict(model, layouts)


def relaid_state_dict(model: nn.Module, layouts: list[tuple[list[Source], list[Source]]]) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every layer's per-head tensors rebuilt to another layout.

    ``layouts[l] = (q_src, kv_src)`` lists, for each query slot and each key/value slot of the
    new layer ``l``, the current slot its weights come from, or ``None`` for zeros. The model
    is not changed. Used by the dense export and by ``sentinel_core.export``.
    """
    adapter = get_adapter(model)
    hm = _head_map(adapter)
    state = dict(model.state_dict())
    names = {module: name for name, module in model.named_modules()}
    for layer, attn in enumerate(adapter.attention_modules()):
        q_src, kv_src = layouts[layer]
        prefix = names[attn]
        head_dim = adapter.head_dim(attn)
        for spec in adapter.head_params(attn):
            key = f"{prefix}.{spec.path}"
            if key not in state or state[key] is None:
                continue
            state[key] = gather_param(state[key], spec, head_dim, q_src, kv_src, hm.num_slots(layer),
                                      hm.num_kv_slots(layer))
    return state
