"""The built-in ``prune`` strategies ``global`` and ``per-layer``: pick the heads to remove from scores.

The target is a fraction of the *original* head count: ``target_alive = L*H - round(p * L*H)``.
Heads that are already gone (removed or masked) count towards it, so calling ``prune`` twice
with the same fraction removes nothing the second time, and a growth step followed by a
prune only takes away what is needed to get back to the target.

Choices (see docs/scoring.md):

- Candidates are the *active* heads (present and not masked). A masked head counts as
  removed; its score is ignored.
- ``global``: one ranking over all layers, lowest score removed first, skipping a head whose
  layer would drop below ``min_heads_per_layer``.
- ``per-layer``: every removal comes from a layer with the most active heads left, so the
  layers end as even as the target allows (the same fraction of each layer); within a layer
  the lowest score goes first. When several layers are equally full, the one whose weakest
  candidate has the lowest (normalised) score gives the head.
- Normalisation (``config.options["normalize_scores"]``: ``"auto"`` (default), true or false):
  scores of each layer are divided by the L2 norm of that layer's active scores before the
  global ranking, as Michel et al. (2019) do for gradient importance. ``"auto"`` normalises
  unless the scorer declares its scores comparable across layers
  (``HeadScores.extra["cross_layer_comparable"]``, set by ``entropy`` and ``random``, whose
  scores are on a fixed absolute scale that normalisation would distort). Within one layer,
  dividing by a positive constant never changes the order, so ``per-layer`` is affected only
  in its choice between equally full layers.
- Ties: equal scores are removed lower layer first, then lower head id first.
- GQA: selection works on query heads. Any subset is a valid removal; the surgery keeps a
  key/value head (and dead, gated query slots beside it) while any query head of its group
  lives, so removing a whole group saves more than removing the same number spread over groups.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SentinelError
from ..hookspecs import hookimpl
from ..options import Option
from ..plugins import emit
from ..results import HeadScores, PruneResult, Strategy

if TYPE_CHECKING:  # pragma: no cover
    from ..surgery.headmap import HeadMap

GLOBAL = "global"
PER_LAYER = "per-layer"
SCOPES = (GLOBAL, PER_LAYER)
COMPARABLE_KEY = "cross_layer_comparable"
NORMALIZE = Option("normalize_scores", str, "auto",
                   "divide each layer's scores by their L2 norm before ranking (auto: unless the scorer says its "
                   "scores are comparable across layers)", choices=("auto", "true", "false"))
NORMALIZE_OPTION = NORMALIZE.name


@hookimpl
def register_strategies():
    return [
        Strategy("prune", GLOBAL, "remove the lowest-scoring heads across all layers (default)",
                 options=(NORMALIZE,), function=prune_by_scope),
        Strategy("prune", PER_LAYER, "remove the same share of heads in every layer, lowest scores first",
                 options=(NORMALIZE,), function=prune_by_scope),
    ]


def prune_by_scope(strategy, model, scores, config) -> PruneResult:
    """The ``prune`` hook's work for ``global`` and ``per-layer``: select, then remove or mask."""
    from ..surgery import get_head_map, mask_heads, prune_heads

    head_map = get_head_map(model)
    normalize = resolve_normalize(NORMALIZE.value(config), scores.extra)
    needed = heads_to_remove(head_map, config.pruning_percent)
    selected = select_heads(scores.scores, head_map, config.pruning_percent, scope=strategy,
                            min_heads_per_layer=config.min_heads_per_layer, normalize=normalize)
    chosen = sum(len(v) for v in selected.values())
    if chosen < needed:
        message = (f"pruning_percent {config.pruning_percent} asks for {needed} more heads to go, but "
                   f"min_heads_per_layer={config.min_heads_per_layer} allows only {chosen}")
        warnings.warn(message, stacklevel=2)
        emit("prune", warning=message, heads_requested=needed, heads_allowed=chosen)
    if selected:
        if config.prune_mode == "mask":
            mask_heads(model, selected)
        else:
            prune_heads(model, selected)
    return PruneResult(heads=selected, mode=config.prune_mode, strategy=strategy)


def resolve_normalize(option: Any, extra: dict[str, Any] | None = None) -> bool:
    """Turn the ``normalize_scores`` option (``"auto"``, a bool, or "true"/"false") into a bool."""
    if isinstance(option, bool):
        return option
    text = str(option).strip().lower()
    if text == "auto":
        return not bool((extra or {}).get(COMPARABLE_KEY, False))
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SentinelError(f"options.{NORMALIZE_OPTION}={option!r} is not valid; use auto, true or false")


def heads_to_remove(head_map: HeadMap, pruning_percent: float) -> int:
    """How many more active heads must go to reach ``pruning_percent`` of the original count."""
    if not 0.0 <= pruning_percent < 1.0:
        raise SentinelError(f"pruning_percent must be a fraction in [0, 1), e.g. 0.3, got {pruning_percent}")
    original_total = head_map.num_layers * head_map.original_num_heads
    target_alive = original_total - round(pruning_percent * original_total)
    active = sum(len(head_map.active(layer)) for layer in range(head_map.num_layers))
    return max(0, active - target_alive)


