"""Head growth: prune 50% then grow back to 30% pruned, against pruning straight to 30%, equal training.

Arms, each from a fresh copy of the model, scored once by ``--scorer`` (global selection,
physical removal):

- ``prune 30%``: prune 30% of the original heads, fine-tune ``--steps`` steps;
- ``50% -> grow <strategy> -> 30%``: prune 50%, fine-tune ``steps // 2``, grow 20% of the
  original heads back with the strategy, fine-tune ``steps - steps // 2``.

Every arm ends with the same number of heads and has taken the same number of optimizer steps
(``--fine-tuner``, default ``plain``: AdamW, warm-up then cosine, ``--learning-rate``;
``adaptive`` gives touched layers and grown heads their boosts). The table gives
held-out perplexity (the first ``--max-eval-blocks`` blocks of the validation split) after
each phase, and the test split's when the data has one; per-seed values and timings go to the
JSON file.

    python bench/bench_growth.py [--model PATH] [--data SPEC] [--steps 200]
        [--strategies gradient,entropy-gap,balanced,random] [--seeds 0] [--fine-tuner plain]
        [--out bench/results/growth.json]

Without ``--model`` the demo model is used (built on first use, several minutes), with
``--data demo``. ``--model`` is anything ``sentinel_core.load_model`` opens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "sentinel-growth"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

STRAIGHT = "prune 30%"


def _load_growth_plugin() -> None:
    """Load the installed plugins; register the in-tree growth plugin if it is not installed."""
    from sentinel_core.plugins import available_strategies, load_plugins, pm

    load_plugins()
    if "gradient" not in available_strategies("grow_heads"):
        import sentinel_growth

        pm.register(sentinel_growth, name="growth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the demo model")
    parser.add_argument("--data", default="demo")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per arm, in total")
    parser.add_argument("--strategies", default="gradient,entropy-gap,balanced,random")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--scorer", default="gradient")
    parser.add_argument("--prune-from", type=float, default=0.5)
    parser.add_argument("--prune-to", type=float, default=0.3)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--fine-tuner", default="plain",
                        help="the fine_tune strategy every arm trains with (e.g. adaptive, from sentinel-adaptive)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--max-eval-blocks", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "growth.json"))
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (both fine-tuning phases of a growth arm need a step)")
    if not 0 < args.prune_to < args.prune_from < 1:
        parser.error("need 0 < --prune-to < --prune-from < 1")

    import torch

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig, resolve_device
    from sentinel_core.data import batches, load_data
    from sentinel_core.evaluation import evaluate
    from sentinel_core.model_io import load_model
    from sentinel_core.surgery import get_head_map

    _load_growth_plugin()
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = [s for s in args.strategies.split(",") if s]
    device = resolve_device(args.device)
    model_path = args.model
    if model_path is None:
        from sentinel_core.demo import ensure_demo_model

        model_path = str(ensure_demo_model())
    model, tokenizer = load_model(model_path, device=device)
    data = load_data(args.data, tokenizer, block_size=args.block_size)
    eval_ids = data.validation.ids[: args.max_eval_blocks * args.block_size]
    test_ids = data.test.ids[: args.max_eval_blocks * args.block_size] if data.test is not None else None

    def perplexity(m, ids=eval_ids) -> float:
        return evaluate(m, ids, block_size=args.block_size, batch_size=args.batch_size, device=device,
                        progress=False).perplexity

    def heads(m) -> int:
        hm = get_head_map(m)
        return sum(len(hm.active(layer)) for layer in range(hm.num_layers))

    first, second = args.steps // 2, args.steps - args.steps // 2
    grow_percent = round(args.prune_from - args.prune_to, 6)
    start = time.perf_counter()
    baseline = perplexity(model)
    arms = [STRAIGHT] + [f"grow {s}" for s in strategies]
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="bench-growth-") as workdir:
        for seed in seeds:
            config = ExperimentConfig(
                seed=seed, scorer=args.scorer, learning_rate=args.learning_rate, batch_size=args.batch_size,
                block_size=args.block_size, calibration_batches=args.calibration_batches,
                max_eval_blocks=args.max_eval_blocks, eval_every=10**9, checkpoint_every=10**9, patience=0,
                quiet=True, device=args.device, pruning_percent=args.prune_from,
                growth_percent=grow_percent if strategies else 0.0,
                growth_strategy=strategies[0] if strategies else None,
            )
            calibration = []
            for batch in batches(data.train.blocks, args.batch_size, shuffle=True, seed=seed):
                calibration.append(batch)
                if len(calibration) >= args.calibration_batches:
                    break
            scores = plugins.score_heads(args.scorer, model=model, batches=calibration, config=config)

            def fine_tune(m, steps: int, stage: str, arm: str, config=config, seed=seed):
                out = Path(workdir) / f"{arm.replace(' ', '_').replace('%', '')}-{seed}"
                cfg = config.replace(max_steps=steps, output_dir=str(out))
                return plugins.fine_tune(args.fine_tuner, model=m, tokenizer=tokenizer, data=data, config=cfg, stage=stage)

            # Straight to the target.
            t0 = time.perf_counter()
            m = copy.deepcopy(model)
            plugins.prune("global", model=m, scores=scores, config=config.replace(pruning_percent=args.prune_to,
                                                                                growth_percent=0.0))
            record = {"pruned": perplexity(m), "heads": None}
            fine_tune(m, args.steps, "fine_tune", STRAIGHT)
            record.update(final=perplexity(m), heads=heads(m), seconds=time.perf_counter() - t0)
            if test_ids is not None:
                record["test"] = perplexity(m, test_ids)
            runs[STRAIGHT].append(record)
            print(f"seed {seed} {STRAIGHT}: {record['final']:.2f}", flush=True)
            del m

            for strategy in strategies:
                arm = f"grow {strategy}"
                t0 = time.perf_counter()
                m = copy.deepcopy(model)
                plugins.prune("global", model=m, scores=scores, config=config)
                record = {"pruned": perplexity(m)}
                fine_tune(m, first, "fine_tune", arm)
                record["tuned"] = perplexity(m)
                grown = plugins.grow_heads(strategy, model=m, data=data,
                                         config=config.replace(growth_strategy=strategy))
                m.to(device)
                record.update(grown=perplexity(m), per_layer=grown.extra.get("per_layer"))
                fine_tune(m, second, "fine_tune_growth", arm)
                record.update(final=perplexity(m), heads=heads(m), seconds=time.perf_counter() - t0)
                if test_ids is not None:
                    record["test"] = perplexity(m, test_ids)
                runs[arm].append(record)
                print(f"seed {seed} {arm}: {record['final']:.2f} (per layer {record['per_layer']})", flush=True)
                del m

    def median(arm: str, key: str) -> float | None:
        values = [r[key] for r in runs[arm] if r.get(key) is not None]
        return statistics.median(values) if values else None

    def cell(value: float | None) -> str:
        return f"{value:10.2f}" if value is not None else f"{'-':>10}"

    print(f"\nvalidation perplexity, median of {len(seeds)} seed(s); unpruned {baseline:.2f}; "
          f"{args.steps} optimizer steps per arm")
    print(f"{'arm':22} {'heads':>5} {'pruned':>10} {'tuned':>10} {'grown':>10} {'final':>10} {'test':>10}")
    for arm in arms:
        print(f"{arm:22} {runs[arm][0]['heads']:5d} " + " ".join(
            cell(median(arm, key)) for key in ("pruned", "tuned", "grown", "final", "test")))
    record = {
        "model": model_path, "data": args.data, "seeds": seeds, "scorer": args.scorer, "steps": args.steps,
        "prune_from": args.prune_from, "prune_to": args.prune_to, "learning_rate": args.learning_rate,
        "fine_tuner": args.fine_tuner,
        "batch_size": args.batch_size, "block_size": args.block_size, "eval_tokens": int(eval_ids.numel()),
        "baseline_perplexity": baseline, "runs": runs,
        "median_final_perplexity": {arm: median(arm, "final") for arm in arms},
        "seconds": time.perf_counter() - start, "torch": torch.__version__, "device": device,
    }
    from sentinel_core.fileio import dumps_strict, write_text_atomic

    out = Path(args.out)
    write_text_atomic(out, dumps_strict(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
