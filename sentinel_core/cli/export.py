"""``sentinel export``: a stock transformers checkpoint from a Sentinel model or run."""

from __future__ import annotations

import json

import click

from . import cli


@cli.command("export")
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "export_format", type=click.Choice(["transformers", "dense"]), default="transformers",
              show_default=True,
              help="transformers: the smallest checkpoint stock transformers opens (LLaMA family: the pruned head "
                   "counts, uneven layers padded; GPT-2: the dense form); dense: the original shapes with pruned "
                   "heads zeroed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_command(src: str, out: str, export_format: str, as_json: bool) -> None:
    """Write the model in SRC (a Sentinel checkpoint, a model folder, a run folder, 'demo' or
    'demo-llama') to OUT as a plain save_pretrained checkpoint that opens without Sentinel."""
    from ..defaults import resolve_model
    from ..export import export_checkpoint

    report = export_checkpoint(resolve_model(src), out, format=export_format)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.describe())
