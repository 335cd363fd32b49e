"""Fine-tuning throughput: ``sentinel_core.training.train`` against a bare PyTorch loop.

Both train the same small GPT-2 (default 6 layers x 8 heads, n_embd 256, vocab 8000) on the same
random token blocks (batch 8 x 128) with the same recipe: AdamW (no decay on 1-D parameters),
HF's warm-up + cosine schedule, gradient clipping at 1.0. The bare loop has nothing else: no
Accelerate, no loss check, no metrics, no evaluation, no checkpoints.

What is timed, in both: the optimizer steps after ``--warmup-steps`` untimed ones, from the end of
the last untimed step to the end of the last step (``train`` is timed from its own per-step metric
events, so its evaluation at step 0, its start-of-stage checkpoint and its end-of-stage work fall
outside the window; they are reported separately as whole-call seconds). Runs alternate between
the two loops (and which one goes first) and the median of ``--repeats`` runs is reported, as
tokens per wall-clock second and per CPU second of the process (the steadier figure on a shared
machine; use ``--threads 1`` there).

``--host-sync`` adds a third arm: ``train`` as it was before the deferred step
(``sentinel_core.training.deferred_step``): the loss and gradient norm read back and the skip
decided on the host every step, foreach AdamW on the CPU. Every arm also reports CPU
milliseconds per step (process time).

Usage: python bench/bench_finetune.py [--steps 20] [--repeats 3] [--device cpu] [--host-sync] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup  # noqa: E402

from sentinel_core.config import ExperimentConfig, resolve_device  # noqa: E402
from sentinel_core.data import LMData, TokenSplit  # noqa: E402
from sentinel_core.fileio import dumps_strict, write_text_atomic  # noqa: E402
from sentinel_core.hookspecs import hookimpl  # noqa: E402
from sentinel_core.plugins import pm  # noqa: E402
from sentinel_core.training import deferred_step, resolve_mixed_precision, train  # noqa: E402


def build_model(args) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_head=args.heads, n_embd=args.embd, vocab_size=args.vocab,
                        n_positions=args.block, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def build_data(args, steps: int) -> LMData:
    generator = torch.Generator().manual_seed(1)
    train_blocks = torch.randint(0, args.vocab, (args.batch * steps, args.block), generator=generator)
    val_blocks = torch.randint(0, args.vocab, (1, args.block), generator=generator)
    return LMData(train=TokenSplit(train_blocks.reshape(-1), train_blocks),
                  validation=TokenSplit(val_blocks.reshape(-1), val_blocks), test=None, block_size=args.block,
                  source="random", validation_from_train=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(args, data: LMData, total: int, device: torch.device, precision: str) -> tuple[float, float]:
    """Tokens per wall second and per CPU second of the timed steps of a minimal loop, same recipe."""
    model = build_model(args).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, fused=(device.type == "cuda") or None)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(0.1 * total), total)
    order = torch.randperm(data.train.blocks.shape[0], generator=torch.Generator().manual_seed(0))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    start = cpu_start = 0.0
    for step in range(total):
        if step == args.warmup_steps:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
        ids = data.train.blocks[order[step * args.batch:(step + 1) * args.batch]].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    tokens = (total - args.warmup_steps) * args.batch * args.block
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu_start)


class StepTimes:
    def __init__(self) -> None:
        self.times: dict[int, tuple[float, float]] = {}

    @hookimpl
    def on_metric(self, event):
        if event.stage == "bench" and "loss" in event.values:
            self.times[event.step] = (time.perf_counter(), time.process_time())


def sentinel_loop(args, data: LMData, total: int, device: str, host_sync: bool = False) -> tuple[float, float, float]:
    """Tokens per wall second and per CPU second of ``train``'s timed steps, and the wall seconds of
    the whole call (set-up, evaluations and checkpoints included). ``host_sync``: the loop as it
    was, reading the step back every step."""
    deferred_step.HOST_SYNC_EVERY_STEP = host_sync
    model = build_model(args)
    with tempfile.TemporaryDirectory() as out:
        config = ExperimentConfig(device=device, batch_size=args.batch, learning_rate=args.lr, num_epochs=1,
                                  eval_every=10**6, max_eval_blocks=1, checkpoint_every=10**6, patience=0,
                                  warmup_fraction=0.1, output_dir=out, quiet=True, seed=0,
                                  mixed_precision=args.mixed_precision)
        times = StepTimes()
        pm.register(times)
        try:
            start = time.perf_counter()
            train(model, data, config, stage="bench", resume=False)
            whole = time.perf_counter() - start
        finally:
            pm.unregister(times)
            deferred_step.HOST_SYNC_EVERY_STEP = False
    # Step event k is emitted once step k's numbers are read: right after optimizer step k with
    # host_sync; otherwise inside step k + 1, after its forward and backward, or at the end of
    # the stage for the last step: the window then spans the same number of steps.
    (end, cpu_end), (begin, cpu_begin) = times.times[total], times.times[args.warmup_steps]
    tokens = (total - args.warmup_steps) * args.batch * args.block
    return tokens / (end - begin), tokens / (cpu_end - cpu_begin), whole


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main() -> None:
    def cpu_ms(per_cpu_second: list[float]) -> float:
        """Median CPU milliseconds per step, from tokens per CPU second."""
        return 1000 * args.batch * args.block / statistics.median(per_cpu_second)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per run")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--embd", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    parser.add_argument("--host-sync", action="store_true",
                        help="also time train() reading the step back every step (the loop before the deferred step)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_finetune.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = resolve_device(args.device)
    precision = resolve_mixed_precision(args.mixed_precision, device_name)
    device = torch.device(device_name)
    total = args.steps + args.warmup_steps
    data = build_data(args, total)
    load_before = _load()
    bare, ours, bare_cpu, ours_cpu, whole = [], [], [], [], []
    synced, synced_cpu = [], []
    arms = ["bare", "train", *(["host_sync"] if args.host_sync else [])]
    for repeat in range(args.repeats):
        # Rotate which loop goes first, so a drift in machine load does not favour one of them.
        for which in arms[repeat % len(arms):] + arms[:repeat % len(arms)]:
            if which == "bare":
                wall, cpu = bare_loop(args, data, total, device, precision)
                bare.append(wall)
                bare_cpu.append(cpu)
            elif which == "train":
                wall, cpu, seconds = sentinel_loop(args, data, total, device_name)
                ours.append(wall)
                ours_cpu.append(cpu)
                whole.append(seconds)
            else:
                wall, cpu, _ = sentinel_loop(args, data, total, device_name, host_sync=True)
                synced.append(wall)
                synced_cpu.append(cpu)
        extra = f"   host-sync train() {synced[-1]:8.0f} tok/s ({synced_cpu[-1]:.0f} per CPU-s)" if synced else ""
        print(f"repeat {repeat + 1}: bare {bare[-1]:8.0f} tok/s ({bare_cpu[-1]:.0f} per CPU-s)   "
              f"train() {ours[-1]:8.0f} tok/s ({ours_cpu[-1]:.0f} per CPU-s){extra}   "
              f"(whole train() call {whole[-1]:.2f} s)", flush=True)
    bare_median, ours_median = statistics.median(bare), statistics.median(ours)
    ratio = ours_median / bare_median
    cpu_ratio = statistics.median(ours_cpu) / statistics.median(bare_cpu)
    ratios = [o / b for o, b in zip(ours, bare, strict=True)]
    model = build_model(args)
    record = {
        "benchmark": "bench_finetune",
        "model": {"layers": args.layers, "heads": args.heads, "n_embd": args.embd, "vocab": args.vocab,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "batch": [args.batch, args.block], "timed_steps": args.steps, "untimed_steps": args.warmup_steps,
        "repeats": args.repeats, "device": device_name, "mixed_precision": precision,
        "torch_threads": torch.get_num_threads(), "load_average_1min": {"before": load_before, "after": _load()},
        "tokens_per_second": {"bare_loop": bare, "train": ours},
        "tokens_per_cpu_second": {"bare_loop": bare_cpu, "train": ours_cpu},
        "median_tokens_per_second": {"bare_loop": bare_median, "train": ours_median},
        "ratio_train_over_bare": ratio, "ratio_per_repeat": ratios, "cpu_ratio_train_over_bare": cpu_ratio,
        "train_call_seconds": whole,
        "cpu_ms_per_step": {"bare_loop": cpu_ms(bare_cpu), "train": cpu_ms(ours_cpu),
                            **({"train_host_sync": cpu_ms(synced_cpu)} if synced else {})},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
    }
    print()
    print("| loop | median tokens/s | median tokens per CPU-s | runs (tokens/s) |")
    print("|---|---|---|---|")
    print(f"| bare PyTorch | {bare_median:.0f} | {statistics.median(bare_cpu):.0f} | "
          f"{', '.join(f'{v:.0f}' for v in bare)} |")
    print(f"| sentinel train() | {ours_median:.0f} | {statistics.median(ours_cpu):.0f} | "
          f"{', '.join(f'{v:.0f}' for v in ours)} |")
    if synced:
        record["tokens_per_second"]["train_host_sync"] = synced
        record["tokens_per_cpu_second"]["train_host_sync"] = synced_cpu
        record["median_tokens_per_second"]["train_host_sync"] = statistics.median(synced)
        record["ratio_host_sync_over_bare"] = statistics.median(synced) / bare_median
        record["cpu_ratio_host_sync_over_bare"] = statistics.median(synced_cpu) / statistics.median(bare_cpu)
        print(f"| train(), host sync every step | {statistics.median(synced):.0f} | "
              f"{statistics.median(synced_cpu):.0f} | {', '.join(f'{v:.0f}' for v in synced)} |")
    print("CPU ms per step (median): " + ", ".join(f"{k} {v:.1f}" for k, v in record["cpu_ms_per_step"].items()))
    print(f"train()/bare: {ratio:.3f} wall (per repeat {', '.join(f'{r:.2f}' for r in ratios)}), "
          f"{cpu_ratio:.3f} CPU; goal >= 0.95. {device_name}, mixed precision {precision}, "
          f"{torch.get_num_threads()} thread(s), load average {load_before} -> {_load()}")
    out = Path(args.out)
    write_text_atomic(out, dumps_strict(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
