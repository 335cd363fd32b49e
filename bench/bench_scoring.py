"""Head-importance scoring: throughput against a plain forward pass, and peak memory vs. batch count.

(a) Throughput: entropy, gradient and magnitude scoring of a randomly initialised GPT-2
    (6 layers x 8 heads, n_embd 256, vocab 8000) on batches of 8 x 128 tokens, against an eager
    forward pass of the whole LM over the same tokens (and of the base model, without the LM
    head, since that is what the entropy scorer runs). Every round times each row once, in
    rotating order; each row's time is divided into the eager forward's time of the same round,
    and the median and quartiles of those ratios over --repeats rounds are reported, for wall
    time and for the process's CPU time (all threads), which other processes' load disturbs less.
(b) Memory: peak RSS growth while scoring 2, 8 and 32 batches (of --memory-batch-size x 128
    tokens), each in a fresh subprocess
    (the peak is reset through /proc/self/clear_refs just before scoring, so model
    construction does not count). Flat = the scorer keeps nothing per batch. For contrast,
    the same entropy computed from ``output_attentions=True`` (every layer's maps alive until
    the forward ends) is measured too.

    python bench/bench_scoring.py [--batches 1] [--repeats 11] [--threads N] [--skip-memory | --skip-throughput]
                                  [--out bench/results/scoring.json]

Ratios are within one run on one machine; absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "sentinel-entropy", ROOT / "plugins" / "sentinel-magnitude"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402

MODEL_SHAPE = dict(n_layer=6, n_head=8, n_embd=256, vocab_size=8000, n_positions=128)
BATCH, SEQ = 8, 128


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**MODEL_SHAPE, bos_token_id=0, eos_token_id=0)).eval()
    return model


def make_batches(n: int, seed: int = 0, batch_size: int = BATCH) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, MODEL_SHAPE["vocab_size"], (batch_size, SEQ), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def forward_pass(model, batches, *, base_only: bool = False, impl: str = "eager") -> None:
    original = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        runner = model.base_model if base_only else model
        with torch.inference_mode():
            for batch in batches:
                runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        model.set_attn_implementation(original)


def entropy_via_output_attentions(model, batches) -> torch.Tensor:
    """The same statistic the entropy plugin computes, from maps the model returns (for contrast)."""
    from sentinel_entropy import allowed_key_counts, normalized_entropy_sums

    original = model.config._attn_implementation
    model.set_attn_implementation("eager")
    sums, count = None, 0
    try:
        with torch.inference_mode():
            for batch in batches:
                out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_attentions=True, use_cache=False)
                per_layer = []
                for att in out.attentions:
                    allowed = allowed_key_counts(att.shape, None, batch["attention_mask"])
                    s, count_b = normalized_entropy_sums(att, batch["attention_mask"], allowed)
                    per_layer.append(s)
                count += count_b
                stacked = torch.stack(per_layer)
                sums = stacked if sums is None else sums + stacked
    finally:
        model.set_attn_implementation(original)
    return 1 - sums / count


def run_scorer(name: str, model, batches):
    if name == "entropy":
        from sentinel_entropy import entropy_scores

        return entropy_scores(model, batches)
    if name == "gradient":
        from sentinel_core.strategies.gradient_scorer import gradient_scores

        return gradient_scores(model, batches)
    if name == "magnitude":
        from sentinel_magnitude import magnitude_scores

        return magnitude_scores(model)
    if name == "entropy-output_attentions":
        return entropy_via_output_attentions(model, batches)
    raise ValueError(name)


# ---------------------------------------------------------------- (a) throughput


def throughput(n_batches: int, repeats: int) -> dict:
    model = build_model()
    batches = make_batches(n_batches)
    tokens = n_batches * BATCH * SEQ
    rows = {
        "forward (eager, full LM)": lambda: forward_pass(model, batches),
        "forward (eager, base model)": lambda: forward_pass(model, batches, base_only=True),
        "forward (sdpa, full LM)": lambda: forward_pass(model, batches, impl="sdpa"),
        "entropy": lambda: run_scorer("entropy", model, batches),
        "gradient": lambda: run_scorer("gradient", model, batches),
        "magnitude": lambda: run_scorer("magnitude", model, batches),
    }
    for fn in rows.values():  # warm-up: first-call allocations and lazy imports
        fn()
    names = list(rows)
    wall: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for round_index in range(repeats):
        # Rotate the order so that no row always runs right after a particular other one.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start, start_cpu = time.perf_counter(), time.process_time()
            rows[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    # Other processes' load drifts from second to second, so each row is compared with the
    # eager forward pass of the same round and the per-round ratios are summarised (median and
    # quartiles). CPU time (all threads of this process) is steadier than wall time there.
    base = "forward (eager, full LM)"
    result = {}
    for name in rows:
        uses_tokens = name != "magnitude"
        entry = {
            "median_seconds": statistics.median(wall[name]),
            "best_seconds": min(wall[name]),
            "median_cpu_seconds": statistics.median(cpu[name]),
            "tokens_per_second": tokens / statistics.median(wall[name]) if uses_tokens else None,
            "all_seconds": wall[name],
            "all_cpu_seconds": cpu[name],
        }
        if uses_tokens:
            for key, series in (("wall", wall), ("cpu", cpu)):
                ratios = [b / t for b, t in zip(series[base], series[name], strict=True)]
                q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
                entry[f"{key}_ratio_vs_eager_forward"] = {"median": statistics.median(ratios), "q1": q1, "q3": q3}
        result[name] = entry
    return {"tokens": tokens, "batches": n_batches, "repeats": repeats, "rows": result}


# ---------------------------------------------------------------- (b) memory


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(scorer: str, n_batches: int, batch_size: int) -> dict:
    model = build_model()
    batches = make_batches(n_batches, batch_size=batch_size)
    run_scorer(scorer, model, batches[:1])  # warm-up, so one-off allocations are not counted
    import gc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kb("VmRSS")
    start = time.perf_counter()
    run_scorer(scorer, model, batches)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_growth_mib": (peak - before) / 1024, "seconds": seconds}


def memory(counts: list[int], scorers: list[str], batch_size: int) -> dict:
    out: dict[str, dict[str, dict]] = {}
    for scorer in scorers:
        out[scorer] = {}
        for n in counts:
            proc = subprocess.run([sys.executable, __file__, "--memory-child", scorer, str(n), str(batch_size)],
                                  capture_output=True, text=True, check=True)
            out[scorer][str(n)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------- report


def print_report(results: dict) -> None:
    tp = results.get("throughput")
    if tp:
        print_throughput(results, tp)
    mem = results.get("memory")
    if mem:
        counts = list(next(iter(mem.values())))
        print(f"\n(b) peak RSS growth while scoring (MiB), batches of {results['memory_batch']}x{SEQ}, "
              "fresh process per cell")
        print(f"{'scorer':28} " + " ".join(f"{c + ' batches':>12}" for c in counts))
        for scorer, cells in mem.items():
            print(f"{scorer:28} " + " ".join(f"{cells[c]['peak_growth_mib']:12.1f}" for c in counts))


def print_throughput(results: dict, tp: dict) -> None:
    print(f"(a) throughput: {tp['batches']} batch(es) of {BATCH}x{SEQ} = {tp['tokens']} tokens per run, "
          f"{tp['repeats']} rounds, torch threads {results['threads']}")
    print("throughput relative to the eager full-LM forward of the same round: median [quartiles]")
    print(f"{'what':28} {'median s':>9} {'tokens/s':>9} {'wall ratio':>22} {'CPU-time ratio':>22}")
    for name, row in tp["rows"].items():
        tps = f"{row['tokens_per_second']:.0f}" if row["tokens_per_second"] else "-"
        cells = []
        for key in ("wall", "cpu"):
            r = row.get(f"{key}_ratio_vs_eager_forward")
            cells.append(f"{r['median']:.2f}x [{r['q1']:.2f}-{r['q3']:.2f}]" if r else "-")
        print(f"{name:28} {row['median_seconds']:9.3f} {tps:>9} {cells[0]:>22} {cells[1]:>22}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1, help="batches per throughput run")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--memory-batches", default="2,8,32")
    parser.add_argument("--memory-batch-size", type=int, default=1,
                        help="sequences per batch in the memory runs (kept small so 32 batches stay quick)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scoring.json"))
    parser.add_argument("--memory-child", nargs=3, metavar=("SCORER", "N", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        scorer, n, batch_size = args.memory_child
        print(json.dumps(memory_child(scorer, int(n), int(batch_size))))
        return
    import platform

    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)

    results = {
        "model": MODEL_SHAPE,
        "batch": [BATCH, SEQ],
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    if not args.skip_throughput:
        results["throughput"] = throughput(args.batches, args.repeats)
    if not args.skip_memory:
        counts = [int(c) for c in args.memory_batches.split(",")]
        results["memory_batch"] = args.memory_batch_size
        results["memory"] = memory(counts, ["entropy", "gradient", "entropy-output_attentions"], args.memory_batch_size)
    print_report(results)
    from sentinel_core.fileio import dumps_strict, write_text_atomic

    out = Path(args.out)
    write_text_atomic(out, dumps_strict(results, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
