"""One growth step: measure where heads would help, allocate the target, add the heads."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sentinel_core.data import calibration_batches
from sentinel_core.errors import SentinelError
from sentinel_core.plugins import emit
from sentinel_core.results import GrowthResult
from sentinel_core.surgery import get_head_map, grow_heads

from .allocation import (
    allocate_balanced,
    allocate_by_score,
    allocate_random,
    growth_target,
    layer_room,
)
from .entropy import layer_entropies
from .gain import candidate_gains
from .options import GrowthOptions, growth_options

GRADIENT = "gradient"
ENTROPY_GAP = "entropy-gap"
BALANCED = "balanced"
RANDOM = "random"
STRATEGIES = {
    GRADIENT: "layers where a fresh head's output weights get the largest loss gradient (first-order gain)",
    ENTROPY_GAP: "layers whose surviving heads attend most diffusely (highest mean attention entropy)",
    BALANCED: "layers that lost the most heads first, round-robin",
    RANDOM: "seeded uniform random layers: the baseline to beat",
}


def plan_growth(
    strategy: str,
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    n: int,
    options: GrowthOptions,
    *,
    seed: int = 0,
) -> tuple[list[int], list[float] | None, dict[str, Any]]:
    """Decide how many heads each layer gets; the model is not changed.

    :return: (heads per layer, the per-layer score that drove the choice or None, extra details).
    """
    head_map = get_head_map(model)
    room = layer_room(head_map, allow_exceed=options.allow_exceed)
    extra: dict[str, Any] = {}
    scores: list[float] | None = None
    if n == 0:
        return [0] * head_map.num_layers, None, extra
    if strategy == GRADIENT:
        gains = candidate_gains(model, batches, candidates=options.candidates, init_std=options.init_std, seed=seed)
        scores = [float(v) for v in gains.per_layer]
        extra.update(candidate_gains=gains.per_candidate.tolist(), tokens_seen=gains.tokens)
        counts = allocate_by_score(scores, room, n)
    elif strategy == ENTROPY_GAP:
        scores = layer_entropies(model, batches)
        counts = allocate_by_score(scores, room, n)
    elif strategy == BALANCED:
        counts = allocate_balanced(head_map, room, n)
    elif strategy == RANDOM:
        counts = allocate_random(room, n, seed)
    else:
        raise SentinelError(f"growth strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    return counts, scores, extra


def grow(strategy: str, model: nn.Module, data: Any, config: Any) -> GrowthResult:
    """The ``grow_heads`` hook's work for one of this plugin's strategies (see docs/growth.md)."""
    start = time.perf_counter()
    if strategy not in STRATEGIES:
        raise SentinelError(f"growth strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    options = growth_options(config, getattr(model, "config", None))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if options.warmup_steps and world > 1:
        # The ramp follows metric events, which only the main process receives.
        raise SentinelError(f"options.growth_warmup_steps={options.warmup_steps} is not supported with "
                            f"multi-process training (WORLD_SIZE={world}); set it to 0")
    head_map = get_head_map(model)
    n = growth_target(head_map, config.growth_percent)
    room = layer_room(head_map, allow_exceed=options.allow_exceed)
    batches: list[dict[str, torch.Tensor]] = []
    if strategy in (GRADIENT, ENTROPY_GAP) and n > 0:
        batches = calibration_batches(data.train.blocks, config.batch_size, config.calibration_batches, config.seed)
    counts, scores, extra = plan_growth(strategy, model, batches, n, options, seed=config.seed)
    placed = sum(counts)
    if placed < n:
        message = (f"growth_percent {config.growth_percent} asks for {n} new heads, but only {placed} fit under "
                   f"the original {head_map.original_num_heads} heads per layer; set options.growth_allow_exceed "
                   f"to go past it")
        warnings.warn(message, stacklevel=2)
        emit("grow", warning=message, heads_requested=n, heads_allowed=placed)
    # The new weights come from a private generator: the same seed grows the same heads.
    generator = torch.Generator().manual_seed(int(config.seed))
    new = grow_heads(model, {layer: c for layer, c in enumerate(counts) if c}, init_std=options.init_std,
                     generator=generator)
    new = {layer: ids for layer, ids in sorted(new.items()) if ids}
    extra.update(requested=n, room=[None if r is None else int(r) for r in room], per_layer=counts,
                 init_std=options.init_std, seconds=time.perf_counter() - start)
    if scores is not None:
        extra["layer_scores"] = scores
    if options.warmup_steps and new:
        from .warmup import install_warmup

        install_warmup(model, new, options.warmup_steps)
        extra["warmup_steps"] = options.warmup_steps
    emit("grow", strategy=strategy, heads_requested=n, per_layer=counts,
         **({"layer_scores": scores} if scores is not None else {}))
    return GrowthResult(heads=new, strategy=strategy, extra=extra)
