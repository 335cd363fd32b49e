"""Overhead of the experiment trackers (sentinel-trackers) on a fine-tuning step.

The same small GPT-2 trains on the same random blocks with ``sentinel_core.training.train`` once per
arm: no tracker, each tracker alone (TensorBoard, MLflow's local file store, W&B offline) and all
three. Within a repeat the arms run in a rotated order, and each tracker arm's throughput is divided
by the no-tracker arm's of the same repeat, so a change in machine load between repeats cancels;
the median ratio over repeats is reported with its range.

Two figures per arm:

- end to end: tokens per second of the timed steps (after ``--warmup-steps`` untimed ones), wall
  clock and CPU time of this process. W&B's writer runs in a separate process (wandb-core), so its
  CPU shows only in the wall clock;
- in the hook: the seconds spent inside the trackers' ``on_metric`` during the timed steps, as a
  share of those steps' wall time. This is the cost the training process pays directly and is
  steady even on a loaded machine.

The trackers are opened (``on_run_start``) before, and closed (``on_run_end``) after, the timed
window; those one-off seconds are reported separately.

Usage: python bench/bench_trackers.py [--steps 30] [--repeats 5] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from bench_finetune import _load, build_data, build_model  # noqa: E402

from sentinel_core.config import ExperimentConfig  # noqa: E402
from sentinel_core.fileio import write_text_atomic  # noqa: E402
from sentinel_core.hookspecs import hookimpl  # noqa: E402
from sentinel_core.plugins import load_plugins, pm  # noqa: E402
from sentinel_core.training import train  # noqa: E402

TRACKERS = ("tensorboard", "mlflow", "wandb")


class StepTimes:
    """Clock readings at each step event, taken after every other on_metric (trylast), so a
    tracker's work on step k falls inside the timed window."""

    def __init__(self) -> None:
        self.times: dict[int, tuple[float, float]] = {}

    @hookimpl(trylast=True)
    def on_metric(self, event):
        if event.stage == "bench" and "loss" in event.values:
            self.times[event.step] = (time.perf_counter(), time.process_time())


class HookClock:
    """Seconds spent in the tracker session's ``log`` (what ``on_metric`` does), per step window."""

    def __init__(self, session, first: int, last: int) -> None:
        self.seconds = 0.0
        self.calls = 0
        log = session.log

        def timed(event):
            start = time.perf_counter()
            log(event)
            if first < (event.step or 0) <= last:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        session.log = timed


