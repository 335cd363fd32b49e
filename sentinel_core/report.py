"""One self-contained HTML page about one or more finished runs.

The page has no external resource and no script: the CSS is inline and every plot is a
``data:image/png;base64`` URI, so the file can be mailed, archived or opened offline. Every
piece of text from a run (paths, model names, generated samples) goes through
:func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import SentinelError
from .fileio import write_text_atomic
from .plots import (
    HEAD_IMPORTANCE_PLOT,
    HEAD_MAP_PLOT,
    LOSS_PLOT,
    load_summary,
    plot_comparison,
    plot_files,
    plot_quality_cost,
    plot_run,
)
from .tracking import read_metrics

__all__ = ["write_report"]

REPORT_FILE = "report.html"
MULTI_REPORT_FILE = "sentinel_report.html"

_PLOT_TITLES = {
    LOSS_PLOT: "Training loss and validation perplexity",
    HEAD_IMPORTANCE_PLOT: "Head importance (pruned heads marked x)",
    HEAD_MAP_PLOT: "Head map before and after pruning and growth",
}

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.8em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
.meta { color: #666; font-size: 0.9em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; vertical-align: top; }
thead th { background: #f3f5f8; text-align: center; }
tbody th { text-align: left; font-weight: 600; background: #fafafa; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { max-width: 28em; overflow-wrap: anywhere; }
tr.group th { background: #e9edf3; text-align: left; font-size: 0.85em; text-transform: uppercase;
              letter-spacing: 0.04em; color: #445; }
.runs { display: grid; gap: 16px; }
figure { margin: 0; border: 1px solid #e5e5e5; padding: 6px; background: #fff; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #555; margin-top: 4px; overflow-wrap: anywhere; }
.missing { color: #888; font-style: italic; font-size: 0.9em; padding: 1em; }
pre.sample { white-space: pre-wrap; overflow-wrap: anywhere; margin: 0; font-size: 0.88em;
             font-family: ui-monospace, Menlo, Consolas, monospace; }
.prompt { background: #fff3c4; }
"""


def write_report(run_dirs: Sequence[str | Path], path: str | Path) -> Path:
    """Write one HTML page comparing the finished runs in ``run_dirs``; returns ``path``.

    The page holds the summary table (one column per run), each run's plots (drawn with
    :func:`sentinel_core.plots.plot_run` when the run folder has none yet), the strategy
    comparison when there are two runs or more, and the generated samples before and after.

    :param run_dirs: folders of finished runs (each holds ``summary.json``).
    :param path: the HTML file to write (atomically).
    :raises SentinelError: when no folder is given or one is not a finished run.
    """
    if not run_dirs:
        raise SentinelError("no run folders given; pass one or more --output-dir folders of finished runs")
    _check_report_path(Path(path))
    dirs = [Path(d) for d in run_dirs]
    runs = [_Run(d, load_summary(d)) for d in dirs]
    names = _column_names(dirs)
    for run, name in zip(runs, names, strict=True):
        run.name = name

    with tempfile.TemporaryDirectory(prefix="sentinel-report-") as scratch:
        for index, run in enumerate(runs):
            run.plots = _ensure_plots(run.dir, Path(scratch) / f"run{index}")
        comparison = None
        if len(runs) >= 2:
            comparison = _data_uri(plot_comparison(dirs, Path(scratch) / "comparison.png"))
        cost = _quality_cost_figure(dirs, Path(scratch) / "quality_cost.png")
        page = _page(runs, comparison, cost)
    out = Path(path)
    write_text_atomic(out, page)
    os.chmod(out, 0o644)  # the atomic write's temp file is 0600; a report is meant to be shared
    return out


GENERATOR = "Sentinel report"


def _check_report_path(out: Path) -> None:
    """Replace only a report that Sentinel wrote: never a user's file that happens to share the name."""
    if out.is_dir():
        raise SentinelError(f"report path {str(out)!r} is a folder; give an .html file name, e.g. report.html")
    if out.exists():
        head = out.read_bytes()[:4096].decode("utf-8", errors="replace")
        if f'content="{GENERATOR}"' not in head:
            raise SentinelError(f"{str(out)!r} exists and is not a report Sentinel wrote; give another --output")


