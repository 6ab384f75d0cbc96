"""``diqa report``: an HTML page (and optionally a PNG contact sheet) from stored scores.

Messages and the written paths go to stderr; nothing goes to stdout. :mod:`diqa_cli.report` does
the work and is imported only when the command runs (it needs Pillow, jinja2 and PyAV).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from diqa_cli.errors import UsageError

_DEFAULT_HTML = Path("report.html")
_LARGE_EMBEDDED = 50 * 1024 * 1024  # above this, suggest --thumbs linked


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)


def report_command(
    source: Path = typer.Argument(
        ..., metavar="SOURCE",
        help="A score database (diqa score --db FILE), or a CSV / JSONL file written by diqa score or score-video.",
        show_default=False,
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="The HTML report to write. Default: report.html (none when only --png is given).",
        show_default=False,
    ),
    png: Path | None = typer.Option(
        None, "--png", help="Also write a PNG contact sheet of the best and worst rows of each group.", show_default=False,
    ),
    title: str | None = typer.Option(None, "--title", help="The page title. Default: 'diqa report: SOURCE'.", show_default=False),
    thumbs: str = typer.Option(
        "embedded", "--thumbs",
        help="embedded (JPEGs inside the page: one file), linked (JPEGs in a folder NAME_thumbs/ beside it) or none.",
    ),
    thumb_size: int = typer.Option(128, "--thumb-size", min=16, max=1024, help="Long side of a thumbnail, in pixels."),
    top: int = typer.Option(10, "--top", "-n", min=1, help="How many best and how many worst rows each group shows."),
    workers: int = typer.Option(2, "--workers", "-j", min=1, help="Thumbnail-making threads."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Write one self-contained HTML report of scores: a summary per method and settings (counts,
    failures, quantiles, histogram), the best and worst rows, every row with a thumbnail in a
    sortable table, every error with its reason, and per-frame curves of videos.

    The page opens offline and reads without JavaScript. Exit status: 0, or 2 for a bad source or
    an output that exists (without --overwrite).
    """
    from diqa_cli.report import THUMB_MODES, linked_folder

    if thumbs not in THUMB_MODES:
        raise UsageError(f"--thumbs {thumbs!r} is not one of {', '.join(THUMB_MODES)}")
    if output is None and png is None:
        output = _DEFAULT_HTML
    targets = [p for p in (output, png) if p is not None]
    if thumbs == "linked" and output is not None:
        targets.append(linked_folder(output))
    for target in targets:
        if _same_file(target, source):
            raise UsageError(f"{target} is the report's source; write the report to another file")
        if target.exists() and not overwrite:
            raise UsageError(f"{target} exists; pass --overwrite to replace it, or choose another name")
    if output is not None and png is not None and _same_file(output, png):
        raise UsageError(f"-o and --png both name {output}; give the PNG another name")

    from diqa_cli.report import make_report

    report = make_report(
        source, html=output, png=png, title=title, thumbs=thumbs, thumb_size=thumb_size, top=top, workers=workers
    )
    rows = len(report.source.rows)
    groups = len(report.groups)
    if report.html is not None:
        size = report.html.stat().st_size
        _tell(f"diqa: wrote {report.html} ({rows} rows in {groups} group{'s' if groups != 1 else ''}, {_size(size)})")
        if report.thumbs_folder is not None:
            _tell(f"diqa: thumbnails in {report.thumbs_folder}/ (keep it beside the report)")
        if report.previews_missing:
            _tell(f"diqa: {report.previews_missing} scored files have no preview (moved, deleted or unreadable "
                  "from here); the report shows a placeholder")
        if thumbs == "embedded" and size > _LARGE_EMBEDDED:
            _tell("diqa: the report is large; --thumbs linked keeps thumbnails in a folder beside it, "
                  "or --thumb-size 64 makes them smaller")
    if report.png is not None:
        _tell(f"diqa: wrote {report.png}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def _tell(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