def one_arm(args, data, total: int, arm: str) -> dict:
    from sentinel_trackers import plugin

    model = build_model(args)
    with tempfile.TemporaryDirectory(prefix=f"bench-trackers-{arm}-") as out:
        config = ExperimentConfig(device="cpu", batch_size=args.batch, learning_rate=args.lr, num_epochs=1,
                                  eval_every=10**6, max_eval_blocks=1, checkpoint_every=10**6, patience=0,
                                  output_dir=out, quiet=True, seed=0, report_to=arm)
        start = time.perf_counter()
        plugin.on_run_start(config=config, run_dir=Path(out))
        opened = time.perf_counter() - start
        steps = StepTimes()
        clock = HookClock(plugin.session, args.warmup_steps, total) if plugin.session else None
        pm.register(steps)
        try:
            train(model, data, config, stage="bench", resume=False)
        finally:
            pm.unregister(steps)
            start = time.perf_counter()
            plugin.on_run_end(summary={"arm": arm, "steps": total}, run_dir=Path(out))
            closed = time.perf_counter() - start
    (end, cpu_end), (begin, cpu_begin) = steps.times[total], steps.times[args.warmup_steps]
    tokens = (total - args.warmup_steps) * args.batch * args.block
    return {"tokens_per_second": tokens / (end - begin), "tokens_per_cpu_second": tokens / (cpu_end - cpu_begin),
            "timed_seconds": end - begin, "hook_seconds": clock.seconds if clock else 0.0,
            "hook_calls": clock.calls if clock else 0, "open_seconds": opened, "close_seconds": closed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per arm")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--embd", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads; 1 is steadier on a shared machine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "trackers.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_plugins()
    if pm.get_plugin("trackers") is None:
        sys.exit("install the plugin first: pip install -e 'plugins/sentinel-trackers[all]'")
    available = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    arms = ["none", *available] + ([",".join(available)] if len(available) > 1 else [])
    total = args.steps + args.warmup_steps
    data = build_data(args, total)
    load_before = _load()
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        order = arms[repeat % len(arms):] + arms[:repeat % len(arms)]
        for arm in order:
            runs[arm].append(one_arm(args, data, total, arm))
        line = "  ".join(f"{arm}: {runs[arm][-1]['tokens_per_second']:.0f}" for arm in arms)
        print(f"repeat {repeat + 1} (tokens/s)  {line}", flush=True)

    summary = {}
    for arm in arms:
        wall = [r["tokens_per_second"] for r in runs[arm]]
        ratios = [r["tokens_per_second"] / base["tokens_per_second"] for r, base in zip(runs[arm], runs["none"],
                                                                                        strict=True)]
        cpu_ratios = [r["tokens_per_cpu_second"] / base["tokens_per_cpu_second"]
                      for r, base in zip(runs[arm], runs["none"], strict=True)]
        hook_share = [r["hook_seconds"] / r["timed_seconds"] for r in runs[arm]]
        summary[arm] = {
            "median_tokens_per_second": statistics.median(wall),
            "ratio_to_none_median": statistics.median(ratios), "ratio_to_none_range": [min(ratios), max(ratios)],
            "cpu_ratio_to_none_median": statistics.median(cpu_ratios),
            "hook_share_of_step_time_median": statistics.median(hook_share),
            "hook_ms_per_event_median": statistics.median(
                [1000 * r["hook_seconds"] / r["hook_calls"] for r in runs[arm]]) if runs[arm][0]["hook_calls"] else 0.0,
            "step_ms_median": statistics.median([1000 * r["timed_seconds"] / args.steps for r in runs[arm]]),
            "open_seconds_median": statistics.median([r["open_seconds"] for r in runs[arm]]),
            "close_seconds_median": statistics.median([r["close_seconds"] for r in runs[arm]]),
        }
    model = build_model(args)
    record = {
        "benchmark": "bench_trackers",
        "model": {"layers": args.layers, "heads": args.heads, "n_embd": args.embd, "vocab": args.vocab,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "batch": [args.batch, args.block], "timed_steps": args.steps, "untimed_steps": args.warmup_steps,
        "repeats": args.repeats, "arms": arms, "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"before": load_before, "after": _load()}, "summary": summary, "runs": runs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **{t: _version(t) for t in available}},
    }
    print()
    print("| trackers | step (ms) | tokens/s vs none: median (range) | CPU-time ratio | in on_metric: share of "
          "step time | ms per event | open / close (s) |")
    print("|---|---|---|---|---|---|---|")
    for arm in arms:
        s = summary[arm]
        low, high = s["ratio_to_none_range"]
        print(f"| {arm} | {s['step_ms_median']:.0f} | {s['ratio_to_none_median']:.3f} ({low:.3f}-{high:.3f}) | "
              f"{s['cpu_ratio_to_none_median']:.3f} | {100 * s['hook_share_of_step_time_median']:.2f}% | "
              f"{s['hook_ms_per_event_median']:.2f} | {s['open_seconds_median']:.1f} / "
              f"{s['close_seconds_median']:.1f} |")
    print(f"load average {load_before} -> {_load()}, {torch.get_num_threads()} torch thread(s)")
    out = Path(args.out)
    write_text_atomic(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in (module, f"{module}-skinny"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


if __name__ == "__main__":
    main()
