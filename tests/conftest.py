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
    monkeypatch.delenv("DIQA_DEBUG", raising=False)  # restored after the test, whatever --debug set


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
def unit_latent_backbone_dir(tiny_dir, tiny_pixels, tmp_path_factory):
    """A copy of the tiny folder whose backbone (the diffusers folder returned) has a VAE scaling
    factor that gives latents of unit variance, as SD's 0.18215 does for SD's own VAE. The shipped
    tiny config keeps SD's number, which leaves the random VAE's latents at std ~0.03: at the low timesteps the methods
    train on, the added noise then drowns the image, so tests that need a prior to respond to
    image content use this copy."""
    import json
    import shutil

    import torch

    from diqa_cli.backbone import load_backbone

    # The whole tiny folder: DP-IQA heads find the CLIP tower beside the backbone.
    root = tmp_path_factory.mktemp("unit_latent") / "tiny"
    shutil.copytree(tiny_dir, root)
    folder = root / "backbone"
    backbone = load_backbone(str(folder), device="cpu", dtype="fp32", offline=True)
    with torch.no_grad():
        spread = backbone.vae.encode(tiny_pixels(4) * 2 - 1).latent_dist.mean.std()
    config_path = folder / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = round(float(1 / spread), 4)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


@pytest.fixture(scope="session")
def model_home(_session_home):
    """The DIQA_HOME of session and module fixtures, where loading a head caches its prompt
    embeddings; CLI runs in a test point at it so they do not embed the prompts again."""
    return os.environ["DIQA_HOME"]


@pytest.fixture(scope="session")
def dpiqa_head(tiny_dir, tiny_backbone):
    """A tiny DP-IQA head saved as `diqa weights tiny` saves it (same seed, same place: the tiny
    folder's ``heads/``), with its sidecar."""
    import torch

    from diqa_cli.checkpoint import save_head
    from diqa_cli.models.dpiqa import DPIQA

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = DPIQA(tiny_backbone, **DPIQA.tiny_config())
    return save_head(model, tiny_dir / "heads" / "dpiqa.safetensors", normalisation={"offset": 0.0, "scale": 1.0})


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
