"""Recovery after pruning: which fine-tuner gives the most back, at what memory and speed.

    python bench/bench_recovery.py arms [--model demo] [--fractions 0.3,0.5] [--seeds 0,1,2]
        [--arms plain,adaptive,distill,plain+lora,distill+lora] [--rounds 3] [--steps 60]
        [--out bench/results/recovery-demo.json]
    python bench/bench_recovery.py memory [--keep-best] [--out bench/results/recovery-memory.json]
    python bench/bench_recovery.py table bench/results/recovery-demo.json     # the docs table
    python bench/bench_recovery.py plot bench/results/recovery-demo.json [--png docs/img/recovery.png] [--label NAME]

**arms.** Every arm is a whole ``run_experiment`` (the product's own path: score with
``--scorer``, prune with ``global`` at each fraction, recover, evaluate), in a fresh process
so that its peak memory is its own. Arms, each with the same optimizer steps, batch and
tokens: ``plain``, ``adaptive``, ``distill`` (defaults: KL only at T = 1), ``plain+lora`` and
``distill+lora`` (``--lora-rank``, default 16); at the largest fraction also ``plain`` and
``distill`` pruned in ``--rounds`` rounds; and the reference, the unpruned model fine-tuned
the same way (``plain`` at 0%). Quality is the perplexity of the **test** split (the first
``--max-test-blocks`` blocks), which neither keep-best nor early stopping ever saw; the gap of
an arm is ``ppl(arm) / ppl(reference) - 1``, per seed, then averaged over seeds.

Training speed and memory come from a training callback the bench registers through the
``register_training_callbacks`` hook: wall-clock time inside the steps only (evaluations and
checkpoints left out), tokens trained, and the process's peak resident memory from the start of
the stage (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; on a GPU
``torch.cuda.max_memory_allocated``). The teacher of ``distill`` is loaded inside the stage,
so its memory counts.

**memory.** The distilgpt2 shape (6 layers, d 768, 12 heads, vocabulary 50,257; random
weights) trained for a few steps with ``train()`` in a fresh process each: full fine-tuning
against LoRA r=16, peak memory as above, and the part of it that training added on top of the
loaded model.

Arms already in ``--out`` with the same settings are kept, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS = ("model", "scorer", "steps", "batch_size", "block_size", "learning_rate", "eval_every",
            "max_eval_blocks", "max_test_blocks", "lora_rank")


# ---------------------------------------------------------------- measuring inside a run


def _peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (``VmHWM``: peak, ``VmRSS``: now)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _peak_rss_bytes() -> int | None:
    return _status_bytes("VmHWM")


def _rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


class StageMeter:
    """Times the steps of every training stage and records its peak memory (see the docstring)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    def callback(self, stage: str):
        import torch

        from sentinel_core.training import TrainerCallback

        record = self.stages.setdefault(stage, {"step_seconds": 0.0, "tokens": 0, "steps": 0})

        class Meter(TrainerCallback):
            name = "bench-recovery-meter"

            def on_train_begin(self, state, context):
                record["tokens_at_begin"] = state.tokens
                record["rss_at_begin"] = _rss_bytes()
                _peak_rss_reset()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, state, context):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.started = time.perf_counter()

            def on_step_end(self, state, context, logs):
                record.setdefault("trainable", sum(p.numel() for p in context.model.parameters()
                                                   if p.requires_grad))
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                record["step_seconds"] += time.perf_counter() - self.started
                record["steps"] += 1
                record["tokens"] = state.tokens - record["tokens_at_begin"]

            def on_train_end(self, state, context):
                record["peak_rss"] = _peak_rss_bytes()
                if torch.cuda.is_available():
                    record["peak_cuda"] = torch.cuda.max_memory_allocated()

        return Meter()


def _register_meter(meter: StageMeter) -> None:
    from sentinel_core.hookspecs import hookimpl
    from sentinel_core.plugins import pm

    class MeterPlugin:
        @hookimpl
        def register_training_callbacks(self, model, config, stage):
            return [meter.callback(stage)]

    pm.register(MeterPlugin(), name="bench-recovery-meter")


