"""``sentinel report``: one self-contained HTML page about one or more finished runs."""

from __future__ import annotations

from pathlib import Path

import click

from . import cli


@cli.command("report")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write [default: DIR/report.html for one run, ./sentinel_report.html for several].")
def report_command(run_dirs: tuple[Path, ...], output: Path | None) -> None:
    """Write an HTML report (summary table, plots, samples) for the finished runs in RUN_DIRS."""
    from ..report import MULTI_REPORT_FILE, REPORT_FILE, write_report

    if output is None:
        output = run_dirs[0] / REPORT_FILE if len(run_dirs) == 1 else Path(MULTI_REPORT_FILE)
    click.echo(str(write_report(list(run_dirs), output)))
