"""Downstream task accuracy through lm-evaluation-harness (the optional ``tasks`` extra).

The model in memory, a compact Sentinel checkpoint included, is handed to lm-eval's ``HFLM``
as it is: lm-eval never reloads it from disk, so head surgery that stock transformers cannot
rebuild is evaluated exactly as Sentinel runs it.

Tasks are lm-eval task names (``hellaswag``, ``piqa``, ...) or the names of task YAMLs in
``include_path``. Hub tasks download their datasets from the Hugging Face Hub on first use;
offline, that fails with one line that says so, and a local task YAML over a local file works.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from .errors import SentinelError

INSTALL_HINT = "pip install 'sentinel-core[tasks]' (or pip install lm-eval)"
# lm-eval's own bookkeeping keys in a task's results, not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "samples"}

_task_managers: dict[tuple[str | None, bool], Any] = {}


def parse_tasks(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"hellaswag, piqa"`` -> ``["hellaswag", "piqa"]`` (duplicates dropped)."""
    names = value.split(",") if isinstance(value, str) else list(value)
    chosen: list[str] = []
    for name in (n.strip() for n in names):
        if name and name not in chosen:
            chosen.append(name)
    if not chosen:
        raise SentinelError(f"no task names in {value!r}; give a comma list such as hellaswag,piqa")
    return chosen


def require_lm_eval() -> None:
    """One line naming the package to install when lm-eval is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise SentinelError(f"downstream tasks need lm-evaluation-harness, which is not installed: {INSTALL_HINT}")


def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    key = (include_path, include_defaults)
    if key not in _task_managers:
        from lm_eval.tasks import TaskManager

        _task_managers[key] = TaskManager(include_path=include_path,
                                          include_defaults=include_defaults)
    return _task_managers[key]


def task_manager_for(tasks: list[str], include_path: str | None = None) -> Any:
    """A TaskManager that knows every name in ``tasks``.

    Indexing lm-eval's own tasks takes about 20 s on 2 CPU cores, so when every task is a local
    YAML in ``include_path`` only that folder is indexed.
    """
    require_lm_eval()
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise SentinelError(f"task include path {include_path!r} is not a folder; give a folder of lm-eval "
                                "task YAML files")
        local = _task_manager(include_path, False)
        if all(name in local.all_tasks for name in tasks):
            return local
    manager = _task_manager(include_path, True)
    for name in tasks:
        if name not in manager.all_tasks and not Path(name).is_file():
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SentinelError(f"unknown lm-eval task {name!r}{hint} (list them with `lm-eval ls tasks`, or give a "
                                "folder of local task YAMLs with --include-path)")
    return manager


def prepare_tasks(tasks: str | list[str], include_path: str | None = None) -> list[str]:
    """Check that lm-eval is installed and that every task and its dataset loads; returns the names.

    Run before a long job, so that a missing package, an unknown task or a Hub dataset out of reach
    stops it at once with one line instead of after the first hours.
    """
    names = parse_tasks(tasks)
    manager = task_manager_for(names, include_path)
    for name in names:
        _load_task(manager, name)
    return names


def _load_task(manager: Any, name: str) -> Any:
    try:
        with _quiet_lm_eval():
            return manager.load([name])
    except (ConnectionError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise SentinelError(f"lm-eval task {name!r} cannot load its dataset ({first[:200]}); Hub datasets cannot be "
                            "downloaded offline: run where the Hub is reachable, or point --include-path at a local "
                            "task YAML") from None
    except KeyError:
        raise SentinelError(f"unknown lm-eval task {name!r}; list them with `lm-eval ls tasks`") from None


def evaluate_tasks(model: nn.Module, tokenizer: Any, tasks: str | list[str], *, include_path: str | None = None,
                   num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
                   device: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Score ``model`` on lm-eval tasks; returns ``{"tasks": {name: {...}}, "num_fewshot", "limit", ...}``.

    Each task's entry holds ``metrics`` (e.g. ``{"acc": 0.61, "acc_norm": 0.64}``; a metric under a
    filter other than ``none`` is named ``metric/filter``), ``stderr`` (the same keys), ``samples``
    (documents scored), ``num_fewshot`` and ``higher_is_better``. The model is left in eval mode.

    :param model: a causal LM in memory (a Sentinel compact model too).
    :param tokenizer: its tokenizer.
    :param tasks: lm-eval task names, as a list or a comma string.
    :param include_path: a folder of local task YAMLs.
    :param num_fewshot: few-shot examples per prompt (default: each task's own, else 0).
    :param limit: score only the first ``limit`` documents of each task (for quick checks: lm-eval
        warns that such numbers are not comparable with full runs).
    :param batch_size: requests per forward pass.
    :param device: where the model is (default: where its weights are).
    :param progress: show lm-eval's progress bars.
    """
    names = parse_tasks(tasks)
    manager = task_manager_for(names, include_path)
    for name in names:
        _load_task(manager, name)
    import lm_eval

    from .evaluation import model_device

    if tokenizer is None:
        raise SentinelError("the model has no tokenizer; lm-eval tasks need one (save it with the model)")
    device = str(device or model_device(model))
    with _quiet_lm_eval(progress):
        lm = _language_model(model, tokenizer, batch_size, device, progress)
        output = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
                                         limit=limit, log_samples=False)
    model.eval()
    return {"tasks": _task_results(output), "num_fewshot": num_fewshot, "limit": limit,
            "lm_eval_version": getattr(lm_eval, "__version__", None) or output.get("lm_eval_version")}


