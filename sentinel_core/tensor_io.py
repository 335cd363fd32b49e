"""Tensors to and from safetensors files, and state-dict helpers shared by model folders and
training checkpoints. Nothing here unpickles: tensors go through safetensors, names through JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ALIASES_KEY = "sentinel_aliases"


def storage_key(t: torch.Tensor) -> tuple | None:
    if t.numel() == 0:  # empty tensors may all report the same address: never alias them
        return None
    return (t.device.type, t.device.index, t.untyped_storage().data_ptr(), t.storage_offset(),
            tuple(t.shape), tuple(t.stride()), t.dtype)


def cpu_state_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``state``; tensors that share memory (tied weights) stay shared."""
    memo: dict[tuple, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = storage_key(tensor)
        if key is not None and key in memo:
            out[name] = memo[key]
            continue
        copy = tensor.detach().to("cpu", copy=True)
        if key is not None:
            memo[key] = copy
        out[name] = copy
    return out


def unique_tensors(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with every tensor stored once (CPU, contiguous), and ``alias -> stored name`` for
    the names that share memory with an earlier one (tied weights keep their first name)."""
    first: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        key = storage_key(tensor)
        if key is not None and key in first:
            aliases[name] = first[key]
            continue
        if key is not None:
            first[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def save_tensors(path: str | os.PathLike, state: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Write ``state`` with safetensors, storing tensors that share memory once.

    safetensors refuses shared tensors (GPT-2 ties ``lm_head.weight`` to ``wte.weight``), so
    every alias is dropped from the file and recorded in its metadata instead.
    """
    tensors, aliases = unique_tensors(state)
    meta = dict(metadata or {})
    meta[ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    save_file(tensors, os.fspath(path), metadata=meta)
    fsync_file(path)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_tensors` (on the CPU), restoring the aliases."""
    tensors = load_file(os.fspath(path), device="cpu")
    with safe_open(os.fspath(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if ALIASES_KEY in meta:
        aliases = json.loads(meta[ALIASES_KEY])
    else:
        # Files from before ALIASES_KEY (safetensors.torch.save_model) name each dropped alias
        # as a metadata key whose value is the tensor kept in the file.
        aliases = {key: value for key, value in meta.items() if key not in tensors and value in tensors}
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    return tensors


def all_finite(tensors: Mapping[str, torch.Tensor] | Any) -> bool:
    """True when every floating-point tensor of a state dict (or an iterable of tensors) is finite."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    flags = [torch.isfinite(t).all() for t in values if t.is_floating_point() and t.numel()]
    if not flags:
        return True
    return bool(torch.stack([f.to("cpu") for f in flags]).all())


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
