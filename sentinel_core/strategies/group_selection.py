"""The built-in ``prune`` strategies ``kv-groups`` and ``per-group``: selection that respects
grouped-query attention (GQA).

Under GQA a key/value head serves a group of query heads, and it can only go when its whole
group goes (docs/surgery.md). ``global`` and ``per-layer`` pick query heads one by one, so on a
model such as Llama 3 they rarely empty a group: the key/value cache, which dominates memory when
a model serves, does not shrink. These two strategies aim at the groups instead.

- ``kv-groups`` removes whole groups: a key/value head together with every query head it
  serves. By default (``options["uniform"]`` true) the same number of groups goes from every
  layer, so the result has one head count for the whole model and exports to a stock
  checkpoint without padding; ``uniform = false`` ranks all groups of all layers together.
- ``per-group`` trims every group to the same number of query heads, lowest scores first
  within each group, and keeps every key/value head (the width-pruning mode of NVIDIA's
  Minitron): the query work shrinks, the KV cache does not.

Shared rules (see docs/scoring.md):

- The target is the one every selection uses: ``pruning_percent`` of the model's *original*
  query heads should be gone afterwards (``selection.heads_to_remove``; heads already removed
  or masked count towards it). It is rounded to whole units (groups, or heads per group): the
  count whose removal comes nearest to the target, ties going to the larger removal. What was
  chosen is reported, because it can differ from what was asked (30% of 8 groups is 2 groups,
  25%).
- A group's importance is the sum of the layer-normalised scores of its active query heads
  (``selection.normalize_by_layer``, switched by ``options["normalize_scores"]`` exactly as for
  ``global``), unless the scorer supplies group scores itself in
  ``HeadScores.extra["group_scores"]``: one list per layer, one number per key/value slot of
  that layer in slot order (``HeadMap.kv_groups``), ``None`` for a slot with no active head,
  higher = more important. Those are normalised per layer under the same switch.
- ``min_heads_per_layer`` is never violated; a layer that cannot give up a unit keeps it.
- Ties: lower layer first, then lower key/value slot (or head id within a group).
- Multi-head attention (GPT-2, or a LLaMA whose every query head has its own KV head): a group
  is one head. ``kv-groups`` then selects exactly as ``per-layer`` does (``global`` with
  ``uniform = false``); ``per-group`` has nothing to trim and refuses.

The functions here are pure: they read scores and a head map and return ``{layer: [head ids]}``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SentinelError
from ..hookspecs import hookimpl
from ..log import get_logger
from ..options import Option
from ..plugins import emit
from ..results import HeadScores, PruneResult, Strategy
from .selection import (
    GLOBAL,
    NORMALIZE,
    PER_LAYER,
    _check_scores,
    heads_to_remove,
    normalize_by_layer,
    resolve_normalize,
    select_heads,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..surgery.headmap import HeadMap

log = get_logger()

KV_GROUPS = "kv-groups"
PER_GROUP = "per-group"
GROUP_STRATEGIES = (KV_GROUPS, PER_GROUP)
UNIFORM = Option("uniform", bool, True, "remove the same number of KV groups from every layer, so the model keeps "
                 "one head count (false: rank groups across layers)")
UNIFORM_OPTION = UNIFORM.name
GROUP_SCORES_KEY = "group_scores"


@hookimpl
def register_strategies():
    return [
        Strategy("prune", KV_GROUPS, "remove whole key/value groups (a KV head with all its query heads), the same "
                                     "number from every layer unless -o uniform=false",
                 options=(NORMALIZE, UNIFORM), function=prune_groups),
        Strategy("prune", PER_GROUP, "remove the same number of query heads from every KV group, keeping every "
                                     "KV head (Minitron-style width pruning)", function=prune_groups),
    ]


def prune_groups(strategy, model, scores, config) -> PruneResult:
    """The ``prune`` hook's work for ``kv-groups`` and ``per-group``: select, report, remove or mask."""
    from ..surgery import get_head_map, mask_heads, prune_heads

    head_map = get_head_map(model)
    normalize = resolve_normalize(NORMALIZE.value(config), scores.extra) if strategy == KV_GROUPS else False
    uniform = UNIFORM.value(config) if strategy == KV_GROUPS else True

    def select(min_heads: int) -> dict[int, list[int]]:
        if strategy == KV_GROUPS:
            return select_kv_groups(scores.scores, head_map, config.pruning_percent, uniform=uniform,
                                    min_heads_per_layer=min_heads, normalize=normalize,
                                    group_scores=(scores.extra or {}).get(GROUP_SCORES_KEY))
        return select_per_group(scores.scores, head_map, config.pruning_percent, min_heads_per_layer=min_heads)

    selected = select(config.min_heads_per_layer)
    choice = describe_choice(strategy, head_map, selected, config.pruning_percent, uniform=uniform)
    log.info(choice.message)
    emit("prune", **choice.values)
    unconstrained = _count(select(0)) if config.min_heads_per_layer else _count(selected)
    if unconstrained > _count(selected):
        message = (f"{strategy}: min_heads_per_layer={config.min_heads_per_layer} kept "
                   f"{unconstrained - _count(selected)} heads that the rounded target would remove")
        warnings.warn(message, stacklevel=2)
        emit("prune", warning=message, heads_requested=unconstrained, heads_allowed=_count(selected))
    if selected:
        if config.prune_mode == "mask":
            mask_heads(model, selected)
        else:
            prune_heads(model, selected)
    return PruneResult(heads=selected, mode=config.prune_mode, strategy=strategy)


