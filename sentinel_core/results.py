"""Plain data objects that strategy hooks return, so plugins and the pipeline agree on shapes."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .options import Option

if TYPE_CHECKING:  # pragma: no cover
    import torch

HOOK_KINDS = ("score_heads", "prune", "fine_tune", "grow_heads")


@dataclass(frozen=True)
class Strategy:
    """A named strategy that a plugin offers for one of the strategy hooks.

    :param hook: which hook the strategy answers: one of ``HOOK_KINDS``.
    :param name: what users type (``--scorer entropy``); unique per hook.
    :param description: one line for ``sentinel plugins``.
    :param options: the :class:`~sentinel_core.options.Option` objects the strategy reads from
        ``config.options``; Sentinel checks them before a run starts, and lists them.
    :param function: what Sentinel calls to run the strategy. It takes the hook's arguments by
        name, any subset of them (``strategy``, ``model``, ``config``, ...), and returns the
        hook's result. Without a function, Sentinel calls the plugin's implementation of the
        hook itself, which then must return None for names it does not own.
    """

    hook: str
    name: str
    description: str = ""
    options: tuple[Option, ...] = ()
    function: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.hook not in HOOK_KINDS:
            raise ValueError(f"Strategy hook {self.hook!r} is not one of {', '.join(HOOK_KINDS)}")
        if not self.name or self.name != self.name.strip():
            raise ValueError(f"Strategy name {self.name!r} must be a non-empty word")
        object.__setattr__(self, "options", tuple(self.options))
        names = [o.name for o in self.options]
        if len(set(names)) != len(names) or not all(isinstance(o, Option) for o in self.options):
            raise ValueError(f"Strategy {self.name!r} options must be distinct Option objects, got {names}")
        if self.function is not None and not callable(self.function):
            raise ValueError(f"Strategy {self.name!r} function must be callable, got {self.function!r}")


@dataclass
class HeadScores:
    """Per-head importance: higher means more important.

    ``scores`` is a float tensor ``[num_layers, width]`` indexed by head id (original numbering;
    grown heads after the originals); heads that are not active (removed or masked) are NaN.
    """

    scores: torch.Tensor
    strategy: str
    tokens_seen: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = [[None if math.isnan(v) else float(v) for v in row] for row in self.scores.tolist()]
        return {
            "strategy": self.strategy,
            "tokens_seen": self.tokens_seen,
            "seconds": self.seconds,
            "scores": rows,
            **({"extra": self.extra} if self.extra else {}),
        }


@dataclass
class PruneResult:
    """What ``prune`` removed (or masked): ``heads`` maps layer -> head ids."""

    heads: dict[int, list[int]]
    mode: str
    strategy: str

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.heads.values())


@dataclass
class FineTuneResult:
    """Outcome of a ``fine_tune`` call. ``best_eval_loss`` is on held-out text; NaN if never evaluated."""

    steps: int
    strategy: str
    best_eval_loss: float = float("nan")
    final_train_loss: float = float("nan")
    seconds: float = 0.0
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GrowthResult:
    """What ``grow_heads`` added: ``heads`` maps layer -> new head ids."""

    heads: dict[int, list[int]]
    strategy: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.heads.values())
