"""Imports every subcommand module so that each registers itself on the ``cli`` group."""

from . import evaluate, export, generate, plugins, prune, report, run, score  # noqa: F401
