"""How much diqa says on stderr: stage messages by default, errors only with -q, everything with
--debug; shell completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DIQA = [str(Path(sys.executable).with_name("diqa"))]


def _photo(tiny_images, tmp_path):
    path = tmp_path / "a.png"
    tiny_images(1)[0].save(path)
    return path


def test_stage_messages_by_default_and_only_errors_with_quiet(run_main, dpiqa_head, tiny_images, tmp_path, model_home):
    photo = _photo(tiny_images, tmp_path)
    code, out, err = run_main(["score", str(photo), str(tmp_path / "missing.png"), "-c", str(dpiqa_head), "-f", "csv"],
                              home=model_home)
    assert code == 3 and out.count("\n") == 3
    assert "diqa: loading backbone" in err and "fp32 on cpu" in err
    assert "missing.png: no such file" in err

    code, out, err = run_main(["-q", "score", str(photo), str(tmp_path / "missing.png"), "-c", str(dpiqa_head), "-f", "csv"],
                              home=model_home)
    assert code == 3 and out.count("\n") == 3
    assert "loading backbone" not in err
    assert "missing.png: no such file" in err  # errors are never hidden


def test_debug_shows_the_traceback_of_an_error(run_main, tmp_path):
    code, _, err = run_main(["--debug", "score", str(tmp_path / "a.png"), "-c", str(tmp_path / "absent.safetensors")])
    assert code == 1
    assert "Traceback (most recent call last)" in err and err.rstrip().splitlines()[-1].startswith("diqa: error:")
    code, _, err = run_main(["score", str(tmp_path / "a.png"), "-c", str(tmp_path / "absent.safetensors")])
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_quiet_and_verbose_together_is_a_usage_error(run_main):
    code, _, err = run_main(["-q", "-v", "methods"])
    assert code == 2 and "--quiet" in err


def test_shell_completion_script(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path)}
    # A test has no interactive parent shell to detect: name the shell instead (typer's own switch).
    env["_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"] = "1"
    result = subprocess.run([*DIQA, "--show-completion", "bash"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0
    assert "complete" in result.stdout and "diqa" in result.stdout