def run_arm(spec: dict) -> dict:
    """One arm, in this process: ``run_experiment`` then the test split's perplexity."""
    import torch

    from sentinel_core import run_experiment
    from sentinel_core.config import ExperimentConfig
    from sentinel_core.data import load_data
    from sentinel_core.defaults import resolve_data
    from sentinel_core.evaluation import evaluate
    from sentinel_core.model_io import load_model
    from sentinel_core.plugins import load_plugins
    from sentinel_core.run_files import STAGE_CHECKPOINTS_DIR

    load_plugins()
    meter = StageMeter()
    _register_meter(meter)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        config = ExperimentConfig(
            model_name=spec["model"], data=spec["data"], scorer=spec["scorer"], prune_strategy="global",
            pruning_percent=spec["fraction"], prune_rounds=spec["rounds"], fine_tune=spec["fine_tune"],
            lora_rank=spec["lora"], max_steps=spec["steps"], batch_size=spec["batch_size"],
            block_size=spec["block_size"], learning_rate=spec["learning_rate"], eval_every=spec["eval_every"],
            checkpoint_every=10**6, patience=0, max_eval_blocks=spec["max_eval_blocks"], seed=spec["seed"],
            speed_repeats=0, quiet=True, device=spec["device"], output_dir=str(Path(tmp) / "run"))
        model, tokenizer, summary = run_experiment(config)
        data = load_data(resolve_data(spec["data"]), tokenizer, block_size=spec["block_size"], seed=spec["seed"])
        test_ids = data.test.ids[: spec["max_test_blocks"] * spec["block_size"]]
        device = next(model.parameters()).device

        def test_ppl(m) -> tuple[float, int]:
            with torch.no_grad():
                result = evaluate(m, test_ids, block_size=spec["block_size"], batch_size=spec["batch_size"],
                                  device=device, progress=False)
            return result.perplexity, result.tokens

        test_perplexity, test_tokens = test_ppl(model)
        # The pruned model before any recovery (one-shot arms): what fine-tuning started from.
        pruned_dir = Path(tmp) / "run" / STAGE_CHECKPOINTS_DIR / "prune"
        pruned_test = None
        if spec["rounds"] == 1 and spec["fraction"] > 0 and pruned_dir.is_dir():
            pruned_test = test_ppl(load_model(pruned_dir, device=str(device))[0])[0]
    stages = {k: v for k, v in meter.stages.items() if v["steps"]}
    step_seconds = sum(v["step_seconds"] for v in stages.values())
    tokens = sum(v["tokens"] for v in stages.values())
    peaks = [v.get("peak_cuda") or v.get("peak_rss") or 0 for v in stages.values()]
    return {**spec, "test_perplexity": test_perplexity, "test_tokens": test_tokens, "pruned_test_perplexity": pruned_test,
            "validation_perplexity": summary["perplexity"], "heads": {k: summary["heads"][k] for k in
                                                                       ("original", "removed", "final")},
            "parameters_after": summary["parameters"]["after"]["total"],
            "fine_tune_steps": (summary.get("fine_tune") or {}).get("steps"),
            "train_tokens": tokens, "train_tokens_per_second": tokens / step_seconds if step_seconds else None,
            "peak_training_memory": max(peaks) if peaks else None,
            "memory_at_stage_begin": max((v.get("rss_at_begin") or 0) for v in stages.values()) if stages else None,
            "stages": stages, "seconds": round(time.perf_counter() - started, 1)}


# ---------------------------------------------------------------- the arms


def arm_specs(args) -> list[dict]:
    fractions = [float(f) for f in args.fractions.split(",")]
    specs = []
    base = {name: getattr(args, name) for name in SETTINGS}
    base.update(data=args.data, device=args.device)
    for seed in [int(s) for s in args.seeds.split(",")]:
        specs.append({**base, "arm": "reference", "fraction": 0.0, "fine_tune": "plain", "lora": 0, "rounds": 1,
                      "seed": seed})
        for fraction in fractions:
            for arm in args.arms.split(","):
                fine_tune, _, lora = arm.partition("+")
                specs.append({**base, "arm": arm, "fraction": fraction, "fine_tune": fine_tune,
                              "lora": args.lora_rank if lora == "lora" else 0, "rounds": 1, "seed": seed})
            if fraction == max(fractions) and args.rounds > 1:
                for fine_tune in args.round_arms.split(","):
                    specs.append({**base, "arm": f"{fine_tune} {args.rounds} rounds", "fraction": fraction,
                                  "fine_tune": fine_tune, "lora": 0, "rounds": args.rounds, "seed": seed})
    return specs


