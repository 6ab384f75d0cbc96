"""The ``diqa`` command line: parse, call the library, format. Data to stdout, people to stderr.

Each command group lives in its own module and exposes ``register(app)``. Command bodies import
torch and the models lazily so that ``diqa --help``, ``diqa methods`` and ``diqa weights list``
start fast.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import sys
import warnings

import typer

from diqa_cli.errors import EXIT_BROKEN_PIPE, EXIT_FATAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, DiqaError, DiqaWarning

# Writes that fail because of where they go, not because of diqa: a full disk (or /dev/full), a
# quota, a file-size limit, a read-only or failing device. One line, exit 1, no traceback.
_WRITE_FAILURES = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}

app = typer.Typer(
    name="diqa",
    help="Score image and video quality with latent-diffusion priors, and enhance images.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from diqa_cli import __version__

        typer.echo(f"diqa {__version__}")
        raise typer.Exit(EXIT_OK)


# A root callback keeps ``diqa`` a command group however many commands are registered (typer
# turns an app with a single command into that command, which would swallow its name).
@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors and warnings on stderr (no stage messages, no progress bar)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
    debug: bool = typer.Option(
        False, "--debug", help="Everything on stderr: full tracebacks, decoders' own messages, detail."
    ),
) -> None:
    """Score image and video quality with latent-diffusion priors, and enhance images."""
    from diqa_cli.cli import _terminal

    if quiet and (verbose or debug):
        raise typer.BadParameter("--quiet cannot go with --verbose or --debug")
    _terminal.set_volume("quiet" if quiet else "debug" if debug else "verbose" if verbose else "normal")


# One module per command group; each adds its commands to ``app``.
_COMMAND_MODULES = (
    "diqa_cli.cli.score",
    "diqa_cli.cli.weights",
    "diqa_cli.cli.train",
    "diqa_cli.cli.video",
    "diqa_cli.cli.enhance",
    "diqa_cli.cli.db",
    "diqa_cli.cli.report",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def _quiet_on_broken_pipe(command):
    """A command whose reader goes away (``diqa … | head -1``) ends quietly with 141.

    typer would catch the BrokenPipeError itself and exit 1; wrapping every registered command
    here gives them all the documented code without each command module handling it.
    """

    @functools.wraps(command)  # typer reads the wrapped signature through __wrapped__
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:
            _quiet_broken_pipe()
            raise typer.Exit(EXIT_BROKEN_PIPE) from None

    return run


def _wrap_commands(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        info.callback = _quiet_on_broken_pipe(info.callback)
    for group in typer_app.registered_groups:
        _wrap_commands(group.typer_instance)


_wrap_commands(app)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """The library's own warnings (``DiqaWarning``) as one ``diqa: warning: …`` line on stderr;
    other libraries' warnings as Python shows them."""
    if issubclass(category, DiqaWarning):
        print(f"diqa: warning: {message}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main() -> None:
    """Console-script entry point: maps diqa's errors to documented exit codes.

    ``standalone_mode=False`` lets diqa's own errors reach this function; in that mode typer
    *returns* the code of ``typer.Exit`` (and turns Ctrl-C into 130) instead of exiting. Parser
    errors are recognised by class name: typer 0.29 vendors click (``typer._click``), older typer
    uses click itself, and both name them ``ClickException`` / ``UsageError``.
    """
    warnings.showwarning = _show_warning
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        print("diqa: aborted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except DiqaError as exc:
        from diqa_cli.cli._terminal import volume

        if volume() == "debug":
            import traceback

            traceback.print_exc()
        print(f"diqa: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        code = EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _WRITE_FAILURES:
            raise
        code = _write_failed(exc)
    except Exception as exc:  # the parser's usage errors (bad option, missing value)
        kinds = {cls.__name__ for cls in type(exc).__mro__}
        if "ClickException" not in kinds:
            raise
        exc.show(file=sys.stderr)
        code = EXIT_USAGE if "UsageError" in kinds else exc.exit_code
    # A command's return value is not an exit code; only ``typer.Exit`` (an int here) is.
    code = code if isinstance(code, int) else EXIT_OK
    if code == EXIT_INTERRUPTED:
        print("diqa: interrupted", file=sys.stderr)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_broken_pipe()
        code = EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno not in _WRITE_FAILURES:
            raise
        code = _write_failed(exc)
    sys.exit(code)


def _write_failed(exc: OSError) -> int:
    """A write that the disk refused: say so in one line; what was already written stays."""
    where = exc.filename or "standard output"
    print(f"diqa: error: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
    _quiet_broken_pipe()  # the unwritten buffer must not fail again at exit
    return EXIT_FATAL


def _quiet_broken_pipe() -> None:
    """``diqa score … | head -1``: the reader went away; exit quietly like other Unix tools.

    stdout is pointed at /dev/null so the interpreter's final flush of the unwritten buffer does
    not print "Exception ignored … BrokenPipeError" at shutdown.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
