"""GQA-aware pruning: speed and memory with random weights, and quality on demo-llama.

    python bench/bench_gqa.py speed [--shape cpu|llama-1b] [--device cpu|cuda] [--repeats 3]
        [--out bench/results/gqa-speed.json]
    python bench/bench_gqa.py quality [--steps 100] [--max-test-blocks 256] [--scorers gradient,magnitude]
        [--out bench/results/gqa-quality.json]

**speed.** A LLaMA with random weights and Llama-3.2-1B's head structure (32 query heads of width
64 in 8 key/value groups): ``--shape llama-1b`` is that model (16 layers, d 2048, MLP 8192, vocab
128256, bf16; for a GPU), ``--shape cpu`` a scaled-down one (4 layers, d 1024, MLP 2816, vocab
8192, float32) that runs in minutes on 2 CPU cores. Variants: dense; ``kv-groups`` 25% and 50%;
``per-group`` 25% and 50%; ``global`` 30% (the heads chosen by the seeded ``random`` scorer:
speed does not depend on which heads go, only on how many slots and groups are left). Each
variant is measured as Sentinel's compact model and as its stock export
(``sentinel_core.export``, reloaded with plain ``from_pretrained``). Per model:

- parameters;
- KV-cache bytes at batch 8 x (512 prompt + 128 new tokens), computed from the shapes and
  measured from the real cache after decoding (the key and value tensors' bytes);
- prefill latency: one forward over 1 x 512 tokens (``--prefill-batch``), median and spread
  of ``--repeats`` interleaved repeats (speedups: the median of each repeat's ratio to the dense
  model of the same repeat, in wall-clock and in process CPU time), and the FLOP prediction (dense FLOPs / variant FLOPs,
  counted from the slots the model really computes, dead and padded ones included);
- decode tokens/s: 128 greedy steps at batch 8 after a 512-token prompt (the prefill is done
  once and its cache copied for each repeat), and the prediction from the bytes each step
  moves (every weight once plus the KV cache read at the mean length).

Repeats rotate the order of the models, so drift in the machine's load spreads over all;
speedups are the median of each repeat's ratio to the dense model of the same repeat.

**quality.** The demo-llama model (``--model demo-llama``; built on first use) on the demo
corpus: for each scorer (gradient, magnitude), strategy (``kv-groups``, ``per-group``,
``global``) and fraction (25%, 50%), a fresh copy is pruned (physical removal), evaluated
(validation: the first ``--max-eval-blocks`` blocks; test: the first ``--max-test-blocks``
blocks of the test split, by default all of it), fine-tuned
``--steps`` steps with ``sentinel_core.training.train`` (the same recipe and seed for every arm;
keep-best on the validation blocks, never on test), and evaluated again. The KV cache each arm
keeps is counted from its shapes.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "sentinel-magnitude"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

SHAPES = {
    "cpu": dict(num_hidden_layers=4, hidden_size=1024, intermediate_size=2816, vocab_size=8192, dtype="float32"),
    "llama-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, vocab_size=128256,
                     dtype="bfloat16"),
}
HEADS = dict(num_attention_heads=32, num_key_value_heads=8, head_dim=64)
VARIANTS = [("dense", None, 0.0), ("kv-groups 25%", "kv-groups", 0.25), ("kv-groups 50%", "kv-groups", 0.5),
            ("per-group 25%", "per-group", 0.25), ("per-group 50%", "per-group", 0.5), ("global 30%", "global", 0.3)]


def _load_plugins() -> None:
    import importlib

    from sentinel_core.plugins import available_strategies, load_plugins, pm

    load_plugins()
    if "magnitude" not in available_strategies("score_heads"):
        pm.register(importlib.import_module("sentinel_magnitude"), name="magnitude")


def _machine() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


# ---------------------------------------------------------------- sizes and predictions


def kv_slots(model) -> list[int]:
    return [layer.self_attn.k_proj.weight.shape[0] // layer.self_attn.head_dim for layer in model.model.layers]


def q_slots(model) -> list[int]:
    return [layer.self_attn.q_proj.weight.shape[0] // layer.self_attn.head_dim for layer in model.model.layers]


def kv_bytes(model, batch: int, tokens: int) -> int:
    head_dim = model.model.layers[0].self_attn.head_dim
    element = next(model.parameters()).element_size()
    return batch * tokens * sum(kv_slots(model)) * 2 * head_dim * element


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def prefill_flops(model, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward: projections, MLP, lm_head, and the full seq x seq attention."""
    c = model.config
    d, hd, n = c.hidden_size, model.model.layers[0].self_attn.head_dim, batch * seq
    flops = 2.0 * n * d * c.vocab_size
    for q, kv in zip(q_slots(model), kv_slots(model), strict=True):
        flops += 2.0 * n * d * (q + 2 * kv) * hd + 2.0 * n * q * hd * d  # q, k, v, o
        flops += 2.0 * 2 * batch * q * seq * seq * hd  # scores and weighted values
        flops += 2.0 * 3 * n * d * c.intermediate_size  # SwiGLU
    return flops