def _key(spec: dict) -> tuple:
    return tuple(spec[k] for k in (*SETTINGS, "arm", "fraction", "seed"))


def _machine() -> dict:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _in_subprocess(part: str, spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, part, "--spec", json.dumps(spec)], capture_output=True,
                          text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"arm {spec} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_arms(args) -> dict:
    from sentinel_core.defaults import resolve_model
    from sentinel_core.fileio import write_json_atomic

    args.model = resolve_model(args.model, quiet=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    done = {_key(a): a for a in previous.get("arms", [])}
    result = {"name": "recovery", "machine_before": previous.get("machine_before") or _machine(), "arms": []}
    specs = arm_specs(args)
    for i, spec in enumerate(specs, 1):
        arm = done.get(_key(spec))
        if arm is None:
            arm = _in_subprocess("one-arm", spec)
        result["arms"].append(arm)
        print(f"[{i}/{len(specs)}] seed {spec['seed']} {spec['arm']:<18} {spec['fraction']:.0%}: test ppl "
              f"{arm['test_perplexity']:.2f}, {arm['train_tokens_per_second'] or 0:,.0f} tok/s, peak "
              f"{(arm['peak_training_memory'] or 0) / 2**20:,.0f} MiB ({arm['seconds']:.0f} s)", flush=True)
        write_json_atomic(out, {**result, "summary": summarize(result["arms"])})
    result["machine_after"] = _machine()
    result["summary"] = summarize(result["arms"])
    write_json_atomic(out, result)
    return result


def summarize(arms: list[dict]) -> dict:
    """Per arm and fraction: mean test ppl and gap to the same seed's reference, over seeds; the goals."""
    reference = {a["seed"]: a["test_perplexity"] for a in arms if a["arm"] == "reference"}
    groups: dict[tuple, list[dict]] = {}
    for a in arms:
        if a["arm"] != "reference" and a["seed"] in reference:
            groups.setdefault((a["arm"], a["fraction"]), []).append(a)
    rows = []
    for (arm, fraction), items in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        gaps = [a["test_perplexity"] / reference[a["seed"]] - 1 for a in items]
        rows.append({"arm": arm, "fraction": fraction, "seeds": [a["seed"] for a in items],
                     "test_perplexity": statistics.mean(a["test_perplexity"] for a in items),
                     "gap": statistics.mean(gaps), "gap_min": min(gaps), "gap_max": max(gaps),
                     "tokens_per_second": statistics.median(a["train_tokens_per_second"] or 0 for a in items),
                     "peak_training_memory": max(a["peak_training_memory"] or 0 for a in items)})
    refs = [a for a in arms if a["arm"] == "reference"]
    out = {"reference_test_perplexity": statistics.mean(reference.values()) if reference else None,
           "reference_tokens_per_second": statistics.median(a["train_tokens_per_second"] or 0 for a in refs)
           if refs else None, "rows": rows, "goals": {}}

    def row(arm, fraction):
        return next((r for r in rows if r["arm"] == arm and r["fraction"] == fraction), None)

    fractions = sorted({r["fraction"] for r in rows})
    if fractions:
        top = max(fractions)
        plain, distill = row("plain", top), row("distill", top)
        if plain and distill:
            closed = 1 - distill["gap"] / plain["gap"] if plain["gap"] > 0 else None
            out["goals"]["distill_closes_half_of_plain_gap_at_top"] = {
                "fraction": top, "plain_gap": plain["gap"], "distill_gap": distill["gap"], "closed": closed,
                "met": closed is not None and closed >= 0.5}
        worse = [{"fraction": f, "arm": a} for f in fractions for a in ("distill", "distill+lora")
                 if row(a, f) and row(a.replace("distill", "plain"), f)
                 and row(a, f)["gap"] > row(a.replace("distill", "plain"), f)["gap"]]
        out["goals"]["distill_no_worse_than_plain_anywhere"] = {"worse": worse, "met": not worse}
        recovered = []
        for f in fractions:
            # What fine-tuning won back: the pruned model's test ppl minus the tuned one's, per
            # seed (both arms of a seed start from the same pruned model).
            full = {a["seed"]: a for a in arms if a["arm"] == "plain" and a["fraction"] == f}
            lora = {a["seed"]: a for a in arms if a["arm"] == "plain+lora" and a["fraction"] == f}
            pairs = [(full[s], lo) for s, lo in lora.items() if s in full and lo.get("pruned_test_perplexity")
                     and full[s].get("pruned_test_perplexity")]
            if not pairs:
                continue
            won_full = statistics.mean(fu["pruned_test_perplexity"] - fu["test_perplexity"] for fu, _ in pairs)
            won_lora = statistics.mean(lo["pruned_test_perplexity"] - lo["test_perplexity"] for _, lo in pairs)
            shares = [(lo["pruned_test_perplexity"] - lo["test_perplexity"])
                      / (fu["pruned_test_perplexity"] - fu["test_perplexity"])
                      for fu, lo in pairs if fu["pruned_test_perplexity"] != fu["test_perplexity"]]
            # The share of the means: a seed where full fine-tuning won back almost nothing
            # would make a per-seed share meaningless.
            share = won_lora / won_full if won_full > 0 else None
            recovered.append({"fraction": f, "full_recovered_ppl": won_full, "lora_recovered_ppl": won_lora,
                              "lora_share_of_full_recovery": share, "per_seed": shares,
                              "met": won_lora >= 0.9 * won_full})
        out["goals"]["lora_recovers_90_percent_of_full"] = recovered
    return out


# ---------------------------------------------------------------- memory on the distilgpt2 shape


def memory_arm(spec: dict) -> dict:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from sentinel_core.config import ExperimentConfig
    from sentinel_core.data import LMData, TokenSplit
    from sentinel_core.training import train

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024))
    generator = torch.Generator().manual_seed(0)
    block = spec["block_size"]
    blocks = torch.randint(0, 50257, (spec["batch_size"] * (spec["steps"] + 1), block), generator=generator)
    split = TokenSplit(ids=blocks.reshape(-1), blocks=blocks)
    data = LMData(train=split, validation=TokenSplit(ids=blocks[:2].reshape(-1), blocks=blocks[:2]), test=None,
                  block_size=block, source="random", validation_from_train=False)
    meter = StageMeter()
    loaded = _rss_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        # With keep-best, an evaluation after every step, so that the kept copy is in the peak.
        config = ExperimentConfig(device="cpu", batch_size=spec["batch_size"], block_size=block,
                                  max_steps=spec["steps"], eval_every=1 if spec["keep_best"] else 10**6,
                                  checkpoint_every=10**6, patience=0,
                                  learning_rate=1e-4, lora_rank=spec["lora"], quiet=True, max_eval_blocks=2,
                                  output_dir=str(Path(tmp) / "run"))
        train(model, data, config, stage="fine_tune", callbacks=[meter.callback("fine_tune")],
              select_on="eval_loss" if spec["keep_best"] else None)
    record = meter.stages["fine_tune"]
    return {**spec, "parameters": sum(p.numel() for p in model.parameters()), "rss_after_load": loaded,
            "rss_at_stage_begin": record["rss_at_begin"], "peak_rss": record["peak_rss"],
            "training_added": record["peak_rss"] - record["rss_at_begin"], "trainable": record["trainable"],
            "tokens_per_second": record["tokens"] / record["step_seconds"]}


