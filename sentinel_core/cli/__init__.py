"""The ``sentinel`` command line.

Each subcommand lives in its own module and imports torch and transformers only when it runs,
so ``sentinel --help`` stays fast.

Exit codes (docs/cli.md): 0 success; 1 an error, printed as one line ``Error: ...`` without a
traceback (``-v`` adds the traceback); 2 a usage error (a bad flag); 130 stopped by Ctrl-C;
143 stopped by SIGTERM. A run stopped by a signal saves a checkpoint first and says how to
resume.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback

import click

from .. import __version__
from ..errors import RunInterrupted, SentinelError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SentinelGroup(click.Group):
    """Turns every failure of a subcommand into one ``Error:`` line and an exit code.

    A :class:`SentinelError` is a user mistake and its message says what to change. Anything
    else is a bug or an environment problem: it gets one line too, naming the exception, and
    ``-v`` shows the traceback.
    """

    _plugin_commands_loaded = False

    def _load_plugin_commands(self) -> None:
        # Plugins' commands (the register_commands hook) are loaded only when a listing or an
        # unknown name needs them, so `sentinel run ...` starts without importing every plugin.
        if not SentinelGroup._plugin_commands_loaded:
            SentinelGroup._plugin_commands_loaded = True
            from ..plugins import register_commands

            register_commands(self)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None:
            self._load_plugin_commands()
            command = super().get_command(ctx, name)
        return command

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            if _verbose(ctx):
                traceback.print_exc()
            reason = exc.reason if isinstance(exc, RunInterrupted) else "Ctrl-C"
            click.echo(f"Interrupted ({reason}).", err=True)
            raise click.exceptions.Exit(exc.exit_code if isinstance(exc, RunInterrupted) else 130) from None
        except SentinelError as exc:
            if _verbose(ctx):
                traceback.print_exc()
            raise click.ClickException(_first_line(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
            if _verbose(ctx):
                traceback.print_exc()
            hint = "" if _verbose(ctx) else " (run with -v for the traceback)"
            raise click.ClickException(f"{type(exc).__name__}: {_first_line(exc)}{hint}") from None


def _verbose(ctx: click.Context) -> bool:
    root = ctx.find_root()
    return bool((root.obj or {}).get("verbose"))


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
@click.option("-v", "--verbose", is_flag=True, help="More messages (debug), the libraries' info, and tracebacks of errors.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only (progress lines and notes hidden).")
@click.pass_context
def cli(ctx: click.Context, verbose: bool, quiet: bool) -> None:
    """Sentinel: prune, fine-tune and regrow the attention heads of language models."""
    from ..log import NORMAL, QUIET, VERBOSE, configure

    ctx.obj = {"verbose": verbose}
    configure(VERBOSE if verbose else QUIET if quiet else NORMAL)


def _raise_terminated(signum: int, frame: object) -> None:
    # SIGTERM outside the training loop (which handles it itself, checkpointing first):
    # unwind like Ctrl-C, so locks are released and the exit code says what happened.
    raise RunInterrupted("SIGTERM")


def main() -> None:
    """Console-script entry point."""
    from . import commands  # noqa: F401  (registers the subcommands)

    if not sys.stderr.isatty():
        # Progress bars written into a log file are noise; our own bars check isatty too.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        cli(prog_name="sentinel")
    except KeyboardInterrupt as exc:  # raised outside a subcommand, e.g. while parsing
        click.echo("Interrupted.", err=True)
        sys.exit(exc.exit_code if isinstance(exc, RunInterrupted) else 130)
