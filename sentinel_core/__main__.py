"""``python -m sentinel_core`` is the ``sentinel`` command."""

from .cli import main

main()
