"""Per-slot head gates: a non-trainable buffer multiplied into the output projection's input.

The gate lives on the output projection module itself (not the attention module) so that
the hook is a plain module-level function that reads the module it is called on; closures
over a module would survive ``copy.deepcopy`` pointing at the original model.
"""

from __future__ import annotations

import torch
from torch import nn

GATE_BUFFER = "sentinel_gate"
_ACTIVE_FLAG = "_sentinel_gate_active"


def _gate_pre_hook(proj: nn.Module, args: tuple) -> tuple | None:
    if not getattr(proj, _ACTIVE_FLAG, False):
        return None
    gate: torch.Tensor = getattr(proj, GATE_BUFFER)
    n = gate.shape[0]
    if n == 0:
        return None
    x = args[0]
    shape = x.shape
    gated = (x.reshape(*shape[:-1], n, shape[-1] // n) * gate.to(x.dtype)[:, None]).reshape(shape)
    return (gated, *args[1:])


def _gate_device(proj: nn.Module) -> torch.device:
    # Where the projection's weights are; the CPU while they are still on the meta device (a
    # model being loaded), so the gate keeps its values.
    weight = next(proj.parameters())
    return torch.device("cpu") if weight.is_meta else weight.device


def has_gate(proj: nn.Module) -> bool:
    """True when ``proj`` carries a Sentinel gate."""
    return GATE_BUFFER in proj._buffers


def ensure_gate(proj: nn.Module, num_slots: int) -> torch.Tensor:
    """Install (once) the gate buffer and hook on ``proj``; returns the gate."""
    if not has_gate(proj):
        proj.register_buffer(GATE_BUFFER, torch.ones(num_slots, device=_gate_device(proj)), persistent=False)
        proj.register_forward_pre_hook(_gate_pre_hook)
        setattr(proj, _ACTIVE_FLAG, False)
    return getattr(proj, GATE_BUFFER)


def read_gate(proj: nn.Module, num_slots: int) -> torch.Tensor:
    """Current gate values (ones when no gate was ever installed), detached, float32, on CPU."""
    if not has_gate(proj):
        return torch.ones(num_slots)
    return getattr(proj, GATE_BUFFER).detach().float().cpu()


def write_gate(proj: nn.Module, values: torch.Tensor) -> None:
    """Set the gate to ``values`` (one per slot) and switch the hook on only if it changes anything."""
    ensure_gate(proj, values.shape[0])
    proj._buffers[GATE_BUFFER] = values.detach().to(device=_gate_device(proj), dtype=torch.float32).clone()
    # An all-ones gate is skipped so that an unmasked model runs the stock forward bit for bit.
    setattr(proj, _ACTIVE_FLAG, bool((values != 1).any()))


def swap_in_leaf(proj: nn.Module, leaf: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Put a grad-requiring leaf in place of the gate; returns what to restore."""
    old = (proj._buffers[GATE_BUFFER], getattr(proj, _ACTIVE_FLAG))
    proj._buffers[GATE_BUFFER] = leaf
    setattr(proj, _ACTIVE_FLAG, True)
    return old


def restore(proj: nn.Module, saved: tuple[torch.Tensor, bool]) -> None:
    """Undo :func:`swap_in_leaf`."""
    proj._buffers[GATE_BUFFER] = saved[0]
    setattr(proj, _ACTIVE_FLAG, saved[1])


def detach_gate(proj: nn.Module) -> tuple[torch.Tensor, bool] | None:
    """Take the gate off ``proj`` (buffer and hook); returns ``(values, active)`` or None.

    For wrapping a projection in another module (a LoRA layer): the gate must then sit on the
    wrapper, in front of both the wrapped layer and the adapter's branch.
    """
    if not has_gate(proj):
        return None
    values, active = proj._buffers.pop(GATE_BUFFER), getattr(proj, _ACTIVE_FLAG, False)
    for key, hook in list(proj._forward_pre_hooks.items()):
        if hook is _gate_pre_hook:
            del proj._forward_pre_hooks[key]
    if hasattr(proj, _ACTIVE_FLAG):
        delattr(proj, _ACTIVE_FLAG)
    return values.detach().float().cpu(), active


def attach_gate(proj: nn.Module, detached: tuple[torch.Tensor, bool] | None) -> None:
    """Put a gate taken by :func:`detach_gate` on ``proj``."""
    if detached is not None:
        write_gate(proj, detached[0])
