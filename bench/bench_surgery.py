"""Latency and peak memory of physically removed vs masked attention heads (not a test).

Model: a distilgpt2-shaped GPT-2 (6 layers x 12 heads, d=768, vocab 50257, random weights,
float32, sdpa attention) in five variants: dense, 30% and 50% of all heads physically removed
(``prune_heads``), and the same heads masked (``mask_heads``). Inputs: batch 1 and 8 x
sequence 128 and 512, full forward including the lm_head over every position.

Method:
- Each variant lives in its own worker process (spawned, so every worker has a fresh
  allocator and its own ``ru_maxrss``); only one worker computes at a time.
- Latency: per input shape, every variant runs once to warm up, then ``--repeats`` timed
  forwards under ``torch.inference_mode``, interleaved across variants in a rotating order
  to spread machine drift evenly; the median is reported.
- Peak memory: during the warm-up forward, the rise of the resident-set high-water mark over
  the resident set just before it (the kernel's peak is reset through /proc/self/clear_refs;
  where that is refused, the ``ru_maxrss`` rise, shapes running in increasing size). Workers
  run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB so that large freed tensors leave the
  resident set instead of being recycled invisibly inside the heap. This is activation and
  logits memory; the weights are in the "params" column.
- Predicted speedup: dense FLOPs / variant FLOPs, counted analytically for the whole forward
  (see ``forward_flops``). Masked variants compute everything the dense one does, so their
  prediction is 1.0.

Usage: ``python bench/bench_surgery.py [--quick] [--repeats N] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

D_MODEL, N_LAYER, N_HEAD, VOCAB = 768, 6, 12, 50257
HEAD_DIM = D_MODEL // N_HEAD
FFN = 4 * D_MODEL
VARIANTS = ("dense", "pruned30", "masked30", "pruned50", "masked50")
SHAPES = ((1, 128), (1, 512), (8, 128), (8, 512))  # increasing activation memory
QUICK_SHAPES = ((1, 128), (8, 128))


def choose_heads(fraction: float, seed: int = 0) -> dict[int, list[int]]:
    """A seeded random ``fraction`` of all (layer, head) pairs: {layer: [heads]}."""
    pairs = [(layer, head) for layer in range(N_LAYER) for head in range(N_HEAD)]
    random.Random(seed).shuffle(pairs)
    chosen = pairs[: round(fraction * len(pairs))]
    out: dict[int, list[int]] = {}
    for layer, head in sorted(chosen):
        out.setdefault(layer, []).append(head)
    return out


def forward_flops(batch: int, seq: int, heads_per_layer: list[int]) -> int:
    """Multiply-add FLOPs (2 per MAC) of one full GPT-2 forward.

    Per layer with h heads of width hd, tokens n = batch*seq:
      qkv projection 2*n*d*(3*h*hd) + scores 2*batch*h*seq^2*hd + weighted values
      2*batch*h*seq^2*hd + output projection 2*n*(h*hd)*d + MLP 2*n*d*4d*2;
    plus the lm_head 2*n*d*V. Attention counts the full seq x seq matrix (what eager computes;
    a causal kernel may skip up to half of it). Layer norms, softmax, GELU, the gate multiply and
    embeddings are elementwise and left out.
    """
    n = batch * seq
    total = 2 * n * D_MODEL * VOCAB
    for h in heads_per_layer:
        width = h * HEAD_DIM
        total += 2 * n * D_MODEL * 3 * width
        total += 2 * 2 * batch * h * seq * seq * HEAD_DIM
        total += 2 * n * width * D_MODEL
        total += 2 * 2 * n * D_MODEL * FFN
    return total


def selection_for(variant: str) -> dict[int, list[int]]:
    return {} if variant == "dense" else choose_heads(int(variant[-2:]) / 100)


def heads_kept(variant: str) -> list[int]:
    if variant.startswith("pruned"):
        removed = selection_for(variant)
        return [N_HEAD - len(removed.get(layer, [])) for layer in range(N_LAYER)]
    return [N_HEAD] * N_LAYER


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    """Reset the kernel's resident high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _measure(model, ids) -> tuple[float, float, int | None]:
    """(wall seconds, process CPU seconds, resident peak rise in bytes or None)."""
    import torch

    exact = _reset_peak()
    before = _proc_status_kib("VmRSS") if exact else _maxrss_bytes()
    cpu = time.process_time()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(ids).logits
        elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    del out
    if exact:
        return elapsed, cpu, (_proc_status_kib("VmHWM") - before) * 1024
    after = _maxrss_bytes()
    # without a resettable peak only a new process-wide maximum is attributable to this call
    return elapsed, cpu, after - before if after > before else None


