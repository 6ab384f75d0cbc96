"""Writes on a full disk: a clear one-line error, no traceback, and never a partial file."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

DIQA = [str(Path(sys.executable).with_name("diqa"))]  # the installed console script


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_rows_to_a_full_disk_fail_in_one_line(tiny_dir, dpiqa_head, tiny_images, tmp_path, model_home):
    tiny_images(1)[0].save(tmp_path / "a.png")
    env = {**os.environ, "DIQA_HOME": model_home, "HF_HUB_OFFLINE": "1"}
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*DIQA, "score", str(tmp_path / "a.png"), "-c", str(dpiqa_head), "-f", "csv"],
                              stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "diqa: error: cannot write standard output: No space left on device"


def test_a_head_that_cannot_be_written_leaves_no_file(tiny_backbone, tmp_path, monkeypatch):
    from diqa_cli import checkpoint
    from diqa_cli.checkpoint import save_head
    from diqa_cli.models.dpiqa_student import DPIQAStudent

    def half_then_full(tensors, path, **_):
        Path(path).write_bytes(b"partial")
        _no_space()

    monkeypatch.setattr(checkpoint, "save_safetensors", half_then_full)
    model = DPIQAStudent(None, **DPIQAStudent.tiny_config())
    with pytest.raises(OSError, match="No space left"):
        save_head(model, tmp_path / "heads" / "student.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    assert list((tmp_path / "heads").iterdir()) == []


def test_an_enhanced_image_that_cannot_be_written_is_an_error_row_and_no_file(run_main, dpiqa_head, tiny_images,
                                                                                tmp_path, monkeypatch):
    from PIL import Image

    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    tiny_images(1)[0].save(source)
    real_save = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if "out" in str(fp):  # the enhanced image, not the test's own files
            Path(fp).write_bytes(b"partial")
            _no_space()
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "out"
    code, stdout, stderr = run_main([
        "enhance", str(source), "--out-dir", str(out), "--prior", "dpiqa", "--checkpoint", str(dpiqa_head),
        "--device", "cpu", "--dtype", "fp32", "--inversion-steps", "1", "--iterations", "1",
    ])
    assert code == 3
    assert "No space left on device" in stderr and "Traceback" not in stderr
    assert not out.exists() or list(out.iterdir()) == []
