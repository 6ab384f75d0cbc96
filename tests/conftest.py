"""Shared test fixtures: an isolated DIQA_HOME per test, offline switches, the tiny backbone."""

from __future__ import annotations

import os

import pytest

# Set before anything imports huggingface_hub, which reads these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DIQA_OFFLINE"] = "1"

# skimage.data photos bundled with scikit-image (no download).
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")


@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory):
    """Session fixtures (the tiny backbone) run before the per-test home is set; give them a
    throwaway home so no test ever writes to the user's real cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIQA_HOME", str(tmp_path_factory.mktemp("session_home")))
        yield


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIQA_HOME", str(tmp_path / "diqa_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DIQA_OFFLINE", "1")


@pytest.fixture
def run_main(monkeypatch, capsys):
    """The console entry point in this process: ``run_main(args, home=None) -> (code, stdout,
    stderr)``; ``home`` points DIQA_HOME elsewhere for that run."""
    import sys

    from diqa_cli.cli import main

    def run(args, home=None):
        if home is not None:
            monkeypatch.setenv("DIQA_HOME", home)
        monkeypatch.setattr(sys, "argv", ["diqa", *args])
        with pytest.raises(SystemExit) as exit_info:
            main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


@pytest.fixture(scope="session")
def tiny_dir(_session_home, tmp_path_factory):
    """A folder holding ``backbone/``, ``backbone.safetensors`` and ``clip/`` (diqa_cli.tiny)."""
    from diqa_cli.tiny import write_tiny_backbone

    return write_tiny_backbone(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_backbone(tiny_dir):
    """The tiny backbone loaded once from its diffusers folder, on CPU in float32."""
    from diqa_cli.backbone import load_backbone

    return load_backbone(str(tiny_dir / "backbone"), device="cpu", dtype="fp32", offline=True)


@pytest.fixture(scope="session")
def tiny_images():
    """``tiny_images(n, size=64)``: n distinct RGB PIL images cut from scikit-image's photos
    (cycling through them, each later round cropped differently), resized to size x size."""
    from PIL import Image
    from skimage import data

    def make(n: int, size: int = 64) -> list:
        images = []
        for i in range(n):
            photo = Image.fromarray(getattr(data, _PHOTOS[i % len(_PHOTOS)])()).convert("RGB")
            w, h = photo.size
            inset = (i // len(_PHOTOS)) * 16 % (min(w, h) // 3)  # a different crop on each pass
            side = min(w, h) - 2 * inset
            left, top = (w - side) // 2, (h - side) // 2
            crop = photo.crop((left, top, left + side, top + side))
            images.append(crop.resize((size, size), Image.Resampling.BICUBIC))
        return images

    return make


@pytest.fixture(scope="session")
def tiny_pixels(tiny_images):
    """``tiny_pixels(n, size=64)``: the same images as a float32 (n, 3, size, size) batch in [0, 1]."""
    import numpy as np
    import torch

    def make(n: int, size: int = 64):
        arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in tiny_images(n, size)]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    return make
