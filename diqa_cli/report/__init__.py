"""``diqa report``: one self-contained HTML page (and optionally a PNG contact sheet) from scores.

The library side of the command: :func:`make_report` reads a score database or a CSV / JSONL /
JSON file of rows (:mod:`.sources`), groups the rows by the settings that made them
(:mod:`.summary`), makes thumbnails (:mod:`.thumbs`) and writes the page (:mod:`.html`) and the
sheet (:mod:`.sheet`), each atomically. Nothing here imports torch; PyAV only for video
thumbnails, jinja2 only to render.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diqa_cli.report.sources import Source, read_source
from diqa_cli.report.summary import Group, group_rows
from diqa_cli.report.thumbs import MODES as THUMB_MODES

__all__ = ["THUMB_MODES", "Report", "linked_folder", "make_report", "read_source", "table_thumb_size"]


@dataclass
class Report:
    """What :func:`make_report` wrote and saw."""

    source: Source
    groups: list[Group]
    html: Path | None
    png: Path | None
    thumbs_folder: Path | None  # linked thumbnails
    previews_missing: int  # scored rows whose file could not be previewed (0 with thumbs='none')


def table_thumb_size(thumb_size: int) -> int:
    """Long side of the thumbnails in the table of every row: half the grid's, at least 16 px."""
    return max(16, thumb_size // 2)


def linked_folder(html: str | os.PathLike) -> Path:
    """Where ``--thumbs linked`` puts the thumbnails of the report ``html``: ``NAME_thumbs/``
    beside it."""
    html = Path(html)
    return html.with_name(html.stem + "_thumbs")


def make_report(
    source: str | os.PathLike,
    *,
    html: str | os.PathLike | None = None,
    png: str | os.PathLike | None = None,
    title: str | None = None,
    thumbs: str = "embedded",
    thumb_size: int = 128,
    top: int = 10,
    workers: int = 2,
) -> Report:
    """Read ``source`` and write the HTML report to ``html`` and/or the contact sheet to ``png``.

    ``thumbs``: ``embedded`` (JPEG data URIs in the page), ``linked`` (JPEG files in
    :func:`linked_folder`, linked relatively) or ``none``. ``top``: how many best and worst rows
    each group shows. Inputs that cannot be read for a thumbnail get a placeholder.
    """
    from diqa_cli.files import atomic_write
    from diqa_cli.report.thumbs import Thumbnails, make_thumbnail, resolve_input
    from diqa_cli.videoio import VIDEO_EXTENSIONS

    if thumbs not in THUMB_MODES:
        raise ValueError(f"thumbs={thumbs!r} is not one of {', '.join(THUMB_MODES)}")
    data = read_source(source)
    groups = group_rows(data.rows, top=top)
    bases = (data.path.parent,)
    files: dict[int, dict] = {}
    for row in data.rows:
        video = row.get("frames_sampled") is not None or Path(row["path"]).suffix.lower() in VIDEO_EXTENSIONS
        files[id(row)] = {
            "input": resolve_input(row["path"], bases),
            "video": video,
            "map": resolve_input(str(row["map"]), bases) if row.get("map") else None,
        }

    html_path = Path(html) if html is not None else None
    folder = linked_folder(html_path) if html_path is not None and thumbs == "linked" else None
    missing = 0
    if html_path is not None:
        # The table shows every row: its thumbnails are half the grid's size, which halves a large
        # embedded report; the best/worst grid shows few, at full size.
        small = table_thumb_size(thumb_size)
        store = Thumbnails(thumbs, folder=folder, report_dir=html_path.parent.resolve(), workers=workers)
        wanted = [(f["input"], f["video"], small) for f in files.values()]
        wanted += [(f["map"], False, small) for f in files.values() if f["map"]]
        chosen = [files[id(row)] for group in groups for row in (*group.best, *group.worst)]
        wanted += [(f["input"], f["video"], thumb_size) for f in chosen]
        store.make_all(wanted)
        from diqa_cli.report.html import render_html

        text = render_html(data, groups, store, title=title or f"diqa report: {data.path.name}", files=files,
                           sizes=(small, thumb_size))
        atomic_write(html_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        if thumbs != "none":
            ok_files = [files[id(row)] for row in data.rows if row["status"] == "ok"]
            missing = sum(1 for f in ok_files if store.get(f["input"], small, video=f["video"]) is None)

    png_path = Path(png) if png is not None else None
    if png_path is not None:
        from diqa_cli.report.sheet import contact_sheet

        def image_of(row: dict):
            f = files[id(row)]
            return make_thumbnail(f["input"], thumb_size, video=f["video"]) if f["input"] is not None else None

        sheet = contact_sheet(groups, thumb=thumb_size, columns=top, image_of=image_of)
        atomic_write(png_path, lambda tmp: sheet.save(tmp, "PNG", optimize=True))
    return Report(data, groups, html_path, png_path, folder, missing)
