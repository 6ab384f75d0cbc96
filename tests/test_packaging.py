"""diqa as users install it: a built wheel, installed (not editable) into a fresh virtual
environment, writes the tiny bundle and scores an image from there."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_environment_and_scores(tmp_path, tiny_images):
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True, timeout=600,
    )
    (wheel,) = wheels.glob("diqa_cli-*.whl")
    env_dir = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True, timeout=600)
    # The dependencies come from the test environment (nothing is downloaded here); its editable
    # diqa is not visible: a path entry does not run the site directory's .pth files.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DIQA_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", DIQA_OFFLINE="1")
    diqa = env_dir / "bin" / "diqa"
    where = subprocess.run([str(python), "-c", "import diqa_cli; print(diqa_cli.__file__)"], env=env, cwd=tmp_path,
                           check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where  # the installed copy, not the checkout

    bundle = tmp_path / "tiny"
    subprocess.run([str(diqa), "weights", "tiny", str(bundle)], env=env, cwd=tmp_path, check=True, timeout=600,
                   capture_output=True)
    photo = tmp_path / "photo.png"
    tiny_images(1)[0].save(photo)
    result = subprocess.run([str(diqa), "score", str(photo), "-c", str(bundle / "heads" / "dpiqa.safetensors"), "-f", "csv"],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (row,) = csv.DictReader(io.StringIO(result.stdout))
    assert row["status"] == "ok" and float(row["score"]) == float(row["score"])
    listing = subprocess.run([str(diqa), "weights", "list", "-f", "csv"], env=env, capture_output=True, text=True,
                             check=True).stdout
    assert "dpiqa-koniq" in listing  # the packaged manifest
