"""The ``diqa`` command line: parse, call the library, format. Data to stdout, people to stderr.

Each command group lives in its own module and exposes ``register(app)``. Command bodies import
torch and the models lazily so that ``diqa --help``, ``diqa methods`` and ``diqa weights list``
start fast.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from diqa_cli.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_USAGE, DiqaError

app = typer.Typer(
    name="diqa",
    help="Score image and video quality with latent-diffusion priors, and enhance images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# One module per command group; each adds its commands to ``app``.
_COMMAND_MODULES = (
    "diqa_cli.cli.score",
    "diqa_cli.cli.weights",
    "diqa_cli.cli.train",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console-script entry point: maps diqa's errors to documented exit codes."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("diqa: aborted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except DiqaError as exc:
        print(f"diqa: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("diqa: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as exc:  # click's usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show(file=sys.stderr)
            sys.exit(EXIT_USAGE if isinstance(exc, click.UsageError) else exc.exit_code)
        raise


def _quiet_broken_pipe() -> None:
    """``diqa score … | head -1``: the reader went away; exit quietly like other Unix tools."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(EXIT_BROKEN_PIPE)
