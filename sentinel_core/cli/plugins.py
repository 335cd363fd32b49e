"""``sentinel plugins``: what is installed, as a table or as JSON."""

from __future__ import annotations

import json

import click

from . import cli


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True,
              help="Print [{name, version, hooks, strategies}] as JSON; a plugin that failed to load has 'error'.")
def plugins_command(as_json: bool) -> None:
    """List the loaded plugins, their hooks, strategies and options, and any problems."""
    from ..plugins import clashes, failures, list_plugins

    listing = list_plugins()
    if as_json:
        broken = [{"name": f.name, "version": f.version, "entry_point": f.entry_point, "hooks": [], "strategies": [],
                   "error": f.error} for f in failures]
        click.echo(json.dumps(listing + broken, indent=2))
        return
    rows = [("plugin", "version", "hooks", "strategies")]
    for plugin in listing:
        strategies = ", ".join(f"{s['hook']}:{s['name']}" for s in plugin["strategies"])
        rows.append((plugin["name"], plugin["version"] or "", ", ".join(plugin["hooks"]), strategies))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3])
    # One line per option, naming every strategy that takes it (the training loop's options are
    # shared by every fine-tuner that uses it).
    options: dict[str, tuple[dict, list[str]]] = {}
    for plugin in listing:
        for s in plugin["strategies"]:
            for o in s["options"]:
                options.setdefault(o["name"], (o, []))[1].append(s["name"])
    if options:
        click.echo("\noptions (-o KEY=VALUE; `sentinel run --help-strategy NAME` for one strategy):")
        for name, (o, users) in options.items():
            valid = f"; {o['valid']}" if o["valid"] else ""
            click.echo(f"  {name} ({o['kind']}, default {o['default']!r}{valid}) [{', '.join(users)}]: {o['help']}")
    for failure in failures:
        click.echo(f"! {failure.describe()}")
    for clash in clashes():
        click.echo(f"! {clash}")
