"""PNG plots of a run folder, and a comparison across runs.

Drawing uses ``matplotlib.figure.Figure`` with the Agg canvas directly, never pyplot, so a
user's own pyplot state (backend, open figures, rcParams) is left alone. Each PNG is rendered to
memory and then written atomically, so a reader never sees half a file.

Every plot is drawn only from what the run recorded (``metrics.jsonl``, ``state.json``,
``summary.json``); a plot whose data is absent (no growth, an interrupted run) is skipped.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import SentinelError
from .fileio import write_bytes_atomic
from .tracking import read_metrics

__all__ = [
    "LOSS_PLOT",
    "HEAD_IMPORTANCE_PLOT",
    "HEAD_MAP_PLOT",
    "plot_run",
    "plot_comparison",
    "plot_quality_cost",
    "plot_files",
]

LOSS_PLOT = "loss.png"
HEAD_IMPORTANCE_PLOT = "head_importance.png"
HEAD_MAP_PLOT = "head_map.png"
STATE_FILE = "state.json"
SUMMARY_FILE = "summary.json"

# Training stages in the order the pipeline runs them; their steps are laid end to end.
TRAINING_STAGES = ("fine_tune", "fine_tune_growth")
_EVAL_LABELS = ("baseline", "pruned", "final")
_EVAL_STYLE = {"baseline": ("tab:green", "--"), "pruned": ("tab:red", ":"), "final": ("tab:purple", "-.")}
# "lr", "lr/<group>" (one per parameter group) or a {group: rate} dict; "lr_scale" (the factor
# a rollback applies) is not a rate and is left out.
_LR_KEY = re.compile(r"^(lrs?|learning_rates?)(/.+)?$")
_DPI = 100

# Head-map cell kinds, drawn as categorical colours.
_EMPTY, _ALIVE, _REMOVED, _MASKED, _GROWN = range(5)
_KIND_COLOURS = ("#ffffff", "#4c72b0", "#d9d9d9", "#f0a04b", "#55a868")
_KIND_NAMES = ("no head", "active (original)", "removed", "masked", "grown")


# -- public API ----------------------------------------------------------------------------------


def plot_run(output_dir: str | Path) -> list[Path]:
    """Draw the plots of the run in ``output_dir`` into that folder; returns the files written.

    Writes ``loss.png`` (training loss and validation perplexity over the global step, stage
    boundaries marked, baseline/pruned/final perplexity as reference lines), one head-importance
    heatmap per scorer (``head_importance.png`` for the run's own scorer,
    ``head_importance_<scorer>.png`` for any other scorer found in the metrics) and
    ``head_map.png`` (heads before and after pruning and growth). A plot whose data the run
    does not hold is skipped. A plot that fails on malformed data is skipped with a warning
    rather than raised, because this runs as the last step of a possibly long experiment.

    :param output_dir: a run folder (``ExperimentConfig.output_dir``).
    :return: paths of the PNG files written, in the order above.
    :raises SentinelError: when ``output_dir`` is not a folder.
    """
    run_dir = Path(output_dir)
    if not run_dir.is_dir():
        raise SentinelError(f"run folder {str(run_dir)!r} does not exist; pass the --output-dir of a `sentinel run`")
    run = _RunRecord.read(run_dir)
    written: list[Path] = []
    for name, draw in (("loss", _plot_loss), ("head importance", _plot_head_importance), ("head map", _plot_head_map)):
        try:
            written.extend(draw(run, run_dir))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            warnings.warn(f"skipped the {name} plot of {run_dir}: {type(exc).__name__}: {exc}", stacklevel=2)
    return written


def plot_files(output_dir: str | Path) -> list[Path]:
    """The plot PNGs present in a run folder, in the order :func:`plot_run` writes them."""
    run_dir = Path(output_dir)
    names = [LOSS_PLOT, HEAD_IMPORTANCE_PLOT]
    names += sorted(p.name for p in run_dir.glob("head_importance_*.png"))
    names.append(HEAD_MAP_PLOT)
    return [run_dir / n for n in names if (run_dir / n).is_file()]


def plot_comparison(run_dirs: Sequence[str | Path], path: str | Path) -> Path:
    """Perplexity against pruning percent, one line per scorer, across finished runs.

    Two panels, each with its own y scale: perplexity right after pruning, and after
    fine-tuning (and growth, if any). Each run is a marker; the line joins the median of the runs at each
    percent (several seeds give several markers). Runs that differ in fine-tuning or growth
    get separate lines. The unpruned baseline perplexity is a dashed reference.

    :param run_dirs: finished run folders (each holds ``summary.json``).
    :param path: the PNG file to write.
    :return: ``path`` as a :class:`Path`.
    :raises SentinelError: when a folder is not a finished run, or no folder is given.
    """
    summaries = _finished_summaries(run_dirs)
    points = [_comparison_point(s, d) for s, d in zip(summaries, run_dirs, strict=True)]
    keys = _series_keys(points)

    fig = _figure(11, 4.6)
    axes = fig.subplots(1, 2)
    baselines = sorted({round(p["baseline"], 6) for p in points if _finite(p["baseline"])})
    for ax, which, title in ((axes[0], "pruned", "right after pruning"), (axes[1], "final", "after fine-tuning")):
        for index, key in enumerate(sorted(set(keys))):
            colour = f"C{index % 10}"
            mine = [p for p, k in zip(points, keys, strict=True) if k == key and _finite(p[which])]
            if not mine:
                continue
            xs = [p["percent"] for p in mine]
            ys = [p[which] for p in mine]
            ax.scatter(xs, ys, color=colour, marker=_MARKERS[index % len(_MARKERS)], s=36, zorder=3)
            line_x = sorted(set(xs))
            line_y = [_median([y for x, y in zip(xs, ys, strict=True) if x == lx]) for lx in line_x]
            ax.plot(line_x, line_y, color=colour, marker=_MARKERS[index % len(_MARKERS)], linewidth=1.8,
                    label=key, zorder=2)
        for b_index, baseline in enumerate(baselines):
            ax.axhline(baseline, color="0.35", linestyle="--", linewidth=1,
                       label="unpruned baseline" if b_index == 0 else None)
        ax.set_title(f"Perplexity {title}")
        ax.set_xlabel("heads pruned (%)")
        _fit_percent_axis(ax, [p["percent"] for p in points])
        ax.grid(True, alpha=0.3)
        # Own y scale per panel: pruning can multiply perplexity while fine-tuning differences
        # are a few percent, and one shared scale would flatten the second panel.
        _maybe_log_y(ax, [p[which] for p in points if _finite(p[which])] + baselines)
        ax.set_ylabel("validation perplexity")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="scorer", title_fontsize=8,
                   frameon=False)
    fig.suptitle("Strategy comparison", fontsize=12)
    out = Path(path)
    _save(fig, out)
    return out


def _finished_summaries(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    summaries = [load_summary(d) for d in run_dirs]
    if not summaries:
        raise SentinelError("no run folders given; pass one or more --output-dir folders of finished runs")
    return summaries


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """``summary.json`` of a finished run; a one-line :class:`SentinelError` otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SentinelError(f"run folder {str(run_dir)!r} does not exist; pass the --output-dir of a `sentinel run`")
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        raise SentinelError(f"{str(run_dir)!r} is not a finished Sentinel run (no {SUMMARY_FILE}); "
                            f"finish it with `sentinel run --resume {run_dir}`")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SentinelError(f"{str(summary_path)!r} is not valid JSON ({exc}); re-run or resume that run") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("perplexity"), dict):
        raise SentinelError(f"{str(summary_path)!r} is not a Sentinel summary (no perplexity section)")
    return summary