def decode_bytes_per_step(model, batch: int, mean_length: float) -> float:
    """Bytes one decode step moves: every weight once, plus the KV cache read at ``mean_length``."""
    return weight_bytes(model) + kv_bytes(model, batch, 1) * mean_length


# ---------------------------------------------------------------- speed


def build_variants(shape: str, device: str, workdir: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.evaluation import count_parameters
    from sentinel_core.export import export_model

    spec = dict(SHAPES[shape])
    dtype = getattr(torch, spec.pop("dtype"))
    config = LlamaConfig(**spec, **HEADS, max_position_embeddings=1024, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(dtype).eval()
    models = []
    for name, strategy, percent in VARIANTS:
        compact = copy.deepcopy(base)
        if strategy:
            cfg = ExperimentConfig(pruning_percent=percent, prune_strategy=strategy, scorer="random", seed=0)
            scores = plugins.score_heads("random", model=compact, batches=[], config=cfg)
            plugins.prune(strategy, model=compact, scores=scores, config=cfg)
        report = export_model(compact, None, workdir / name.replace(" ", "-").replace("%", ""))
        stock = AutoModelForCausalLM.from_pretrained(report.path, dtype=dtype, attn_implementation="sdpa").eval()
        for form, model in (("compact", compact), ("export", stock)):
            models.append({"variant": name, "form": form, "model": model.to(device),
                           "parameters": count_parameters(model)["total"], "query_slots": sum(q_slots(model)),
                           "kv_slots": sum(kv_slots(model)), "architecture": type(model).__name__,
                           "export_notes": report.notes if form == "export" else []})
    del base
    return models


def run_speed(args) -> dict:
    import torch
    from transformers import DynamicCache

    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    prompt, new, batch = args.prompt, args.new_tokens, args.batch
    workdir = Path(tempfile.mkdtemp(prefix="bench-gqa-"))
    machine_before = _machine()
    models = build_variants(args.shape, device, workdir)
    vocab = models[0]["model"].config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(1, vocab, (batch, prompt), generator=g).to(device)
    prefill_ids = prompt_ids[: args.prefill_batch]

    with torch.inference_mode():
        for m in models:  # prefill the decode prompt once per model; each repeat decodes from a copy
            out = m["model"](input_ids=prompt_ids, cache=DynamicCache(), use_cache=True)
            m["prefilled"] = out.past_key_values
            m["first"] = out.logits[:, -1:].argmax(-1)
            m["prefill_s"], m["decode_s"], m["prefill_cpu"], m["decode_cpu"] = [], [], [], []
            # Warm-up at the timed shapes: the first call of a shape pays one-off costs.
            m["model"](input_ids=prefill_ids)
            cache, ids = copy.deepcopy(m["prefilled"]), m["first"]
            for _ in range(2):
                ids = m["model"](input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            print(f"ready: {m['variant']:<14} {m['form']:<7} {m['parameters']:>12,} parameters", flush=True)
        for repeat in range(args.repeats):
            order = models[repeat % len(models):] + models[: repeat % len(models)]
            for m in order:
                model = m["model"]
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                model(input_ids=prefill_ids)
                sync()
                m["prefill_s"].append(time.perf_counter() - t0)
                m["prefill_cpu"].append(time.process_time() - c0)
                cache = copy.deepcopy(m["prefilled"])
                ids = m["first"]
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(new):
                    ids = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                sync()
                m["decode_s"].append(time.perf_counter() - t0)
                m["decode_cpu"].append(time.process_time() - c0)
                m["cache"] = cache
            print(f"repeat {repeat + 1}/{args.repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)

    dense = next(m for m in models if m["variant"] == "dense" and m["form"] == "compact")
    dense_flops = prefill_flops(dense["model"], args.prefill_batch, prompt)
    mean_length = prompt + (new + 1) / 2
    dense_step_bytes = decode_bytes_per_step(dense["model"], batch, mean_length)
    dense_kv = kv_bytes(dense["model"], batch, prompt + new)

    def paired(key: str, m: dict) -> float:
        # Speedup per repeat against the dense model of the same repeat, then the median: the
        # pairing cancels load that changes between repeats.
        return statistics.median(d / v for d, v in zip(dense[key], m[key], strict=True))

    rows = []
    for m in models:
        model = m["model"]
        measured_kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in m["cache"].layers)
        computed_kv = kv_bytes(model, batch, prompt + new)
        row = {
            "variant": m["variant"], "form": m["form"], "architecture": m["architecture"],
            "parameters": m["parameters"], "query_slots": m["query_slots"], "kv_slots": m["kv_slots"],
            "kv_bytes": computed_kv, "kv_bytes_measured": measured_kv, "kv_fraction": computed_kv / dense_kv,
            "prefill_seconds": _spread(m["prefill_s"]), "prefill_cpu_seconds": _spread(m["prefill_cpu"]),
            "prefill_speedup": paired("prefill_s", m), "prefill_speedup_cpu_time": paired("prefill_cpu", m),
            "prefill_predicted": dense_flops / prefill_flops(model, args.prefill_batch, prompt),
            "decode_tokens_per_second": _spread([batch * new / t for t in m["decode_s"]]),
            "decode_cpu_seconds": _spread(m["decode_cpu"]),
            "decode_speedup": paired("decode_s", m), "decode_speedup_cpu_time": paired("decode_cpu", m),
            "decode_predicted": dense_step_bytes / decode_bytes_per_step(model, batch, mean_length),
            "export_notes": m["export_notes"],
        }
        row["prefill_ratio"] = row["prefill_speedup"] / row["prefill_predicted"]
        row["decode_ratio"] = row["decode_speedup"] / row["decode_predicted"]
        row["decode_ratio_cpu_time"] = row["decode_speedup_cpu_time"] / row["decode_predicted"]
        row["prefill_ratio_cpu_time"] = row["prefill_speedup_cpu_time"] / row["prefill_predicted"]
        rows.append(row)
    shutil.rmtree(workdir, ignore_errors=True)
    return {"name": "gqa-speed", "shape": {**SHAPES[args.shape], **HEADS, "name": args.shape}, "device": device,
            "batch": batch, "prompt": prompt, "new_tokens": new, "prefill_batch": args.prefill_batch,
            "repeats": args.repeats, "machine_before": machine_before, "machine_after": _machine(), "rows": rows}


def print_speed(result: dict) -> None:
    print(f"\n{result['shape']['name']} shape on {result['device']}: KV cache at batch {result['batch']} x "
          f"({result['prompt']} + {result['new_tokens']}); prefill {result['prefill_batch']} x {result['prompt']}; "
          f"speedups are medians of per-repeat ratios to dense (wall / CPU time)")
    print("| variant | form | params M | q / kv slots | KV MiB | KV kept | measured = computed | prefill ms "
          "| prefill speedup wall / CPU / predicted | decode tok/s | decode speedup wall / CPU / predicted |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        p, d = r["prefill_seconds"], r["decode_tokens_per_second"]
        print(f"| {r['variant']} | {r['form']} | {r['parameters'] / 1e6:.1f} | {r['query_slots']} / {r['kv_slots']} "
              f"| {r['kv_bytes'] / 2**20:.1f} | {r['kv_fraction']:.3f} | {r['kv_bytes_measured'] == r['kv_bytes']} "
              f"| {p['median'] * 1e3:.0f} ({p['min'] * 1e3:.0f}-{p['max'] * 1e3:.0f}) "
              f"| {r['prefill_speedup']:.2f} / {r['prefill_speedup_cpu_time']:.2f} / {r['prefill_predicted']:.2f} "
              f"| {d['median']:.1f} ({d['min']:.1f}-{d['max']:.1f}) "
              f"| {r['decode_speedup']:.2f} / {r['decode_speedup_cpu_time']:.2f} / {r['decode_predicted']:.2f} |")


# ---------------------------------------------------------------- quality


def run_quality(args) -> dict:
    import torch

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig, resolve_device
    from sentinel_core.data import batches, load_data
    from sentinel_core.defaults import resolve_data, resolve_model
    from sentinel_core.evaluation import count_parameters, evaluate
    from sentinel_core.fileio import write_json_atomic
    from sentinel_core.model_io import load_model
    from sentinel_core.training import train

    device = resolve_device(args.device)
    machine_before = _machine()
    source = resolve_model(args.model)
    model, tokenizer = load_model(source, device=device)
    data = load_data(resolve_data(args.data), tokenizer, block_size=args.block_size, seed=args.seed)
    val_ids = data.validation.ids[: args.max_eval_blocks * args.block_size]
    test_ids = data.test.ids if args.max_test_blocks is None else data.test.ids[: args.max_test_blocks * args.block_size]

    def perplexities(m) -> dict:
        def ppl(ids):
            return evaluate(m, ids, block_size=args.block_size, batch_size=args.batch_size, device=device,
                            progress=False).perplexity
        return {"validation": ppl(val_ids), "test": ppl(test_ids)}

    def cache_per_token(m) -> int:
        return kv_bytes(m, 1, 1)

    calibration = []
    for b in batches(data.train.blocks, args.batch_size, shuffle=True, seed=args.seed):
        calibration.append(b)
        if len(calibration) >= args.calibration_batches:
            break
    started = time.perf_counter()
    baseline = {"perplexity": perplexities(model), "kv_bytes_per_token": cache_per_token(model),
                "parameters": count_parameters(model)["total"]}
    print(f"baseline: {baseline['perplexity']}", flush=True)
    arms = []
    with tempfile.TemporaryDirectory() as tmp:
        for scorer in args.scorers.split(","):
            config = ExperimentConfig(seed=args.seed, scorer=scorer, calibration_batches=args.calibration_batches,
                                      batch_size=args.batch_size)
            scores = plugins.score_heads(scorer, model=model, batches=calibration, config=config)
            for strategy in args.strategies.split(","):
                for percent in [float(p) for p in args.percents.split(",")]:
                    if strategy == "none":  # one reference arm, whatever the scorers and fractions
                        if any(a["strategy"] == "none" for a in arms):
                            continue
                        percent = 0.0
                    arm_start = time.perf_counter()
                    pruned = copy.deepcopy(model)
                    removed = 0
                    if strategy != "none":  # "none": the unpruned model, fine-tuned the same way (a reference)
                        removed = plugins.prune(strategy, model=pruned, scores=scores, config=config.replace(
                            pruning_percent=percent, prune_strategy=strategy)).count
                    pruned.to(device)
                    after_prune = perplexities(pruned)
                    train_config = ExperimentConfig(
                        seed=args.seed, batch_size=args.batch_size, block_size=args.block_size,
                        learning_rate=args.learning_rate, max_steps=args.steps, eval_every=args.eval_every,
                        checkpoint_every=10**6, patience=0, max_eval_blocks=args.max_eval_blocks, device=device,
                        quiet=True, output_dir=str(Path(tmp) / f"{scorer}-{strategy}-{percent}"))
                    tuned = train(pruned, data, train_config, stage="fine_tune", resume=False)
                    after_tune = perplexities(pruned)
                    arm = {"scorer": scorer, "strategy": strategy, "percent": percent, "heads_removed": removed,
                           "query_slots": sum(q_slots(pruned)), "kv_slots": sum(kv_slots(pruned)),
                           "kv_bytes_per_token": cache_per_token(pruned),
                           "kv_saved": 1 - cache_per_token(pruned) / baseline["kv_bytes_per_token"],
                           "parameters": count_parameters(pruned)["total"], "pruned": after_prune,
                           "fine_tuned": after_tune, "steps": tuned.steps, "best_step": tuned.extra.get("best_step"),
                           "restored_best": tuned.extra.get("restored_best"),
                           "seconds": round(time.perf_counter() - arm_start, 1)}
                    arms.append(arm)
                    if args.out:  # the arms so far, so that a long run that is stopped keeps them
                        write_json_atomic(Path(args.out), {"name": "gqa-quality", "partial": True,
                                                           "baseline": baseline, "arms": arms})
                    print(f"{scorer:<9} {strategy:<9} {percent:.0%}: removed {removed} heads, KV saved "
                          f"{arm['kv_saved']:.1%}; test ppl {after_prune['test']:.2f} -> {after_tune['test']:.2f} "
                          f"(best step {arm['best_step']}) "
                          f"({arm['seconds']:.0f} s)", flush=True)
                    del pruned
                    torch.manual_seed(args.seed)
    goals = []
    for scorer in args.scorers.split(","):
        def arm_of(strategy, percent, scorer=scorer):
            return next((a for a in arms if a["scorer"] == scorer and a["strategy"] == strategy
                         and a["percent"] == percent), None)
        kv, glob = arm_of("kv-groups", 0.25), arm_of("global", 0.25)
        if kv and glob:
            ratio = kv["fine_tuned"]["test"] / glob["fine_tuned"]["test"]
            goals.append({"scorer": scorer, "kv_groups_over_global_test_ppl": ratio, "within_3_percent": ratio <= 1.03,
                          "kv_groups_kv_saved": kv["kv_saved"], "global_kv_saved": glob["kv_saved"]})
    return {"name": "gqa-quality", "model": args.model, "source": source, "data": args.data, "steps": args.steps,
            "learning_rate": args.learning_rate, "batch_size": args.batch_size, "block_size": args.block_size,
            "max_eval_blocks": args.max_eval_blocks, "max_test_blocks": args.max_test_blocks,
            "test_tokens": int(test_ids.numel()), "seed": args.seed, "baseline": baseline, "arms": arms,
            "goals": goals, "seconds": round(time.perf_counter() - started, 1), "machine_before": machine_before,
            "machine_after": _machine()}


def print_quality(result: dict) -> None:
    b = result["baseline"]["perplexity"]
    print(f"\nunpruned: validation {b['validation']:.2f}, test {b['test']:.2f}; {result['steps']} fine-tuning steps")
    print("| scorer | strategy | removed | q / kv slots | KV saved | val pruned | test pruned | val tuned | test tuned |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a in result["arms"]:
        print(f"| {a['scorer']} | {a['strategy']} | {a['percent']:.0%} | {a['query_slots']} / {a['kv_slots']} "
              f"| {a['kv_saved']:.1%} | {a['pruned']['validation']:.2f} | {a['pruned']['test']:.2f} "
              f"| {a['fine_tuned']['validation']:.2f} | {a['fine_tuned']['test']:.2f} |")
    for g in result["goals"]:
        print(f"goal ({g['scorer']}): kv-groups 25% / global 25% test ppl after fine-tuning = "
              f"{g['kv_groups_over_global_test_ppl']:.3f} ({'met' if g['within_3_percent'] else 'NOT met'}; <= 1.03); "
              f"KV saved {g['kv_groups_kv_saved']:.1%} vs {g['global_kv_saved']:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    speed = sub.add_parser("speed")
    speed.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--batch", type=int, default=8)
    speed.add_argument("--prompt", type=int, default=512)
    speed.add_argument("--new-tokens", type=int, default=128)
    speed.add_argument("--prefill-batch", type=int, default=1)
    speed.add_argument("--repeats", type=int, default=3)
    speed.add_argument("--out", default=str(ROOT / "bench" / "results" / "gqa-speed.json"))
    quality = sub.add_parser("quality")
    quality.add_argument("--model", default="demo-llama")
    quality.add_argument("--data", default="demo")
    quality.add_argument("--scorers", default="gradient,magnitude")
    quality.add_argument("--strategies", default="kv-groups,per-group,global",
                         help="'none' adds one arm: the unpruned model fine-tuned the same way")
    quality.add_argument("--percents", default="0.25,0.5")
    quality.add_argument("--steps", type=int, default=100)
    quality.add_argument("--eval-every", type=int, default=50)
    quality.add_argument("--learning-rate", type=float, default=1e-4)
    quality.add_argument("--batch-size", type=int, default=8)
    quality.add_argument("--block-size", type=int, default=128)
    quality.add_argument("--max-eval-blocks", type=int, default=128)
    quality.add_argument("--max-test-blocks", type=int, default=None, help="default: the whole test split")
    quality.add_argument("--calibration-batches", type=int, default=8)
    quality.add_argument("--seed", type=int, default=0)
    quality.add_argument("--device", default="auto")
    quality.add_argument("--out", default=str(ROOT / "bench" / "results" / "gqa-quality.json"))
    args = parser.parse_args(argv)

    from sentinel_core.fileio import write_json_atomic

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _load_plugins()
    if args.part == "speed":
        result = run_speed(args)
        print_speed(result)
    else:
        result = run_quality(args)
        print_quality(result)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