# ---------------------------------------------------------------- groups and their importance


@dataclass(frozen=True)
class Group:
    """One key/value slot of a layer and the query heads it serves.

    ``active`` are the heads that contribute; ``present`` adds the masked ones, which go with the
    group so that removing it frees the key/value head.
    """

    layer: int
    kv_slot: int
    active: tuple[int, ...]
    present: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.active)


def groups_of(head_map: HeadMap) -> list[list[Group]]:
    """Per layer, the key/value groups that still have an active query head, in slot order."""
    out: list[list[Group]] = []
    for layer in range(head_map.num_layers):
        masked = set(head_map.masked(layer))
        groups = []
        for kv, members in enumerate(head_map.kv_groups(layer)):
            present = tuple(i for i in members if i is not None)
            active = tuple(i for i in present if i not in masked)
            if active:
                groups.append(Group(layer, kv, active, present))
        out.append(groups)
    return out


def is_multi_head(head_map: HeadMap) -> bool:
    """True when every original query head has its own key/value head (GPT-2, MHA LLaMAs)."""
    return head_map.original_num_kv_heads == head_map.original_num_heads


def group_importance(
    scores: torch.Tensor,
    head_map: HeadMap,
    *,
    normalize: bool = True,
    group_scores: list[list[float | None]] | None = None,
) -> dict[tuple[int, int], float]:
    """``(layer, kv_slot) -> importance`` for every group with an active head (higher = keep).

    :param scores: ``[num_layers, width]`` head scores (checked by the caller).
    :param head_map: the model's current layout.
    :param normalize: divide by the layer's L2 norm first (head scores, or the supplied group
        scores), so that groups can be ranked across layers.
    :param group_scores: optional scores per layer and key/value slot from the scorer
        (``HeadScores.extra["group_scores"]``); used instead of summing head scores.
    :raises SentinelError: group scores of the wrong shape, or not finite for a group with an
        active head.
    """
    groups = groups_of(head_map)
    if group_scores is None:
        ranked = normalize_by_layer(scores, head_map) if normalize else scores.double()
        return {(g.layer, g.kv_slot): float(sum(float(ranked[g.layer, h]) for h in g.active))
                for layer_groups in groups for g in layer_groups}
    _check_group_scores(group_scores, head_map, groups)
    out: dict[tuple[int, int], float] = {}
    for layer, layer_groups in enumerate(groups):
        values = [float(group_scores[layer][g.kv_slot]) for g in layer_groups]
        norm = math.sqrt(sum(v * v for v in values))
        scale = norm if normalize and norm > 0 and math.isfinite(norm) else 1.0
        for g, value in zip(layer_groups, values, strict=True):
            out[(g.layer, g.kv_slot)] = value / scale
    return out


