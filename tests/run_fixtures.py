"""Build a run folder with the files and shapes ``sentinel_core.pipeline`` writes, without a model.

Metric events go through a real ``ProgressTracker`` registered on the plugin manager, in the
order the pipeline emits them; ``state.json`` and ``summary.json`` copy the pipeline's shapes
(``_Run._finish`` / ``_Run._summary``). The numbers are fixture values chosen by the test
(a smooth loss curve, scores from a formula), not measurements; the plot and report tests
check how they are drawn, and the pipeline's own tests cover a real run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sentinel_core.config import ExperimentConfig
from sentinel_core.fileio import write_json_atomic
from sentinel_core.plugins import emit, pm
from sentinel_core.results import HeadScores
from sentinel_core.tracking import ProgressTracker


@dataclass
class RunSpec:
    layers: int = 3
    heads: int = 4
    scorer: str = "entropy"
    pruning_percent: float = 0.25
    prune_mode: str = "remove"
    fine_tune_steps: int = 12
    growth_percent: float = 0.0  # > 0: grow heads back and run fine_tune_growth
    growth_steps: int = 6
    eval_every: int = 3
    baseline_ppl: float = 40.0
    pruned_ppl: float = 95.0
    final_ppl: float = 42.5
    sample_before: str = "The king <b>speaks</b> & the queen listens."
    sample_after: str = "The castle stands; 'night' falls > day."
    # Stop after this stage (an interrupted run): no summary.json, state.finished False.
    stop_after: str | None = None
    extra_score_events: dict[str, list[list[float]]] = field(default_factory=dict)
    nan_score_heads: list[tuple[int, int]] = field(default_factory=list)
    parameters_after: int = 100_000
    kv_bytes_after: int = 1536
    tokens_per_second_after: float = 6100.0
    # False: the summary's speed is the single evaluation pass of each model (speed_repeats=0).
    speed_interleaved: bool = True
    # {"task": (accuracy before, accuracy after)}: lm-eval results in the summary when given.
    task_accuracy: dict[str, tuple[float, float]] = field(default_factory=dict)


def fixture_scores(spec: RunSpec) -> torch.Tensor:
    """A score per head from a formula; chosen heads are NaN (as if already gone)."""
    scores = torch.tensor([[math.sin(1.3 * layer + 0.7 * head) + 0.05 * head for head in range(spec.heads)]
                           for layer in range(spec.layers)], dtype=torch.float32)
    for layer, head in spec.nan_score_heads:
        scores[layer, head] = float("nan")
    return scores


def lowest_heads(scores: torch.Tensor, count: int) -> dict[int, list[int]]:
    """The ``count`` lowest-scoring heads, NaN excluded: what a global selection removes."""
    flat = [(float(scores[layer, h]), layer, h) for layer in range(scores.shape[0]) for h in range(scores.shape[1])
            if not math.isnan(float(scores[layer, h]))]
    chosen: dict[int, list[int]] = {}
    for _value, layer, head in sorted(flat)[:count]:
        chosen.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def train_loss(step: int) -> float:
    return 2.0 + 3.0 * math.exp(-step / 5.0)


def make_run(run_dir: Path, spec: RunSpec | None = None) -> dict[str, Any]:
    """Write a run folder; returns ``{"state", "summary", "events", "removed", "grown", "scores"}``."""
    spec = spec or RunSpec()
    run_dir.mkdir(parents=True, exist_ok=True)
    config = ExperimentConfig(model_name="tiny-gpt2", data="demo", scorer=spec.scorer,
                              pruning_percent=spec.pruning_percent, prune_mode=spec.prune_mode,
                              growth_strategy="gradient" if spec.growth_percent else None,
                              growth_percent=spec.growth_percent, output_dir=str(run_dir), device="cpu",
                              eval_every=spec.eval_every)
    write_json_atomic(run_dir / "experiment.json", config.to_dict())
    total = spec.layers * spec.heads
    per_layer = [spec.heads] * spec.layers
    state: dict[str, Any] = {"completed": [], "results": {}, "finished": False,
                             "sources": {"model": "tiny-gpt2", "data": "demo"}, "timings": {}}
    results = state["results"]
    scores = fixture_scores(spec)
    removed = lowest_heads(scores, round(spec.pruning_percent * total))
    n_grow = round(spec.growth_percent * total)
    grown: dict[int, list[int]] = {}
    if n_grow:
        for i in range(n_grow):
            layer = sorted(removed)[i % len(removed)]
            grown.setdefault(layer, []).append(spec.heads + len(grown.get(layer, [])))

    def active(include_growth: bool) -> list[int]:
        return [spec.heads - len(removed.get(layer, [])) + (len(grown.get(layer, [])) if include_growth else 0)
                for layer in range(spec.layers)]

    def evaluation(label: str, ppl: float, heads_active: list[int]) -> dict[str, float]:
        values = {"loss": math.log(ppl), "perplexity": ppl, "tokens": 1024,
                  "tokens_per_second": 5000.0 if label == "baseline" else 6100.0}
        emit("evaluate", label=label, heads_active=heads_active, **values)
        return values

    def finish(stage: str, seconds: float, **stage_results: Any) -> bool:
        state["completed"].append(stage)
        results.update(stage_results)
        state["timings"][stage] = seconds
        write_json_atomic(run_dir / "state.json", state)
        return spec.stop_after == stage

    def train(stage: str, steps: int, start_loss_step: int) -> None:
        for step in range(1, steps + 1):
            emit(stage, step, loss=train_loss(start_loss_step + step), lr=1e-3 * (1 - step / (steps + 1)))
            if step % spec.eval_every == 0 or step == steps:
                eval_loss = math.log(spec.final_ppl) + 0.8 * math.exp(-(start_loss_step + step) / 4.0)
                emit(stage, step, eval_loss=eval_loss, eval_perplexity=math.exp(eval_loss))

    tracker = ProgressTracker(run_dir)
    pm.register(tracker)
    try:
        baseline = evaluation("baseline", spec.baseline_ppl, per_layer)
        emit("sample", label="baseline", prompt="The", text=spec.sample_before)
        if finish("baseline", 1.5, baseline=baseline, sample_before=spec.sample_before,
                  parameters_before={"total": 120_000, "attention": 40_000},
                  heads_original={"per_layer": per_layer, "total": total, "grown": 0}):
            return _result(state, None, removed, grown, scores)
        record = HeadScores(scores=scores, strategy=spec.scorer, tokens_seen=2048, seconds=0.4)
        emit("score", strategy=spec.scorer, scores=record.scores, tokens_seen=2048, seconds=0.4)
        for strategy, matrix in spec.extra_score_events.items():
            emit("score", strategy=strategy, scores=torch.tensor(matrix), tokens_seen=2048, seconds=0.3)
        if finish("score", 0.5, scores=record.to_dict()):
            return _result(state, None, removed, grown, scores)
        emit("prune", heads_removed=sum(map(len, removed.values())), mode=spec.prune_mode, heads_active=active(False))
        pruned = evaluation("pruned", spec.pruned_ppl, active(False))
        if finish("prune", 0.7, pruned=pruned, removed={str(k): v for k, v in removed.items()},
                  prune_mode=spec.prune_mode):
            return _result(state, None, removed, grown, scores)
        train("fine_tune", spec.fine_tune_steps, 0)
        if finish("fine_tune", 12.0, fine_tune={"steps": spec.fine_tune_steps, "best_eval_loss": 3.8}):
            return _result(state, None, removed, grown, scores)
        if grown:
            emit("grow", heads_grown=n_grow, heads_active=active(True))
            if finish("grow", 0.3, grown={str(k): v for k, v in grown.items()}):
                return _result(state, None, removed, grown, scores)
            train("fine_tune_growth", spec.growth_steps, spec.fine_tune_steps)
            if finish("fine_tune_growth", 6.0,
                      fine_tune_growth={"steps": spec.growth_steps, "best_eval_loss": 3.75}):
                return _result(state, None, removed, grown, scores)
        final_active = active(True)
        final = evaluation("final", spec.final_ppl, final_active)
        emit("sample", label="final", prompt="The", text=spec.sample_after)
        finish("final", 1.4, final=final, sample_after=spec.sample_after,
               parameters_after={"total": spec.parameters_after, "attention": 30_000},
               heads_final={"per_layer": final_active, "total": sum(final_active), "grown": n_grow})
    finally:
        pm.unregister(tracker)
        tracker.close()

    summary = {
        "output_dir": str(run_dir),
        "model": "tiny-gpt2",
        "data": "demo",
        "perplexity": {"baseline": spec.baseline_ppl, "pruned": spec.pruned_ppl, "final": spec.final_ppl},
        "heads": {"original": total, "removed": sum(map(len, removed.values())), "grown": n_grow,
                  "final": sum(final_active), "per_layer_final": final_active,
                  "removed_heads": results["removed"], "grown_heads": results.get("grown", {}),
                  "prune_mode": spec.prune_mode},
        "parameters": {"before": results["parameters_before"], "after": results["parameters_after"]},
        "kv_cache": {"bytes_per_token_before": 2048, "bytes_per_token_after": spec.kv_bytes_after},
        "speed": _speed(spec),
        "tasks": _tasks(spec),
        "fine_tune": results.get("fine_tune"),
        "fine_tune_growth": results.get("fine_tune_growth"),
        "samples": {"before": spec.sample_before, "after": spec.sample_after},
        "timings_seconds": state["timings"],
        "versions": {"sentinel-core": "0.1.0", "torch": torch.__version__},
        "config": config.to_dict(),
    }
    write_json_atomic(run_dir / "summary.json", summary)
    state["finished"] = True
    write_json_atomic(run_dir / "state.json", state)
    return _result(state, summary, removed, grown, scores)


def _speed(spec: RunSpec) -> dict[str, Any]:
    after = spec.tokens_per_second_after
    single = {"tokens_per_second_before": 5000.0, "tokens_per_second_after": after, "ratio": after / 5000.0}
    if not spec.speed_interleaved:
        return {**single, "method": "single-pass", "indicative": True}
    return {"method": "interleaved", "indicative": False, "repeats": 5, "ratio": after / 5000.0,
            "ratio_range": [0.96 * after / 5000.0, 1.03 * after / 5000.0], "tokens_per_second_before": 5000.0,
            "tokens_per_second_after": after, "tokens_per_second_before_range": [4900.0, 5100.0],
            "tokens_per_second_after_range": [0.97 * after, 1.02 * after], "single_pass": single}


def _tasks(spec: RunSpec) -> dict[str, Any] | None:
    if not spec.task_accuracy:
        return None

    def entries(index: int) -> dict[str, Any]:
        return {task: {"metrics": {"acc": pair[index]}, "stderr": {"acc": 0.01}, "samples": 100, "num_fewshot": 0}
                for task, pair in spec.task_accuracy.items()}

    return {"baseline": entries(0), "final": entries(1), "num_fewshot": None, "limit": None,
            "lm_eval_version": "0.4.13"}


def _result(state, summary, removed, grown, scores) -> dict[str, Any]:
    return {"state": state, "summary": summary, "removed": removed, "grown": grown, "scores": scores}
