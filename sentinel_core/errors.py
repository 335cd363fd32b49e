"""Errors that Sentinel reports to users as one line, without a traceback."""


class SentinelError(ValueError):
    """A user mistake: message is one line naming the bad value and what would be right."""
