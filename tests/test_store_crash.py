"""Crash safety of the score store: `diqa score --db` killed with SIGKILL at random points, then run
again, leaves an intact database that keeps every committed row and re-scores only the rest."""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

DIQA = [str(Path(sys.executable).with_name("diqa"))]  # the installed console script


def _rows_in(db: Path) -> tuple[str, int]:
    with sqlite3.connect(db) as connection:
        check = connection.execute("PRAGMA integrity_check").fetchone()[0]
        count = connection.execute("SELECT count(*) FROM scores WHERE status = 'ok'").fetchone()[0]
    return check, count


@pytest.mark.slow
def test_kill_9_at_random_points_then_rerun_keeps_committed_rows(dpiqa_head, tiny_images, tmp_path, model_home):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(tiny_images(16, 48)):
        image.save(folder / f"p{i:02d}.png")
    db = tmp_path / "scores.sqlite"
    env = {**os.environ, "DIQA_HOME": model_home, "HF_HUB_OFFLINE": "1", "DIQA_OFFLINE": "1"}
    args = [*DIQA, "score", str(folder), "-c", str(dpiqa_head), "--db", str(db), "-f", "csv", "-b", "1", "-j", "1"]
    chance = random.Random(7)
    printed_before_kill = 0
    for _ in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        proc.stdout.readline()  # the CSV header: the run has started
        for _ in range(chance.randint(0, 3)):  # a few rows in, or none
            if proc.stdout.readline():
                printed_before_kill += 1
        time.sleep(chance.uniform(0.0, 0.3))  # and somewhere inside the next image or commit
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        check, committed = _rows_in(db)
        assert check == "ok"
        assert committed >= min(printed_before_kill, 16)  # a row is committed before it is printed

    final = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert final.returncode == 0, final.stderr
    rows = list(csv.DictReader(io.StringIO(final.stdout)))
    assert len(rows) == 16 and all(row["status"] == "ok" for row in rows)
    assert f"reused {committed} of 16 results" in final.stderr  # only the unfinished inputs were scored
    assert _rows_in(db) == ("ok", 16)