def plot_quality_cost(run_dirs: Sequence[str | Path], path: str | Path) -> Path:
    """Quality against cost across finished runs: one point per run, the unpruned baseline marked.

    Columns are the costs: parameters, KV-cache bytes per token and tokens per second (each drawn
    when a run recorded it); rows are the quality: final validation perplexity, and mean task
    accuracy when every run scored lm-eval tasks. Each base model's unpruned baseline is a black
    star at its own cost and quality (the median over the runs that share it). Tokens/s carry the
    range of the interleaved repeats as error bars; a run whose speed is a single indicative pass
    is drawn hollow.

    :param run_dirs: finished run folders (each holds ``summary.json``).
    :param path: the PNG file to write.
    :return: ``path`` as a :class:`Path`.
    :raises SentinelError: when a folder is not a finished run, or no folder is given.
    """
    summaries = _finished_summaries(run_dirs)
    points = [_cost_point(s, d) for s, d in zip(summaries, run_dirs, strict=True)]
    keys = _series_keys([_comparison_point(s, d) for s, d in zip(summaries, run_dirs, strict=True)])
    costs = [c for c in _COSTS if any(_finite(p["after"].get(c)) for p in points)]
    qualities = ["perplexity"] + (["accuracy"] if all(_finite(p["after"].get("accuracy")) for p in points) else [])
    if not costs:
        raise SentinelError("the runs recorded neither parameters, KV-cache size nor speed; re-run them with "
                            "this Sentinel")
    fig = _figure(1.2 + 4.2 * len(costs), 0.9 + 3.5 * len(qualities))
    axes = fig.subplots(len(qualities), len(costs), squeeze=False)
    colours = {key: f"C{i % 10}" for i, key in enumerate(sorted(set(keys)))}
    markers = {key: _MARKERS[i % len(_MARKERS)] for i, key in enumerate(sorted(set(keys)))}
    baselines = _baselines(points)
    for row, quality in enumerate(qualities):
        for col, cost in enumerate(costs):
            ax = axes[row][col]
            for point, key in zip(points, keys, strict=True):
                x, y = point["after"].get(cost), point["after"].get(quality)
                if not (_finite(x) and _finite(y)):
                    continue
                hollow = cost == "tokens_per_second" and point["indicative_speed"]
                xerr = None
                spread = point["after_range"].get(cost)
                if spread:
                    xerr = [[max(0.0, x - spread[0])], [max(0.0, spread[1] - x)]]
                ax.errorbar([x], [y], xerr=xerr, fmt=markers[key], color=colours[key], ecolor=colours[key],
                            elinewidth=1, capsize=3, markersize=7, zorder=3,
                            markerfacecolor="white" if hollow else colours[key])
                ax.annotate(point["name"], (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7.5,
                            color="0.25")
            for base in baselines:
                x, y = base.get(cost), base.get(quality)
                if _finite(x) and _finite(y):
                    ax.scatter([x], [y], marker="*", s=170, color="black", zorder=4)
                    ax.annotate("unpruned", (x, y), xytext=(6, -10), textcoords="offset points", fontsize=7.5)
            ax.set_xlabel(_COSTS[cost])
            ax.set_ylabel(_QUALITIES[quality] if col == 0 else "")
            ax.grid(True, alpha=0.3)
            ax.xaxis.set_major_formatter(_engineering(cost))
            _pad_axes(ax)
    handles = _cost_legend(colours, markers, points, costs)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle("Quality against cost (one point per run)", fontsize=12)
    out = Path(path)
    _save(fig, out)
    return out


_COSTS = {"parameters": "parameters", "kv_bytes": "KV cache per token (bytes)",
          "tokens_per_second": "tokens / s (forward)"}
_QUALITIES = {"perplexity": "final validation perplexity\n(lower is better)",
              "accuracy": "mean task accuracy\n(higher is better)"}


def _cost_point(summary: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """A run's cost and quality after pruning, and its unpruned baseline's, from summary.json."""
    params = summary.get("parameters") or {}
    kv = summary.get("kv_cache") or {}
    speed = summary.get("speed") or {}
    ppl = summary.get("perplexity") or {}
    tasks = summary.get("tasks") or {}
    before = {"parameters": (params.get("before") or {}).get("total"), "kv_bytes": kv.get("bytes_per_token_before"),
              "tokens_per_second": speed.get("tokens_per_second_before"), "perplexity": ppl.get("baseline"),
              "accuracy": _mean_accuracy(tasks.get("baseline"))}
    after = {"parameters": (params.get("after") or {}).get("total"), "kv_bytes": kv.get("bytes_per_token_after"),
             "tokens_per_second": speed.get("tokens_per_second_after"), "perplexity": ppl.get("final"),
             "accuracy": _mean_accuracy(tasks.get("final"))}
    spread = speed.get("tokens_per_second_after_range")
    return {"name": Path(run_dir).name, "model": str(summary.get("model")), "before": before, "after": after,
            "after_range": {"tokens_per_second": spread} if isinstance(spread, list) and len(spread) == 2 else {},
            "indicative_speed": speed.get("method") != "interleaved"}


def _mean_accuracy(results: dict[str, Any] | None) -> float | None:
    """The mean over tasks of each task's ``acc`` (or its first metric when it has no ``acc``)."""
    values = []
    for entry in (results or {}).values():
        metrics = (entry or {}).get("metrics") or {}
        value = metrics.get("acc", next(iter(metrics.values()), None))
        if _finite(value):
            values.append(float(value))
    return sum(values) / len(values) if values else None


def _baselines(points: list[dict[str, Any]]) -> list[dict[str, float]]:
    """One unpruned point per base model: the median of what its runs measured before pruning."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_model.setdefault(point["model"], []).append(point["before"])
    out = []
    for befores in by_model.values():
        merged = {}
        for name in ("parameters", "kv_bytes", "tokens_per_second", "perplexity", "accuracy"):
            values = [float(b[name]) for b in befores if _finite(b.get(name))]
            if values:
                merged[name] = _median(values)
        out.append(merged)
    return out


def _engineering(cost: str):
    from matplotlib.ticker import EngFormatter, FuncFormatter

    if cost == "tokens_per_second":
        return FuncFormatter(lambda v, _pos: f"{v:,.0f}")
    return EngFormatter(unit="B" if cost == "kv_bytes" else "", sep="")


def _pad_axes(ax: Any) -> None:
    """Room around the points for their labels, however close together they sit."""
    ax.margins(x=0.18, y=0.18)


def _cost_legend(colours: dict[str, str], markers: dict[str, str], points: list[dict[str, Any]],
                 costs: list[str]) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker=markers[k], color=c, markersize=7, label=k)
               for k, c in colours.items()]
    handles.append(Line2D([], [], linestyle="", marker="*", color="black", markersize=11, label="unpruned baseline"))
    if "tokens_per_second" in costs:
        if any(p["indicative_speed"] for p in points):
            handles.append(Line2D([], [], linestyle="", marker="o", color="0.3", markerfacecolor="white",
                                  label="speed indicative (one pass each)"))
        if any(p["after_range"] for p in points):
            handles.append(Line2D([], [], color="0.3", marker="|", label="range over interleaved repeats"))
    return handles


def _fit_percent_axis(ax: Any, percents: list[float]) -> None:
    """Ticks at the pruning percents the runs used, and limits just around them: a single percent
    gets one tick instead of an axis of made-up tenths around it."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    values = sorted({round(p, 6) for p in percents if _finite(p)})
    if not values:
        return
    span = values[-1] - values[0]
    pad = max(0.08 * span, 2.5)
    ax.set_xlim(values[0] - pad, values[-1] + pad)
    ax.xaxis.set_major_locator(FixedLocator(values))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}%"))


# -- what a run recorded -------------------------------------------------------------------------


class _RunRecord:
    """The parts of a run folder the plots read, each optional."""

    def __init__(self, events: list[dict[str, Any]], state: dict[str, Any], summary: dict[str, Any]):
        self.events = events
        self.state = state
        self.summary = summary
        self.results: dict[str, Any] = state.get("results") or {}

    @classmethod
    def read(cls, run_dir: Path) -> _RunRecord:
        return cls(read_metrics(run_dir), _read_optional_json(run_dir / STATE_FILE),
                   _read_optional_json(run_dir / SUMMARY_FILE))

    def eval_perplexities(self) -> dict[str, float]:
        """baseline/pruned/final perplexity: state.json first, then the last ``evaluate`` event."""
        found: dict[str, float] = {}
        for event in self.events:
            if event.get("stage") == "evaluate" and event.get("label") in _EVAL_LABELS:
                if _finite(event.get("perplexity")):
                    found[event["label"]] = float(event["perplexity"])
        for label in _EVAL_LABELS:
            value = (self.results.get(label) or {}).get("perplexity")
            if _finite(value):
                found[label] = float(value)
        return found

    def removed(self) -> dict[int, list[int]] | None:
        raw = self.results.get("removed")
        if raw is None:
            raw = (self.summary.get("heads") or {}).get("removed_heads")
        return None if raw is None else _head_selection(raw)

    def grown(self) -> dict[int, list[int]]:
        raw = self.results.get("grown")
        if raw is None:
            raw = (self.summary.get("heads") or {}).get("grown_heads")
        return _head_selection(raw or {})

    def prune_mode(self) -> str:
        return str(self.results.get("prune_mode") or (self.summary.get("heads") or {}).get("prune_mode") or "remove")

    def original_heads_per_layer(self) -> list[int] | None:
        """Original head count of each layer."""
        per_layer = (self.results.get("heads_original") or {}).get("per_layer")
        if per_layer:
            return [int(n) for n in per_layer]
        heads = self.summary.get("heads") or {}
        layers = len(heads.get("per_layer_final") or self.results.get("heads_final", {}).get("per_layer") or [])
        total = heads.get("original")
        if layers and isinstance(total, int) and total % layers == 0:
            return [total // layers] * layers
        scores = (self.results.get("scores") or {}).get("scores")
        if scores:
            return [len(row) for row in scores]
        return None

    def scorer(self) -> str | None:
        record = self.results.get("scores") or {}
        return record.get("strategy") or (self.summary.get("config") or {}).get("scorer")

    def scores_by_strategy(self) -> dict[str, list[list[float]]]:
        """Score matrices by scorer: the run's own from state.json, others from ``score`` events."""
        found: dict[str, list[list[float]]] = {}
        for event in self.events:
            if event.get("stage") == "score" and event.get("scores") is not None:
                found[str(event.get("strategy") or "scores")] = _matrix(event["scores"])
        record = self.results.get("scores") or {}
        if record.get("scores") is not None:
            found[str(record.get("strategy") or "scores")] = _matrix(record["scores"])
        return found


def _read_optional_json(path: Path) -> dict[str, Any]:
    # state.json is written atomically, so a parse error means a foreign file; treat it as absent.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _head_selection(raw: dict[Any, Any]) -> dict[int, list[int]]:
    return {int(layer): sorted(int(h) for h in heads) for layer, heads in raw.items()}


def _matrix(rows: Any) -> list[list[float]]:
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError("scores are not a [layers][heads] matrix")
    return [[math.nan if v is None else float(v) for v in row] for row in rows]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- loss.png ------------------------------------------------------------------------------------


def _is_training_stage(stage: Any) -> bool:
    """fine_tune, its rounds (fine_tune_round2, ... under --prune-rounds) and fine_tune_growth."""
    return isinstance(stage, str) and (stage in TRAINING_STAGES or (stage.startswith("fine_tune_round")
                                                                    and stage[len("fine_tune_round"):].isdigit()))


def _training_curves(run: _RunRecord) -> tuple[dict[str, dict[str, dict[int, float]]], dict[str, tuple[int, int]]]:
    """Per stage: curves (train loss, validation perplexity, learning rates) by global step,
    and each stage's [start, end] on the global axis."""
    per_stage: dict[str, dict[str, dict[int, float]]] = {}
    for event in run.events:
        stage = event.get("stage")
        step = event.get("step")
        if not _is_training_stage(stage) or not isinstance(step, int) or isinstance(step, bool):
            continue
        curves = per_stage.setdefault(stage, {})
        # A resumed stage re-runs the steps after its last checkpoint; the later value wins.
        for name, value in _curve_values(event).items():
            curves.setdefault(name, {})[step] = value
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    global_curves: dict[str, dict[str, dict[int, float]]] = {}
    rounds = sorted((s for s in per_stage if s.startswith("fine_tune_round")), key=lambda s: int(s[len("fine_tune_round"):]))
    for stage in (TRAINING_STAGES[0], *rounds, *TRAINING_STAGES[1:]):
        curves = per_stage.get(stage)
        recorded = (run.results.get(stage) or {}).get("steps") if stage in TRAINING_STAGES and not rounds else None
        last = max((s for c in (curves or {}).values() for s in c), default=None)
        if curves is None and not recorded:
            continue
        length = max(int(recorded or 0), int(last or 0))
        spans[stage] = (offset, offset + length)
        global_curves[stage] = {name: {offset + s: v for s, v in sorted(c.items())} for name, c in (curves or {}).items()}
        offset += length
    return global_curves, spans


def _curve_values(event: dict[str, Any]) -> dict[str, float]:
    """Which values of a training event go on which curve.

    Training loss is ``loss`` (or ``train_loss``). Validation perplexity is ``eval_perplexity``,
    or ``perplexity`` in an event that reports ``eval_loss`` or no training loss, or else
    ``exp(eval_loss)``, the definition :func:`sentinel_core.evaluation.evaluate` uses.
    Learning rates are ``lr`` / ``learning_rate`` or ``lr/<group>`` numbers (what
    :mod:`sentinel_core.training` emits), or a ``{group: rate}`` dict under ``lr``, ``lrs``,
    ``learning_rate`` or ``learning_rates``.
    """
    out: dict[str, float] = {}
    if event.get("rollback") is True:
        # The trainer went back to this step's checkpoint after non-finite losses.
        out["rollback"] = 1.0
    train = event.get("loss", event.get("train_loss"))
    if _finite(train):
        out["loss"] = float(train)
    ppl = event.get("eval_perplexity")
    if ppl is None and ("eval_loss" in event or "loss" not in event):
        ppl = event.get("perplexity")
    if ppl is None and _finite(event.get("eval_loss")) and event["eval_loss"] < 700:
        ppl = math.exp(event["eval_loss"])
    if _finite(ppl):
        out["perplexity"] = float(ppl)
    for key, value in event.items():
        if not _LR_KEY.match(key):
            continue
        if _finite(value):
            out[f"lr:{key}"] = float(value)
        elif isinstance(value, dict):  # one rate per parameter group, e.g. {"base": .., "grown": ..}
            out.update({f"lr:{key}/{group}": float(v) for group, v in value.items() if _finite(v)})
    return out


def _plot_loss(run: _RunRecord, out_dir: Path) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    curves, spans = _training_curves(run)
    has = {kind: any(any(n == kind or n.startswith(kind + ":") for n in c) for c in curves.values())
           for kind in ("loss", "perplexity", "lr")}
    references = run.eval_perplexities()
    if not (has["loss"] or has["perplexity"]):
        return []
    panels = [k for k in ("loss", "perplexity", "lr") if has[k] or (k == "perplexity" and references)]
    fig = _figure(10, 1.2 + 2.4 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    ax_of = dict(zip(panels, axes, strict=True))
    stage_colour = {"fine_tune": "tab:blue", "fine_tune_growth": "tab:orange"}

    for stage, stage_curves in curves.items():
        colour = stage_colour.get(stage, "tab:gray")
        if "loss" in stage_curves and "loss" in ax_of:
            xs, ys = zip(*sorted(stage_curves["loss"].items()), strict=True)
            ax_of["loss"].plot(xs, ys, color=colour, linewidth=1.2, label=f"{stage} train loss")
        if "perplexity" in stage_curves and "perplexity" in ax_of:
            xs, ys = zip(*sorted(stage_curves["perplexity"].items()), strict=True)
            ax_of["perplexity"].plot(xs, ys, color=colour, marker="o", markersize=4, linewidth=1.4,
                                     label=f"{stage} validation")
        if "lr" in ax_of:
            for index, name in enumerate(sorted(n for n in stage_curves if n.startswith("lr:"))):
                xs, ys = zip(*sorted(stage_curves[name].items()), strict=True)
                ax_of["lr"].plot(xs, ys, color=colour, linestyle=("-", "--", ":", "-.")[index % 4], linewidth=1.1,
                                 label=f"{stage} {name[3:]}")

    rollbacks = sorted({s for c in curves.values() for s in c.get("rollback", {})})
    for step in rollbacks:
        for ax in axes:
            ax.axvline(step, color="#e31a1c", linestyle=":", linewidth=1.3, zorder=1)
        axes[-1].annotate("rollback", xy=(step, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 2),
                          textcoords="offset points", fontsize=7.5, color="#e31a1c", rotation=90)

    if "perplexity" in ax_of:
        ax = ax_of["perplexity"]
        for label in _EVAL_LABELS:
            if label in references:
                colour, style = _EVAL_STYLE[label]
                ax.axhline(references[label], color=colour, linestyle=style, linewidth=1.2,
                           label=f"{label} eval: {references[label]:.2f}")
        plotted = [v for c in curves.values() for v in c.get("perplexity", {}).values()] + list(references.values())
        _maybe_log_y(ax, plotted)
        ax.set_ylabel("validation perplexity")
    if "loss" in ax_of:
        ax_of["loss"].set_ylabel("training loss")
    if "lr" in ax_of:
        ax_of["lr"].set_ylabel("learning rate")
        ax_of["lr"].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    shade = {"fine_tune": "#e8f0fb", "fine_tune_growth": "#fdf0e2"}
    for stage, (start, end) in spans.items():
        text = "fine_tune" if stage == "fine_tune" else "grow → fine_tune_growth"
        for ax in axes:
            ax.axvspan(start, end, color=shade.get(stage, "#f2f2f2"), zorder=0, linewidth=0)
            ax.axvline(start, color="0.3", linestyle="--", linewidth=1, zorder=1)
            ax.axvline(end, color="0.3", linestyle="--", linewidth=1, zorder=1)
        axes[0].annotate(f"{text}\n({end - start} steps)", xy=((start + end) / 2, 1.0),
                         xycoords=("data", "axes fraction"), xytext=(0, 3), textcoords="offset points",
                         ha="center", va="bottom", fontsize=8.5, color="0.2")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("optimizer step (counted across stages)")
    fig.suptitle(_run_title(run, "Training"), fontsize=12)
    path = out_dir / LOSS_PLOT
    _save(fig, path)
    return [path]


# -- head_importance*.png ------------------------------------------------------------------------


def _plot_head_importance(run: _RunRecord, out_dir: Path) -> list[Path]:
    by_strategy = run.scores_by_strategy()
    if not by_strategy:
        return []
    own = run.scorer()
    removed = run.removed() or {}
    mode = run.prune_mode()
    written = []
    for strategy, matrix in by_strategy.items():
        name = HEAD_IMPORTANCE_PLOT if strategy == own or len(by_strategy) == 1 else \
            f"head_importance_{_safe_name(strategy)}.png"
        path = out_dir / name
        _draw_heatmap(matrix, strategy, removed, mode, path, run)
        written.append(path)
    written.sort(key=lambda p: (p.name != HEAD_IMPORTANCE_PLOT, p.name))
    return written


def _draw_heatmap(matrix: list[list[float]], strategy: str, removed: dict[int, list[int]], mode: str,
                  path: Path, run: _RunRecord) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    layers = len(matrix)
    width = max(len(row) for row in matrix)
    data = np.full((layers, width), np.nan)
    for i, row in enumerate(matrix):
        data[i, : len(row)] = row
    masked = np.ma.masked_invalid(data)
    cmap = colormaps["viridis"].with_extremes(bad="#c8c8c8")

    fig = _figure(max(5.5, 1.2 + 0.55 * width), max(3.2, 1.6 + 0.45 * layers))
    ax = fig.subplots()
    image = ax.imshow(masked, cmap=cmap, aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"{strategy} score (higher = more important)")
    finite = data[np.isfinite(data)]
    annotate = layers * width <= 160 and finite.size > 0
    if annotate:
        low, high = float(finite.min()), float(finite.max())
        for i in range(layers):
            for j in range(width):
                if np.isfinite(data[i, j]):
                    light = high > low and (data[i, j] - low) / (high - low) < 0.55
                    ax.text(j, i, f"{data[i, j]:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if light else "black")
    cells = [(layer, h) for layer, heads in removed.items() for h in heads if layer < layers and h < width]
    if cells:
        label = f"{'masked' if mode == 'mask' else 'pruned'} ({len(cells)})"
        for layer, h in cells:
            ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#e31a1c", linewidth=2.2))
        # The value stays readable: the cross sits in the cell's corner when values are written.
        dx, dy = (0.3, -0.25) if annotate else (0.0, 0.0)
        ax.scatter([h + dx for _l, h in cells], [layer + dy for layer, _h in cells], marker="x",
                   s=40 if annotate else 120, linewidths=2.0, color="#e31a1c")
    ax.set_xticks(range(width))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    notes = [f"red ×: {label}"] if cells else []
    if np.isnan(data).any():
        notes.append("grey: no score")
    ax.set_title(f"Head importance: {strategy}" + ("\n" + " · ".join(notes) if notes else ""), fontsize=11)
    fig.suptitle(_run_title(run, None), fontsize=9, color="0.3")
    _save(fig, path)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "scores"


# -- head_map.png --------------------------------------------------------------------------------


def _head_map_panels(run: _RunRecord) -> list[tuple[str, Any]] | None:
    """``[(title, grid)]``: the heads originally, after pruning and (if any) after growth.

    ``grid[layer, head_id]`` is one of the cell kinds ``_EMPTY`` (no such head), ``_ALIVE``,
    ``_REMOVED``, ``_MASKED`` or ``_GROWN``; None when the run has not pruned yet.
    """
    import numpy as np

    original = run.original_heads_per_layer()
    removed = run.removed()
    if not original or removed is None:
        return None
    grown = run.grown()
    layers = len(original)
    width = max([max(original)] + [h + 1 for heads in grown.values() for h in heads])
    dead = _MASKED if run.prune_mode() == "mask" else _REMOVED

    before = np.full((layers, width), _EMPTY)
    for layer, count in enumerate(original):
        before[layer, :count] = _ALIVE
    pruned = before.copy()
    for layer, heads in removed.items():
        for h in heads:
            if not (0 <= layer < layers and 0 <= h < original[layer]):
                raise ValueError(f"removed head {layer}:{h} is not one of the original {layers} x {max(original)} heads")
            pruned[layer, h] = dead
    panels = [("original", before), ("after pruning", pruned)]
    if any(grown.values()):
        after = pruned.copy()
        for layer, heads in grown.items():
            for h in heads:
                if not (0 <= layer < layers and h >= original[layer]):
                    raise ValueError(f"grown head {layer}:{h} reuses an original head id or layer is out of range")
                after[layer, h] = _GROWN
        panels.append(("after growth", after))
    return panels


def _plot_head_map(run: _RunRecord, out_dir: Path) -> list[Path]:
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    panels = _head_map_panels(run)
    if panels is None:
        return []
    layers, width = panels[0][1].shape
    cmap = ListedColormap(_KIND_COLOURS)
    norm = BoundaryNorm([k - 0.5 for k in range(len(_KIND_COLOURS) + 1)], cmap.N)
    # Size the figure from the grid so cells come out about square with aspect="auto";
    # aspect="equal" fights constrained layout and lets titles overlap.
    cell = min(0.42, 16.0 / (len(panels) * width), 10.0 / layers)
    fig = _figure(0.6 + len(panels) * (0.7 + cell * width), 2.1 + cell * layers)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, grid) in zip(axes, panels, strict=True):
        ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(np.arange(-0.5, width, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, layers, 1), minor=True)
        ax.grid(which="minor", color="white", linewidth=1.5)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(width))
        ax.set_yticks(range(layers))
        ax.tick_params(labelsize=7)
        alive = int(np.isin(grid, (_ALIVE, _GROWN)).sum())
        ax.set_title(f"{title}\n{alive} heads working", fontsize=10)
        ax.set_xlabel("head id")
    axes[0].set_ylabel("layer")
    used = sorted({int(k) for _t, g in panels for k in np.unique(g)} - {_EMPTY})
    fig.legend(handles=[Patch(facecolor=_KIND_COLOURS[k], edgecolor="0.5", label=_KIND_NAMES[k]) for k in used],
               loc="outside lower center", ncol=len(used), fontsize=9, frameon=False)
    fig.suptitle(_run_title(run, "Head map"), fontsize=12)
    path = out_dir / HEAD_MAP_PLOT
    _save(fig, path)
    return [path]


# -- comparison helpers --------------------------------------------------------------------------

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _comparison_point(summary: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    config = summary.get("config") or {}
    ppl = summary.get("perplexity") or {}
    percent = config.get("pruning_percent")
    if not _finite(percent):
        raise SentinelError(f"{str(run_dir)!r}: summary.json has no config.pruning_percent; "
                            "it was not written by `sentinel run`")
    return {
        "scorer": str(config.get("scorer") or "?"),
        "fine_tune": str(config.get("fine_tune") or "?"),
        "growth": f"{config.get('growth_strategy')} {100 * float(config.get('growth_percent') or 0):g}%"
        if config.get("growth_strategy") and (config.get("growth_percent") or 0) > 0 else "",
        "percent": 100.0 * float(percent),
        "pruned": ppl.get("pruned"),
        "final": ppl.get("final"),
        "baseline": ppl.get("baseline"),
    }


def _series_keys(points: list[dict[str, Any]]) -> list[str]:
    """Line labels: the scorer, plus the fine-tuner and growth when they vary across the runs."""
    vary_ft = len({p["fine_tune"] for p in points}) > 1
    keys = []
    for p in points:
        key = p["scorer"]
        if vary_ft:
            key += f", fine-tune {p['fine_tune']}"
        if p["growth"]:
            key += f", grow {p['growth']}"
        keys.append(key)
    return keys


def _maybe_log_y(ax: Any, values: list[float]) -> None:
    """Log y axis with plain-number ticks when the values span more than 20x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not values or min(values) <= 0 or max(values) / min(values) <= 20:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- figure plumbing -----------------------------------------------------------------------------


def _run_title(run: _RunRecord, prefix: str | None) -> str:
    config = run.summary.get("config") or {}
    sources = run.state.get("sources") or {}
    model = run.summary.get("model") or sources.get("model") or config.get("model_name")
    parts = [prefix] if prefix else []
    if model:
        parts.append(str(model if len(str(model)) <= 40 else "…" + str(model)[-39:]))
    if config.get("scorer"):
        parts.append(f"scorer {config['scorer']}, {100 * float(config.get('pruning_percent', 0)):g}% pruned")
    return " · ".join(parts)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, 20), min(height, 16)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, facecolor="white", metadata={"Software": "sentinel-core"})
    write_bytes_atomic(path, buffer.getvalue())
