"""Running the ``sentinel`` command in-process, and what a one-line error looks like."""

from __future__ import annotations

from click.testing import CliRunner

import sentinel_core.cli.commands  # noqa: F401  (registers the subcommands)
from sentinel_core.cli import cli


def invoke(*args, **kwargs):
    """``sentinel ARGS`` in-process (arguments may be paths); exceptions propagate."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def one_error_line(result, *fragments, code=1):
    """The command failed with ``code`` and its last line is ``Error: ...`` holding every fragment."""
    assert result.exit_code == code, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in last, result.output
    assert "Traceback" not in result.output
