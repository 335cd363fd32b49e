"""Head surgery and head scoring on a CUDA GPU (not a test; needs a GPU).

(a) Surgery: latency and peak memory of one full forward (LM head included) of a dense model,
    of the same model with 30% / 50% of its heads physically removed (``prune_heads``), and
    with the same heads masked (``mask_heads``). Models: a distilgpt2-shaped GPT-2 (6 x 12
    heads, d 768, vocab 50257) and a Llama-3.2-1B-shaped LLaMA (16 layers, 32 query heads in 8
    key/value groups, d 2048, vocab 128256), random weights, sdpa attention, in bfloat16 (and
    the GPT-2 in float32 too). Heads are a seeded random choice over all (layer, head) pairs;
    under grouped-query attention a key/value head goes only with its whole group, so the
    LLaMA mostly loses query and output-projection width.
    - Latency: CUDA events around the forward under ``inference_mode``; every variant stays
      resident, runs ``--warmup`` untimed forwards, then ``--repeats`` timed ones interleaved
      across variants in a rotating order. Median (and min, max) in milliseconds.
    - Peak memory: ``max_memory_allocated`` during one forward, minus what was allocated
      before it (activations and logits; the weights are the ``params`` column).
    - Predicted speedup: dense FLOPs / variant FLOPs, counted from the tensors the variant
      really has (every linear layer's weight, the LM head included, plus the full seq x seq
      score and value products per query slot). Masked variants compute what dense does.
(b) Scoring: entropy and gradient scoring of ``--score-batches`` batches of 8 x 512 tokens on
    the float32 GPT-2, against an eager and an sdpa forward of the whole LM over the same
    tokens. Rotating order, ``--repeats`` rounds, ratio forward time / scorer time per round,
    median and quartiles (1.0 = as fast as a forward; the issue's goal for entropy is >= 0.8
    of the forward's throughput).

    python bench/bench_gpu.py [--repeats 20] [--out bench/results/gpu.json]

Ratios are within one run on one GPU; absolute numbers depend on the card.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT, ROOT / "plugins" / "sentinel-entropy"):
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from sentinel_core.fileio import write_json_atomic  # noqa: E402
from sentinel_core.surgery import get_head_map, mask_heads, prune_heads  # noqa: E402

hf_logging.set_verbosity_error()

FRACTIONS = (0.3, 0.5)
SHAPES = ((1, 128), (8, 512), (16, 1024))


def gpt2(dtype: torch.dtype) -> nn.Module:
    config = GPT2Config(n_layer=6, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024,
                        attn_implementation="sdpa")
    return GPT2LMHeadModel(config).to(dtype).eval()


def llama(dtype: torch.dtype) -> nn.Module:
    config = LlamaConfig(num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, hidden_size=2048,
                         head_dim=64, intermediate_size=8192, vocab_size=128256, max_position_embeddings=2048,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(dtype).eval()


MODELS = {"gpt2-distil-bf16": (gpt2, torch.bfloat16), "gpt2-distil-fp32": (gpt2, torch.float32),
          "llama-1b-bf16": (llama, torch.bfloat16)}


def choose_heads(model: nn.Module, fraction: float, seed: int = 0) -> dict[int, list[int]]:
    head_map = get_head_map(model)
    pairs = [(layer, head) for layer, heads in enumerate(head_map.layers) for head in heads]
    random.Random(seed).shuffle(pairs)
    chosen: dict[int, list[int]] = {}
    for layer, head in sorted(pairs[: round(fraction * len(pairs))]):
        chosen.setdefault(layer, []).append(head)
    return chosen


def _query_slots(model: nn.Module) -> list[int]:
    """Query-head slots each layer computes (dead, gated GQA slots included)."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if isinstance(model, GPT2LMHeadModel):
        return [block.attn.c_proj.weight.shape[0] // head_dim for block in model.transformer.h]
    return [layer.self_attn.o_proj.weight.shape[1] // head_dim for layer in model.model.layers]


def flops(model: nn.Module, batch: int, seq: int) -> int:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    tokens = batch * seq
    total = sum(2 * tokens * m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear | Conv1D))
    return total + sum(2 * 2 * batch * slots * seq * seq * head_dim for slots in _query_slots(model))


def build_variants(name: str) -> dict[str, nn.Module]:
    maker, dtype = MODELS[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        dense = maker(dtype)
    variants = {"dense": dense}
    for fraction in FRACTIONS:
        heads = choose_heads(dense, fraction)
        pruned, masked = copy.deepcopy(dense), copy.deepcopy(dense)
        prune_heads(pruned, heads)
        mask_heads(masked, heads)
        variants[f"pruned{round(fraction * 100)}"] = pruned
        variants[f"masked{round(fraction * 100)}"] = masked
    return variants


def time_forward(model: nn.Module, ids: torch.Tensor) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.inference_mode():
        start.record()
        model(ids, use_cache=False)
        end.record()
    end.synchronize()
    return start.elapsed_time(end)


def peak_rise(model: nn.Module, ids: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        out = model(ids, use_cache=False)
    torch.cuda.synchronize()
    rise = torch.cuda.max_memory_allocated() - before
    del out
    return rise


def bench_surgery(name: str, repeats: int, warmup: int) -> list[dict]:
    variants = build_variants(name)
    vocab = variants["dense"].config.vocab_size
    rows = []
    for batch, seq in SHAPES:
        ids = torch.randint(0, vocab, (batch, seq), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(batch * 1000 + seq))
        names = list(variants)
        for variant in names:
            for _ in range(warmup):
                time_forward(variants[variant], ids)
        times: dict[str, list[float]] = {v: [] for v in names}
        for round_ in range(repeats):
            order = names[round_ % len(names):] + names[: round_ % len(names)]
            for variant in order:
                times[variant].append(time_forward(variants[variant], ids))
        dense_ms = statistics.median(times["dense"])
        dense_flops = flops(variants["dense"], batch, seq)
        for variant in names:
            model = variants[variant]
            median = statistics.median(times[variant])
            predicted = 1.0 if not variant.startswith("pruned") else dense_flops / flops(model, batch, seq)
            rows.append({
                "model": name, "batch": batch, "seq": seq, "variant": variant,
                "params": sum(p.numel() for p in model.parameters()),
                "median_ms": median, "min_ms": min(times[variant]), "max_ms": max(times[variant]),
                "speedup": dense_ms / median, "predicted_speedup": predicted,
                "peak_rise_bytes": peak_rise(model, ids),
            })
        del ids
    del variants
    torch.cuda.empty_cache()
    return rows


def score_batches(n: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (8, 512), generator=generator).cuda()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def bench_scoring(repeats: int, n_batches: int) -> dict:
    from sentinel_entropy import entropy_scores

    from sentinel_core.strategies.gradient_scorer import gradient_scores

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = gpt2(torch.float32)
    batches = score_batches(n_batches, model.config.vocab_size)

    def forward(impl: str):
        def run():
            model.set_attn_implementation(impl)
            with torch.inference_mode():
                for batch in batches:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            model.set_attn_implementation("sdpa")
        return run

    rows = {"forward_eager": forward("eager"), "forward_sdpa": forward("sdpa"),
            "entropy": lambda: entropy_scores(model, batches), "gradient": lambda: gradient_scores(model, batches)}
    for run in rows.values():  # warm-up: kernels, allocator
        run()
    seconds: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            torch.cuda.synchronize()
            start = time.perf_counter()
            rows[name]()
            torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    result = {"batches": n_batches, "batch_shape": [8, 512], "repeats": repeats, "rows": {}}
    for name in names:
        ratios = [f / s for f, s in zip(seconds["forward_eager"], seconds[name], strict=True)]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        result["rows"][name] = {"median_s": statistics.median(seconds[name]),
                                "throughput_vs_eager_forward": {"median": median, "q1": q1, "q3": q3},
                                "throughput_vs_sdpa_forward": statistics.median(
                                    f / s for f, s in zip(seconds["forward_sdpa"], seconds[name], strict=True))}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--score-batches", type=int, default=4)
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU; the CPU benchmarks are bench_surgery.py and bench_scoring.py")
    torch.backends.cuda.matmul.allow_tf32 = True  # what a GPU user runs float32 with
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "surgery": [], "scoring": None}
    print(f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}")
    print(f"{'model':18} {'batch x seq':>11} {'variant':9} {'ms':>8} {'speedup':>8} {'predicted':>9} {'peak MiB':>9}")
    for name in args.models.split(","):
        rows = bench_surgery(name, args.repeats, args.warmup)
        result["surgery"].extend(rows)
        for r in rows:
            print(f"{r['model']:18} {r['batch']:>4} x {r['seq']:<5} {r['variant']:9} {r['median_ms']:8.2f} "
                  f"{r['speedup']:8.2f} {r['predicted_speedup']:9.2f} {r['peak_rise_bytes'] / 2**20:9.1f}")
    if not args.skip_scoring:
        result["scoring"] = bench_scoring(max(5, args.repeats // 2), args.score_batches)
        for name, row in result["scoring"]["rows"].items():
            t = row["throughput_vs_eager_forward"]
            print(f"{name:14} {row['median_s'] * 1000:8.1f} ms  vs eager forward {t['median']:.2f} "
                  f"[{t['q1']:.2f}, {t['q3']:.2f}]  vs sdpa forward {row['throughput_vs_sdpa_forward']:.2f}")
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
