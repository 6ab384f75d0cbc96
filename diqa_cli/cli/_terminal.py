"""The terminal side of the commands that stream rows: a progress bar and messages on stderr,
kept out of the way of the data on stdout."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

_VOLUMES = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG, "debug": logging.DEBUG}
_volume = "normal"
_debug_env_set = False


def set_volume(name: str) -> None:
    """How much goes to stderr: the library's ``diqa`` log at the level of ``name``, as
    ``diqa: message`` lines; ``debug`` also lets decoder processes' own messages through."""
    global _volume, _debug_env_set
    _volume = name
    logger = logging.getLogger("diqa")
    logger.setLevel(_VOLUMES[name])
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("diqa: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if name == "debug" and not os.environ.get("DIQA_DEBUG"):
        os.environ["DIQA_DEBUG"] = "1"  # decoder processes read it
        _debug_env_set = True
    elif name != "debug" and _debug_env_set:  # a later run in this process (tests) without --debug
        os.environ.pop("DIQA_DEBUG", None)
        _debug_env_set = False


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each message (a plain StreamHandler keeps the stream
    it was created with)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def volume() -> str:
    return _volume


def same_terminal() -> bool:
    """stdout and stderr are the same terminal (so table rows must not tear through the bar)."""
    try:
        return (
            sys.stdout.isatty()
            and sys.stderr.isatty()
            and os.path.samestat(os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno()))
        )
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def progress_bar(total: int):
    """A rich progress bar on stderr while it is a terminal (and not ``--quiet``), else nothing (``None``)."""
    if not sys.stderr.isatty() or _volume == "quiet":
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        # rich would otherwise capture sys.stdout into the (stderr) bar console: data must stay on stdout.
        redirect_stdout=False,
        redirect_stderr=False,
    )
    progress.add_task("scoring", total=total)
    with progress:
        yield progress


def tell(progress, message: str) -> None:
    """One line for a person on stderr, printed above the progress bar when there is one."""
    if progress is not None:
        progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        print(message, file=sys.stderr, flush=True)


def write_rows(items, rows, fmt: str, columns, *, context: dict | None = None, note=None, lines=None) -> int:
    """Write ``rows`` (one per item of ``items``) to stdout in ``fmt`` as they come, with a
    progress bar and each failure's one line on stderr; returns how many failed. ``context`` is
    added to every row; ``note(row)`` may return a line to tell about an ``ok`` row; ``lines(row)``,
    when given, turns a row into the output lines written for it (a long format)."""
    from diqa_cli.output import open_writer

    failed = 0
    with progress_bar(len(items)) as progress:
        stdout_console = progress.console if progress is not None and same_terminal() else None
        path_width = max((len(str(getattr(item, "path", item))) for item in items), default=4)
        # A closed pipe (`| head -1`) ends here too: diqa_cli.cli turns it into a quiet exit 141.
        with open_writer(fmt, sys.stdout, columns=columns, path_width=path_width, console=stdout_console) as writer:
            rows = iter(rows)
            with contextlib.closing(rows):  # stops the decoding threads on Ctrl-C or a closed pipe
                for row in rows:
                    row.update(context or {})
                    if row["status"] != "ok":
                        failed += 1
                        tell(progress, f"diqa: {row['path']}: {row['error']}")
                    elif note is not None and (line := note(row)):
                        tell(progress, line)
                    for line in lines(row) if lines is not None else (row,):
                        writer.write(line)
                    if progress is not None:
                        progress.advance(progress.task_ids[0])
    return failed