def _check_group_scores(group_scores: Any, head_map: HeadMap, groups: list[list[Group]]) -> None:
    expected = [head_map.num_kv_slots(layer) for layer in range(head_map.num_layers)]
    if not isinstance(group_scores, (list, tuple)) or len(group_scores) != head_map.num_layers or any(
        not isinstance(row, (list, tuple)) or len(row) != n for row, n in zip(group_scores, expected, strict=False)
    ):
        raise SentinelError(
            f"HeadScores.extra[{GROUP_SCORES_KEY!r}] must hold one list per layer with one score per key/value "
            f"slot ({expected} slots per layer); score the model in its current state"
        )
    for layer_groups in groups:
        for g in layer_groups:
            value = group_scores[g.layer][g.kv_slot]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SentinelError(
                    f"HeadScores.extra[{GROUP_SCORES_KEY!r}] is {value!r} for key/value slot {g.kv_slot} of layer "
                    f"{g.layer}, which has active heads; it needs a finite number"
                )


# ---------------------------------------------------------------- selection


def select_kv_groups(
    scores: torch.Tensor | HeadScores,
    head_map: HeadMap,
    pruning_percent: float,
    *,
    uniform: bool = True,
    min_heads_per_layer: int = 1,
    normalize: bool = True,
    group_scores: list[list[float | None]] | None = None,
) -> dict[int, list[int]]:
    """Choose whole key/value groups to remove so that about ``pruning_percent`` of the original
    query heads are gone.

    :param scores: ``[num_layers, width]`` head importance (higher = keep), or a
        :class:`HeadScores` (whose ``extra["group_scores"]`` is then used unless
        ``group_scores`` is given).
    :param head_map: the model's current layout.
    :param pruning_percent: fraction of the original query heads that should be gone; rounded to
        whole groups (nearest, ties to the larger removal).
    :param uniform: the same number of groups from every layer (its weakest ones); otherwise
        one ranking over all groups of all layers.
    :param min_heads_per_layer: never leave a layer with fewer active heads than this.
    :param normalize: normalise scores per layer before ranking across layers (only the
        non-uniform ranking depends on it).
    :param group_scores: scores per layer and key/value slot supplied by the scorer.
    :return: layer -> sorted head ids to remove: every present head of each chosen group
        (masked ones too, so the group's key/value head goes).
    :raises SentinelError: bad percent or minimum; scores that do not fit the model.
    """
    if isinstance(scores, HeadScores):
        group_scores = group_scores if group_scores is not None else (scores.extra or {}).get(GROUP_SCORES_KEY)
        scores = scores.scores
    _check_minimum(min_heads_per_layer)
    _check_scores(scores, head_map)
    if is_multi_head(head_map):
        # A group is one head: whole-group selection is head selection.
        return select_heads(scores, head_map, pruning_percent, scope=PER_LAYER if uniform else GLOBAL,
                            min_heads_per_layer=min_heads_per_layer, normalize=normalize)
    needed = heads_to_remove(head_map, pruning_percent)
    if needed == 0:
        return {}
    importance = group_importance(scores, head_map, normalize=normalize, group_scores=group_scores)
    groups = groups_of(head_map)
    room = [max(0, sum(g.size for g in layer_groups) - min_heads_per_layer) for layer_groups in groups]

    def rank(g: Group) -> tuple[float, int, int]:
        return (importance[(g.layer, g.kv_slot)], g.layer, g.kv_slot)

    if uniform:
        # The k weakest groups of every layer (fewer where the room runs out), for the k whose
        # total comes nearest to the target.
        ordered = [sorted(layer_groups, key=rank) for layer_groups in groups]
        candidates = [_take_within(layer_groups, room, stop_at_misfit=True) for layer_groups in ordered]
        options = [[g for layer_groups in candidates for g in layer_groups[:k]]
                   for k in range(max((len(c) for c in candidates), default=0) + 1)]
    else:
        accepted = _take_within(sorted((g for layer_groups in groups for g in layer_groups), key=rank), room,
                                stop_at_misfit=False)
        options = [accepted[:k] for k in range(len(accepted) + 1)]
    chosen = _nearest(options, needed)
    selection: dict[int, list[int]] = {}
    for g in chosen:
        selection.setdefault(g.layer, []).extend(g.present)
    return {layer: sorted(ids) for layer, ids in sorted(selection.items())}


