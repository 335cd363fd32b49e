"""``sentinel run``: the whole pipeline, from flags and/or a TOML config file.

Every ExperimentConfig field is a flag here, derived from the field's declaration
(:mod:`sentinel_core.config`): its name, type, choices, default and help. Strategy options are
``-o KEY=VALUE``.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click

from ..config import ExperimentConfig, default_text, display_only_fields, field_info, field_kind, flag_name
from . import cli


def _field_option(name: str):
    """A click option for one config field; it defaults to None, meaning "not given"."""
    info = field_info(name)
    kind, _ = field_kind(name)
    help_text = f"{info.metadata['help']}  [default: {default_text(name)}]"
    flag = flag_name(name)
    if name == "options":
        return click.option("-o", flag, "options", multiple=True, metavar="KEY=VALUE", help=help_text)
    if kind is bool:
        return click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)
    if info.metadata["choices"]:
        return click.option(flag, name, type=click.Choice(info.metadata["choices"]), default=None, help=help_text)
    return click.option(flag, name, type={int: click.INT, float: click.FLOAT, str: click.STRING}[kind],
                        default=None, help=help_text)


def _config_options(command):
    for f in reversed(fields(ExperimentConfig)):
        command = _field_option(f.name)(command)
    return command


def _show_strategy(ctx: click.Context, _param: click.Parameter, name: str | None) -> None:
    if name is None or ctx.resilient_parsing:
        return
    from ..plugins import describe_strategy

    click.echo(describe_strategy(name))
    ctx.exit()


@cli.command("run")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file; flags override it.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False),
              help="Continue an interrupted run in DIR (with its own settings; only display flags may be given).")
@click.option("--help-strategy", metavar="NAME", expose_value=False, is_eager=True, callback=_show_strategy,
              help="Describe strategy NAME and its options, then exit.")
@_config_options
def run_command(config_file: str | None, resume_dir: str | None, **flags: Any) -> None:
    """Score, prune, fine-tune (and optionally grow) a model, then evaluate and save it."""
    from ..pipeline import resume_experiment, run_experiment
    from ..plugins import parse_cli_options

    given = {name: value for name, value in flags.items() if value is not None and value != ()}
    if resume_dir is not None:
        changing = sorted(set(given) - display_only_fields())
        if config_file or changing:
            shown = [flag_name(name) for name in changing] + (["--config"] if config_file else [])
            raise click.UsageError(f"--resume continues with the settings saved in DIR; drop {', '.join(shown)} "
                                   f"(only {', '.join(sorted(flag_name(n) for n in display_only_fields()))} may "
                                   "change)")
        _, _, summary = resume_experiment(resume_dir, **given)
    else:
        pairs = given.pop("options", ())
        config = (ExperimentConfig.from_toml(config_file, **given) if config_file
                  else ExperimentConfig.from_dict(given))
        if pairs:  # typed by the options' declarations, which depend on the strategies chosen
            config = config.replace(options={**config.options, **parse_cli_options(config, pairs)})
        _, _, summary = run_experiment(config)
    from ..distributed import is_main

    if is_main():  # under torchrun / accelerate launch, one summary for the run
        _print_summary(summary)


def _print_summary(summary: dict[str, Any]) -> None:
    ppl = summary.get("perplexity", {})
    parts = [f"{stage} {value:.2f}" for stage, value in ppl.items() if isinstance(value, (int, float))]
    heads = summary.get("heads", {})
    click.echo(f"perplexity (validation): {', '.join(parts)}")
    test = summary.get("test_perplexity") or {}
    tested = [f"{stage} {value:.2f}" for stage, value in test.items() if isinstance(value, (int, float))]
    if tested:
        click.echo(f"perplexity (test, held out): {', '.join(tested)}")
    if heads:
        click.echo(f"heads: {heads.get('original')} -> {heads.get('final')} ({heads.get('removed', 0)} removed, "
                   f"{heads.get('grown', 0)} grown)")
    click.echo(f"results in {summary.get('output_dir')}")
