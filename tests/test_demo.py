"""`diqa demo` end to end, as `make demo` runs it: a fresh process, an empty DIQA_HOME, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_diqa_demo_prints_a_labelled_table_and_srcc(tmp_path):
    env = {**os.environ, "DIQA_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "DIQA_OFFLINE": "1"}
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("diqa")), "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stdout, stderr = result.stdout, result.stderr

    # Nobody can mistake it for a quality model: labelled on both streams.
    assert "tiny random-backbone demo on a synthetic distortion set" in stdout
    assert "not a quality model" in stderr

    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("path"))
    assert lines[header].split() == ["path", "distortion", "level", "synthetic_mos", "score"]
    held_out, training = (line for line in lines if line.startswith("SRCC "))
    assert "held-out images of unseen photos" in held_out and "synthetic MOS" in held_out
    table = lines[header + 1 : lines.index(held_out)]
    # Every held-out image has a row with a numeric score; the table covers every distortion.
    assert len(table) == 42
    assert {row.split()[1] for row in table} == {"none", "blur", "noise", "jpeg", "contrast"}
    for row in table:
        float(row.split()[-1])
    assert -1.0 <= float(held_out.split()[1]) <= 1.0  # a number: NaN would mean constant scores
    # The head learned its training photos (0.98 when measured): training and scoring work.
    assert float(training.split()[1]) > 0.8

    # --out keeps the synthetic set and the trained head, and the head's sidecar says how it
    # was trained; the tiny backbone was built inside DIQA_HOME.
    assert (out / "synthetic" / "labels.csv").is_file()
    assert (out / "dpiqa-tiny-demo.safetensors").is_file()
    sidecar = json.loads((out / "dpiqa-tiny-demo.json").read_text())
    assert sidecar["method"] == "dpiqa" and sidecar["training"]["n_train"] == 84
    assert (tmp_path / "home" / "tiny" / "backbone" / "unet").is_dir()

    # It ends with `diqa score --db --maps` and `diqa report`: the report's path on stderr, a map
    # for every image (126 of the set and the half-noised photo) recorded in the database.
    assert f"report of the scores and quality maps: {out / 'report.html'}" in stderr
    assert (out / "report.html").is_file() and "data:image/jpeg" in (out / "report.html").read_text()
    assert len(list((out / "maps").glob("*.map.png"))) == len(list((out / "maps").glob("*.map.tiff"))) == 127
    assert len(list((out / "maps").glob("patched.*.map.png"))) == 1
    from diqa_cli.store import open_store

    with open_store(out / "scores.sqlite", create=False) as store:
        rows = list(store.rows())
    assert len(rows) == 127 and all(row["map"] and Path(row["map"]).is_file() for row in rows)


@pytest.mark.slow
def test_diqa_demo_without_out_keeps_only_its_report(tmp_path):
    env = {**os.environ, "DIQA_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "DIQA_OFFLINE": "1"}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("diqa")), "demo", "--epochs", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = tmp_path / "home" / "demo" / "report.html"
    assert f"report of the scores and quality maps: {report}" in result.stderr
    assert report.is_file() and [p.name for p in (tmp_path / "home" / "demo").iterdir()] == ["report.html"]
