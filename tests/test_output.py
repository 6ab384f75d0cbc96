"""Row writers: what a pipeline reading diqa's stdout receives, row by row."""

from __future__ import annotations

import csv
import io
import json

import pytest

from diqa_cli.errors import UsageError
from diqa_cli.output import CORE_COLUMNS, DETAIL_COLUMNS, columns_for, default_format, open_writer

OK = {
    "path": "photos/a.jpg",
    "score": 0.1 + 0.2,  # 0.30000000000000004: only repr precision gives it back exactly
    "raw_score": 1 / 3,
    "status": "ok",
    "error": None,
    "method": "dpiqa",
    "backbone": "sd15",
    "checkpoint": "heads/dpiqa.safetensors",
    "seconds": 0.0125,
}
BAD = {
    "path": "photos/b, \"quoted\".jpg",
    "score": None,
    "raw_score": None,
    "status": "error",
    "error": "truncated image data",
    "method": "dpiqa",
    "backbone": "sd15",
    "checkpoint": "heads/dpiqa.safetensors",
    "seconds": None,
}


class Recorder(io.StringIO):
    """A stream that remembers what had been flushed when each flush happened."""

    def __init__(self):
        super().__init__()
        self.flushed: list[str] = []

    def flush(self):
        super().flush()
        self.flushed.append(self.getvalue())


def test_csv_rows_parse_and_floats_round_trip():
    out = io.StringIO()
    with open_writer("csv", out, columns=columns_for("csv")) as writer:
        writer.write(OK)
        writer.write(BAD)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert tuple(rows[0]) == CORE_COLUMNS
    assert float(rows[0]["score"]) == OK["score"]
    assert float(rows[0]["raw_score"]) == OK["raw_score"]
    assert rows[1]["path"] == BAD["path"]  # comma and quotes survive CSV quoting
    assert rows[1]["score"] == "" and rows[1]["status"] == "error"
    assert rows[1]["error"] == "truncated image data"
    assert "\r" not in out.getvalue()


def test_json_is_one_valid_array_with_run_context():
    out = io.StringIO()
    with open_writer("json", out, columns=columns_for("json")) as writer:
        writer.write(OK)
        writer.write(BAD)
    rows = json.loads(out.getvalue())
    assert [tuple(r) for r in rows] == [DETAIL_COLUMNS, DETAIL_COLUMNS]
    assert rows[0]["score"] == OK["score"] and rows[0]["checkpoint"] == OK["checkpoint"]
    assert rows[1]["score"] is None and rows[1]["error"] == "truncated image data"


def test_json_with_no_rows_is_an_empty_array():
    out = io.StringIO()
    with open_writer("json", out, columns=CORE_COLUMNS):
        pass
    assert json.loads(out.getvalue()) == []


def test_interrupted_json_run_keeps_its_rows_and_stays_valid():
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):
        with open_writer("json", out, columns=CORE_COLUMNS) as writer:
            writer.write(OK)
            raise KeyboardInterrupt
    assert [r["path"] for r in json.loads(out.getvalue())] == [OK["path"]]


def test_broken_pipe_does_not_try_to_finish_the_document():
    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError

    with pytest.raises(BrokenPipeError):  # the original error, not a second one from close()
        with open_writer("jsonl", Gone(), columns=CORE_COLUMNS) as writer:
            writer.write(OK)


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl", "table"])
def test_each_row_is_flushed_as_it_is_written(fmt):
    out = Recorder()
    writer = open_writer(fmt, out, columns=columns_for(fmt), path_width=20)
    writer.write(OK)
    assert "a.jpg" in out.flushed[-1]  # on the stream before the next row exists
    writer.write(BAD)
    assert "truncated image data" in out.flushed[-1]
    writer.close()


def test_jsonl_one_object_per_line_and_non_finite_becomes_null():
    out = io.StringIO()
    with open_writer("jsonl", out, columns=columns_for("jsonl")) as writer:
        writer.write(OK)
        writer.write({**OK, "raw_score": float("nan"), "score": float("inf")})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    second = json.loads(lines[1])  # NaN would not be valid JSON
    assert second["raw_score"] is None and second["score"] is None
    assert json.loads(lines[0])["seconds"] == OK["seconds"]


def test_table_prints_header_once_and_one_line_per_row():
    out = io.StringIO()
    with open_writer("table", out, columns=CORE_COLUMNS, path_width=40) as writer:
        writer.write(OK)
        writer.write(BAD)
        writer.write(OK)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].split() == list(CORE_COLUMNS)
    assert "0.3000" in lines[1] and "error" in lines[2] and "truncated image data" in lines[2]


def test_table_never_shortens_a_path_or_an_error():
    out = io.StringIO()
    long_path = "/very/long/" + "x" * 80 + "/IMG_0042.jpg"
    long_error = "corrupt image data: " + "a reason that goes on " * 8
    with open_writer("table", out, columns=CORE_COLUMNS, path_width=len(long_path)) as writer:
        writer.write({**BAD, "path": long_path, "error": long_error})
    row = out.getvalue().splitlines()[1]
    assert long_path in row and long_error.strip() in row and "…" not in row


def test_default_format_is_table_on_a_terminal_and_csv_in_a_pipe():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert default_format(Terminal()) == "table"
    assert default_format(io.StringIO()) == "csv"


def test_unknown_format_names_the_choices():
    with pytest.raises(UsageError, match="csv, json, jsonl"):
        open_writer("xml", io.StringIO(), columns=CORE_COLUMNS)
