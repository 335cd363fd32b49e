"""Hook specifications: the contract between Sentinel's pipeline and its plugins.

Strategy hooks (``score_heads``, ``prune``, ``fine_tune``, ``grow_heads``) take the chosen
strategy's name first. The pipeline calls only the plugin that declared that name through
``register_strategies``, so an implementation may serve several names and should return None
for a name it does not own. Every argument is passed by keyword: an implementation names only
the arguments it needs (pluggy matches them by name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from collections.abc import Sequence

    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import ExperimentConfig
    from .data import LMData
    from .metrics import MetricEvent
    from .results import FineTuneResult, GrowthResult, HeadScores, PruneResult, Strategy

hookspec = HookspecMarker("sentinel")
hookimpl = HookimplMarker("sentinel")


@hookspec
def register_strategies() -> Sequence[Strategy]:
    """Declare the named strategies this plugin implements.

    Called once when plugins load; the names appear in ``sentinel plugins`` and are what users
    pass to ``--scorer``, ``--prune-strategy``, ``--fine-tune`` and ``--growth-strategy``.

    :return: a list of :class:`sentinel_core.results.Strategy`. Results of all plugins are
        collected into one list (not firstresult); a name may be declared once per hook.
    """


@hookspec
def register_head_adapters() -> Sequence[type]:
    """Add head-surgery adapters for more model architectures.

    :return: a list of adapter classes (subclasses of
        :class:`sentinel_core.surgery.HeadAdapter`). Results of all plugins are collected
        (not firstresult); each class is passed to ``sentinel_core.surgery.register_adapter``.
    """


@hookspec(firstresult=True)
def score_heads(
    strategy: str,
    model: PreTrainedModel,
    batches: Sequence[dict[str, torch.Tensor]],
    config: ExperimentConfig,
) -> HeadScores | None:
    """Score the importance of every attention head of ``model``.

    The model must come back unchanged: same weights, same attention implementation, same
    train/eval mode, no hooks left behind.

    :param strategy: the scorer's name, e.g. ``"entropy"``.
    :param model: the causal LM to score, already on its device.
    :param batches: calibration batches, dicts with ``input_ids``, ``attention_mask`` and
        ``labels`` (``-100`` on padding), on the CPU. Data-free scorers ignore them.
    :param config: the experiment's configuration (``seed``, ``options``, ...).
    :return: :class:`sentinel_core.results.HeadScores` with a ``[num_layers, width]`` tensor in
        original head numbering, NaN for heads that are not alive, higher meaning more
        important; or None when ``strategy`` is not this plugin's. A scorer that measures
        key/value groups itself may add ``extra["group_scores"]``: one list per layer with one
        number per key/value slot of the layer's current layout (``HeadMap.kv_groups``), None
        for a slot with no active head, higher = more important; the ``kv-groups`` selection
        then ranks groups by it instead of summing the layer-normalised head scores.

    firstresult: the first non-None result is used.
    """


@hookspec(firstresult=True)
def prune(
    strategy: str,
    model: PreTrainedModel,
    scores: HeadScores,
    config: ExperimentConfig,
) -> PruneResult | None:
    """Choose the heads to remove from ``scores`` and remove (or mask) them.

    :param strategy: the selection policy's name, e.g. ``"global"``, ``"per-layer"``,
        ``"kv-groups"`` or ``"per-group"``.
    :param model: the model to change in place.
    :param scores: what ``score_heads`` returned.
    :param config: gives the target (``pruning_percent`` of the original heads),
        ``min_heads_per_layer`` and ``prune_mode`` (``"remove"`` or ``"mask"``).
    :return: :class:`sentinel_core.results.PruneResult` naming the heads taken away, or None
        when ``strategy`` is not this plugin's.

    firstresult: the first non-None result is used.
    """


@hookspec(firstresult=True)
def fine_tune(
    strategy: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: LMData,
    config: ExperimentConfig,
    stage: str,
) -> FineTuneResult | None:
    """Train ``model`` in place on ``data.train``, evaluating on ``data.validation``.

    Implementations emit progress through :func:`sentinel_core.metrics.emit` with ``stage``,
    keep the best model by validation loss, and write resumable checkpoints under
    ``config.output_dir``.

    :param strategy: the fine-tuner's name, e.g. ``"plain"`` or ``"adaptive"``.
    :param model: the (pruned or grown) model to train.
    :param tokenizer: its tokenizer.
    :param data: tokenised train/validation data.
    :param config: learning rate, epochs, batch size, seed, ``options``, ...
    :param stage: the name to report metrics under (``"fine_tune"`` or ``"fine_tune_growth"``).
    :return: :class:`sentinel_core.results.FineTuneResult`, or None when ``strategy`` is not
        this plugin's.

    firstresult: the first non-None result is used.
    """


@hookspec(firstresult=True)
def grow_heads(
    strategy: str,
    model: PreTrainedModel,
    data: LMData,
    config: ExperimentConfig,
) -> GrowthResult | None:
    """Add attention heads back to ``model`` in place, up to ``config.growth_percent``.

    :param strategy: where to grow, e.g. ``"gradient"`` or ``"balanced"``.
    :param model: the pruned model.
    :param data: data to measure where new heads would help.
    :param config: ``growth_percent`` (of the original head count), seed, ``options``.
    :return: :class:`sentinel_core.results.GrowthResult` naming the new head ids, or None when
        ``strategy`` is not this plugin's.

    firstresult: the first non-None result is used.
    """


@hookspec
def on_metric(event: MetricEvent) -> Any:
    """Receive a metric event from any stage of the pipeline.

    :param event: :class:`sentinel_core.metrics.MetricEvent` with ``stage``, ``step``,
        ``values`` and ``time``.
    :return: ignored.

    Broadcast: every implementation is called (not firstresult). Keep it cheap and never raise.
    """
