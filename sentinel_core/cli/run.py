"""``sentinel run``: the whole pipeline, from flags and/or a TOML config file."""

from __future__ import annotations

from typing import Any

import click

from . import cli

# flag name -> ExperimentConfig field, for flags whose names differ from the field.
_FIELD_FOR_FLAG = {"model": "model_name"}


@cli.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file; flags override it.")
@click.option("--model", help="Hub name or local directory of a causal LM, 'demo' or 'demo-llama'.")
@click.option("--data", help="Hub dataset NAME[:CONFIG], a local file or folder, or 'demo'.")
@click.option("--pruning-percent", type=float, help="Fraction of the original heads to remove, in [0, 1).")
@click.option("--num-epochs", type=int, help="Fine-tuning epochs.")
@click.option("--batch-size", type=int)
@click.option("--learning-rate", type=float)
@click.option("--device", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--output-dir", help="Where the model, metrics, plots and summary go.")
@click.option("--scorer", help="Head-importance strategy (see `sentinel plugins`).")
@click.option("--prune-strategy", help="Selection policy: global or per-layer.")
@click.option("--prune-mode", type=click.Choice(["remove", "mask"]), help="Remove heads physically, or mask them.")
@click.option("--fine-tune", "fine_tune", help="Fine-tuning strategy (plain, adaptive, ...).")
@click.option("--growth-strategy", help="Where to grow heads back (see `sentinel plugins`).")
@click.option("--growth-percent", type=float, help="Heads to grow back, as a fraction of the original count.")
@click.option("--max-steps", type=int, help="Cap on optimizer steps per fine-tuning stage.")
@click.option("--block-size", type=int, help="Tokens per training block.")
@click.option("--seed", type=int)
@click.option("--test-mode", is_flag=True, default=None, help="A few steps on a little data: a smoke test.")
@click.option("--quiet", is_flag=True, default=None, help="No progress bars (metrics are still logged).")
@click.option("--export", type=click.Choice(["transformers", "dense"]),
              help="After the final stage, also write a stock transformers checkpoint to DIR/export.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), help="Continue an interrupted run in DIR.")
def run_command(config_file: str | None, resume_dir: str | None, **flags: Any) -> None:
    """Score, prune, fine-tune (and optionally grow) a model, then evaluate and save it."""
    from ..config import ExperimentConfig
    from ..pipeline import resume_experiment, run_experiment

    overrides = {_FIELD_FOR_FLAG.get(k, k): v for k, v in flags.items() if v is not None}
    if resume_dir is not None:
        if config_file or overrides:
            raise click.UsageError("--resume takes the settings saved in DIR; drop the other flags")
        _, _, summary = resume_experiment(resume_dir)
    else:
        config = (ExperimentConfig.from_toml(config_file, **overrides) if config_file
                  else ExperimentConfig.from_dict(overrides))
        _, _, summary = run_experiment(config)
    _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    ppl = summary.get("perplexity", {})
    parts = [f"{stage} {value:.2f}" for stage, value in ppl.items() if isinstance(value, (int, float))]
    heads = summary.get("heads", {})
    click.echo(f"perplexity: {', '.join(parts)}")
    if heads:
        click.echo(f"heads: {heads.get('original')} -> {heads.get('final')} ({heads.get('removed', 0)} removed, "
                   f"{heads.get('grown', 0)} grown)")
    click.echo(f"results in {summary.get('output_dir')}")
