"""Sentinel's messages: the ``sentinel`` logger, and what verbosity does to the libraries under it.

Everything Sentinel says goes through ``logging.getLogger("sentinel")`` (and its children), so
a program that embeds Sentinel can route, silence or format it like any other library. Until
the program configures logging itself, messages of level INFO and up go to stderr, one line
each, and write around a progress bar instead of through it.

``sentinel -q`` shows warnings and errors only; ``sentinel -v`` adds debug messages and
tracebacks. transformers' and datasets' own logging follows: errors only under ``-q``,
warnings by default, info under ``-v``.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "sentinel"
QUIET, NORMAL, VERBOSE = -1, 0, 1

logger = logging.getLogger(LOGGER_NAME)
_bars: list = []  # tqdm bars on screen: a message is written above them, not through them


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (so redirections and captures see it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if _bars:
                _bars[-1].write(message, file=sys.stderr)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


if not logger.handlers:
    _handler = _StderrHandler()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``sentinel`` logger, or its child ``sentinel.<name>``."""
    return logger.getChild(name) if name else logger


def configure(verbosity: int = NORMAL) -> None:
    """Set Sentinel's level and the libraries' to match (QUIET, NORMAL or VERBOSE)."""
    logger.setLevel({QUIET: logging.WARNING, NORMAL: logging.INFO}.get(verbosity, logging.DEBUG))
    try:
        import transformers

        transformers.utils.logging.set_verbosity(
            {QUIET: logging.ERROR, NORMAL: logging.WARNING}.get(verbosity, logging.INFO))
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity(
            {QUIET: logging.ERROR, NORMAL: logging.WARNING}.get(verbosity, logging.INFO))
        if verbosity == QUIET:
            datasets.disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency
        pass


def show_bar(bar) -> None:
    """Register a tqdm bar so that messages are written above it."""
    _bars.append(bar)


def hide_bar(bar) -> None:
    if bar in _bars:
        _bars.remove(bar)