def _task_results(output: dict[str, Any]) -> dict[str, Any]:
    results = {}
    for task, values in (output.get("results") or {}).items():
        metrics: dict[str, float] = {}
        stderr: dict[str, float] = {}
        for key, value in values.items():
            if key in _NOT_METRICS or "," not in key or not _number(value):
                continue
            metric, _, filter_name = key.partition(",")
            target = stderr if metric.endswith("_stderr") else metrics
            name = metric.removesuffix("_stderr")
            target[name if filter_name == "none" else f"{name}/{filter_name}"] = float(value)
        results[task] = {
            "metrics": metrics,
            "stderr": stderr,
            "samples": (output.get("n-samples") or {}).get(task, {}).get("effective"),
            "num_fewshot": (output.get("n-shot") or {}).get(task),
            "higher_is_better": (output.get("higher_is_better") or {}).get(task),
        }
    return results


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@contextmanager
def _quiet_lm_eval(progress: bool = True) -> Iterator[None]:
    """lm-eval logs every step at INFO and WARNING: keep its errors only while it runs. Without
    ``progress``, its per-task "building contexts" bar is off too; lm-eval offers no switch for it,
    so the ``tqdm`` name inside ``lm_eval.api.task`` is swapped for a silent one and put back after."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    task_module = original = None
    if not progress:
        import lm_eval.api.task as task_module

        original = task_module.tqdm
        task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        logger.setLevel(level)
        if task_module is not None:
            task_module.tqdm = original


def _language_model(model: nn.Module, tokenizer: Any, batch_size: int, device: str, progress: bool) -> Any:
    """lm-eval's ``HFLM`` around the model in memory; without progress bars unless asked for."""
    from lm_eval.models.huggingface import HFLM

    if progress:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)

    class QuietHFLM(HFLM):
        # The request loops are where lm-eval spends its time; their bars are the ones worth hiding.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def format_table(result: dict[str, Any]) -> str:
    """The results as a plain-text table: task, metric, value, stderr, documents."""
    rows = [("task", "metric", "value", "± stderr", "docs", "shots")]
    for task, entry in result["tasks"].items():
        for metric, value in entry["metrics"].items():
            err = entry["stderr"].get(metric)
            rows.append((task, metric, f"{value:.4f}", f"{err:.4f}" if err is not None else "",
                         str(entry.get("samples") or ""), str(entry.get("num_fewshot") if entry.get("num_fewshot")
                                                                 is not None else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
             strict=True))).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
