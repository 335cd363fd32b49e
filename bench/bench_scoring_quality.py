"""Head-importance quality: validation perplexity after removing heads with each scorer.

For every seed, the model is scored once per scorer on ``--calibration-batches`` training
batches (the seed picks the batches, and the random scorer's draws), then for each fraction a
fresh copy is pruned (``--prune-strategy``, physical removal) and evaluated on the first
``--max-eval-blocks`` blocks of validation text. The table shows the median over seeds; a
scorer is useful where it beats ``random``.

With ``--fine-tune-steps N`` every pruned copy is then fine-tuned for exactly N steps with the
built-in training loop (same seed, same batches), and so is an unpruned copy: the reference a
pruned model should come within a few percent of.

    python bench/bench_scoring_quality.py --model PATH --data SPEC [--seeds 0,1,2]
        [--percents 0.1,0.3,0.5] [--scorers entropy,gradient,magnitude,random]
        [--fine-tune-steps 0] [--out bench/results/scoring-quality.json]

``--model`` is anything ``sentinel_core.load_model`` opens (e.g. the demo model's directory);
``--data`` anything ``sentinel_core.data.load_data`` reads.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "sentinel-entropy", ROOT / "plugins" / "sentinel-magnitude"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))


def _load_scorer_plugins() -> None:
    """Load the installed plugins; register the in-tree scorer plugins if they are not installed."""
    import importlib

    from sentinel_core.plugins import available_strategies, load_plugins, pm

    load_plugins()
    known = available_strategies("score_heads")
    for name, module in (("entropy", "sentinel_entropy"), ("magnitude", "sentinel_magnitude")):
        if name not in known:
            pm.register(importlib.import_module(module), name=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--percents", default="0.1,0.3,0.5")
    parser.add_argument("--scorers", default="entropy,gradient,magnitude,random")
    parser.add_argument("--prune-strategy", default="global")
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-eval-blocks", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fine-tune-steps", type=int, default=0, help="0: no fine-tuning arm")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring-quality.json"))
    args = parser.parse_args()

    import torch

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig, resolve_device
    from sentinel_core.data import batches, load_data
    from sentinel_core.evaluation import evaluate
    from sentinel_core.model_io import load_model

    _load_scorer_plugins()
    seeds = [int(s) for s in args.seeds.split(",")]
    percents = [float(p) for p in args.percents.split(",")]
    scorers = args.scorers.split(",")
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    data = load_data(args.data, tokenizer, block_size=args.block_size)
    eval_ids = data.validation.ids[: args.max_eval_blocks * args.block_size]

    def perplexity(m) -> float:
        return evaluate(m, eval_ids, block_size=args.block_size, batch_size=args.batch_size, device=device,
                        progress=False).perplexity

    def fine_tuned_perplexity(m, seed: int) -> float:
        """Train ``m`` for exactly --fine-tune-steps steps (no early stop), then evaluate it."""
        import tempfile

        from sentinel_core.training import train

        with tempfile.TemporaryDirectory() as tmp:
            config = ExperimentConfig(seed=seed, batch_size=args.batch_size, block_size=args.block_size,
                                      learning_rate=args.learning_rate, max_steps=args.fine_tune_steps,
                                      eval_every=args.fine_tune_steps, checkpoint_every=10**6, patience=0,
                                      max_eval_blocks=args.max_eval_blocks, device=device, quiet=True,
                                      output_dir=tmp)
            train(m, data, config, stage="fine_tune", resume=False)
        return perplexity(m)

    start = time.perf_counter()
    baseline = perplexity(model)
    tuning = args.fine_tune_steps > 0
    reference: list[float] = []
    tuned: dict[str, dict[str, list[float]]] = {s: {str(p): [] for p in percents} for s in scorers}
    runs: dict[str, dict[str, list[float]]] = {s: {str(p): [] for p in percents} for s in scorers}
    removed: dict[str, dict[str, list[int]]] = {s: {str(p): [] for p in percents} for s in scorers}
    for seed in seeds:
        if tuning:
            reference.append(fine_tuned_perplexity(copy.deepcopy(model), seed))
            print(f"seed {seed} unpruned, fine-tuned {args.fine_tune_steps} steps -> {reference[-1]:.2f}", flush=True)
        calibration = []
        for batch in batches(data.train.blocks, args.batch_size, shuffle=True, seed=seed):
            calibration.append(batch)
            if len(calibration) >= args.calibration_batches:
                break
        for scorer in scorers:
            config = ExperimentConfig(seed=seed, scorer=scorer, prune_strategy=args.prune_strategy,
                                      calibration_batches=args.calibration_batches, batch_size=args.batch_size)
            scores = plugins.score_heads(scorer, model=model, batches=calibration, config=config)
            for p in percents:
                pruned = copy.deepcopy(model)
                result = plugins.prune(args.prune_strategy, model=pruned, scores=scores,
                                     config=config.replace(pruning_percent=p))
                runs[scorer][str(p)].append(perplexity(pruned))
                removed[scorer][str(p)].append(result.count)
                if tuning:
                    tuned[scorer][str(p)].append(fine_tuned_perplexity(pruned, seed))
                del pruned
            print(f"seed {seed} {scorer}: " + ", ".join(f"{p:.0%} -> {runs[scorer][str(p)][-1]:.2f}" for p in percents),
                  flush=True)
            if tuning:
                print(f"seed {seed} {scorer} fine-tuned: "
                      + ", ".join(f"{p:.0%} -> {tuned[scorer][str(p)][-1]:.2f}" for p in percents), flush=True)

    print(f"\nvalidation perplexity, median of {len(seeds)} seeds ({args.prune_strategy}, no fine-tuning); "
          f"unpruned {baseline:.2f}")
    print(f"{'scorer':12} " + " ".join(f"{f'{p:.0%} removed':>14}" for p in percents))
    for scorer in scorers:
        print(f"{scorer:12} " + " ".join(f"{statistics.median(runs[scorer][str(p)]):14.2f}" for p in percents))
    if tuning:
        ref = statistics.median(reference)
        print(f"\nafter {args.fine_tune_steps} fine-tuning steps, median of {len(seeds)} seeds; "
              f"unpruned model fine-tuned the same: {ref:.2f}")
        print(f"{'scorer':12} " + " ".join(f"{f'{p:.0%} removed':>20}" for p in percents))
        for scorer in scorers:
            cells = []
            for p in percents:
                value = statistics.median(tuned[scorer][str(p)])
                cells.append(f"{value:10.2f} ({value / ref - 1:+6.1%})")
            print(f"{scorer:12} " + " ".join(f"{c:>20}" for c in cells))
    record = {
        "model": args.model, "data": args.data, "seeds": seeds, "prune_strategy": args.prune_strategy,
        "calibration_batches": args.calibration_batches, "batch_size": args.batch_size,
        "block_size": args.block_size, "eval_tokens": int(eval_ids.numel()), "baseline_perplexity": baseline,
        "perplexity": runs, "heads_removed": removed,
        "median_perplexity": {s: {p: statistics.median(v) for p, v in r.items()} for s, r in runs.items()},
        "fine_tune_steps": args.fine_tune_steps, "learning_rate": args.learning_rate,
        "reference_fine_tuned_perplexity": reference,
        "fine_tuned_perplexity": tuned if tuning else None,
        "median_fine_tuned_perplexity": {s: {p: statistics.median(v) for p, v in r.items()} for s, r in tuned.items()}
        if tuning else None,
        "seconds": time.perf_counter() - start, "torch": torch.__version__,
    }
    from sentinel_core.fileio import dumps_strict, write_text_atomic

    out = Path(args.out)
    write_text_atomic(out, dumps_strict(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