class _Run:
    def __init__(self, run_dir: Path, summary: dict[str, Any]):
        self.dir = run_dir
        self.summary = summary
        self.name = run_dir.name
        self.plots: dict[str, str] = {}


def _column_names(dirs: list[Path]) -> list[str]:
    """Folder names; where two runs share a name, longer path tails for those runs only."""
    parts = [d.resolve().parts for d in dirs]
    depth = [1] * len(dirs)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth, strict=True)]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            return names
        for i in clashing:
            depth[i] += 1


def _ensure_plots(run_dir: Path, scratch: Path) -> dict[str, str]:
    """The run's plots as data URIs, by file name; drawn first if the folder has none."""
    files = plot_files(run_dir)
    if not files:
        try:
            files = plot_run(run_dir)
        except OSError:
            # A read-only run folder: draw into scratch space instead of failing the report.
            scratch.mkdir(parents=True, exist_ok=True)
            files = _plot_elsewhere(run_dir, scratch)
    return {f.name: _data_uri(f) for f in files}


def _plot_elsewhere(run_dir: Path, scratch: Path) -> list[Path]:
    import shutil

    copy = scratch / run_dir.name
    copy.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "state.json", "summary.json"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, copy / name)
    return plot_run(copy)


def _quality_cost_figure(dirs: list[Path], path: Path) -> str | None:
    try:
        return _data_uri(plot_quality_cost(dirs, path))
    except SentinelError:  # runs from before Sentinel recorded any cost: the section is left out
        return None


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


# -- the page ------------------------------------------------------------------------------------


def _page(runs: list[_Run], comparison: str | None, cost: str | None = None) -> str:
    e = html.escape
    title = "Sentinel report: " + (runs[0].name if len(runs) == 1 else f"{len(runs)} runs")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f'<meta name="generator" content="{GENERATOR}">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">Generated {e(time.strftime("%Y-%m-%d %H:%M:%S"))} from '
        f"{len(runs)} run folder{'s' if len(runs) != 1 else ''}.</p>",
        "<h2>Summary</h2>",
        _summary_table(runs),
    ]
    if cost:
        parts += ["<h2>Quality against cost</h2>",
                  '<figure style="max-width: 1300px">',
                  f'<img src="{cost}" alt="Quality against cost: one point per run, the unpruned baseline marked">',
                  "<figcaption>Each run's final validation perplexity (and mean task accuracy, when every run scored "
                  "lm-eval tasks) against its parameters, KV-cache bytes per token and forward tokens per second. "
                  "The black star is the unpruned model. Speed error bars span the interleaved repeats; a hollow "
                  "marker is an indicative single-pass speed.</figcaption>",
                  "</figure>"]
    if comparison:
        parts += ["<h2>Strategy comparison</h2>",
                  '<figure style="max-width: 1100px">',
                  f'<img src="{comparison}" alt="Perplexity against pruning percent for each scorer">',
                  "<figcaption>Perplexity against the share of heads pruned: right after pruning (left) and "
                  "after fine-tuning (right). Markers are runs; lines join the median per percent.</figcaption>",
                  "</figure>"]
    parts += ["<h2>Plots</h2>", _plots_section(runs), "<h2>Generated samples</h2>", _samples_table(runs),
              "</body></html>"]
    return "\n".join(parts) + "\n"


def _grid(count: int) -> str:
    if count == 1:
        return 'class="runs" style="grid-template-columns: minmax(0, 1000px)"'
    return f'class="runs" style="grid-template-columns: repeat({count}, minmax(360px, 1fr)); overflow-x: auto"'


def _plots_section(runs: list[_Run]) -> str:
    e = html.escape
    names = [LOSS_PLOT, HEAD_IMPORTANCE_PLOT]
    names += sorted({n for r in runs for n in r.plots if n not in _PLOT_TITLES})
    names.append(HEAD_MAP_PLOT)
    out = []
    for name in names:
        if not any(name in r.plots for r in runs):
            continue
        title = _PLOT_TITLES.get(name) or f"Head importance: {name[len('head_importance_'):-len('.png')]}"
        out.append(f"<h3>{e(title)}</h3>")
        out.append(f"<div {_grid(len(runs))}>")
        for run in runs:
            if name in run.plots:
                out.append(f'<figure><img src="{run.plots[name]}" alt="{e(title)}: {e(run.name)}">'
                           f"<figcaption>{e(run.name)}</figcaption></figure>")
            else:
                out.append(f'<figure><p class="missing">No {e(title.lower())} for {e(run.name)}: '
                           "the run recorded no data for it.</p></figure>")
        out.append("</div>")
    if not out:
        return '<p class="missing">No plots: the runs recorded no training steps, scores or head changes.</p>'
    return "\n".join(out)


