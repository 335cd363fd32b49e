"""What a run measures besides perplexity: task accuracy, KV-cache size and a timed speed comparison.

Each function takes what it needs explicitly, so the pipeline only calls them at the right stage
and stores what they return in ``state.json``; ``summary.json`` is assembled from those records.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import ExperimentConfig
from .errors import SentinelError
from .log import get_logger
from .plugins import emit

log = get_logger()

# Blocks of the validation split that the speed comparison times, in batches of the run's
# batch size: enough to average over several forward passes, few enough to stay a small part
# of a run (2 x (repeats + 1) passes over these blocks).
SPEED_BATCHES = 4


def check_run_extras(config: ExperimentConfig) -> None:
    """Fail in one line, before any stage, when a requested tracker or task cannot run."""
    from .report_to import check_trackers_available

    check_trackers_available(config.report_to)
    if config.tasks:
        from .downstream import prepare_tasks

        prepare_tasks(config.tasks, config.tasks_include_path)


def task_scores(model: nn.Module, tokenizer: Any, config: ExperimentConfig, device: str,
                label: str) -> dict[str, Any] | None:
    """lm-eval results of ``model`` on ``config.tasks`` (None when no tasks were asked for), emitted
    as a ``tasks`` metric event with ``label`` (``baseline`` or ``final``)."""
    if not config.tasks:
        return None
    from .downstream import evaluate_tasks

    result = evaluate_tasks(model, tokenizer, config.tasks, include_path=config.tasks_include_path,
                            num_fewshot=config.tasks_num_fewshot, limit=config.tasks_limit,
                            batch_size=config.batch_size, device=device, progress=not config.quiet)
    values = {f"{task}/{metric}": value for task, entry in result["tasks"].items()
              for metric, value in entry["metrics"].items()}
    emit("tasks", label=label, **values)
    return result


def measure_speed(model: nn.Module, baseline_source: str, blocks: Any, config: ExperimentConfig,
                  device: str) -> dict[str, Any] | None:
    """Reload the unpruned model from ``baseline_source`` and time it against ``model``, interleaved.

    Returns None when ``config.speed_repeats`` is 0 (the summary then labels the single-pass
    figures as indicative). The baseline copy is freed afterwards; while it lives the run holds
    two models in memory.
    """
    if config.speed_repeats == 0:
        return None
    from .model_io import load_model
    from .speed import compare_throughput

    try:
        baseline, _ = load_model(baseline_source, device=device, attn_implementation=config.attn_implementation,
                                 trust_remote_code=config.trust_remote_code)
    except (SentinelError, OSError) as exc:
        # Hours of work are done by now; a baseline that cannot be reopened (moved, or a Hub
        # model out of reach) costs the timed comparison only, and the summary says so.
        message = (str(exc).splitlines() or [type(exc).__name__])[0]
        log.warning(f"Warning: the speed comparison is skipped: the unpruned model {baseline_source!r} cannot be "
              f"reloaded ({message[:200]}); the summary's speed is the indicative single pass")
        return {"skipped": message[:300]}
    try:
        timed = blocks[: SPEED_BATCHES * config.batch_size]
        result = compare_throughput(baseline, model, timed, batch_size=config.batch_size,
                                    repeats=config.speed_repeats)
    finally:
        del baseline
    result.update(device=str(device), batch_size=config.batch_size, block_size=int(timed.shape[1]))
    emit("speed", ratio=result["ratio"], ratio_min=result["ratio_range"][0], ratio_max=result["ratio_range"][1],
         tokens_per_second_before=result["tokens_per_second_before"],
         tokens_per_second_after=result["tokens_per_second_after"], repeats=result["repeats"])
    return result


def speed_summary(results: dict[str, Any]) -> dict[str, Any]:
    """``summary["speed"]``: the interleaved measurement when the run made one, else the single
    evaluation passes, labelled indicative."""
    before = (results.get("baseline") or {}).get("tokens_per_second")
    after = (results.get("final") or {}).get("tokens_per_second")
    single = {"tokens_per_second_before": before, "tokens_per_second_after": after,
              "ratio": after / before if before and after is not None else None}
    measured = results.get("speed")
    if measured and "skipped" not in measured:
        return {**measured, "indicative": False, "single_pass": single}
    why = (f"the timed comparison failed: {measured['skipped']}" if measured
           else "speed_repeats=0 skipped the timed comparison")
    return {**single, "method": "single-pass", "indicative": True,
            "note": f"one evaluation pass of each model, not interleaved: indicative only ({why})"}


def kv_cache_summary(results: dict[str, Any]) -> dict[str, Any]:
    return {"bytes_per_token_before": results.get("kv_cache_before"),
            "bytes_per_token_after": results.get("kv_cache_after")}


def tasks_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    before, after = results.get("tasks_baseline"), results.get("tasks_final")
    if not before and not after:
        return None
    meta = after or before
    return {"baseline": (before or {}).get("tasks"), "final": (after or {}).get("tasks"),
            "num_fewshot": meta.get("num_fewshot"), "limit": meta.get("limit"),
            "lm_eval_version": meta.get("lm_eval_version")}
