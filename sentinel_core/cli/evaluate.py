"""``sentinel evaluate``: perplexity, speed and size of a model on held-out text, and lm-eval task accuracy."""

from __future__ import annotations

import math

import click

from ..fileio import dumps_strict
from . import cli
from .options import (
    device_map_option,
    device_option,
    dtype_option,
    load_checked,
    model_option,
    seed_option,
    trust_option,
)


@cli.command("evaluate")
@model_option
@click.option("--data", default=None,
              help="Hub dataset NAME[:CONFIG], local file/folder, or 'demo' [default: demo, unless --tasks is given].")
@click.option("--split", type=click.Choice(["validation", "test"]), default="validation", show_default=True)
@click.option("--block-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Sliding-window stride (default: the block size).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-blocks", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N blocks' worth of tokens.")
@click.option("--tasks", default=None, help="lm-evaluation-harness tasks, e.g. hellaswag,piqa (needs lm-eval).")
@click.option("--include-path", type=click.Path(file_okay=False), default=None,
              help="Folder of local lm-eval task YAMLs (for --tasks).")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Few-shot examples per task (default: the task's own).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N documents of each task.")
@click.option("--output", "output", type=click.Path(dir_okay=False), default=None,
              help="Also write the results as JSON to this file.")
@seed_option
@device_option
@dtype_option
@device_map_option
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate_command(model: str, data: str | None, split: str, block_size: int, stride: int | None, batch_size: int,
                     max_blocks: int | None, tasks: str | None, include_path: str | None, num_fewshot: int | None,
                     limit: int | None, output: str | None, seed: int, device: str, dtype: str, device_map: str | None, trust_remote_code: bool,
                     as_json: bool) -> None:
    """Measure perplexity (sliding window), tokens/s and parameter counts; with --tasks, task accuracy."""
    from ..config import resolve_device
    from ..errors import SentinelError
    from ..evaluation import count_parameters
    from ..fileio import write_json_atomic

    if tasks is not None:
        from ..downstream import prepare_tasks

        prepare_tasks(tasks, include_path)  # a missing lm-eval or an unknown task fails before the model loads
    elif include_path or num_fewshot is not None or limit is not None:
        raise SentinelError("--include-path, --num-fewshot and --limit apply to --tasks; add --tasks T1,T2")
    device = resolve_device(device)
    perplexity = data is not None or tasks is None  # --tasks alone scores the tasks only
    loaded, tokenizer = load_checked(model, device=device, trust_remote_code=trust_remote_code, dtype=dtype,
                                     device_map=device_map,
                                     block_size=block_size if perplexity else None)
    record = {"model": model, "parameters": count_parameters(loaded)}
    if perplexity:
        record.update(_perplexity(loaded, tokenizer, data or "demo", split, block_size, stride, batch_size,
                                  max_blocks, seed, device, progress=not as_json))
    if tasks is not None:
        from ..downstream import evaluate_tasks

        record["tasks"] = evaluate_tasks(loaded, tokenizer, tasks, include_path=include_path, num_fewshot=num_fewshot,
                                         limit=limit, batch_size=batch_size, device=device, progress=not as_json)
    if output:
        write_json_atomic(output, record)
    if as_json:
        click.echo(dumps_strict(record, indent=2))  # a non-finite loss is null, with "finite": false
    if "perplexity" in record and not record["finite"]:
        raise SentinelError(f"the loss of {model!r} on {split} is {record['loss']} (not finite): the model overflows "
                            "or diverged; try --device cpu in float32, or a checkpoint from before it diverged")
    if as_json:
        return
    params = record["parameters"]
    if "perplexity" in record:
        click.echo(f"perplexity {record['perplexity']:.3f} (loss {record['loss']:.4f}) on {record['tokens']} tokens "
                   f"of {split}; {record['tokens_per_second']:.0f} tokens/s; parameters {params['total']:,} "
                   f"(attention {params['attention']:,})")
    if "tasks" in record:
        from ..downstream import format_table

        click.echo(format_table(record["tasks"]))
    if output:
        click.echo(f"results in {output}")


def _perplexity(loaded, tokenizer, data: str, split: str, block_size: int, stride: int | None, batch_size: int,
                max_blocks: int | None, seed: int, device: str, progress: bool) -> dict:
    from ..data import load_data
    from ..defaults import resolve_data
    from ..errors import SentinelError
    from ..evaluation import evaluate

    # The seed picks the validation part of a single-source dataset, as `sentinel run` does.
    lm_data = load_data(resolve_data(data), tokenizer, block_size=block_size, seed=seed)
    token_split = getattr(lm_data, split)
    if token_split is None:
        raise SentinelError(f"data {data!r} has no {split} split; use --split validation")
    ids = token_split.ids if max_blocks is None else token_split.ids[: max_blocks * block_size]
    result = evaluate(loaded, ids, block_size=block_size, stride=stride, batch_size=batch_size, device=device,
                      progress=progress)
    return {"data": data, "split": split, "perplexity": result.perplexity, "loss": result.loss,
            "finite": math.isfinite(result.loss) and math.isfinite(result.perplexity), "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second}
