"""Adaptive vs plain fine-tuning at an equal number of steps on the same pruned model.

The model is scored and pruned once; then, for every seed, a copy is fine-tuned with ``plain``
and a copy with ``adaptive`` for the same ``--steps`` optimizer steps (same data order, same
base learning rate and schedule), and each result's perplexity is measured with
``sentinel_core.evaluation.evaluate`` on held-out text the loop never selects on (the test split
when the data has one, else the validation text after the blocks the loop evaluates on).

Usage:
    python bench/bench_adaptive.py --model demo --data demo --steps 100 --seeds 0 1
    python bench/bench_adaptive.py --model distilgpt2 --data wikitext:wikitext-2-raw-v1 --steps 300 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins" / "sentinel-adaptive"))  # when the plugin is not pip-installed

import torch  # noqa: E402

from sentinel_core import plugins  # noqa: E402
from sentinel_core.config import ExperimentConfig  # noqa: E402
from sentinel_core.data import batches, load_data  # noqa: E402
from sentinel_core.evaluation import evaluate  # noqa: E402
from sentinel_core.fileio import dumps_strict, write_text_atomic  # noqa: E402
from sentinel_core.plugins import load_plugins, pm  # noqa: E402


def register_adaptive() -> None:
    import sentinel_adaptive

    load_plugins()
    if not pm.is_registered(sentinel_adaptive) and pm.get_plugin("adaptive") is None:
        pm.register(sentinel_adaptive, name="adaptive")


def held_out_ids(data, args) -> tuple[torch.Tensor, str]:
    if data.test is not None:
        ids = data.test.ids
        name = "test"
    else:
        # The loop selects its best model on the first max_eval_blocks validation blocks: skip them.
        ids = data.validation.ids[args.eval_blocks * args.block:]
        name = "validation (after the loop's blocks)"
    if args.report_blocks:
        ids = ids[: args.report_blocks * args.block]
    return ids, name


def perplexity(model, ids, args, device) -> float:
    return evaluate(model, ids, block_size=args.block, batch_size=args.batch, device=device).perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Sentinel or HF checkpoint directory, a Hub name, or 'demo'")
    parser.add_argument("--data", required=True, help="data spec for load_data (a file, folder, Hub name or 'demo')")
    parser.add_argument("--scorer", default="gradient")
    parser.add_argument("--prune-strategy", default="global")
    parser.add_argument("--pruning-percent", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--eval-blocks", type=int, default=16, help="validation blocks the loop evaluates on")
    parser.add_argument("--report-blocks", type=int, default=64, help="held-out blocks the reported perplexity uses")
    parser.add_argument("--boost", type=float, default=None, help="options.adaptive_boost (default: the plugin's)")
    parser.add_argument("--growth-boost", type=float, default=None)
    parser.add_argument("--control-lr-scale", type=float, default=None,
                        help="also run plain with the learning rate times this, to tell a targeted boost "
                             "from a higher rate overall")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_adaptive.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentinel_core.config import resolve_device
    from sentinel_core.model_io import load_model

    register_adaptive()
    device = resolve_device(args.device)
    source = args.model
    if source == "demo":
        from sentinel_core.demo import ensure_demo_model

        source = str(ensure_demo_model())
    model, tokenizer = load_model(source, device=device)
    model.eval()
    data = load_data(args.data, tokenizer, block_size=args.block, seed=0)
    ids, split_name = held_out_ids(data, args)
    options = {}
    if args.boost is not None:
        options["adaptive_boost"] = args.boost
    if args.growth_boost is not None:
        options["adaptive_growth_boost"] = args.growth_boost

    arms = [("plain", "plain", 1.0), ("adaptive", "adaptive", 1.0)]
    if args.control_lr_scale:
        arms.append((f"plain x{args.control_lr_scale:g}", "plain", args.control_lr_scale))

    def config(seed: int, out: str, strategy: str, lr_scale: float = 1.0) -> ExperimentConfig:
        steps_per_epoch = max(1, data.train.num_blocks // args.batch)
        return ExperimentConfig(device=device, batch_size=args.batch, learning_rate=args.lr * lr_scale,
                                block_size=args.block,
                                num_epochs=math.ceil(args.steps / steps_per_epoch), max_steps=args.steps,
                                eval_every=args.steps, max_eval_blocks=args.eval_blocks, patience=0,
                                warmup_fraction=0.1, checkpoint_every=10**6, output_dir=out, quiet=True, seed=seed,
                                pruning_percent=args.pruning_percent, scorer=args.scorer, fine_tune=strategy,
                                options=options)

    baseline = perplexity(model, ids, args, device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(args.seeds[0], tmp, "plain")
        calibration = []
        for batch in batches(data.train.blocks, args.batch, shuffle=True, seed=0):
            calibration.append(batch)
            if len(calibration) >= cfg.calibration_batches:
                break
        scores = plugins.score_heads(args.scorer, model=model, batches=calibration, config=cfg)
        pruned_heads = plugins.prune(args.prune_strategy, model=model, scores=scores, config=cfg)
    model.to(device)
    pruned = perplexity(model, ids, args, device)
    print(f"{args.model}: {split_name} perplexity {baseline:.2f} -> {pruned:.2f} after pruning "
          f"{pruned_heads.count} heads ({args.scorer}, {args.prune_strategy})", flush=True)

    runs = []
    for seed in args.seeds:
        row = {"seed": seed}
        for arm, strategy, lr_scale in arms:
            candidate = copy.deepcopy(model)
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                result = plugins.fine_tune(strategy, model=candidate, tokenizer=tokenizer, data=data,
                                         config=config(seed, out, strategy, lr_scale), stage="fine_tune")
                seconds = time.perf_counter() - start
            row[arm] = {"perplexity": perplexity(candidate, ids, args, device), "seconds": seconds,
                             "best_step": result.extra.get("best_step"),
                             "loop_best_eval_loss": result.best_eval_loss}
            del candidate
        runs.append(row)
        print(f"seed {seed}: " + "   ".join(f"{arm} {row[arm]['perplexity']:.2f}" for arm, _, _ in arms), flush=True)

    plain = [r["plain"]["perplexity"] for r in runs]
    adaptive = [r["adaptive"]["perplexity"] for r in runs]
    better = sum(a < p for a, p in zip(adaptive, plain, strict=True))
    print()
    names = [arm for arm, _, _ in arms]
    print("| seed | " + " | ".join(f"{n} ppl" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for r in runs:
        print(f"| {r['seed']} | " + " | ".join(f"{r[n]['perplexity']:.2f}" for n in names) + " |")
    print("| mean | " + " | ".join(f"{statistics.mean(r[n]['perplexity'] for r in runs):.2f}" for n in names) + " |")
    print(f"baseline {baseline:.2f}, pruned {pruned:.2f}; adaptive better in {better}/{len(runs)} seeds "
          f"after {args.steps} steps")
    record = {"benchmark": "bench_adaptive", "model": args.model, "data": args.data, "held_out": split_name,
              "scorer": args.scorer, "prune_strategy": args.prune_strategy, "pruning_percent": args.pruning_percent,
              "heads_removed": pruned_heads.count, "steps": args.steps, "lr": args.lr, "batch": [args.batch, args.block],
              "options": options, "device": device, "baseline_perplexity": baseline, "pruned_perplexity": pruned,
              "runs": runs,
              "mean_perplexity": {n: statistics.mean(r[n]["perplexity"] for r in runs) for n in names},
              "adaptive_better_seeds": better,
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    out = Path(args.out)
    write_text_atomic(out, dumps_strict(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
