"""The adapter interface that head surgery needs from an architecture, and the adapter registry.

An adapter describes where an architecture keeps its per-head weights; everything else
(gates, removal, growth, head maps, dense export) is generic code in this package.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sentinel_core.errors import SentinelError


@dataclass(frozen=True)
class HeadParam:
    """One tensor of an attention module whose dimension ``dim`` is a run of per-head blocks.

    ``segments`` lists the consecutive parts of that dimension, each a block per slot:
    ``"q"`` (one block per query slot), ``"k"`` / ``"v"`` (one per key/value slot) or
    ``"o"`` (one per query slot, on the input side of the output projection). Every block
    is ``head_dim`` wide. Example: GPT-2's fused ``c_attn.weight`` [in, 3*H*hd] is
    ``HeadParam("c_attn.weight", 1, ("q", "k", "v"))``.
    """

    path: str
    dim: int
    segments: tuple[str, ...]


class HeadAdapter(ABC):
    """How one architecture family stores attention heads.

    Subclasses set ``family`` (a short name) and ``description`` (named in the error an
    unsupported model gets), and implement the abstract methods. The adapter never edits the
    model's config: per-layer head counts live in the module attributes it sets and in the
    HeadMap.
    """

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter can operate on ``model``."""

    @abstractmethod
    def attention_modules(self) -> list[nn.Module]:
        """The self-attention module of every layer, in layer order."""

    @abstractmethod
    def original_num_heads(self) -> int:
        """Query heads per layer of the unmodified model (from the config)."""

    def original_num_kv_heads(self) -> int:
        """Key/value heads per layer of the unmodified model (equal to query heads for MHA)."""
        return self.original_num_heads()

    @abstractmethod
    def head_dim(self, attn: nn.Module) -> int:
        """Width of one head."""

    @classmethod
    @abstractmethod
    def output_projection(cls, attn: nn.Module) -> nn.Module:
        """The module whose input is the concatenated head outputs (the gate sits there)."""

    @abstractmethod
    def head_params(self, attn: nn.Module) -> list[HeadParam]:
        """Every tensor of ``attn`` that has per-head blocks."""

    @abstractmethod
    def set_head_counts(self, attn: nn.Module, num_slots: int, num_kv_slots: int, group_size: int) -> None:
        """Update the module attributes the forward reads after its weights were resized."""

    @classmethod
    def zero_output(cls, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Attention output of a layer with no heads: what masking every head would give.

        The default suits an ``nn.Linear``-like projection: zeros plus its bias, if any.
        """
        proj = cls.output_projection(attn)
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], proj.weight.shape[0])
        bias = getattr(proj, "bias", None)
        return out if bias is None else out + bias.to(out.dtype)

    def original_group_size(self) -> int:
        """Query heads per key/value head in the unmodified model."""
        return self.original_num_heads() // self.original_num_kv_heads()


_REGISTRY: list[type[HeadAdapter]] = []


def register_adapter(adapter_cls: type[HeadAdapter]) -> type[HeadAdapter]:
    """Make ``adapter_cls`` available to every surgery operation (usable as a decorator).

    Adapters are tried in registration order; the built-in ones come first.
    """
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, HeadAdapter)) or not adapter_cls.family:
        raise SentinelError(
            f"register_adapter got {adapter_cls!r}; it needs a HeadAdapter subclass with a non-empty `family`"
        )
    for existing in _REGISTRY:
        if existing is adapter_cls:
            return adapter_cls
        if existing.family == adapter_cls.family:
            raise SentinelError(
                f"a surgery adapter for family {adapter_cls.family!r} is already registered "
                f"({existing.__module__}.{existing.__qualname__}); choose another family name"
            )
    _REGISTRY.append(adapter_cls)
    return adapter_cls


def registered_adapters() -> list[type[HeadAdapter]]:
    """The registered adapter classes, in the order they are tried."""
    return list(_REGISTRY)


def supported_architectures() -> str:
    """A one-line list of the supported families, for error messages."""
    return "; ".join(f"{c.family} ({c.description})" for c in _REGISTRY) or "none registered"


def get_adapter(model: nn.Module) -> HeadAdapter:
    """The surgery adapter for ``model``; SentinelError naming the supported families if none fits."""
    config = getattr(model, "config", None)
    for adapter_cls in _REGISTRY:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    model_type = getattr(config, "model_type", None)
    raise SentinelError(
        f"head surgery does not support {type(model).__name__} (model_type {model_type!r}); "
        f"supported: {supported_architectures()}"
    )
