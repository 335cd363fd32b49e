"""Build the demo model and measure it: build time, training throughput, test perplexity vs unigram.

    python bench/bench_demo.py [--spec full] [--rebuild] [--cache-dir DIR] [--out bench/results/demo.json]
    python bench/bench_demo.py --time-steps 30 [--out bench/results/demo-steps.json]

By default it uses the normal Sentinel cache (``SENTINEL_CACHE_DIR`` or the user cache folder),
so the model it builds is the one later ``sentinel run`` calls reuse. ``--rebuild`` deletes a
cached model first so the build is timed; without it a cached model is only measured and the
build times come from its ``demo.json``. The load average before and after is recorded because
other processes on the machine slow the build down.

``--time-steps N`` instead times N pre-training steps of the spec with the real training loop on
the real data (nothing is cached) and projects the build time from the median step: a quick
check of how long the full build would take on this machine when it is idle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel_core.demo import SPECS, demo_model_dir, ensure_demo_model  # noqa: E402
from sentinel_core.demo.report import measure_demo_model  # noqa: E402
from sentinel_core.fileio import write_json_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", choices=sorted(SPECS), default="full")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--rebuild", action="store_true", help="delete the cached model first and time a fresh build")
    parser.add_argument("--time-steps", type=int, default=None, metavar="N",
                        help="only time N training steps and project the build time")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/demo.json, "
                                                     "or demo-steps.json with --time-steps)")
    args = parser.parse_args(argv)
    if args.time_steps is not None:
        return time_steps(args)
    args.out = args.out or "bench/results/demo.json"

    import torch

    target = demo_model_dir(args.spec, cache_dir=args.cache_dir)
    if args.rebuild and target.exists():
        shutil.rmtree(target)
    reused = (target / "demo.json").is_file()
    load_before = os.getloadavg()
    start = time.perf_counter()
    path = ensure_demo_model(quiet=False, spec=args.spec, cache_dir=args.cache_dir)
    ensure_seconds = time.perf_counter() - start
    load_after = os.getloadavg()
    report = measure_demo_model(path, cache_dir=args.cache_dir)
    build = report["build"]

    rows = [
        ("model", f"{args.spec}: {report['parameters']['total']:,} parameters"),
        ("ensure_demo_model wall time", f"{ensure_seconds:.1f} s" + (" (reused the cached model)" if reused else "")),
        ("build: tokenizer + data", f"{build['seconds']['total'] - build['seconds']['train']:.1f} s"),
        ("build: training", f"{build['seconds']['train']:.1f} s, {build['steps']} steps, "
                            f"{build['train_tokens_per_second']:.0f} tok/s on {build['device']} "
                            f"({build['threads']} threads)"),
        ("validation curve (step: ppl)", ", ".join(f"{s}: {math.exp(v):.0f}" for s, v in build["eval_history"]
                                                   if v is not None)),
        ("test perplexity", f"{report['test_perplexity']:.1f} over {report['test_tokens_scored']:,} tokens"),
        ("unigram test perplexity", f"{report['unigram_test_perplexity']:.1f} (add-one, train counts, same tokens)"),
        ("load average before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")

    result = {
        "name": "demo",
        "spec": args.spec,
        "reused_cached_model": reused,
        "ensure_seconds": ensure_seconds,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        **report,
    }
    write_json_atomic(Path(args.out), json.loads(json.dumps(result, default=str)))
    print(f"wrote {args.out}")
    return 0


def time_steps(args: argparse.Namespace) -> int:
    import dataclasses
    import statistics
    import tempfile

    import torch
    import transformers

    from sentinel_core import training
    from sentinel_core.demo.model import _new_model, prepare_corpus, pretrain_config
    from sentinel_core.hookspecs import hookimpl
    from sentinel_core.plugins import pm

    spec = SPECS[args.spec]
    load_before = os.getloadavg()
    start = time.perf_counter()
    corpus = prepare_corpus(spec, args.cache_dir)
    prep_seconds = time.perf_counter() - start
    stamps: list[float] = []

    class StepClock:
        @hookimpl
        def on_metric(self, event):
            if event.stage == "demo_pretrain" and "loss" in event.values:
                stamps.append(time.perf_counter())

    # Evaluation and checkpoints only at the start and end, so the steps in between are pure steps.
    short = dataclasses.replace(spec, max_steps=args.time_steps, eval_every=args.time_steps,
                                checkpoint_every=args.time_steps)
    transformers.set_seed(spec.seed)
    model = _new_model(spec, corpus.tokenizer)
    clock = StepClock()
    pm.register(clock)
    try:
        with tempfile.TemporaryDirectory() as work:
            training.train(model, corpus.data, pretrain_config(short, corpus.data, work, quiet=True),
                           stage="demo_pretrain", resume=False)
    finally:
        pm.unregister(clock)
    load_after = os.getloadavg()
    gaps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
    step = statistics.median(gaps[2:] if len(gaps) > 4 else gaps)
    projected = prep_seconds + spec.max_steps * step
    rows = [
        ("spec", spec.describe()),
        ("tokenizer + data", f"{prep_seconds:.1f} s"),
        ("median step", f"{step:.3f} s = {spec.tokens_per_step / step:.0f} tok/s ({len(gaps)} step gaps, "
                        f"fastest {min(gaps):.3f} s)"),
        ("projected build", f"{projected:.0f} s = {projected / 60:.1f} min for {spec.max_steps} steps "
                            "(+ evaluations and checkpoints)"),
        ("load average before / after", f"{load_before[0]:.1f} / {load_after[0]:.1f} on {os.cpu_count()} CPUs"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    out = args.out or "bench/results/demo-steps.json"
    write_json_atomic(Path(out), {
        "name": "demo-steps", "spec": args.spec, "timed_steps": args.time_steps, "prep_seconds": prep_seconds,
        "step_seconds": gaps, "median_step_seconds": step, "tokens_per_second": spec.tokens_per_step / step,
        "projected_build_seconds": projected, "load_average_before": load_before, "load_average_after": load_after,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
    })
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