def run_memory(args) -> dict:
    from sentinel_core.fileio import write_json_atomic

    arms = [_in_subprocess("one-memory", {"arm": name, "lora": lora, "batch_size": args.batch_size,
                                          "block_size": args.block_size, "steps": args.steps,
                                          "keep_best": args.keep_best})
            for name, lora in (("full", 0), (f"lora r={args.lora_rank}", args.lora_rank))]
    full, lora = arms
    result = {"name": "recovery-memory", "shape": "distilgpt2 (6 x 768, 12 heads, vocab 50257), random weights",
              "keep_best": args.keep_best,
              "machine": _machine(), "arms": arms,
              "lora_over_full_peak": lora["peak_rss"] / full["peak_rss"],
              "lora_over_full_training_added": lora["training_added"] / full["training_added"]}
    result["goal_met"] = result["lora_over_full_peak"] <= 0.5
    write_json_atomic(Path(args.out), result)
    for a in arms:
        print(f"{a['arm']:<10} peak {a['peak_rss'] / 2**20:,.0f} MiB, training added "
              f"{a['training_added'] / 2**20:,.0f} MiB, {a['tokens_per_second']:,.0f} tok/s")
    print(f"LoRA / full: peak {result['lora_over_full_peak']:.2f}, added by training "
          f"{result['lora_over_full_training_added']:.2f} (goal: peak <= 0.5: "
          f"{'met' if result['goal_met'] else 'NOT met'})")
    return result


