"""``sentinel score``: the importance of every attention head, as a table or as JSON."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import click

from ..fileio import dumps_strict
from . import cli
from .options import (
    device_map_option,
    device_option,
    dtype_option,
    load_checked,
    model_option,
    option_assignments,
    seed_option,
    trust_option,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ExperimentConfig
    from ..results import HeadScores

data_option = click.option("--data", default=None,
                           help="Calibration text: Hub dataset NAME[:CONFIG], local file/folder, or 'demo'. "
                                "Data-free scorers (magnitude, random) do without.")
batch_size_option = click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
calibration_option = click.option("--calibration-batches", type=click.IntRange(min=1), default=8, show_default=True,
                                  help="Batches of training text the scorer sees.")
block_size_option = click.option("--block-size", type=click.IntRange(min=2), default=128, show_default=True)


def load_for_scoring(config: ExperimentConfig, device_map: str | None = None) -> tuple[Any, Any, list[dict[str, Any]]]:
    """Load the model, its tokenizer and the calibration batches that ``config`` names.

    The batches are the first ``calibration_batches`` of the shuffled training blocks (seeded),
    as ``sentinel run`` takes them. Without ``config.data`` the list is empty.
    """
    from ..config import resolve_device

    device = resolve_device(config.device)
    model, tokenizer = load_checked(config.model_name, device=device, trust_remote_code=config.trust_remote_code,
                                    block_size=config.block_size if config.data is not None else None,
                                    attn_implementation=config.attn_implementation, dtype=config.dtype,
                                    device_map=device_map)
    model.eval()
    calibration: list[dict[str, Any]] = []
    if config.data is not None:
        from ..data import calibration_batches, load_data
        from ..defaults import resolve_data

        data = load_data(resolve_data(config.data), tokenizer, block_size=config.block_size, seed=config.seed)
        calibration = calibration_batches(data.train.blocks, config.batch_size, config.calibration_batches,
                                          config.seed)
    return model, tokenizer, calibration


def score_table(scores: HeadScores) -> str:
    """Layers as rows, head ids as columns; NaN (heads not active) shown as ``-``."""
    matrix = scores.scores.tolist()
    width = len(matrix[0]) if matrix else 0
    cells = [[("-" if math.isnan(v) else f"{v:.4g}") for v in row] for row in matrix]
    col = max([len(c) for row in cells for c in row] + [len(str(width - 1)) if width else 1, 4])
    label = max(len("layer"), len(str(len(matrix) - 1)))
    lines = [f"{'layer':>{label}}  " + "  ".join(f"{h:>{col}}" for h in range(width))]
    for layer, row in enumerate(cells):
        lines.append(f"{layer:>{label}}  " + "  ".join(f"{c:>{col}}" for c in row))
    return "\n".join(lines)


@cli.command("score")
@model_option
@data_option
@click.option("--scorer", default="entropy", show_default=True, help="Head-importance strategy (see `sentinel plugins`).")
@seed_option
@batch_size_option
@calibration_option
@block_size_option
@device_option
@dtype_option
@device_map_option
@trust_option
@option_assignments
@click.option("--json", "as_json", is_flag=True, help="Print HeadScores as JSON (NaN as null).")
def score_command(model: str, data: str | None, scorer: str, seed: int, batch_size: int, calibration_batches: int,
                  block_size: int, device: str, dtype: str, device_map: str | None, trust_remote_code: bool, options: tuple[str, ...],
                  as_json: bool) -> None:
    """Score every attention head of MODEL (higher = more important) and print the matrix."""
    from .. import plugins
    from ..config import ExperimentConfig

    config = ExperimentConfig(model_name=model, data=data, scorer=scorer, seed=seed, batch_size=batch_size, dtype=dtype,
                              calibration_batches=calibration_batches, block_size=block_size, device=device,
                              trust_remote_code=trust_remote_code)
    config = plugins.check_run(config.replace(options=plugins.parse_cli_options(config, options)))
    loaded, _, calibration = load_for_scoring(config, device_map)
    result = plugins.score_heads(scorer, model=loaded, batches=calibration, config=config)
    if as_json:
        click.echo(dumps_strict(result.to_dict(), indent=2))
        return
    click.echo(f"{scorer} scores (higher = more important; '-' = not active), "
               f"{result.tokens_seen} tokens, {result.seconds:.2f} s")
    click.echo(score_table(result))