def normalize_by_layer(scores: torch.Tensor, head_map: HeadMap) -> torch.Tensor:
    """Divide each layer's active-head scores by their L2 norm (a zero-norm layer is left as is)."""
    out = scores.double().clone()
    for layer in range(head_map.num_layers):
        ids = head_map.active(layer)
        if not ids:
            continue
        norm = float(out[layer, ids].norm())
        if norm > 0 and math.isfinite(norm):
            out[layer, ids] = out[layer, ids] / norm
    return out


def select_heads(
    scores: torch.Tensor | HeadScores,
    head_map: HeadMap,
    pruning_percent: float,
    *,
    scope: str = GLOBAL,
    min_heads_per_layer: int = 1,
    normalize: bool = True,
) -> dict[int, list[int]]:
    """Choose which active heads to remove so that ``pruning_percent`` of the original heads are gone.

    :param scores: ``[num_layers, width]`` importance (higher = keep), original head numbering
        (a :class:`HeadScores` is accepted too).
    :param head_map: the model's current layout (:func:`sentinel_core.surgery.get_head_map`).
    :param pruning_percent: fraction of ``num_layers * original_num_heads`` that should be gone
        afterwards; heads already removed or masked count towards it.
    :param scope: ``"global"`` or ``"per-layer"`` (see the module docstring).
    :param min_heads_per_layer: never leave a layer with fewer active heads than this (a layer
        that already has fewer loses nothing). When this makes the target unreachable, as many
        heads as allowed are chosen.
    :param normalize: divide each layer's scores by their L2 norm before ranking.
    :return: layer -> sorted head ids to remove, only for layers that lose at least one head.
    :raises SentinelError: bad scope, percent or minimum; scores of the wrong shape or NaN for
        an active head (scores from another model state).
    """
    if isinstance(scores, HeadScores):
        scores = scores.scores
    if scope not in SCOPES:
        raise SentinelError(f"prune strategy {scope!r} is not one of {', '.join(SCOPES)}")
    if isinstance(min_heads_per_layer, bool) or not isinstance(min_heads_per_layer, int) or min_heads_per_layer < 0:
        raise SentinelError(f"min_heads_per_layer must be an integer >= 0, got {min_heads_per_layer!r}")
    _check_scores(scores, head_map)
    needed = heads_to_remove(head_map, pruning_percent)
    if needed == 0:
        return {}
    ranked = normalize_by_layer(scores, head_map) if normalize else scores.double()

    # Per layer, candidates in removal order: lowest score, then lowest id.
    queues: list[list[tuple[float, int, int]]] = []
    room: list[int] = []
    for layer in range(head_map.num_layers):
        ids = head_map.active(layer)
        queues.append(sorted((float(ranked[layer, h]), layer, h) for h in ids))
        room.append(max(0, len(ids) - min_heads_per_layer))

    if scope == GLOBAL:
        order = sorted(c for queue in queues for c in queue)
        chosen: list[tuple[float, int, int]] = []
        taken = [0] * head_map.num_layers
        for candidate in order:
            if len(chosen) == needed:
                break
            layer = candidate[1]
            if taken[layer] < room[layer]:
                taken[layer] += 1
                chosen.append(candidate)
    else:
        chosen = []
        remaining = [len(head_map.active(layer)) for layer in range(head_map.num_layers)]
        pointer = [0] * head_map.num_layers
        while len(chosen) < needed:
            open_layers = [layer for layer in range(head_map.num_layers) if pointer[layer] < room[layer]]
            if not open_layers:
                break
            fullest = max(remaining[layer] for layer in open_layers)
            # Among the fullest layers: weakest next candidate, then lower layer (tuple order).
            candidate = min(queues[layer][pointer[layer]] for layer in open_layers if remaining[layer] == fullest)
            layer = candidate[1]
            pointer[layer] += 1
            remaining[layer] -= 1
            chosen.append(candidate)

    selection: dict[int, list[int]] = {}
    for _, layer, head in chosen:
        selection.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(selection.items())}


def _check_scores(scores: torch.Tensor, head_map: HeadMap) -> None:
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[0] != head_map.num_layers:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise SentinelError(
            f"scores have shape {shape}; expected [{head_map.num_layers}, {head_map.width}] for this model"
        )
    for layer in range(head_map.num_layers):
        ids = head_map.active(layer)
        if ids and max(ids) >= scores.shape[1]:
            raise SentinelError(
                f"scores are {scores.shape[1]} heads wide but layer {layer} has head id {max(ids)}; "
                "score the model in its current state"
            )
        bad = [h for h in ids if not math.isfinite(float(scores[layer, h]))]
        if bad:
            raise SentinelError(
                f"scores are NaN or infinite for active head {bad[0]} of layer {layer}; "
                "score the model in its current state"
            )
