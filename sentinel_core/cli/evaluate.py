"""``sentinel evaluate``: perplexity, speed and size of a model on held-out text."""

from __future__ import annotations

import math

import click

from ..fileio import dumps_strict
from . import cli
from .options import device_option, load_checked, model_option, seed_option, trust_option


@cli.command("evaluate")
@model_option
@click.option("--data", default="demo", show_default=True, help="Hub dataset NAME[:CONFIG], local file/folder, or 'demo'.")
@click.option("--split", type=click.Choice(["validation", "test"]), default="validation", show_default=True)
@click.option("--block-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Sliding-window stride (default: the block size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-blocks", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N blocks' worth of tokens.")
@seed_option
@device_option
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate_command(model: str, data: str, split: str, block_size: int, stride: int | None, batch_size: int,
                     max_blocks: int | None, seed: int, device: str, trust_remote_code: bool, as_json: bool) -> None:
    """Measure perplexity (sliding window), tokens/s and parameter counts."""
    from ..config import resolve_device
    from ..data import load_data
    from ..defaults import resolve_data
    from ..errors import SentinelError
    from ..evaluation import count_parameters, evaluate

    device = resolve_device(device)
    loaded, tokenizer = load_checked(model, device=device, trust_remote_code=trust_remote_code, block_size=block_size)
    # The seed picks the validation part of a single-source dataset, as `sentinel run` does.
    lm_data = load_data(resolve_data(data), tokenizer, block_size=block_size, seed=seed)
    token_split = getattr(lm_data, split)
    if token_split is None:
        raise SentinelError(f"data {data!r} has no {split} split; use --split validation")
    ids = token_split.ids if max_blocks is None else token_split.ids[: max_blocks * block_size]
    result = evaluate(loaded, ids, block_size=block_size, stride=stride, batch_size=batch_size, device=device,
                      progress=not as_json)
    finite = math.isfinite(result.loss) and math.isfinite(result.perplexity)
    record = {"model": model, "data": data, "split": split, "perplexity": result.perplexity, "loss": result.loss,
              "finite": finite, "tokens": result.tokens, "tokens_per_second": result.tokens_per_second,
              "parameters": count_parameters(loaded)}
    if as_json:
        click.echo(dumps_strict(record, indent=2))  # a non-finite loss is null, with "finite": false
    if not finite:
        raise SentinelError(f"the loss of {model!r} on {split} is {result.loss} (not finite): the model overflows "
                            "or diverged; try --device cpu in float32, or a checkpoint from before it diverged")
    if as_json:
        return
    params = record["parameters"]
    click.echo(f"perplexity {result.perplexity:.3f} (loss {result.loss:.4f}) on {result.tokens} tokens of {split}; "
               f"{result.tokens_per_second:.0f} tokens/s; parameters {params['total']:,} "
               f"(attention {params['attention']:,})")