def _samples_table(runs: list[_Run]) -> str:
    e = html.escape
    rows = ['<div class="scroll"><table><thead><tr><th></th>']
    rows += [f"<th>{e(r.name)}</th>" for r in runs]
    rows.append("</tr></thead><tbody>")
    for key, label in (("before", "before pruning"), ("after", "after fine-tuning")):
        rows.append(f"<tr><th>{e(label)}</th>")
        for run in runs:
            text = (run.summary.get("samples") or {}).get(key)
            prompt = _sample_prompt(run, "baseline" if key == "before" else "final")
            if text is None:
                rows.append('<td class="text"><span class="missing">no sample</span></td>')
                continue
            text = str(text)
            if prompt and text.startswith(prompt):
                body = f'<span class="prompt">{e(prompt)}</span>{e(text[len(prompt):])}'
            else:
                body = e(text)
            rows.append(f'<td class="text"><pre class="sample">{body}</pre></td>')
        rows.append("</tr>")
    rows.append("</tbody></table></div>")
    return "\n".join(rows)


def _sample_prompt(run: _Run, label: str) -> str | None:
    for event in reversed(read_metrics(run.dir)):
        if event.get("stage") == "sample" and event.get("label") == label and isinstance(event.get("prompt"), str):
            return event["prompt"]
    options = (run.summary.get("config") or {}).get("options") or {}
    prompt = options.get("sample_prompt")
    return prompt if isinstance(prompt, str) else None


# -- the summary table ---------------------------------------------------------------------------


