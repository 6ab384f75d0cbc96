"""Read the rows a report is made from: a score database, or a CSV / JSONL / JSON file of rows.

The kind is told from the content, not the name: SQLite files start with the 16-byte header
``SQLite format 3\\0``; JSON Lines start with ``{`` and a JSON array (``diqa score --format json``)
with ``[``; anything else must be CSV whose header names a ``path`` column. What is not one of
these is a usage error naming the file. Values come back typed (scores as floats, ``None`` where a
value is missing, ``per_frame`` as a list of ``{time, score}``) whatever the source.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diqa_cli.errors import UsageError

__all__ = ["Source", "read_source"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SNIFF_BYTES = 4096

# Numeric columns that CSV carries as text.
_FLOATS = ("score", "raw_score", "seconds", "duration", "mtime", "size")
_INTS = ("frames_sampled", "frames_decoded", "frames_lost", "clips", "seed", "resolution")


@dataclass
class Source:
    """The rows of one source file and what kind of file it was (sqlite, csv, jsonl, json)."""

    path: Path
    kind: str
    rows: list[dict[str, Any]]


def read_source(path: str | os.PathLike) -> Source:
    """Every row of ``path`` (a score database, or a CSV, JSONL or JSON file written by
    ``diqa score`` / ``diqa score-video``), typed; a file of another kind is a usage error."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"report source {str(path)!r} does not exist; name a score database (--db), CSV or JSONL file")
    if path.is_dir():
        raise UsageError(f"report source {str(path)!r} is a folder; name a score database (--db), CSV or JSONL file")
    try:
        with open(path, "rb") as stream:
            head = stream.read(_SNIFF_BYTES)
    except OSError as exc:
        raise UsageError(f"cannot read report source {str(path)!r}: {exc.strerror or exc}") from None
    if head.startswith(_SQLITE_MAGIC):
        return Source(path, "sqlite", [_typed(row) for row in _sqlite_rows(path)])
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise _not_rows(path, "it is binary and not SQLite") from None
    first = text.lstrip()[:1]
    if first == "{":
        return Source(path, "jsonl", [_typed(row) for row in _jsonl_rows(path, text)])
    if first == "[":
        return Source(path, "json", [_typed(row) for row in _json_rows(path, text)])
    return Source(path, "csv", [_typed(row) for row in _csv_rows(path, text)])


def _not_rows(path: Path, why: str) -> UsageError:
    return UsageError(
        f"{str(path)!r} is not a diqa score database, CSV or JSONL file ({why}); "
        "make one with `diqa score … --db FILE` or `--format csv|jsonl`"
    )


def _sqlite_rows(path: Path) -> list[dict]:
    import sqlite3

    from diqa_cli.store import open_store

    # Opening a store brings its schema up to date, which would add diqa's tables to any other
    # SQLite file: look first, read-only, for the table of diqa's migrations.
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            ours = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_diqa_migrations'").fetchone()
    except sqlite3.Error as exc:
        raise _not_rows(path, f"SQLite cannot read it: {exc}") from None
    if ours is None:
        raise _not_rows(path, "an SQLite database without diqa's tables")
    with open_store(path, create=False) as store:
        # A video's frame counts and per-frame scores come back from the row's details.
        return [{**row.pop("details"), **row} for row in store.rows()]


def _jsonl_rows(path: Path, text: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _not_rows(path, f"line {number} is not JSON: {exc.msg}") from None
        rows.append(_checked(path, row, f"line {number}"))
    return rows


def _json_rows(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _not_rows(path, f"not valid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise _not_rows(path, "the JSON is not a list of rows")
    return [_checked(path, row, f"item {i + 1}") for i, row in enumerate(data)]


def _csv_rows(path: Path, text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise _not_rows(path, "no 'path' column in its first line")
    # An empty CSV field is a missing value, as the CSV writer writes None.
    return [{k: (v if v != "" else None) for k, v in row.items() if k is not None} for row in reader]


def _checked(path: Path, row: Any, where: str) -> dict:
    if not isinstance(row, dict) or not isinstance(row.get("path"), str):
        raise _not_rows(path, f"{where} has no 'path'")
    return row


def _typed(row: dict) -> dict:
    """Numbers as numbers, NaN as missing, a status on every row, per_frame as a list."""
    row = dict(row)
    for key in _FLOATS:
        row[key] = _number(row.get(key), float)
    for key in _INTS:
        if key in row:
            row[key] = _number(row[key], int)
    if row.get("status") not in ("ok", "error"):
        row["status"] = "ok" if row.get("score") is not None and not row.get("error") else "error"
    if row["status"] == "ok" and row.get("score") is None:
        row["status"], row["error"] = "error", row.get("error") or "no score recorded"
    frames = row.get("per_frame")
    if isinstance(frames, str):  # a CSV cell holding the JSON list
        try:
            frames = json.loads(frames)
        except json.JSONDecodeError:
            frames = None
    row["per_frame"] = _per_frame(frames)
    return row


def _number(value: Any, kind: type) -> Any:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    return int(number) if kind is int else number


def _per_frame(frames: Any) -> list[dict] | None:
    if not isinstance(frames, list):
        return None
    points = []
    for point in frames:
        if isinstance(point, dict):
            time, score = _number(point.get("time"), float), _number(point.get("score"), float)
            if time is not None and score is not None:
                points.append({"time": time, "score": score})
    return points or None
