"""The README's Python examples run as written, on the tiny bundle (`diqa weights tiny tiny`)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_readme_has_python_examples_for_images_and_videos():
    examples = python_examples()
    assert len(examples) >= 2
    assert any("create_metric" in e and "score_files" in e and "as_loss=True" in e for e in examples)
    assert any("genzvqa" in e and "timestamps=" in e for e in examples)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_images, model_home):
    """A folder laid out as the examples expect: tiny/ (the bundle), photos/, clips/."""
    from diqa_cli.tiny import write_tiny_bundle
    from test_videoio import encode  # the clip builder the decoding tests use

    root = tmp_path_factory.mktemp("readme")
    write_tiny_bundle(root / "tiny")  # what `diqa weights tiny tiny` writes
    (root / "photos").mkdir()
    for name, image in zip(("a.png", "b.png"), tiny_images(2, 80)):
        image.save(root / "photos" / name)
    (root / "clips").mkdir()
    encode(root / "clips" / "clip.mp4", "libx264", noise=True)
    return root


@pytest.mark.parametrize("index", range(len(python_examples())))
def test_readme_python_example_runs_as_written(index, workdir, monkeypatch, capsys):
    example = python_examples()[index]
    script = workdir / f"example{index}.py"
    script.write_text(example, encoding="utf-8")
    monkeypatch.chdir(workdir)
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.strip(), "each example prints what it computed"
    assert "nan" not in printed.lower()