def _take_within(ordered: list[Group], room: list[int], *, stop_at_misfit: bool) -> list[Group]:
    """The groups of ``ordered`` that fit, in order, while their layer has room (``room[layer]``
    active heads may go). ``stop_at_misfit``: a group that does not fit ends the run instead of
    being skipped (within one layer, weakest first, a later group may not jump the queue)."""
    left = list(room)
    out: list[Group] = []
    for g in ordered:
        if g.size > left[g.layer]:
            if stop_at_misfit:
                break
            continue
        left[g.layer] -= g.size
        out.append(g)
    return out


def _nearest(options: list[list[Group]], needed: int) -> list[Group]:
    """The option whose number of active heads is nearest ``needed``; ties go to the larger removal."""
    return min(options, key=lambda gs: (abs(sum(g.size for g in gs) - needed), -sum(g.size for g in gs)))


def select_per_group(
    scores: torch.Tensor | HeadScores,
    head_map: HeadMap,
    pruning_percent: float,
    *,
    min_heads_per_layer: int = 1,
) -> dict[int, list[int]]:
    """Trim every key/value group to the same number of active query heads, lowest scores first
    within each group, keeping every key/value head.

    :param scores: ``[num_layers, width]`` head importance (higher = keep), or a :class:`HeadScores`.
        Only the order within each group matters, so no normalisation applies.
    :param head_map: the model's current layout.
    :param pruning_percent: fraction of the original query heads that should be gone; rounded to
        a whole number of heads per group (nearest, ties to the larger removal). Every group
        keeps at least one head.
    :param min_heads_per_layer: a layer that would drop below this keeps larger groups.
    :return: layer -> sorted head ids to remove.
    :raises SentinelError: on a multi-head model (each group is one head, so there is nothing to
        trim), bad percent or minimum, or scores that do not fit the model.
    """
    if isinstance(scores, HeadScores):
        scores = scores.scores
    _check_minimum(min_heads_per_layer)
    _check_scores(scores, head_map)
    if is_multi_head(head_map):
        raise SentinelError(
            f"prune strategy {PER_GROUP!r} needs grouped-query attention, but this {head_map.family} model has one "
            f"query head per key/value head; use per-layer or kv-groups"
        )
    needed = heads_to_remove(head_map, pruning_percent)
    if needed == 0:
        return {}
    groups = groups_of(head_map)
    largest = max((g.size for layer_groups in groups for g in layer_groups), default=0)

    def sizes_for(target: int) -> list[int]:
        # Per layer, the group size kept: the target, or larger where min_heads_per_layer asks.
        out = []
        for layer_groups in groups:
            size = target
            while size < largest and sum(min(g.size, size) for g in layer_groups) < min_heads_per_layer:
                size += 1
            out.append(size)
        return out

    def removed(sizes: list[int]) -> int:
        return sum(max(0, g.size - sizes[layer]) for layer, layer_groups in enumerate(groups) for g in layer_groups)

    candidates = [sizes_for(target) for target in range(1, largest + 1)]
    best = min(candidates, key=lambda sizes: (abs(removed(sizes) - needed), -removed(sizes)))
    ranked = scores.double()
    selection: dict[int, list[int]] = {}
    for layer, layer_groups in enumerate(groups):
        for g in layer_groups:
            drop = g.size - best[layer]
            if drop > 0:
                weakest = sorted(g.active, key=lambda h: (float(ranked[layer, h]), h))[:drop]
                selection.setdefault(layer, []).extend(weakest)
    return {layer: sorted(ids) for layer, ids in sorted(selection.items())}