def _summary_table(runs: list[_Run]) -> str:
    e = html.escape
    out = ['<div class="scroll"><table class="summary"><thead><tr><th></th>']
    out += [f'<th title="{e(str(r.dir))}">{e(r.name)}</th>' for r in runs]
    out.append("</tr></thead><tbody>")
    for group, rows in _ROWS + _task_rows(runs):
        out.append(f'<tr class="group"><th colspan="{len(runs) + 1}">{e(group)}</th></tr>')
        for label, cell in rows:
            out.append(f"<tr><th>{e(label)}</th>")
            for run in runs:
                text, kind = cell(run.summary)
                out.append(f'<td class="{kind}">{e(text)}</td>')
            out.append("</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _get(summary: dict[str, Any], *keys: str) -> Any:
    value: Any = summary
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: Any, fmt: str) -> tuple[str, str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–", "num"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value), "num"
    return format(value, fmt), "num"


def _text(value: Any) -> tuple[str, str]:
    return ("–" if value in (None, "") else str(value)), "text"


def _growth(summary: dict[str, Any]) -> tuple[str, str]:
    config = summary.get("config") or {}
    if not config.get("growth_strategy") or not config.get("growth_percent"):
        return "none", "text"
    return f"{config['growth_strategy']}, {100 * float(config['growth_percent']):g}%", "text"


def _percent(value: Any) -> tuple[str, str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–", "num"
    return f"{100 * float(value):g}%", "num"


def _ratio(summary: dict[str, Any]) -> tuple[str, str]:
    """The speed ratio, saying how it was measured: the median and range of interleaved repeats,
    or "indicative" for one evaluation pass of each model (what runs before the timed comparison,
    or with speed_repeats=0, recorded)."""
    speed = summary.get("speed") or {}
    text, kind = _num(speed.get("ratio"), ".2f")
    if text == "–":
        return text, kind
    spread = speed.get("ratio_range")
    if speed.get("method") == "interleaved" and isinstance(spread, list) and len(spread) == 2:
        return (f"{text}x ({spread[0]:.2f}–{spread[1]:.2f}, median of {speed.get('repeats')} interleaved "
                "repeats)"), kind
    return f"{text}x (indicative: one evaluation pass each)", kind


def _bytes(value: Any) -> tuple[str, str]:
    text, kind = _num(value, ",d")
    return (text if text == "–" else f"{text} B"), kind


def _seconds(summary: dict[str, Any]) -> tuple[str, str]:
    timings = summary.get("timings_seconds") or {}
    values = [v for v in timings.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values:
        return "–", "num"
    return format_duration(sum(values)), "num"


def format_duration(seconds: float) -> str:
    """``95.2`` -> ``"1 min 35 s"``; under a minute, one decimal."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


def _steps(summary: dict[str, Any]) -> tuple[str, str]:
    parts = [_get(summary, stage, "steps") for stage in ("fine_tune", "fine_tune_growth")]
    parts = [p for p in parts if isinstance(p, int)]
    return (" + ".join(str(p) for p in parts), "num") if parts else ("–", "num")


Cell = Callable[[dict[str, Any]], tuple[str, str]]

_ROWS: list[tuple[str, list[tuple[str, Cell]]]] = [
    ("Setup", [
        ("model", lambda s: _text(s.get("model"))),
        ("data", lambda s: _text(s.get("data"))),
        ("scorer", lambda s: _text(_get(s, "config", "scorer"))),
        ("pruning", lambda s: _percent(_get(s, "config", "pruning_percent"))),
        ("prune mode", lambda s: _text(_get(s, "heads", "prune_mode") or _get(s, "config", "prune_mode"))),
        ("fine-tuning", lambda s: _text(_get(s, "config", "fine_tune"))),
        ("fine-tuning steps", _steps),
        ("growth", _growth),
    ]),
    ("Validation perplexity", [
        ("baseline", lambda s: _num(_get(s, "perplexity", "baseline"), ",.2f")),
        ("after pruning", lambda s: _num(_get(s, "perplexity", "pruned"), ",.2f")),
        ("final", lambda s: _num(_get(s, "perplexity", "final"), ",.2f")),
    ]),
    ("Heads", [
        ("original", lambda s: _num(_get(s, "heads", "original"), ",d")),
        ("removed", lambda s: _num(_get(s, "heads", "removed"), ",d")),
        ("grown", lambda s: _num(_get(s, "heads", "grown"), ",d")),
        ("final", lambda s: _num(_get(s, "heads", "final"), ",d")),
    ]),
    ("Size and speed", [
        ("parameters before", lambda s: _num(_get(s, "parameters", "before", "total"), ",d")),
        ("parameters after", lambda s: _num(_get(s, "parameters", "after", "total"), ",d")),
        ("attention parameters before", lambda s: _num(_get(s, "parameters", "before", "attention"), ",d")),
        ("attention parameters after", lambda s: _num(_get(s, "parameters", "after", "attention"), ",d")),
        ("KV cache per token before", lambda s: _bytes(_get(s, "kv_cache", "bytes_per_token_before"))),
        ("KV cache per token after", lambda s: _bytes(_get(s, "kv_cache", "bytes_per_token_after"))),
        ("tokens/s before", lambda s: _num(_get(s, "speed", "tokens_per_second_before"), ",.0f")),
        ("tokens/s after", lambda s: _num(_get(s, "speed", "tokens_per_second_after"), ",.0f")),
        ("speed ratio (after / before)", _ratio),
        ("time", _seconds),
    ]),
]


def _task_rows(runs: list[_Run]) -> list[tuple[str, list[tuple[str, Cell]]]]:
    """A "Task accuracy" group when any run scored lm-eval tasks: one row per task and metric,
    each cell "before → after"."""
    found: list[tuple[str, str]] = []
    for run in runs:
        for label in ("baseline", "final"):
            for task, entry in (_get(run.summary, "tasks", label) or {}).items():
                for metric in (entry or {}).get("metrics") or {}:
                    if (task, metric) not in found:
                        found.append((task, metric))
    if not found:
        return []

    def cell(task: str, metric: str) -> Cell:
        def read(summary: dict[str, Any]) -> tuple[str, str]:
            before = _get(summary, "tasks", "baseline", task, "metrics", metric)
            after = _get(summary, "tasks", "final", task, "metrics", metric)
            if before is None and after is None:
                return "–", "num"
            return f"{_num(before, '.3f')[0]} → {_num(after, '.3f')[0]}", "num"
        return read

    return [("Task accuracy (lm-eval, before → after)", [(f"{t} {m}", cell(t, m)) for t, m in sorted(found)])]
