"""Hook specifications: the contract between Sentinel's pipeline and its plugins.

Strategy hooks (``score_heads``, ``prune``, ``fine_tune``, ``grow_heads``) run one named
strategy. A plugin declares its strategies with ``register_strategies``; a
:class:`~sentinel_core.results.Strategy` that carries a ``function`` is run by calling that
function with the hook's arguments (the preferred way: no name checks), and one without is
run by calling the declaring plugin's implementation of the hook, which gets the strategy's
name first and returns None for names it does not own. Either way only the declaring plugin
is called. Every argument is passed by keyword: an implementation names only the arguments
it needs (pluggy matches them by name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pluggy import HookimplMarker, HookspecMarker

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from collections.abc import Sequence
    from pathlib import Path

    import click
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

    :return: a list of :class:`sentinel_core.results.Strategy`, each with its options and,
        preferably, the function that runs it. Results of all plugins are collected into one
        list (not firstresult). Two plugins declaring one name for one hook block the runs that
        use that name (``sentinel plugins`` shows the clash).
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
    :param model: the causal LM to score, already on its device and in eval mode. A scorer that
        needs train mode (dropout) sets it and restores eval mode before it returns.
    :param batches: calibration batches, dicts with ``input_ids``, ``attention_mask`` and
        ``labels`` (``-100`` on padding), on the CPU. Data-free scorers ignore them.
    :param config: the experiment's configuration (``seed``, ``options``, ...).
    :return: :class:`sentinel_core.results.HeadScores` with a ``[num_layers, width]`` tensor in
        original head numbering, NaN for heads that are not active (removed or masked), higher
        meaning more important; or None when ``strategy`` is not this plugin's. A scorer that
        measures key/value groups itself may add ``extra["group_scores"]``: one list per layer
        with one number per key/value slot of the layer's current layout (``HeadMap.kv_groups``),
        None for a slot with no active head, higher = more important; the ``kv-groups``
        selection then ranks groups by it instead of summing the layer-normalised head scores.

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
    original_model: str | None,
    run_dir: str | None,
) -> FineTuneResult | None:
    """Train ``model`` in place on ``data.train``, evaluating on ``data.validation``.

    Implementations usually call :func:`sentinel_core.training.train`, which reports progress
    (:func:`sentinel_core.emit` with ``stage``), keeps the best model, and writes resumable
    checkpoints under ``config.output_dir``.

    :param strategy: the fine-tuner's name, e.g. ``"plain"`` or ``"adaptive"``.
    :param model: the (pruned or grown) model to train.
    :param tokenizer: its tokenizer.
    :param data: tokenised train/validation data.
    :param config: learning rate, epochs, batch size, seed, ``options``, ...
    :param stage: the name to report metrics under (``"fine_tune"`` or ``"fine_tune_growth"``).
    :param original_model: what :func:`sentinel_core.load_model` opens to get the model as it
        was before pruning (a folder or hub name; the teacher of a distillation), or None when
        the caller has none.
    :param run_dir: the run folder, or None outside a run.
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
def register_training_callbacks(model: PreTrainedModel, config: ExperimentConfig, stage: str) -> Sequence[Any]:
    """Add callbacks to every training stage, whichever fine-tuner runs it.

    Called by :func:`sentinel_core.training.train` when a stage starts, on every process. The
    callbacks (:class:`sentinel_core.training.TrainerCallback`) fire after those the
    fine-tuner passed itself. This is how a plugin extends training it does not run: the
    growth plugin ramps up new heads' gates in whichever stage trains them.

    :param model: the model about to be trained (before any callback wraps it).
    :param config: the stage's configuration.
    :param stage: the stage's name (``fine_tune``, ``fine_tune_growth``, ...).
    :return: a list of callbacks, possibly empty. Every plugin's list is collected
        (not firstresult).
    """


@hookspec
def on_metric(event: MetricEvent) -> Any:
    """Receive a metric event from any stage of the pipeline.

    :param event: :class:`sentinel_core.metrics.MetricEvent` with ``stage``, ``step``,
        ``values`` and ``time``.
    :return: ignored.

    Broadcast: every implementation is called (not firstresult). Keep it cheap. An
    implementation that raises is reported once and not called again for the rest of the run;
    a ``KeyboardInterrupt`` asks the run to stop (a fine-tuning stage stops after its step).
    """


@hookspec
def register_commands(cli: click.Group) -> Any:
    """Add subcommands to the ``sentinel`` command line.

    :param cli: the ``sentinel`` click group; add commands with ``@cli.command()`` or
        ``cli.add_command(...)``.
    :return: ignored.

    Broadcast: every implementation is called (not firstresult), once, when the command line
    starts. A plugin that raises here is reported and its commands are missing; the rest work.
    """


@hookspec
def on_run_start(config: ExperimentConfig, run_dir: Path) -> Any:
    """A ``sentinel run`` begins, or resumes: its run folder exists and ``experiment.json`` is written.

    Called once per process, before the first stage, so an observer (an experiment tracker, a
    notifier) can learn where the run lives and what it was asked to do. A resumed run calls it
    again (its ``state.json`` then lists stages already finished).

    :param config: the run's :class:`sentinel_core.config.ExperimentConfig` as given (the one
        saved in ``experiment.json``). What actually ran, with test mode and the demo model's
        settings applied, arrives with ``on_run_end`` as ``summary["effective_config"]``.
    :param run_dir: the run folder (``config.output_dir``) as a :class:`pathlib.Path`.
    :return: ignored.

    Broadcast: every implementation is called (not firstresult). One that raises is reported once,
    in one line naming the plugin, and switched off for the rest of the run; the run goes on.
    """


@hookspec
def on_run_end(summary: dict[str, Any], run_dir: Path) -> Any:
    """A ``sentinel run`` finished: ``summary.json``, the final ``model/`` and the plots are written.

    Not called for a run that stops with an error or an interruption; such a run gets
    ``on_run_start`` again when it is resumed.

    :param summary: what ``summary.json`` holds (perplexities, heads, parameters, speed, task
        results, timings, versions, ``config`` and ``effective_config``).
    :param run_dir: the run folder as a :class:`pathlib.Path`.
    :return: ignored.

    Broadcast: every implementation is called (not firstresult). One that raises is reported in
    one line naming the plugin; the run is already finished and stays so.
    """
