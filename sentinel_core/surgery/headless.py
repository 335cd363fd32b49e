"""The zero-output path for an attention layer whose every head was removed.

Stock attention forwards reshape the projections with ``view(..., -1, head_dim)``, which
fails on an empty tensor, so such a layer gets a subclass of its own attention class whose
forward returns what masking every head would give (the output projection's bias, or zeros).

It still writes a one-element-wide placeholder into the KV cache: ``DynamicLayer`` reports
a sequence length of 0 when its keys are empty, and ``generate()`` reads positions from the
cache, so an empty entry would shift every later token's position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_CLASSES: dict[tuple[type, Callable], type] = {}


class _HeadlessMixin:
    """Mixed in front of an attention class; ``_sentinel_zero_output`` is set per subclass."""

    _sentinel_headless = True
    _sentinel_zero_output: Callable[[nn.Module, torch.Tensor], torch.Tensor]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx, kwargs=kwargs)
        return type(self)._sentinel_zero_output(self, hidden_states), None


def is_headless(attn: nn.Module) -> bool:
    """True when ``attn`` currently runs the zero-output path."""
    return getattr(type(attn), "_sentinel_headless", False)


def _headless_class(base: type, zero_output: Callable) -> type:
    key = (base, zero_output)
    if key not in _CLASSES:
        _CLASSES[key] = type(
            f"Headless{base.__name__}",
            (_HeadlessMixin, base),
            {"_sentinel_zero_output": staticmethod(zero_output), "__module__": __name__},
        )
    return _CLASSES[key]


def set_headless(attn: nn.Module, headless: bool, zero_output: Callable) -> None:
    """Switch ``attn`` onto (or back off) the zero-output path, keeping its parameters."""
    if headless and not is_headless(attn):
        attn.__class__ = _headless_class(type(attn), zero_output)
    elif not headless and is_headless(attn):
        attn.__class__ = type(attn).__bases__[1]
