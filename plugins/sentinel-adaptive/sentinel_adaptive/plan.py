"""Which parameters the adaptive fine-tuner speeds up, and by how much at each step.

Three rates, all on top of the training loop's warm-up + cosine schedule:

- ``base``: every parameter of layers that surgery did not touch (and embeddings, final norm,
  LM head) trains at the configured learning rate.
- ``touched``: the parameters of each layer that lost, gained or masked heads (the whole decoder
  layer, or only its attention module with ``adaptive_scope = "attention"``) train
  ``boost(step)`` times faster. ``boost`` rises linearly from 1 to ``adaptive_boost`` over the
  first ``adaptive_ramp`` fraction of the steps, then follows half a cosine back to 1 at the end.
- ``grown``: the weights of heads added by growth (their query/key/value blocks and their block of
  the output projection) follow the same curve up to ``adaptive_growth_boost``.

How the grown heads get their own rate: they live inside fused tensors (GPT-2's ``c_attn``, a
LLaMA ``q_proj``), and optimizer parameter groups cannot split a tensor. Scaling their gradient
would not work either: Adam divides the gradient by its running RMS, so the step is
(nearly) independent of gradient scale. Instead the plugin lets AdamW take its step at the
``touched`` rate and then rescales that step on the grown blocks only:
``w <- w_old + r * (w_new - w_old)`` with ``r = rate_grown / rate_touched``. AdamW's whole update
(the Adam step and the decoupled weight decay) is proportional to the learning rate and the
moment estimates do not depend on it, so this is exactly AdamW with the ``grown`` rate on those
blocks. It runs as a global optimizer step hook (``torch.optim.optimizer.register_optimizer_step_*``)
that acts only on the optimizer holding the model's parameters and only while ``fine_tune`` runs.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sentinel_core.options import Option

SCOPES = ("layer", "attention")
BOOST = Option("adaptive_boost", float, 3.0, "peak learning-rate factor of the layers surgery touched (1 = no boost)",
               minimum=0.0, min_exclusive=True)
GROWTH_BOOST = Option("adaptive_growth_boost", float, 5.0, "peak learning-rate factor of grown heads",
                      minimum=0.0, min_exclusive=True)
RAMP = Option("adaptive_ramp", float, None, "fraction of the steps over which the boosts rise (unset: warmup_fraction)",
              minimum=0.0, maximum=1.0, max_exclusive=True, optional=True)
SCOPE = Option("adaptive_scope", str, "layer", "boost whole decoder layers, or only their attention", choices=SCOPES)
OPTIONS = (BOOST, GROWTH_BOOST, RAMP, SCOPE)


@dataclass(frozen=True)
class AdaptiveOptions:
    """``config.options`` keys of the adaptive fine-tuner (see the module docstring)."""

    boost: float = 3.0
    growth_boost: float = 5.0
    ramp: float = 0.1
    scope: str = "layer"

    @classmethod
    def from_config(cls, config: Any) -> AdaptiveOptions:
        ramp = RAMP.value(config)
        return cls(boost=BOOST.value(config), growth_boost=GROWTH_BOOST.value(config),
                   ramp=config.warmup_fraction if ramp is None else ramp, scope=SCOPE.value(config))


def boost_factor(step: int, total_steps: int, peak: float, ramp_steps: int) -> float:
    """1 at step 0, ``peak`` at ``ramp_steps``, then half a cosine back to 1 at ``total_steps``."""
    if step < ramp_steps:
        shape = step / ramp_steps
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * (step - ramp_steps) / max(1, total_steps - ramp_steps)))
    return 1.0 + (peak - 1.0) * shape


@dataclass(frozen=True)
class HeadBlock:
    """The ``length`` entries from ``start`` along ``dim`` of ``param`` that belong to one grown head."""

    param: nn.Parameter
    dim: int
    start: int
    length: int
    label: str

    def view(self) -> torch.Tensor:
        return self.param.detach().narrow(self.dim, self.start, self.length)


class AdaptivePlan:
    """The groups and schedules for one model; build with :meth:`from_model`."""

    def __init__(self, options: AdaptiveOptions, touched_layers: list[int], grown: dict[int, list[int]],
                 touched_params: list[nn.Parameter], blocks: list[HeadBlock]) -> None:
        self.options = options
        self.touched_layers = touched_layers
        self.grown = grown
        self.touched_params = touched_params
        self.blocks = blocks
        self._step = 0
        self._total = 1

    @classmethod
    def from_model(cls, model: nn.Module, config: Any) -> AdaptivePlan:
        from sentinel_core.surgery import get_adapter, get_head_map

        options = AdaptiveOptions.from_config(config)
        adapter = get_adapter(model)
        head_map = get_head_map(model)
        original = list(range(head_map.original_num_heads))
        attns = adapter.attention_modules()
        parents = {id(child): parent for parent in model.modules() for child in parent.children()}
        touched_layers, grown, params, blocks = [], {}, [], []
        seen: set[int] = set()
        for layer, attn in enumerate(attns):
            if head_map.present(layer) == original and not head_map.masked(layer):
                continue
            touched_layers.append(layer)
            owner = attn if options.scope == "attention" else parents.get(id(attn), attn)
            for p in owner.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
            masked = set(head_map.masked(layer))
            new = [i for i in head_map.grown(layer) if i not in masked]
            if new:
                grown[layer] = new
                blocks.extend(_grown_blocks(model, head_map, layer, new))
        return cls(options, touched_layers, grown, params, blocks)

    # -- what train() gets -------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        if not self.touched_params:
            return []
        groups: list[dict[str, Any]] = [{"name": "touched", "params": self.touched_params, "lr_scale": 1.0}]
        if self.blocks:
            # No parameters of its own: its rate is reported, and applied by the step hook.
            groups.append({"name": "grown", "params": [], "lr_scale": 1.0})
        return groups

    def ramp_steps(self, total_steps: int) -> int:
        return math.ceil(self.options.ramp * total_steps)

    def factor(self, step: int, total_steps: int, group: str) -> float:
        """The multiplier of ``group``'s scheduled rate at 0-based ``step``."""
        ramp = self.ramp_steps(total_steps)
        if group == "touched":
            return boost_factor(step, total_steps, self.options.boost, ramp)
        if group == "grown":
            return boost_factor(step, total_steps, self.options.growth_boost, ramp)
        return 1.0

    def multiplier(self, step: int, total_steps: int, group: str) -> float:
        """The ``lr_multiplier`` for :func:`sentinel_core.training.train`; it also tells the step
        hook which step the optimizer is about to take."""
        self._step, self._total = step, total_steps
        return self.factor(step, total_steps, group)

    def grown_ratio(self) -> float:
        return self.factor(self._step, self._total, "grown") / self.factor(self._step, self._total, "touched")

    # -- the grown heads' own rate ---------------------------------------------------------------

    @contextmanager
    def grown_head_boost(self) -> Iterator[None]:
        """While active, every step of the optimizer that trains these parameters is rescaled on the
        grown heads' blocks by :meth:`grown_ratio` (see the module docstring)."""
        if not self.blocks:
            yield
            return
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        marker = self.blocks[0].param
        owns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        before: list[torch.Tensor] = []

        def is_ours(optimizer: torch.optim.Optimizer) -> bool:
            if optimizer not in owns:
                owns[optimizer] = any(p is marker for g in optimizer.param_groups for p in g["params"])
            return owns[optimizer]

        def pre(optimizer, args, kwargs):
            if is_ours(optimizer):
                before[:] = [block.view().clone() for block in self.blocks]

        @torch.no_grad()
        def post(optimizer, args, kwargs):
            if not is_ours(optimizer) or not before:
                return
            ratio = self.grown_ratio()
            for block, old in zip(self.blocks, before, strict=True):
                view = block.view()
                view.copy_(torch.lerp(old, view, ratio))
            before.clear()

        handles = [register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def describe(self) -> dict[str, Any]:
        return {"touched_layers": list(self.touched_layers),
                "grown_heads": {str(k): v for k, v in self.grown.items()},
                "boost": self.options.boost, "growth_boost": self.options.growth_boost,
                "ramp": self.options.ramp, "scope": self.options.scope,
                "touched_parameters": int(sum(p.numel() for p in self.touched_params)),
                "grown_head_entries": int(sum(b.view().numel() for b in self.blocks))}


def _grown_blocks(model: nn.Module, head_map: Any, layer: int, ids: list[int]) -> list[HeadBlock]:
    """The per-head blocks of the grown heads ``ids`` of ``layer`` (``sentinel_core.surgery.head_slices``).

    Key/value blocks count only when every query head reading them is grown (a grown group under
    grouped-query attention); a key/value head shared with original heads keeps the touched rate.
    """
    from sentinel_core.surgery import head_slices

    slots = head_map.layers[layer]
    group = head_map.group_sizes[layer]
    original = head_map.original_num_heads
    out: list[HeadBlock] = []
    seen: set[tuple[int, int, int]] = set()
    for head in ids:
        slot = slots.index(head)
        first = (slot // group) * group
        whole_group_grown = all(i is None or i >= original for i in slots[first:first + group])
        parts = ("q", "k", "v", "o") if whole_group_grown else ("q", "o")
        for piece in head_slices(model, layer, head, parts=parts):
            key = (id(piece.parameter), piece.dim, piece.start)
            if isinstance(piece.parameter, nn.Parameter) and key not in seen:
                seen.add(key)
                index = slot // group if piece.part in ("k", "v") else slot
                out.append(HeadBlock(piece.parameter, piece.dim, piece.start, piece.length,
                                     f"layer {layer} {piece.path} {piece.part}{index}"))
    return out
