"""Exceptions and the documented exit codes.

Exit codes (also in the README):
  0  every input was scored
  1  fatal: nothing could run (weights missing, backbone unreadable, bad checkpoint)
  2  usage error (bad option, unknown method)
  3  the run finished but some inputs failed (each has an error row)
  130 interrupted (Ctrl-C); rows already written stay written
  141 stdout was closed early (``diqa score … | head -1``); no traceback
"""

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class DiqaError(Exception):
    """A fatal error with a message meant for the user (one line, names the fix)."""

    exit_code = EXIT_FATAL


class UsageError(DiqaError):
    """The user asked for something that does not exist or does not fit."""

    exit_code = EXIT_USAGE


class WeightsError(DiqaError):
    """Weights are missing, tampered with, or in a refused format."""


class InputError(Exception):
    """One input cannot be used; the run goes on and the input gets an error row.

    ``reason`` is a short one-line explanation without the path (the row carries the path).
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
