"""``sentinel prune``: score, remove (or mask) heads and save the model, without fine-tuning."""

from __future__ import annotations

import click

from . import cli
from .options import (
    device_map_option,
    device_option,
    dtype_option,
    model_option,
    option_assignments,
    seed_option,
    trust_option,
)
from .score import batch_size_option, block_size_option, calibration_option, data_option, load_for_scoring


@cli.command("prune")
@model_option
@data_option
@click.option("--scorer", default="entropy", show_default=True, help="Head-importance strategy (see `sentinel plugins`).")
@click.option("--pruning-percent", type=float, required=True,
              help="Fraction of the original heads that should be gone afterwards, in [0, 1).")
@click.option("--output-dir", required=True,
              help="A new or empty folder for the pruned model (or one that Sentinel saved a model into before).")
@click.option("--prune-strategy", default="global", show_default=True,
              help="Selection policy: global, per-layer, kv-groups or per-group (see `sentinel plugins`).")
@click.option("--prune-mode", type=click.Choice(["remove", "mask"]), default="remove", show_default=True,
              help="Remove heads physically, or gate them off.")
@click.option("--min-heads-per-layer", type=click.IntRange(min=0), default=1, show_default=True)
@option_assignments
@click.option("--export", type=click.Choice(["compact", "transformers", "dense"]), default="compact",
              show_default=True,
              help="compact: a Sentinel checkpoint; transformers: the smallest plain transformers checkpoint "
                   "(as `sentinel export`); dense: a plain transformers checkpoint in the original shapes with "
                   "pruned heads zeroed.")
@seed_option
@batch_size_option
@calibration_option
@block_size_option
@device_option
@dtype_option
@device_map_option
@trust_option
def prune_command(model: str, data: str | None, scorer: str, pruning_percent: float, output_dir: str,
                  prune_strategy: str, prune_mode: str, min_heads_per_layer: int, options: tuple[str, ...],
                  export: str, seed: int, batch_size: int, calibration_batches: int, block_size: int, device: str, dtype: str, device_map: str | None,
                  trust_remote_code: bool) -> None:
    """Score the heads of MODEL, take away the least important ones and save the result to --output-dir."""
    from .. import plugins
    from ..config import ExperimentConfig
    from ..evaluation import count_parameters
    from ..folders import check_model_folder, check_no_overlap
    from ..kv_cache import kv_cache_bytes_per_token
    from ..model_io import save_model
    from ..surgery import get_head_map

    config = ExperimentConfig(model_name=model, data=data, scorer=scorer, pruning_percent=pruning_percent, dtype=dtype,
                              prune_strategy=prune_strategy, prune_mode=prune_mode,
                              min_heads_per_layer=min_heads_per_layer, seed=seed, batch_size=batch_size,
                              calibration_batches=calibration_batches, block_size=block_size, device=device,
                              output_dir=output_dir, trust_remote_code=trust_remote_code)
    config = plugins.check_run(config.replace(options=plugins.parse_cli_options(config, options)))
    # The folder is checked before the model loads, and again when the model is written.
    check_model_folder(output_dir, what="--output-dir")
    check_no_overlap(output_dir, {"model": model, "data": data}, what="--output-dir")
    loaded, tokenizer, calibration = load_for_scoring(config, device_map)
    before = get_head_map(loaded)
    card = {"base_model": model, "calibration_data": data, "scorer": scorer,
            "prune_strategy": prune_strategy, "pruning_percent": pruning_percent, "prune_mode": prune_mode,
            "parameters_before": count_parameters(loaded), "kv_bytes_per_token_before": kv_cache_bytes_per_token(loaded)}
    scores = plugins.score_heads(scorer, model=loaded, batches=calibration, config=config)
    result = plugins.prune(prune_strategy, model=loaded, scores=scores, config=config)
    after = get_head_map(loaded)
    if export == "compact":
        save_model(loaded, tokenizer, output_dir, card=card)
    else:
        from ..export import export_model

        export_model(loaded, tokenizer, output_dir, format=export, card=card)
    original = before.num_layers * before.original_num_heads
    active_before = sum(len(before.active(layer)) for layer in range(before.num_layers))
    active_after = sum(len(after.active(layer)) for layer in range(after.num_layers))
    click.echo(f"{'masked' if result.mode == 'mask' else 'removed'} {result.count} heads "
               f"({scorer} scores, {prune_strategy}): {active_before} -> {active_after} of {original} "
               f"original heads active; saved {export} model to {output_dir}")
