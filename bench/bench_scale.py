"""Sentinel at the size of a real model: a Llama-3.2-1B-shaped LLaMA (16 layers, d 2048, 32 query
heads in 8 key/value groups, head_dim 64, MLP 8192, vocab 128256, tied embeddings; 1.24B
parameters), random weights in bfloat16, on the CPU.

Every measurement runs in a fresh Python process (peak RSS is the process's ``VmHWM`` from
/proc/self/status, reset with /proc/self/clear_refs before the part measured), so one
measurement's memory does not colour the next:

- ``build``: the dense model, saved with plain ``save_pretrained``, then scored by magnitude and
  pruned with ``kv-groups`` 25% and saved as a Sentinel checkpoint (``save_model``), both once,
  into a temporary folder;
- ``load``: ``load_model`` of each checkpoint, then one pass over every weight (a checksum, in
  16 MiB chunks) so that lazily mapped weights are really read: load seconds and peak RSS against
  the size on disk (goal: a Sentinel checkpoint's peak is at most 1.2x its size on disk);
- ``score``: magnitude on the bf16 model, entropy on 1 x 512 tokens;
- ``step``: ``train()`` for one step (batch 1 x ``--step-tokens``), full fine-tuning with and
  without gradient checkpointing, and LoRA r=16: peak RSS of the whole call (its evaluation at
  step 0 and at the end, its keep-best copy and its checkpoints included).

Two facts of this machine shape the measurements (both printed and saved):

- its CPU has no bf16 matrix units: a bf16 matmul ran ~100x slower than float32 (0.06 against
  6 GFLOPS for 128x2048 @ 2048x2048 on 2 threads), so everything that multiplies matrices
  (entropy scoring, the training steps) computes in float32: entropy loads the bf16 checkpoint
  as float32, the steps use ``mixed_precision="no"`` over the float32 master copy train() makes
  of a bf16 model anyway;
- full fine-tuning of 1.24B parameters with float32 master weights needs ~16 bytes per parameter
  (weights, gradients, two AdamW moments: 19.8 GB) plus activations, more than the ~18 GiB this
  shared 24 GiB machine can give; so the full and checkpointed steps run on the same shape cut
  to ``--step-layers`` layers (every layer is the same, so the cost per layer is the slope
  between two depths), and the 16-layer figure is extrapolated from that slope, labelled as such;
  gradient checkpointing runs at the deepest of them only (each step child takes minutes here).
  LoRA r=16 runs on the real 16-layer model.

    python bench/bench_scale.py [--out bench/results/scale.json] [--workdir DIR]
    python bench/bench_scale.py --steps-only --step-kinds lora --out bench/results/scale-lora.json

On a GPU (``--device cuda``) the steps and scoring run there (peak ``max_memory_allocated``),
all 16 layers, and bf16 autocast; the bare-loop comparison is bench_finetune.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for extra in (ROOT, BENCH, ROOT / "plugins" / "sentinel-entropy", ROOT / "plugins" / "sentinel-magnitude"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

GOAL_LOAD_RATIO = 1.2
CHUNK = 1 << 23  # elements per checksum chunk (16 MiB of bf16)


# ---------------------------------------------------------------- measuring inside a child


def _status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    """Start ``VmHWM`` again from the current RSS (Linux: ``5`` in clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _memory() -> dict:
    return {"rss": _status("VmRSS"), "peak": _status("VmHWM")}


def _shape(layers: int = 16):
    from bench_gqa import HEADS, SHAPES
    from transformers import LlamaConfig

    spec = dict(SHAPES["llama-1b"])
    spec.pop("dtype")
    spec["num_hidden_layers"] = layers
    return LlamaConfig(**spec, **HEADS, max_position_embeddings=1024, tie_word_embeddings=True,
                       attn_implementation="sdpa")


def _random_model(layers: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(_shape(layers), dtype=torch.bfloat16)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def _touch(model) -> float:
    """Read every weight once (a float32 checksum over 16 MiB chunks): mapped pages come in."""
    import torch

    total = 0.0
    seen = set()
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.data_ptr() in seen or not tensor.is_floating_point():
                continue
            seen.add(tensor.data_ptr())
            for chunk in tensor.reshape(-1).split(CHUNK):
                total += float(chunk.float().sum())
    return total


def child_build(args) -> dict:
    import torch

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.evaluation import count_parameters
    from sentinel_core.model_io import save_model
    from sentinel_core.surgery import get_head_map

    work = Path(args.workdir)
    start = time.perf_counter()
    if (work / "hf" / "config.json").is_file():  # --workdir of an earlier run: the same seeded model
        from sentinel_core.model_io import load_model

        model = load_model(work / "hf")[0]
        built, hf_seconds = None, None
    else:
        model = _random_model(16).eval()
        built = time.perf_counter() - start
        start = time.perf_counter()
        model.save_pretrained(work / "hf")
        hf_seconds = time.perf_counter() - start
    dense_parameters = count_parameters(model)["total"]
    _load_plugins()
    cfg = ExperimentConfig(pruning_percent=0.25, prune_strategy="kv-groups", scorer="magnitude", seed=0)
    scores = plugins.score_heads("magnitude", model=model, batches=[], config=cfg)
    plugins.prune("kv-groups", model=model, scores=scores, config=cfg)
    head_map = get_head_map(model)
    start = time.perf_counter()
    save_model(model, None, work / "sentinel")
    sentinel_seconds = time.perf_counter() - start
    assert next(model.parameters()).dtype == torch.bfloat16
    return {"build_seconds": built, "dense_parameters": dense_parameters,
            "pruned_parameters": count_parameters(model)["total"],
            "heads_left": sum(len(head_map.active(layer)) for layer in range(head_map.num_layers)),
            "hf_save_seconds": hf_seconds, "sentinel_save_seconds": sentinel_seconds,
            "hf_bytes": _folder_bytes(work / "hf"), "sentinel_bytes": _folder_bytes(work / "sentinel"),
            "peak": _status("VmHWM")}


def child_load(args) -> dict:
    import accelerate  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    import sentinel_core.surgery  # noqa: F401
    from sentinel_core.model_io import load_model

    # Libraries imported first: loading a model in a process that has them (a session, a server)
    # is what is timed; their memory is in rss_before.
    path = Path(args.workdir) / args.kind
    before = _memory()
    _reset_peak()
    start = time.perf_counter()
    model, _ = load_model(path)
    seconds = time.perf_counter() - start
    after_load = _memory()
    start = time.perf_counter()
    checksum = _touch(model)
    touch_seconds = time.perf_counter() - start
    after_touch = _memory()
    return {"kind": args.kind, "disk_bytes": _folder_bytes(path), "seconds": seconds, "touch_seconds": touch_seconds,
            "rss_before": before["rss"], "rss_after_load": after_load["rss"], "peak_load": after_load["peak"],
            "rss_after_touch": after_touch["rss"], "peak": after_touch["peak"], "checksum": checksum,
            "dtype": str(next(model.parameters()).dtype), "any_meta": any(p.is_meta for p in model.parameters())}


def child_score(args) -> dict:
    import torch

    from sentinel_core import plugins
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.model_io import load_model

    _load_plugins()
    torch.manual_seed(0)
    dtype = "bfloat16" if args.kind == "magnitude" or args.device == "cuda" else "float32"
    model, _ = load_model(Path(args.workdir) / "hf", dtype=dtype, device=args.device)
    tokens = args.entropy_tokens if args.kind == "entropy" else 0
    batches = []
    if tokens:
        ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
        batches = [{"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}]
    cfg = ExperimentConfig(scorer=args.kind, seed=0, device=args.device)
    plugins.score_heads(args.kind, model=model, batches=batches[:1] if tokens else [], config=cfg)  # warm-up
    _reset_peak()
    _sync(args.device, reset=True)
    start = time.perf_counter()
    scores = plugins.score_heads(args.kind, model=model, batches=batches, config=cfg)
    _sync(args.device)
    seconds = time.perf_counter() - start
    heads = int(torch.isfinite(scores.scores).sum())
    return {"kind": args.kind, "dtype": dtype, "seconds": seconds, "tokens": tokens, "heads": heads,
            "tokens_per_second": tokens / seconds if tokens else None, "heads_per_second": heads / seconds,
            "peak": _status("VmHWM"), "device_peak": _device_peak(args.device)}


def child_step(args) -> dict:
    import torch

    from sentinel_core.config import ExperimentConfig
    from sentinel_core.data import LMData, TokenSplit
    from sentinel_core.model_io import load_model
    from sentinel_core.training import train

    if args.layers == 16:
        model, _ = load_model(Path(args.workdir) / "hf")
    else:
        model = _random_model(args.layers)
    vocab, n = model.config.vocab_size, args.step_tokens
    blocks = torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(0))
    split = TokenSplit(blocks.reshape(-1), blocks)
    data = LMData(train=split, validation=split, test=None, block_size=n, source="random",
                  validation_from_train=True)
    before = _memory()
    with tempfile.TemporaryDirectory(dir=args.workdir) as out:
        cfg = ExperimentConfig(device=args.device, batch_size=1, max_steps=1, num_epochs=1, eval_every=10**6,
                               checkpoint_every=10**6, max_eval_blocks=1, patience=0, learning_rate=1e-5,
                               output_dir=out, quiet=True, seed=0,
                               mixed_precision="bf16" if args.device == "cuda" else "no",
                               gradient_checkpointing=args.kind == "checkpointing",
                               lora_rank=16 if args.kind == "lora" else 0)
        _reset_peak()
        _sync(args.device, reset=True)
        start = time.perf_counter()
        result = train(model, data, cfg, stage="bench", resume=False)
        seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters())
    return {"kind": args.kind, "layers": args.layers, "tokens": n, "train_call_seconds": seconds,
            "loss": result.final_train_loss, "parameters": trainable, "rss_before": before["rss"],
            "peak": _status("VmHWM"), "device_peak": _device_peak(args.device)}


def _sync(device: str, reset: bool = False) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        if reset:
            torch.cuda.reset_peak_memory_stats()


def _device_peak(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _load_plugins() -> None:
    """The installed plugins; magnitude and entropy from the source tree if not installed."""
    import importlib

    from sentinel_core.plugins import available_strategies, load_plugins, pm

    load_plugins()
    for name in ("magnitude", "entropy"):
        if name not in available_strategies("score_heads"):
            pm.register(importlib.import_module(f"sentinel_{name}"), name=name)


CHILDREN = {"build": child_build, "load": child_load, "score": child_score, "step": child_step}


# ---------------------------------------------------------------- the parent


def run_child(args, what: str, **extra) -> dict:
    command = [sys.executable, __file__, "--child", what, "--workdir", args.workdir, "--device", args.device,
               "--step-tokens", str(args.step_tokens), "--entropy-tokens", str(args.entropy_tokens),
               "--threads", str(args.threads)]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    label = " ".join(f"{k}={v}" for k, v in extra.items())
    # Each record is kept in the work folder as it comes, so that a failure later (or --reuse)
    # does not cost the measurements already made.
    saved = Path(args.workdir) / "records" / f"{what}-{'-'.join(str(v) for v in extra.values())}.json"
    if args.reuse and saved.is_file():
        print(f"[{time.strftime('%H:%M:%S')}] {what} {label}: reused {saved}", flush=True)
        return json.loads(saved.read_text())
    print(f"[{time.strftime('%H:%M:%S')}] {what} {label} ...", flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.child_timeout)
    if done.returncode != 0:
        print(f"    FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}, no message (killed?)"]
        return {"failed": True, "what": what, **extra, "error": lines[-1][:300]}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["process_seconds"] = time.perf_counter() - start
    print(f"    {time.perf_counter() - start:.0f} s, peak RSS {record['peak'] / 2**30:.2f} GiB", flush=True)
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(json.dumps(record))
    return record


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def summarise(result: dict) -> None:
    for r in (*result["load"], *result["score"], *result["step"]):
        if r.get("failed"):
            print(f"FAILED: {r['what']} {r.get('kind', '')} {r.get('layers', '')}: {r['error']}")
    build = result["build"]
    loads = {r["kind"]: r for r in result["load"] if not r.get("failed")}
    print()
    print(f"Llama-1B shape: {build['dense_parameters'] / 1e9:.3f}B parameters dense, "
          f"{build['pruned_parameters'] / 1e9:.3f}B after kv-groups 25%; load average "
          f"{result['machine']['load_average_before']} -> {result['machine']['load_average_after']}")
    print("| checkpoint | on disk GiB | load s | RSS before GiB | peak RSS GiB (load) | peak RSS GiB (weights read) "
          "| (peak - before) / disk | peak / disk |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, r in loads.items():
        print(f"| {kind} | {_gib(r['disk_bytes'])} | {r['seconds']:.1f} | {_gib(r['rss_before'])} | "
              f"{_gib(r['peak_load'])} | {_gib(r['peak'])} | {(r['peak'] - r['rss_before']) / r['disk_bytes']:.2f} | "
              f"{r['peak'] / r['disk_bytes']:.2f} |")
    print("| scorer | dtype | seconds | tokens/s | heads/s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in result["score"] if not r.get("failed")):
        tps = f"{r['tokens_per_second']:.1f}" if r["tokens_per_second"] else "-"
        print(f"| {r['kind']} | {r['dtype']} | {r['seconds']:.2f} | {tps} | {r['heads_per_second']:.0f} | "
              f"{_gib(r['peak'])} |")
    print("| step | layers | tokens | train() s | peak RSS GiB | peak device GiB |")
    print("|---|---|---|---|---|---|")
    for r in (r for r in result["step"] if not r.get("failed")):
        print(f"| {r['kind']} | {r['layers']} | {r['tokens']} | {r['train_call_seconds']:.0f} | {_gib(r['peak'])} | "
              f"{_gib(r['device_peak'])} |")
    for r in result.get("extrapolated", []):
        print(f"| {r['kind']} (extrapolated) | 16 | {r['tokens']} | - | {_gib(r['peak'])} | - |")
    for goal in result["goals"]:
        print(f"goal: {goal['goal']}: {goal['measured']} -> {'met' if goal['met'] else 'NOT met'}")


def extrapolate(steps: list[dict]) -> list[dict]:
    """Peak RSS at 16 layers from the slope between the two smallest depths measured."""
    out = []
    for kind in ("full",):
        runs = sorted((r for r in steps if not r.get("failed") and r["kind"] == kind and r["layers"] < 16),
                      key=lambda r: r["layers"])
        if len(runs) < 2:
            continue
        a, b = runs[0], runs[-1]
        per_layer = (b["peak"] - a["peak"]) / (b["layers"] - a["layers"])
        out.append({"kind": kind, "layers": 16, "tokens": a["tokens"], "per_layer_bytes": per_layer,
                    "peak": b["peak"] + per_layer * (16 - b["layers"]), "from_layers": [a["layers"], b["layers"]]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step-layers", default="2,4", help="depths of the full / checkpointed steps on the CPU")
    parser.add_argument("--step-tokens", type=int, default=128)
    parser.add_argument("--entropy-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's choice)")
    parser.add_argument("--child-timeout", type=int, default=900)
    parser.add_argument("--reuse", action="store_true", help="reuse the records a run left in --workdir")
    parser.add_argument("--step-kinds", default="full,checkpointing,lora", help="which fine-tuning steps to measure")
    parser.add_argument("--steps-only", action="store_true", help="build, then the steps: no load or scoring parts")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        import torch
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(CHILDREN[args.child](args)))
        return

    from sentinel_core.fileio import write_json_atomic

    temp = None
    if args.workdir is None:
        temp = tempfile.TemporaryDirectory(prefix="sentinel-scale-")
        args.workdir = temp.name
    started = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    import torch

    result: dict = {"benchmark": "bench_scale", "device": args.device, "step_tokens": args.step_tokens,
                    "entropy_tokens": args.entropy_tokens}
    result["build"] = run_child(args, "build")
    result["load"] = [] if args.steps_only else [run_child(args, "load", kind=kind) for kind in ("sentinel", "hf")]
    result["score"] = [] if args.steps_only else [run_child(args, "score", kind=kind)
                                                  for kind in ("magnitude", "entropy")]
    depths = [16] if args.device == "cuda" else [int(x) for x in args.step_layers.split(",")]
    # Checkpointing at the deepest CPU depth only: each step child takes minutes on this CPU.
    kinds = args.step_kinds.split(",")
    result["step"] = [run_child(args, "step", kind="full", layers=layers) for layers in depths if "full" in kinds]
    if "checkpointing" in kinds:
        result["step"].append(run_child(args, "step", kind="checkpointing", layers=max(depths)))
    if "lora" in kinds:
        result["step"].append(run_child(args, "step", kind="lora", layers=16))
    result["extrapolated"] = extrapolate(result["step"])
    result["goals"] = []
    sentinel = next((r for r in result["load"] if r["kind"] == "sentinel" and not r.get("failed")), None)
    if sentinel is not None:
        # The load's own memory: the peak over what the process held before (Python, torch,
        # transformers imported); the whole process's peak is reported beside it.
        own = (sentinel["peak"] - sentinel["rss_before"]) / sentinel["disk_bytes"]
        whole = sentinel["peak"] / sentinel["disk_bytes"]
        result["goals"].append({
            "goal": f"peak RSS of loading the Sentinel checkpoint <= {GOAL_LOAD_RATIO}x its size on disk",
            "measured": f"{own:.2f}x for the load itself (peak over the {_gib(sentinel['rss_before'])} GiB the "
                        f"process held before, every weight read), {whole:.2f}x for the whole process; "
                        f"{_gib(sentinel['disk_bytes'])} GiB on disk",
            "ratio": own, "whole_process_ratio": whole, "met": own <= GOAL_LOAD_RATIO})
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "threads": args.threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
                         "load_average_before": load_before, "load_average_after": round(os.getloadavg()[0], 2),
                         "total_seconds": time.perf_counter() - started}
    summarise(result)
    write_json_atomic(Path(args.out), result)
    print(f"wrote {args.out}")
    if temp is not None:
        temp.cleanup()


if __name__ == "__main__":
    main()
