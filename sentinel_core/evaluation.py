"""Held-out perplexity with a sliding window, throughput, and parameter counts.

The window scheme follows the transformers guide "Perplexity of fixed-length models": windows
of ``block_size`` tokens start every ``stride`` tokens, and only the tokens of a window that no
earlier window scored are scored, so each token is scored at most once and with as much
context as the window allows. Loss is the token-weighted mean negative log-likelihood, computed
here from the logits (sum of per-token NLL / number of scored tokens).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_core import distributed
from sentinel_core.data import IGNORE_INDEX
from sentinel_core.errors import SentinelError

__all__ = ["EvalResult", "evaluate", "count_parameters", "sliding_windows"]



@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    ``tokens`` counts scored tokens (the NLL denominator). ``seconds`` is the wall time of the
    whole evaluation loop. ``tokens_per_second`` is the model's throughput in input tokens
    (every token fed through the model, overlap included, padding excluded) per second, timed
    from the end of the first batch when there are several: the first forward pays one-off
    costs (on a GPU the CUDA context and kernel selection), which would otherwise be charged
    to whichever model a run evaluates first.
    """

    loss: float
    perplexity: float
    tokens: int
    seconds: float
    tokens_per_second: float
    input_tokens: int


def sliding_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows as ``(begin, end, first_scored)``: tokens ``ids[first_scored:end]`` are scored.

    ``first_scored`` is at least ``begin + 1`` since a window's first token has no context.
    """
    windows = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + block_size, n_tokens)
        windows.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise SentinelError(f"model returned {type(output).__name__} without logits; "
                            "give a causal LM whose output has .logits")
    return logits


def max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _as_ids(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    t = torch.as_tensor(ids)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1:
        raise SentinelError(f"ids must be a 1-D token stream, got shape {tuple(t.shape)}; "
                            "pass e.g. LMData.validation.ids")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise SentinelError(f"ids must be integer token ids, got dtype {t.dtype}")
    return t.long()


def evaluate(
    model: nn.Module,
    ids: torch.Tensor | Sequence[int],
    *,
    block_size: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = False,
    split_over_processes: bool = False,
) -> EvalResult:
    """Perplexity of ``model`` on the token stream ``ids`` with a sliding window.

    Args:
        model: a causal LM returning logits ``[batch, seq, vocab]`` (e.g. a transformers model).
        ids: 1-D token stream (e.g. ``LMData.validation.ids``); at least 2 tokens.
        block_size: window length; at most the model's position limit.
        stride: how far windows advance (1..block_size, default block_size). A smaller stride
            gives each scored token more context at more compute.
        batch_size: windows per forward pass; the last, shorter window is right-padded and
            its padding is excluded from the loss.
        device: where to run; the model is moved there if needed (default: the model's).
        progress: show a tqdm bar (only when stderr is a terminal).
        split_over_processes: under a multi-process launch, this process scores every
            ``world``-th window from its rank on and the token-loss sums, token counts and
            throughput are summed over the processes, so every process returns the result of
            the whole stream (each must call it); one process scores every window.

    Returns:
        EvalResult with the token-weighted mean NLL (``loss``), ``exp(loss)``, the count of
        scored tokens, wall seconds and throughput.
    """
    stream = _as_ids(ids)
    n = int(stream.numel())
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise SentinelError(f"block_size={block_size!r} must be an integer >= 2")
    stride = block_size if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise SentinelError(f"stride={stride!r} must be an integer from 1 to block_size={block_size}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SentinelError(f"batch_size={batch_size!r} must be an integer >= 1")
    if n < 2:
        raise SentinelError(f"ids has {n} token(s); perplexity needs at least 2")
    limit = max_positions(model)
    if limit is not None and block_size > limit:
        raise SentinelError(f"block_size={block_size} exceeds the model's {limit} positions; "
                            f"use block_size <= {limit}")

    target = torch.device(device) if device is not None else model_device(model)
    if model_device(model) != target:
        model.to(target)

    from transformers import PreTrainedModel

    extra = {"use_cache": False} if isinstance(model, PreTrainedModel) else {}
    windows = sliding_windows(n, block_size, stride)
    split = split_over_processes and distributed.world_size() > 1
    if split:
        windows = windows[distributed.rank()::distributed.world_size()]
        progress = progress and distributed.is_main()

    from tqdm.auto import tqdm

    bar = tqdm(total=len(windows), desc="Evaluating", unit="window",
               disable=not (progress and sys.stderr.isatty()))
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    scored = 0
    fed = 0
    start = time.perf_counter()
    warm: tuple[float, int] | None = None  # (clock, tokens fed) once the first batch is done
    try:
        with torch.inference_mode():
            for b in range(0, len(windows), batch_size):
                group = windows[b:b + batch_size]
                width = max(end - begin for begin, end, _ in group)
                input_ids = torch.zeros((len(group), width), dtype=torch.long)
                labels = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
                mask = torch.zeros((len(group), width), dtype=torch.long)
                for i, (begin, end, first) in enumerate(group):
                    length = end - begin
                    input_ids[i, :length] = stream[begin:end]
                    mask[i, :length] = 1
                    labels[i, first - begin:length] = stream[first:end]
                padded = bool((mask == 0).any())
                input_ids = input_ids.to(target)
                kwargs = dict(extra)
                if padded:
                    kwargs["attention_mask"] = mask.to(target)
                logits = _logits(model(input_ids, **kwargs))
                # Position t predicts token t+1; only labelled targets count, so padding and
                # context-only tokens never enter the sum.
                shift_labels = labels[:, 1:].to(target)
                keep = shift_labels != IGNORE_INDEX
                # Row by row, so the float32 copy of the selected logits is one window, not a batch;
                # summed on the device and read back once per batch (MPS has no float64).
                batch_nll = torch.zeros((), dtype=torch.float32 if target.type == "mps" else torch.float64,
                                        device=target)
                for i in range(logits.shape[0]):
                    rows = logits[i, :-1][keep[i]].float()
                    batch_nll += F.cross_entropy(rows, shift_labels[i][keep[i]], reduction="sum").to(batch_nll.dtype)
                nll_sum += float(batch_nll)
                scored += int(keep.sum())
                fed += int(mask.sum())
                bar.update(len(group))
                if warm is None and b + batch_size < len(windows):
                    # float(batch_nll) above waited for the GPU, so the clock is after the batch.
                    warm = (time.perf_counter(), fed)
        if target.type == "cuda":
            torch.cuda.synchronize(target)
    finally:
        bar.close()
        model.train(was_training)
    end = time.perf_counter()
    seconds = end - start
    timed_seconds, timed_tokens = (end - warm[0], fed - warm[1]) if warm is not None else (seconds, fed)
    if split:
        # Sums of what each process scored; the processes ran at once, so time is the slowest's.
        nll_sum, scored, fed, timed_tokens = distributed.all_reduce_sum([nll_sum, scored, fed, timed_tokens])
        scored, fed, timed_tokens = int(scored), int(fed), int(timed_tokens)
        seconds, timed_seconds = distributed.all_reduce_max([seconds, timed_seconds])
    loss = nll_sum / scored
    perplexity = math.exp(loss) if loss < 700 else math.inf
    return EvalResult(loss=loss, perplexity=perplexity, tokens=scored, seconds=seconds,
                      tokens_per_second=timed_tokens / timed_seconds if timed_seconds > 0 else math.inf,
                      input_tokens=fed)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    found = []
    for _, module in model.named_modules():
        if "Attention" in type(module).__name__:
            found.append(module)
    if found:
        # Keep only outermost ones, so a wrapper and its inner attention are not counted twice
        # (parameters are de-duplicated anyway, this keeps the list meaningful).
        inner = {id(m) for outer in found for m in outer.modules() if m is not outer}
        return [m for m in found if id(m) not in inner]
    layers = None
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        layers = [getattr(layer, "attn", None) for layer in model.transformer.h]
    elif hasattr(model, "model") and hasattr(model.model, "layers"):
        layers = [getattr(layer, "self_attn", None) for layer in model.model.layers]
    return [m for m in (layers or []) if isinstance(m, nn.Module)]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts: ``total`` (tied weights once) and ``attention`` (attention modules).

    Attention modules are those whose class name contains "Attention" (GPT-2 ``attn``, LLaMA
    ``self_attn``, ...), falling back to ``transformer.h[i].attn`` / ``model.layers[i].self_attn``.
    """
    total = sum(p.numel() for p in model.parameters())
    seen: set[int] = set()
    attention = 0
    for module in _attention_modules(model):
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                attention += p.numel()
    return {"total": int(total), "attention": int(attention)}