def _check_minimum(min_heads_per_layer: Any) -> None:
    if isinstance(min_heads_per_layer, bool) or not isinstance(min_heads_per_layer, int) or min_heads_per_layer < 0:
        raise SentinelError(f"min_heads_per_layer must be an integer >= 0, got {min_heads_per_layer!r}")


def _count(selection: dict[int, list[int]]) -> int:
    return sum(len(ids) for ids in selection.values())


# ---------------------------------------------------------------- reporting what was chosen


@dataclass
class GroupChoice:
    """What a group strategy chose, as one line for people and values for the metric log."""

    message: str
    values: dict[str, Any] = field(default_factory=dict)


def describe_choice(
    strategy: str,
    head_map: HeadMap,
    selection: dict[int, list[int]],
    pruning_percent: float,
    *,
    uniform: bool = True,
) -> GroupChoice:
    """Describe ``selection`` (made on ``head_map``) in whole groups and in query heads.

    The fraction reported is of the original query heads gone afterwards, the quantity
    ``pruning_percent`` asks for, so the two can be compared.
    """
    groups = groups_of(head_map)
    layers = head_map.num_layers
    original = layers * head_map.original_num_heads
    active = [set(head_map.active(layer)) for layer in range(layers)]
    chosen_active = [len(active[layer] & set(selection.get(layer, []))) for layer in range(layers)]
    active_after = sum(len(ids) for ids in active) - sum(chosen_active)
    fraction = 1.0 - active_after / original if original else 0.0
    gone = [sum(1 for g in layer_groups if set(g.active) <= set(selection.get(g.layer, [])))
            for layer_groups in groups]
    before = [len(layer_groups) for layer_groups in groups]
    tail = f"({fraction:.1%} of query heads; {pruning_percent * 100:g}% asked)"
    values: dict[str, Any] = {
        "strategy": strategy, "heads_chosen": sum(chosen_active), "fraction_chosen": fraction,
        "fraction_asked": pruning_percent, "kv_groups_before": sum(before), "kv_groups_removed": sum(gone),
        "kv_groups_removed_per_layer": gone,
    }
    if strategy == KV_GROUPS:
        values["uniform"] = uniform
        if is_multi_head(head_map):
            how = "per-layer" if uniform else "global"
            message = (f"{strategy}: every head of this {head_map.family} model is its own key/value group, so it "
                       f"selects as {how}: removing {sum(chosen_active)} of {sum(before)} heads {tail}")
        elif len(set(gone)) == 1 and len(set(before)) == 1:
            message = (f"{strategy}: removing {gone[0]} of {before[0]} KV groups in each of {layers} layers {tail}")
        else:
            message = (f"{strategy}: removing {sum(gone)} of {sum(before)} KV groups across {layers} layers "
                       f"(per layer {gone}) {tail}")
        return GroupChoice(message, values)
    per_group = [len(set(g.active) & set(selection.get(g.layer, []))) for layer_groups in groups for g in layer_groups]
    sizes = [g.size for layer_groups in groups for g in layer_groups]
    values["heads_removed_per_group"] = per_group
    if len(set(per_group)) == 1 and len(set(sizes)) == 1:
        message = (f"{strategy}: removing {per_group[0]} of {sizes[0]} query heads from each of {len(sizes)} KV "
                   f"groups ({sum(before) // layers if layers else 0} per layer, {layers} layers), keeping every "
                   f"KV head {tail}")
    else:
        kept = sorted({size - n for size, n in zip(sizes, per_group, strict=True)})
        message = (f"{strategy}: removing {sum(per_group)} query heads so that the {len(sizes)} KV groups keep "
                   f"{'/'.join(map(str, kept))} heads each, keeping every KV head {tail}")
    return GroupChoice(message, values)
