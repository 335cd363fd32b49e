"""The ``sentinel`` command line.

Each subcommand lives in its own module and imports torch and transformers only when it runs,
so ``sentinel --help`` stays fast. A user mistake (:class:`SentinelError`, a bad flag) prints one
line ``Error: ...`` and exits with status 1 or 2, without a traceback.
"""

from __future__ import annotations

import os
import sys

import click

from .. import __version__
from ..errors import SentinelError


class SentinelGroup(click.Group):
    """Turns a :class:`SentinelError` raised by any subcommand into one ``Error:`` line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SentinelError as exc:
            raise click.ClickException(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from ..plugins import list_plugins

    click.echo(f"sentinel-core {__version__}")
    for plugin in list_plugins():
        if plugin["name"].startswith("sentinel_core."):
            continue
        click.echo(f"{plugin['name']} {plugin['version'] or 'unknown'}")
    ctx.exit()


@click.group(cls=SentinelGroup)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of sentinel-core and its plugins, then exit.")
def cli() -> None:
    """Sentinel: prune, fine-tune and regrow the attention heads of language models."""


def main() -> None:
    """Console-script entry point."""
    from . import commands  # noqa: F401  (registers the subcommands)

    if not sys.stderr.isatty():
        # Progress bars written into a log file are noise; our own bars check isatty too.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        cli(prog_name="sentinel")
    except KeyboardInterrupt:  # a run that handles Ctrl-C itself has already said how to resume
        click.echo("Interrupted.", err=True)
        sys.exit(130)
