"""``diqa db show|stats`` and ``diqa filter``: read a score database (``diqa score --db``) back.

Data to stdout, people to stderr. :mod:`diqa_cli.store` does the work; nothing here imports
torch, so these commands start fast.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import sys
from pathlib import Path

import typer

from diqa_cli.errors import EXIT_OK, EXIT_PARTIAL, UsageError
from diqa_cli.output import FORMATS, default_format, open_writer

db_app = typer.Typer(
    name="db",
    help="Read a score database written by `diqa score --db`: rows, statistics.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

# A terminal table keeps to what fits on a line; csv/json carry every stored column.
_TABLE_COLUMNS = ("path", "score", "status", "method", "scored_at", "error")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
    app.command("filter")(filter_command)


def _open(db: Path):
    from diqa_cli.store import open_store

    return open_store(db, create=False)


_CHECKPOINT_HELP = (
    "Only scores of this head: its .safetensors file, its SHA-256 or a prefix of it "
    "(`diqa db stats` shows them). Different heads score on different scales."
)


def _checkpoint_sha(value: str | None) -> str | None:
    """A --checkpoint value as the SHA-256 (or prefix) the store records."""
    if value is None:
        return None
    if os.path.isfile(value):
        from diqa_cli.files import file_sha256

        return file_sha256(value)
    text = value.lower()
    if len(text) >= 6 and all(c in "0123456789abcdef" for c in text):
        return text
    raise UsageError(f"--checkpoint {value!r} is neither a head file nor a SHA-256 (prefix of 6+ hex digits)")


def _method_name(value: str | None) -> str | None:
    """A --method value as the registry names it (case, aliases); an unknown name is the same
    usage error, with its did-you-mean, as in every other command."""
    if value is None:
        return None
    from diqa_cli.methods import get_method

    return get_method(value).name


def _shown(path: str) -> str:
    """A stored (absolute) path as ``diqa score`` printed it when given paths relative to the
    current folder: relative for files under it, absolute for the rest."""
    relative = os.path.relpath(path)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def _warn_if_mixed(store, method: str | None, checkpoint: str | None) -> None:
    heads = store.heads(method=method, checkpoint=checkpoint)
    if len(heads) > 1:
        listed = ", ".join(f"{m} {c[:12]}" for m, c in heads)
        typer.echo(
            f"diqa: warning: these scores come from {len(heads)} heads ({listed}), whose scales differ; "
            "choose one with --method and --checkpoint",
            err=True,
        )


@db_app.command("show")
def show_command(
    db: Path = typer.Argument(..., metavar="DB", help="The score database (diqa score --db FILE)."),
    fmt: str | None = typer.Option(
        None, "--format", "-f",
        help=f"{' | '.join(FORMATS)}. Default: table on a terminal, csv in a pipe.",
        show_default=False,
    ),
    method: str | None = typer.Option(None, "--method", "-m", help="Only this method's rows.", show_default=False),
    checkpoint: str | None = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_HELP, show_default=False),
) -> None:
    """Print every stored row: one per file and settings (method, checkpoint, backbone, seed,
    resolution, dtype, diqa version)."""
    from diqa_cli.store import STORE_COLUMNS

    fmt = (fmt or default_format(sys.stdout)).lower()
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    checkpoint = _checkpoint_sha(checkpoint)
    method = _method_name(method)
    with _open(db) as store:
        _warn_if_mixed(store, method, checkpoint)
        rows = [{**row, "path": _shown(row["path"])} for row in store.rows(method=method, checkpoint=checkpoint)]
        # JSON carries each row's details (a video's frames, decoder, per-frame scores) as an object.
        columns = {"table": _TABLE_COLUMNS, "csv": STORE_COLUMNS}.get(fmt, (*STORE_COLUMNS, "details"))
        width = max((len(r["path"]) for r in rows), default=4)
        with open_writer(fmt, sys.stdout, columns=columns, path_width=width) as writer:
            for row in rows:
                writer.write(row)


@db_app.command("stats")
def stats_command(
    db: Path = typer.Argument(..., metavar="DB", help="The score database (diqa score --db FILE)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table or json."),
    method: str | None = typer.Option(None, "--method", "-m", help="Only this method's rows.", show_default=False),
    checkpoint: str | None = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_HELP, show_default=False),
) -> None:
    """Counts, the score distribution of each head (method and checkpoint: one scale each), and
    failures by reason."""
    fmt = fmt.lower()
    if fmt not in ("table", "json"):
        raise UsageError(f"--format {fmt!r} is not one of table, json")
    method = _method_name(method)
    with _open(db) as store:
        stats = store.stats(method=method, checkpoint=_checkpoint_sha(checkpoint))
    if fmt == "json":
        sys.stdout.write(json.dumps(stats, indent=2) + "\n")
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False)
    console.print(
        f"{stats['database']}: {stats['rows']} rows for {stats['paths']} files, "
        f"{stats['ok']} ok, {stats['errors']} failed"
    )
    if stats["methods"]:
        # One column per head (there are few), one line per statistic: fits 80 columns.
        table = Table(title="scores per head (method, checkpoint)", title_justify="left", box=box.SIMPLE)
        table.add_column("")
        for entry in stats["methods"]:
            table.add_column(f"{entry['method']}\n{entry['checkpoint_sha256'][:12]}", justify="right")
        for name in ("ok", "errors", "min", "q1", "median", "q3", "max", "mean", "std"):
            values = [entry.get(name) for entry in stats["methods"]]
            table.add_row(name, *("" if v is None else str(v) if isinstance(v, int) else f"{v:.6g}" for v in values))
        console.print(table)
    if stats["failures"]:
        table = Table(title="failures by reason", title_justify="left", box=box.SIMPLE)
        table.add_column("count", justify="right")
        table.add_column("reason", overflow="fold")
        for failure in stats["failures"]:
            table.add_row(str(failure["count"]), failure["error"] or "")
        console.print(table)


def filter_command(
    db: Path = typer.Argument(..., metavar="DB", help="The score database (diqa score --db FILE)."),
    min_score: float | None = typer.Option(None, "--min-score", help="Keep files scoring at least this.", show_default=False),
    max_score: float | None = typer.Option(None, "--max-score", help="Keep files scoring at most this.", show_default=False),
    method: str | None = typer.Option(
        None, "--method", "-m",
        help="Whose scores to compare (required when the database holds several methods).",
        show_default=False,
    ),
    checkpoint: str | None = typer.Option(None, "--checkpoint", "-c", help=_CHECKPOINT_HELP, show_default=False),
    copy_to: Path | None = typer.Option(
        None, "--copy-to", help="Copy the files into this folder instead of printing their paths.", show_default=False
    ),
    print0: bool = typer.Option(False, "--print0", help="End each path with NUL, for `xargs -0`."),
) -> None:
    """Print the paths of the files whose latest score lies in [--min-score, --max-score], best
    first, one per line (or NUL-terminated with --print0), or copy them with --copy-to. Paths
    under the current folder print relative to it, as `diqa score` printed them; others absolute.

    Exit status: 0, or 3 when some files could not be copied (each named on stderr).
    """
    if copy_to is not None and print0:
        raise UsageError("--copy-to and --print0 do not go together: copy the files, or print their paths")
    if min_score is not None and max_score is not None and min_score > max_score:
        raise UsageError(f"--min-score {min_score} is above --max-score {max_score}")
    method = _method_name(method)
    with _open(db) as store:
        methods = store.methods()
        if method is None:
            if len(methods) > 1:
                raise UsageError(
                    f"{db} holds scores of several methods ({', '.join(methods)}), whose scales differ; "
                    f"choose one with --method"
                )
            method = methods[0] if methods else None
        elif method not in methods:
            raise UsageError(f"{db} holds no scores of method {method!r}; it has {', '.join(methods) or 'none'}")
        checkpoint = _checkpoint_sha(checkpoint)
        if method and checkpoint and not store.heads(method=method, checkpoint=checkpoint):
            raise UsageError(f"{db} holds no {method} scores of checkpoint {checkpoint[:12]}")
        if method:
            _warn_if_mixed(store, method, checkpoint)
        chosen = store.best(method=method, checkpoint=checkpoint, min_score=min_score, max_score=max_score) if method else []
    paths = [row["path"] for row in chosen]
    if copy_to is None:
        out = sys.stdout.buffer
        end = b"\0" if print0 else b"\n"
        for path in paths:
            out.write(os.fsencode(_shown(path)) + end)
        out.flush()
        raise typer.Exit(EXIT_OK)
    failed = _copy_all(paths, copy_to)
    typer.echo(f"diqa: copied {len(paths) - failed} of {len(paths)} files to {copy_to}", err=True)
    raise typer.Exit(EXIT_PARTIAL if failed else EXIT_OK)


def _copy_all(paths: list[str], folder: Path) -> int:
    """Copy ``paths`` into ``folder`` (contents and times); returns how many failed.

    Files keep their names; a name already taken by a different file gets ``-1``, ``-2``…
    before its extension, and a file already there with the same contents is left as it is,
    so running the same filter again copies nothing twice and overwrites nothing.
    """
    folder.mkdir(parents=True, exist_ok=True)
    failed = 0
    for source in paths:
        if not os.path.isfile(source):
            typer.echo(f"diqa: {source}: not copied: no such file (moved or deleted since it was scored)", err=True)
            failed += 1
            continue
        stem, suffix = os.path.splitext(os.path.basename(source))
        target, n = folder / (stem + suffix), 0
        while target.exists() and not filecmp.cmp(source, target, shallow=False):
            n += 1
            target = folder / f"{stem}-{n}{suffix}"
        if target.exists():
            continue
        try:
            shutil.copy2(source, target)
        except OSError as exc:
            typer.echo(f"diqa: {source}: not copied: {exc.strerror or exc}", err=True)
            failed += 1
    return failed