def worker(conn, variant: str, threads: int | None) -> None:  # runs in a spawned process
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from sentinel_core.surgery import mask_heads, prune_heads

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=D_MODEL, vocab_size=VOCAB, n_positions=1024)
    model = GPT2LMHeadModel(config).eval()
    selection = selection_for(variant)
    if variant.startswith("pruned"):
        prune_heads(model, selection)
    elif variant.startswith("masked"):
        mask_heads(model, selection)
    params = sum(p.numel() for p in model.parameters())
    with torch.inference_mode():
        model(torch.zeros(1, 8, dtype=torch.long))
    conn.send({"params": params, "threads": torch.get_num_threads(), "exact_peak": _reset_peak()})
    while True:
        message = conn.recv()
        if message is None:
            break
        batch, seq = message
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(batch * 1000 + seq))
        seconds, cpu, peak = _measure(model, ids)
        conn.send({"seconds": seconds, "cpu_seconds": cpu, "peak_rise": peak})
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 at sequence 128 only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per variant and shape (default 3)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: torch's choice); 1 makes CPU time a clean work measure",
    )
    parser.add_argument("--out", default="bench/results/bench_surgery.json")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    load_start = os.getloadavg()  # other processes on the machine skew wall-clock times

    import multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # read by glibc in each spawned worker
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = root + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, root)
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    workers = {}
    for variant in VARIANTS:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, variant, args.threads), daemon=True)
        proc.start()
        workers[variant] = (proc, parent)
    info = {v: conn.recv() for v, (_, conn) in workers.items()}
    print(
        f"workers ready in {time.perf_counter() - started:.0f}s; torch threads per worker: {info['dense']['threads']}"
    )

    def run(variant: str, shape: tuple[int, int]) -> dict:
        conn = workers[variant][1]
        conn.send(shape)
        return conn.recv()

    rows = []
    for batch, seq in shapes:
        first = {v: run(v, (batch, seq)) for v in VARIANTS}  # warm-up and memory
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(repeats):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                measured = run(v, (batch, seq))
                times[v].append(measured["seconds"])
                cpu[v].append(measured["cpu_seconds"])
        dense_time = statistics.median(times["dense"])
        dense_flops = forward_flops(batch, seq, heads_kept("dense"))
        for v in VARIANTS:
            median = statistics.median(times[v])
            flops = forward_flops(batch, seq, heads_kept(v))
            predicted = dense_flops / flops
            measured = dense_time / median
            rows.append(
                {
                    "batch": batch,
                    "seq": seq,
                    "variant": v,
                    "heads_kept": sum(heads_kept(v)) if v.startswith("pruned") else N_LAYER * N_HEAD,
                    "heads_active": N_LAYER * N_HEAD - sum(len(x) for x in selection_for(v).values()),
                    "params": info[v]["params"],
                    "gflops": flops / 1e9,
                    "median_ms": median * 1e3,
                    "all_ms": [t * 1e3 for t in times[v]],
                    "measured_speedup": measured,
                    "predicted_speedup": predicted,
                    "speedup_ratio": measured / predicted,
                    "saving_achieved": (1 - median / dense_time) / (1 - flops / dense_flops)
                    if flops < dense_flops
                    else None,
                    "overhead_vs_dense": median / dense_time - 1,
                    "peak_rise_mb": None if first[v]["peak_rise"] is None else first[v]["peak_rise"] / 2**20,
                    "median_cpu_s": statistics.median(cpu[v]),
                    "all_cpu_s": cpu[v],
                }
            )
        print(f"[{time.perf_counter() - started:.0f}s] batch {batch} seq {seq} done", flush=True)
    for proc, conn in workers.values():
        conn.send(None)
        proc.join(timeout=30)

    header = (
        "| batch | seq | variant | heads active | params M | GFLOP | median ms | speedup | predicted "
        "| measured/predicted | time vs dense | CPU-time speedup | peak rise MB |"
    )
    print(header)
    print("|" + "---|" * 13)
    for r in rows:
        peak = f"{r['peak_rise_mb']:.0f}" if r["peak_rise_mb"] is not None else "n/a"
        dense_cpu = next(
            x["median_cpu_s"] for x in rows if (x["batch"], x["seq"], x["variant"]) == (r["batch"], r["seq"], "dense")
        )
        print(
            f"| {r['batch']} | {r['seq']} | {r['variant']} | {r['heads_active']} | {r['params'] / 1e6:.1f} | "
            f"{r['gflops']:.1f} | {r['median_ms']:.0f} | {r['measured_speedup']:.3f} | {r['predicted_speedup']:.3f} | "
            f"{r['speedup_ratio']:.3f} | {r['overhead_vs_dense']:+.1%} | {dense_cpu / r['median_cpu_s']:.3f} | {peak} |"
        )
    pruned = [r for r in rows if r["variant"].startswith("pruned")]
    masked = [r for r in rows if r["variant"].startswith("masked")]
    for r in rows:
        dense_cpu = next(
            x["median_cpu_s"] for x in rows if (x["batch"], x["seq"], x["variant"]) == (r["batch"], r["seq"], "dense")
        )
        r["cpu_speedup"] = dense_cpu / r["median_cpu_s"]
        r["cpu_speedup_ratio"] = r["cpu_speedup"] / r["predicted_speedup"]
    summary = {
        "pruned_cpu_speedup_ratio_min": min(r["cpu_speedup_ratio"] for r in pruned),
        "masked_cpu_overhead_max": max(1 / r["cpu_speedup"] - 1 for r in masked),
        "pruned_speedup_ratio_min": min(r["speedup_ratio"] for r in pruned),
        "pruned_saving_achieved_min": min(r["saving_achieved"] for r in pruned),
        "masked_overhead_max": max(r["overhead_vs_dense"] for r in masked),
        "goal_speedup_ratio_met": all(r["speedup_ratio"] >= 0.9 for r in pruned),
        "goal_mask_overhead_met": all(r["overhead_vs_dense"] <= 0.05 for r in masked),
    }
    print(json.dumps(summary, indent=2))
    result = {
        "benchmark": "bench_surgery",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "repeats": repeats,
        "threads_per_worker": info["dense"]["threads"],
        "peak_method": "VmHWM after clear_refs" if info["dense"]["exact_peak"] else "ru_maxrss rise",
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_seconds": time.perf_counter() - started,
        "pruned_heads": {v: selection_for(v) for v in ("pruned30", "pruned50")},
        "rows": rows,
        "summary": summary,
    }
    from sentinel_core.fileio import dumps_strict, write_text_atomic

    out = Path(args.out)
    write_text_atomic(out, dumps_strict(result, indent=2) + "\n")
    print(f"wrote {out} in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
