"""Text generation through ``model.generate``: validated parameters, seeded sampling, batching.

Pruned models (layers with different head counts) need nothing special: transformers' dynamic
cache sizes itself per layer from the keys it sees.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sentinel_core.data import collate
from sentinel_core.errors import SentinelError
from sentinel_core.evaluation import max_positions, model_device

__all__ = ["generate_text", "stream_text"]


def _check_params(max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, do_sample: bool) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SentinelError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise SentinelError(f"temperature={temperature!r} must be > 0 when sampling "
                            "(use do_sample=False for greedy decoding)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise SentinelError(f"top_k={top_k!r} must be an integer >= 0 (0 disables top-k)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise SentinelError(f"top_p={top_p!r} must be in (0, 1] (1 disables nucleus sampling)")


def _prompts(prompt: str | Sequence[str]) -> tuple[list[str], bool]:
    if isinstance(prompt, str):
        return [prompt], True
    prompts = list(prompt)
    if not prompts:
        raise SentinelError("prompt list is empty; give at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise SentinelError(f"prompt {bad[0]!r} is not a string; give a string or a list of strings")
    return prompts, False


def _encode(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    # The tokenizer's own special tokens (e.g. LLaMA's BOS) are what the model was trained with.
    encoded = [list(x) for x in tokenizer(prompts)["input_ids"]]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for i, ids in enumerate(encoded):
        if not ids:
            # GPT-2 style: an empty prompt starts from the document separator.
            if start is None:
                raise SentinelError("prompt is empty and the tokenizer has no BOS/EOS token to start "
                                    "from; give a non-empty prompt")
            encoded[i] = [start]
    return encoded


def generate_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[str],
    *,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    seed: int | None = None,
    do_sample: bool = True,
    streamer: Any = None,
) -> str | list[str]:
    """Continue ``prompt`` (a string, or a list of strings generated as one left-padded batch).

    Returns only the new text (for a list, a list in the same order), cut at the first EOS.
    ``temperature``/``top_k``/``top_p`` apply when ``do_sample`` is true (``top_k=0`` and
    ``top_p=1`` disable those filters); ``do_sample=False`` is greedy decoding. A ``seed`` makes
    sampling reproducible without touching the global random state. ``streamer`` (e.g.
    ``transformers.TextStreamer``) receives tokens as they are generated; single prompts only.
    The tokenizer is not modified: without a pad token, EOS is used for padding.
    """
    _check_params(max_new_tokens, temperature, top_k, top_p, do_sample)
    prompts, single = _prompts(prompt)
    if streamer is not None and len(prompts) > 1:
        raise SentinelError(f"streaming works with one prompt, got {len(prompts)}; "
                            "pass a single string or streamer=None")

    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if pad_id is None:
        pad_id = 0  # no pad or EOS: padded positions are masked out, so any id works

    encoded = _encode(tokenizer, prompts)
    prompt_len = max(len(ids) for ids in encoded)
    limit = max_positions(model)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise SentinelError(f"prompt ({prompt_len} tokens) + max_new_tokens={max_new_tokens} exceeds "
                            f"the model's {limit} positions; use max_new_tokens <= "
                            f"{max(limit - prompt_len, 0)} or a shorter prompt")

    device = model_device(model)
    batch = collate(encoded, pad_id, padding_side="left")
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)

    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    if do_sample:
        kwargs.update(temperature=float(temperature), top_k=top_k, top_p=float(top_p))
    if streamer is not None:
        kwargs["streamer"] = streamer

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if seed is None:
                out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            else:
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(seed)
                    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        model.train(was_training)

    texts = []
    for row in out[:, input_ids.shape[1]:].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False))
    return texts[0] if single else texts


def stream_text(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    timeout: float | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the new text of a single prompt piece by piece as it is generated.

    Takes the keyword arguments of :func:`generate_text` (except ``streamer``). Generation runs
    in a background thread; an error there is re-raised here. ``timeout`` bounds the wait for
    each piece (seconds, default unbounded).
    """
    from transformers import TextIteratorStreamer

    if not isinstance(prompt, str):
        raise SentinelError(f"stream_text takes one prompt string, got {type(prompt).__name__}")
    if "streamer" in kwargs:
        raise SentinelError("stream_text makes its own streamer; call generate_text to pass one")
    _check_params(kwargs.get("max_new_tokens", 50), kwargs.get("temperature", 1.0),
                  kwargs.get("top_k", 50), kwargs.get("top_p", 1.0), kwargs.get("do_sample", True))
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=timeout,
                                    skip_special_tokens=True, clean_up_tokenization_spaces=False)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            generate_text(model, tokenizer, prompt, streamer=streamer, **kwargs)
        except BaseException as exc:  # handed to the consuming thread
            failure.append(exc)
            streamer.end()  # unblock the consumer, which then re-raises

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        thread.join()
    if failure:
        raise failure[0]
