"""Errors that Sentinel reports to users as one line, without a traceback."""


class SentinelError(ValueError):
    """A user mistake: message is one line naming the bad value and what would be right."""


class RunInterrupted(KeyboardInterrupt):
    """Work stopped by a signal (Ctrl-C or SIGTERM); any checkpoint it owed is on disk.

    A ``KeyboardInterrupt``, so code that handles Ctrl-C handles it too. ``exit_code`` follows
    the shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    EXIT_CODES = {"SIGTERM": 143}

    def __init__(self, reason: str = "Ctrl-C") -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.reason, 130)
