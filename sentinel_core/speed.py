"""Throughput of two models compared the way the benchmarks compare them.

One evaluation pass per model says little on a shared machine: another job starting during one
pass and not the other moves the ratio by tens of percent. :func:`compare_throughput` instead
times both models on the same batches, alternating within each repeat and which model goes
first, after an untimed warm-up pass each; the ratio is taken per repeat (so both halves of a
ratio saw the same load), and the median of the repeats is reported with its range.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from .evaluation import model_device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_seconds(model: nn.Module, batches: list[torch.Tensor]) -> float:
    device = model_device(model)
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            model(ids.to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - start


def compare_throughput(before: nn.Module, after: nn.Module, blocks: torch.Tensor, *, batch_size: int,
                       repeats: int) -> dict[str, Any]:
    """Forward-pass tokens per second of ``before`` and ``after`` on ``blocks``, interleaved.

    :param before: the reference model (e.g. the unpruned baseline), in eval mode on its device.
    :param after: the model to compare (e.g. the pruned one).
    :param blocks: ``[n, block_size]`` token ids; both models run every block, ``batch_size`` at a time.
    :param batch_size: blocks per forward pass.
    :param repeats: timed repeats (at least 1); each times both models once.
    :return: ``ratio`` (median over repeats of after/before tokens/s), ``ratio_range`` ([min, max]),
        ``tokens_per_second_before`` / ``_after`` (medians) with their ranges, ``repeats``,
        ``tokens_per_pass`` and ``method: "interleaved"``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    batches = [blocks[i:i + batch_size] for i in range(0, blocks.shape[0], batch_size)]
    tokens = int(blocks.numel())
    models = {"before": before, "after": after}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        for m in models.values():
            _forward_seconds(m, batches[:1])  # warm-up: allocator, kernels, caches
        rates: dict[str, list[float]] = {"before": [], "after": []}
        for repeat in range(repeats):
            order = ("before", "after") if repeat % 2 == 0 else ("after", "before")
            for name in order:
                rates[name].append(tokens / _forward_seconds(models[name], batches))
    finally:
        for name, m in models.items():
            m.train(was_training[name])
    ratios = [a / b for a, b in zip(rates["after"], rates["before"], strict=True)]
    return {
        "method": "interleaved",
        "repeats": repeats,
        "tokens_per_pass": tokens,
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "tokens_per_second_before": statistics.median(rates["before"]),
        "tokens_per_second_after": statistics.median(rates["after"]),
        "tokens_per_second_before_range": [min(rates["before"]), max(rates["before"])],
        "tokens_per_second_after_range": [min(rates["after"]), max(rates["after"])],
    }
