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


class DiqaWarning(UserWarning):
    """Something the user should know that does not stop the run (a head loaded on another
    backbone than it was trained on…). The library warns; the CLI prints ``diqa: warning: …``."""


class InputError(DiqaError):
    """One input cannot be used; the run goes on and the input gets an error row.

    ``reason`` is a short one-line explanation without the path (the row carries the path).
    Pipelines turn it into an error row; raised to a caller (``Metric`` on one file), it is a
    ``DiqaError`` like the others.
    """

    exit_code = EXIT_PARTIAL

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for the
    one-line reasons that error rows and stderr messages carry."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
