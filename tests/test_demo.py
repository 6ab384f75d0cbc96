"""`diqa demo` end to end, as `make demo` runs it: a fresh process, an empty DIQA_HOME, offline."""

from __future__ import annotations

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
    srcc_lines = [line for line in lines if line.startswith("SRCC ")]
    assert len(srcc_lines) == 1 and "synthetic" in srcc_lines[0]
    table = lines[header + 1 : lines.index(srcc_lines[0])]
    # Every held-out image has a row with a numeric score; the table covers every distortion.
    assert len(table) == 42
    assert {row.split()[1] for row in table} == {"none", "blur", "noise", "jpeg", "contrast"}
    for row in table:
        float(row.split()[-1])
    srcc = float(srcc_lines[0].split()[1])
    assert -1.0 <= srcc <= 1.0

    # --out keeps the synthetic set and the trained head, and the head's sidecar says how it
    # was trained; the tiny backbone was built inside DIQA_HOME.
    assert (out / "synthetic" / "labels.csv").is_file()
    assert (out / "dpiqa-tiny-demo.safetensors").is_file()
    assert (tmp_path / "home" / "tiny" / "backbone" / "unet").is_dir()
