"""Row writers for stdout: ``table``, ``csv``, ``json`` and ``jsonl``, streamed row by row.

Every row is written and flushed as soon as it is computed, so an interrupted run keeps what it
scored and a pipeline consumer sees results while the run goes on. This module never imports
torch: listing commands use it too.

Columns: CSV carries the per-input columns (:data:`CORE_COLUMNS`); JSON and JSONL add the run's
context (:data:`DETAIL_COLUMNS`: method, backbone, checkpoint, seconds), which is what a consumer
merging several runs needs and which would only repeat the same value on every CSV line.
Floats are written with ``repr`` precision (they round-trip); a missing value is empty in CSV and
``null`` in JSON. The ``json`` format is a streamed array (``[``, one object per line, ``]``) that
is valid JSON once the writer is closed, including after Ctrl-C.
"""

from __future__ import annotations

import csv
import json
import math
from typing import IO, Any, Iterable

__all__ = [
    "CORE_COLUMNS",
    "DETAIL_COLUMNS",
    "FORMATS",
    "RowWriter",
    "columns_for",
    "default_format",
    "open_writer",
    "rich_console",
]

FORMATS = ("table", "csv", "json", "jsonl")
CORE_COLUMNS = ("path", "score", "raw_score", "status", "error")
DETAIL_COLUMNS = (*CORE_COLUMNS, "method", "backbone", "checkpoint", "seconds")


def columns_for(fmt: str) -> tuple[str, ...]:
    """The columns a format carries (see the module docstring for why CSV is leaner)."""
    return DETAIL_COLUMNS if fmt in ("json", "jsonl") else CORE_COLUMNS


def default_format(stream: IO[str]) -> str:
    """``table`` for a person at a terminal, ``csv`` for a pipe or a file."""
    try:
        return "table" if stream.isatty() else "csv"
    except (AttributeError, ValueError):  # closed or not a real file
        return "csv"


def rich_console(stream: IO[str]):
    """A rich console printing to ``stream`` that lets a closed pipe raise BrokenPipeError.

    rich's own handling exits with status 1 on a broken pipe; diqa ends such a run with its
    documented quiet 141 instead (``diqa_cli.cli``), so the error must reach it.
    """
    from rich.console import Console

    class _PipeConsole(Console):
        def on_broken_pipe(self) -> None:
            self.quiet = True  # nothing more to write: the reader is gone
            raise BrokenPipeError

    return _PipeConsole(file=stream, highlight=False)


class RowWriter:
    """Writes rows (dicts keyed by column name) to one stream; use as a context manager."""

    def __init__(self, stream: IO[str], columns: Iterable[str]):
        self.stream = stream
        self.columns = tuple(columns)
        self.closed = False

    def write(self, row: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish the document (the JSON array's bracket) and flush; safe to call twice."""
        if not self.closed:
            self.closed = True
            self._finish()
            self.stream.flush()

    def _finish(self) -> None:
        return None

    def _values(self, row: dict[str, Any]) -> list[Any]:
        return [row.get(c) for c in self.columns]

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # After a broken pipe the stream is gone: writing the closing bracket would fail again.
        if exc_type is not None and issubclass(exc_type, BrokenPipeError):
            self.closed = True
            return
        self.close()


def _json_value(value: Any) -> Any:
    # json.dumps would write NaN/Infinity, which is not JSON; such values become null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _CsvWriter(RowWriter):
    def __init__(self, stream, columns):
        super().__init__(stream, columns)
        # "\n", not csv's default "\r\n": the consumers are Unix pipelines.
        self._csv = csv.writer(stream, lineterminator="\n")
        self._csv.writerow(self.columns)
        stream.flush()

    def write(self, row):
        # csv formats floats with repr, so they round-trip; None becomes an empty field.
        self._csv.writerow(self._values(row))
        self.stream.flush()


class _JsonLinesWriter(RowWriter):
    def write(self, row):
        record = {c: _json_value(v) for c, v in zip(self.columns, self._values(row))}
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()


class _JsonArrayWriter(RowWriter):
    def __init__(self, stream, columns):
        super().__init__(stream, columns)
        self._rows = 0
        stream.write("[")
        stream.flush()

    def write(self, row):
        record = {c: _json_value(v) for c, v in zip(self.columns, self._values(row))}
        sep = "\n" if self._rows == 0 else ",\n"
        self.stream.write(sep + json.dumps(record, ensure_ascii=False))
        self.stream.flush()
        self._rows += 1

    def _finish(self):
        self.stream.write("\n]\n")


class _TableWriter(RowWriter):
    """Aligned lines rendered by rich, the header once, each row printed as it comes.

    A rich ``Table`` needs every row before it can size its columns; streaming rows instead fixes
    the widths up front (the path column from ``path_width``, the longest input path).
    """

    _WIDTHS = {
        "score": 10, "raw_score": 10, "status": 6, "method": 12, "seconds": 8,
        # ``diqa score-video``'s columns, no narrower than their headers.
        "frames_sampled": 14, "frames_decoded": 14, "frames_lost": 11, "decoder": 11, "duration": 8,
        # ``diqa enhance``'s.
        "input": 40, "prior_before": 12, "prior_after": 11, "iterations": 10,
    }

    def __init__(self, stream, columns, *, path_width: int | None = None, console=None):
        super().__init__(stream, columns)
        self.console = console or rich_console(stream)
        self._widths = dict(self._WIDTHS, path=max(4, min(path_width or 40, 60)))
        self._print(self._line({c: c for c in self.columns}, header=True))

    def _cell(self, column: str, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    def _line(self, row: dict[str, Any], header: bool = False):
        from rich.text import Text

        line = Text()
        for i, column in enumerate(self.columns):
            cell = self._cell(column, row.get(column)) if not header else column
            width = self._widths.get(column)
            last = i == len(self.columns) - 1
            if width is not None and not last:
                # Never shortened: a path is what a user types next, an error what they must read.
                cell = cell.rjust(width) if column in ("score", "raw_score", "seconds") else cell.ljust(width)
            style = "bold" if header else ("red" if column == "status" and cell.strip() == "error" else "")
            line.append(cell, style=style)
            if not last:
                line.append("  ")
        line.rstrip()
        return line

    def _print(self, line) -> None:
        # The whole line, however long (a terminal wraps it): nothing a user must read is cut.
        self.console.print(line, soft_wrap=True)
        self.stream.flush()

    def write(self, row):
        self._print(self._line(row))


def open_writer(
    fmt: str,
    stream: IO[str],
    *,
    columns: Iterable[str],
    path_width: int | None = None,
    console=None,
) -> RowWriter:
    """A writer for ``fmt`` on ``stream``; the header (CSV, table) or ``[`` (JSON) is written now.

    ``path_width`` and ``console`` only concern the table: the width of the path column, and a
    rich console to print through (the progress bar's, when stdout and stderr are one terminal,
    so rows appear above the bar instead of through it).
    """
    if fmt == "csv":
        return _CsvWriter(stream, columns)
    if fmt == "jsonl":
        return _JsonLinesWriter(stream, columns)
    if fmt == "json":
        return _JsonArrayWriter(stream, columns)
    if fmt == "table":
        return _TableWriter(stream, columns, path_width=path_width, console=console)
    from diqa_cli.errors import UsageError

    raise UsageError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
