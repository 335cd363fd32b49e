"""Setting the loop up: its options, the devices and precision, parameter groups, the optimizer."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ExperimentConfig, resolve_device
from ..errors import SentinelError
from ..options import Option

BASE_GROUP = "base"
LrMultiplier = Callable[[int, int, str], float]

# The config.options this loop reads. Every fine-tuner that trains with this loop declares them
# among its strategy options (``Strategy(..., options=(*TRAINING_OPTIONS, ...))``).
TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("weight_decay", float, 0.01, "AdamW weight decay on 2-D weights (biases and norms get none)",
           minimum=0.0, maximum=1.0, max_exclusive=True),
    Option("max_bad_steps", int, 3, "non-finite steps in a row before rolling back to the last good checkpoint",
           minimum=1),
    Option("max_rollbacks", int, 3, "rollbacks (each halving the learning rate) before giving up", minimum=0),
    Option("keep_checkpoints", int, 2, "step checkpoints kept on disk (plus the last good one)", minimum=1),
)


def resolve_mixed_precision(setting: str, device: str) -> str:
    """``auto`` -> ``bf16`` on a GPU that supports it, ``fp16`` on other GPUs, ``no`` elsewhere."""
    is_cuda = device == "cuda" or device.startswith("cuda:")
    if setting == "auto":
        if not is_cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and not is_cuda:
        raise SentinelError(f"mixed_precision 'fp16' needs a CUDA GPU but the device is {device!r}; "
                            "use 'bf16', 'no' or 'auto'")
    return setting




@dataclass
class Group:
    name: str
    lr_scale: float
    params: list[nn.Parameter]




def loop_options(config: ExperimentConfig) -> dict[str, Any]:
    return {option.name: option.value(config) for option in TRAINING_OPTIONS}


def check_stage(stage: str) -> None:
    if not isinstance(stage, str) or not stage or not all(c.isalnum() or c in "_-." for c in stage) \
            or stage.startswith("."):
        raise SentinelError(f"stage {stage!r} must be a word of letters, digits, '_', '-' or '.', e.g. 'fine_tune'")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one's)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def training_precision(config: ExperimentConfig, loaded: torch.dtype) -> tuple[torch.dtype | None, str]:
    """``(master dtype, mixed precision)`` for a model loaded in ``loaded``.

    A bf16 or fp16 model trains as a float32 master copy with autocast in its own dtype (the
    usual mixed-precision recipe: AdamW's updates are far below bf16's resolution near 1), unless
    ``master_weights="model"`` asks to train in the loaded dtype. ``mixed_precision`` left at
    ``auto`` then follows the model: bf16 autocast for a bf16 model, fp16 (with loss scaling, on a
    GPU) for an fp16 one.
    """
    device = resolve_device(config.device)
    half = loaded in (torch.bfloat16, torch.float16)
    master = torch.float32 if half and config.master_weights == "float32" else None
    setting = config.mixed_precision
    if setting == "auto" and master is not None:
        setting = "bf16" if loaded == torch.bfloat16 or not device.startswith("cuda") else "fp16"
    return master, resolve_mixed_precision(setting, device)


def make_accelerator(config: ExperimentConfig, precision: str | None = None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    device = resolve_device(config.device)
    precision = precision or resolve_mixed_precision(config.mixed_precision, device)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device.startswith("cuda:") and not launched:
        torch.cuda.set_device(int(device.partition(":")[2]))
    # Accelerate keeps its settings in process-wide singletons; a later train() call with other
    # settings (e.g. the demo's pre-training, then a run) must not be refused for that.
    partial = PartialState._shared_state
    if partial and not launched and (device == "cpu") != (str(partial.get("device", "cpu")).startswith("cpu")):
        AcceleratorState._reset_state(reset_partial_state=True)
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != precision:
        AcceleratorState._reset_state()
    return Accelerator(cpu=device == "cpu", mixed_precision=precision)


def build_groups(model: nn.Module, param_groups: Sequence[Mapping[str, Any]] | None) -> list[Group]:
    """Named groups in model order; trainable parameters nobody claimed go to ``base``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise SentinelError("the model has no trainable parameters; unfreeze some (requires_grad=True) to train it")
    order = {id(p): i for i, (_, p) in enumerate(named)}
    names = {id(p): n for n, p in named}
    owner: dict[int, str] = {}
    groups: list[Group] = []
    for index, spec in enumerate(param_groups or ()):
        if not isinstance(spec, Mapping) or "name" not in spec or "params" not in spec:
            raise SentinelError(f"param_groups[{index}] must be a dict with 'name', 'params' and optional "
                                f"'lr_scale', got {spec!r}")
        name = spec["name"]
        if not isinstance(name, str) or not name or any(g.name == name for g in groups):
            raise SentinelError(f"param_groups[{index}] has name {name!r}; names must be distinct non-empty strings")
        scale = spec.get("lr_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (scale > 0 and math.isfinite(scale)):
            raise SentinelError(f"param group {name!r} has lr_scale {scale!r}; it must be a positive number")
        params = []
        for p in spec["params"]:
            if not isinstance(p, torch.Tensor):
                raise SentinelError(f"param group {name!r} holds {type(p).__name__}; give the model's parameters")
            if not p.requires_grad:
                continue
            if id(p) not in order:
                raise SentinelError(f"param group {name!r} holds a tensor of shape {tuple(p.shape)} that is not a "
                                    "parameter of the model being trained")
            if id(p) in owner:
                raise SentinelError(f"parameter {names[id(p)]} is in param groups {owner[id(p)]!r} and {name!r}; "
                                    "put each parameter in one group")
            owner[id(p)] = name
            params.append(p)
        groups.append(Group(name, float(scale), sorted(params, key=lambda q: order[id(q)])))
    rest = [p for _, p in named if id(p) not in owner]
    if rest:
        base = next((g for g in groups if g.name == BASE_GROUP), None)
        if base is None:
            groups.insert(0, Group(BASE_GROUP, 1.0, rest))
        else:
            base.params = sorted(base.params + rest, key=lambda q: order[id(q)])
    return groups


def optimizer_groups(groups: list[Group], weight_decay: float) -> list[dict[str, Any]]:
    out = []
    for group in groups:
        decay = [p for p in group.params if p.ndim >= 2]
        # Biases and normalisation weights (1-D) are not decayed: shrinking them only hurts.
        no_decay = [p for p in group.params if p.ndim < 2]
        for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if params:
                out.append({"params": params, "weight_decay": wd, "sentinel_group": group.name})
    return out