# ---------------------------------------------------------------- the tables in docs/benchmarks.md


def table(path: str) -> str:
    """The markdown table and goal lines of an ``arms`` result, as docs/benchmarks.md shows them."""
    result = json.loads(Path(path).read_text())
    arms = result["arms"]
    summary = summarize(arms)

    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.mean(values) if values else None

    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    lines = ["| removed | arm | seeds | trainable params | test ppl pruned | test ppl recovered | gap to reference "
             "(min..max over seeds) | validation ppl (keep-best's set) | tokens/s in steps | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    refs = [a for a in arms if a["arm"] == "reference"]
    rows = [{"arm": "reference", "fraction": 0.0, "seeds": [a["seed"] for a in refs], "gap": 0.0, "gap_min": 0.0,
             "gap_max": 0.0}] + summary["rows"]
    for row in rows:
        items = [a for a in arms if a["arm"] == row["arm"] and a["fraction"] == row["fraction"]]
        last = [list(a["stages"].values())[-1] for a in items if a["stages"]]
        trainable = mean(s.get("trainable") for s in last)
        lines.append("| " + " | ".join([
            f"{row['fraction']:.0%}", row["arm"], str(len(items)), fmt(trainable and trainable / 1e6, ".2f") + "M",
            fmt(mean(a["pruned_test_perplexity"] for a in items)), fmt(mean(a["test_perplexity"] for a in items)),
            f"{row['gap']:+.2%} ({row['gap_min']:+.2%}..{row['gap_max']:+.2%})",
            fmt(mean(a["validation_perplexity"]["final"] for a in items)),
            fmt(statistics.median(a["train_tokens_per_second"] or 0 for a in items), ",.0f"),
            fmt(max(a["peak_training_memory"] or 0 for a in items) / 2**20, ",.0f")]) + " |")
    goals = summary["goals"]
    closes = goals.get("distill_closes_half_of_plain_gap_at_top")
    if closes:
        lines.append(f"\n- distill closes {fmt(closes['closed'] and 100 * closes['closed'], '.0f')}% of plain's gap at "
                     f"{closes['fraction']:.0%} (plain {closes['plain_gap']:+.2%}, distill {closes['distill_gap']:+.2%}): "
                     f"{'met' if closes['met'] else 'not met'}")
    worse = goals.get("distill_no_worse_than_plain_anywhere")
    if worse:
        where = ", ".join(f"{w['arm']} at {w['fraction']:.0%}" for w in worse["worse"]) or "nowhere"
        lines.append(f"- distill worse than plain (mean over seeds): {where}: {'met' if worse['met'] else 'not met'}")
    for item in goals.get("lora_recovers_90_percent_of_full", []):
        won = (f"full fine-tuning won back {item['full_recovered_ppl']:.2f} test ppl from the pruned model, LoRA "
               f"{item['lora_recovered_ppl']:.2f}")
        share = item["lora_share_of_full_recovery"]
        if share is None or item["full_recovered_ppl"] < 0.1:
            lines.append(f"- at {item['fraction']:.0%}, {won}: LoRA recovers more; a share of so little is not "
                         f"meaningful: {'met' if item['met'] else 'not met'}")
        else:
            lines.append(f"- LoRA recovers {100 * share:.0f}% of full's recovery at {item['fraction']:.0%} ({won}): "
                         f"{'met' if item['met'] else 'not met'}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the figure


def plot(path: str, png: str, label: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sentinel_core.fileio import write_bytes_atomic

    summary = json.loads(Path(path).read_text())["summary"]
    rows = summary["rows"]
    fractions = sorted({r["fraction"] for r in rows})
    fig, axes = plt.subplots(1, len(fractions), figsize=(5.5 * len(fractions), 4), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        these = sorted((r for r in rows if r["fraction"] == fraction), key=lambda r: r["gap"])
        names = [r["arm"] for r in these]
        gaps = [100 * r["gap"] for r in these]
        low = [100 * (r["gap"] - r["gap_min"]) for r in these]
        high = [100 * (r["gap_max"] - r["gap"]) for r in these]
        ax.barh(names, gaps, xerr=[low, high], color="tab:blue", alpha=0.8)
        ax.set_title(f"{fraction:.0%} of heads removed")
        ax.set_xlabel("test ppl above the reference (%)")
        ax.invert_yaxis()
    fig.suptitle(f"Recovery after pruning{': ' + label if label else ''}: test perplexity above the unpruned model "
                 "fine-tuned the same way\n(mean over seeds; whiskers span the seeds)")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(png, buffer.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    arms = sub.add_parser("arms")
    arms.add_argument("--model", default="demo")
    arms.add_argument("--data", default="demo")
    arms.add_argument("--scorer", default="gradient")
    arms.add_argument("--fractions", default="0.3,0.5")
    arms.add_argument("--arms", default="plain,adaptive,distill,plain+lora,distill+lora")
    arms.add_argument("--rounds", type=int, default=3)
    arms.add_argument("--round-arms", default="plain,distill")
    arms.add_argument("--seeds", default="0,1,2")
    arms.add_argument("--steps", type=int, default=60)
    arms.add_argument("--batch-size", type=int, default=8)
    arms.add_argument("--block-size", type=int, default=128)
    arms.add_argument("--learning-rate", type=float, default=3e-4)
    arms.add_argument("--eval-every", type=int, default=20)
    arms.add_argument("--max-eval-blocks", type=int, default=32)
    arms.add_argument("--max-test-blocks", type=int, default=256)
    arms.add_argument("--lora-rank", type=int, default=16)
    arms.add_argument("--device", default="auto")
    arms.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery-demo.json"))
    memory = sub.add_parser("memory")
    memory.add_argument("--batch-size", type=int, default=8)
    memory.add_argument("--block-size", type=int, default=256)
    memory.add_argument("--steps", type=int, default=3)
    memory.add_argument("--lora-rank", type=int, default=16)
    memory.add_argument("--keep-best", action="store_true",
                        help="evaluate after every step with keep-best on (the product's default selection)")
    memory.add_argument("--out", default=str(ROOT / "bench" / "results" / "recovery-memory.json"))
    sub.add_parser("table", help="print the docs table of an arms result").add_argument("result")
    figure = sub.add_parser("plot")
    figure.add_argument("result")
    figure.add_argument("--png", default=str(ROOT / "docs" / "img" / "recovery.png"))
    figure.add_argument("--label", default="", help="the model's name, for the title")
    for hidden in ("one-arm", "one-memory"):
        sub.add_parser(hidden).add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    if args.part == "one-arm":
        print(json.dumps(run_arm(json.loads(args.spec))))
    elif args.part == "one-memory":
        print(json.dumps(memory_arm(json.loads(args.spec))))
    elif args.part == "arms":
        run_arms(args)
    elif args.part == "memory":
        run_memory(args)
    elif args.part == "table":
        print(table(args.result))
    else:
        plot(args.result, args.png, args.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
