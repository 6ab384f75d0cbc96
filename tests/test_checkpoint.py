"""Head checkpoints: safetensors + JSON sidecar, saved and rebuilt in one call."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from diqa_cli import methods
from diqa_cli.checkpoint import load_head, read_sidecar, save_head, sidecar_path
from diqa_cli.errors import WeightsError
from diqa_cli.methods import MethodSpec, register_method
from diqa_cli.models.base import QualityModel

METHOD = "test-latent-conv"


class LatentConv(QualityModel):
    """A test-only head: one conv on the tiny backbone's VAE latents, averaged to a score."""

    method_name = METHOD

    def __init__(self, backbone, *, hidden: int = 3, seed: int = 0):
        super().__init__(backbone, hidden=hidden, seed=seed)
        channels = backbone.vae.config.latent_channels
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = nn.Linear(hidden, 1)

    def forward(self, pixels):
        latents = self.backbone.encode(pixels * 2 - 1)
        return self.out(self.conv(latents).mean((2, 3))).squeeze(1)

    def feature_layers(self):
        return ["vae.encoder"]


@pytest.fixture
def latent_conv_method():
    """Registers the test method for one test and removes it afterwards."""
    register_method(
        MethodSpec(
            name=METHOD,
            summary="test head",
            paper="none",
            model=f"{__name__}:LatentConv",
            default_backbone="sd15",
            resolution=64,
            input_convention="[-1,1] into the VAE",
            timesteps=(7, 9),
        )
    )
    yield METHOD
    methods._REGISTRY.pop(METHOD, None)


@pytest.fixture
def saved_head(tmp_path, tiny_backbone, latent_conv_method):
    torch.manual_seed(5)
    model = LatentConv(tiny_backbone, hidden=4, seed=11)
    path = save_head(
        model,
        tmp_path / "heads" / "conv.safetensors",
        normalisation={"offset": 2.5, "scale": 4.0},
        extra={"training": {"epochs": 3}},
    )
    return model, path


def test_sidecar_records_how_to_rebuild_and_read_the_head(saved_head, tiny_backbone):
    model, path = saved_head
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["format"] == "diqa-head/1"
    assert sidecar["method"] == METHOD
    assert sidecar["config"] == {"hidden": 4, "seed": 11}
    assert sidecar["backbone"] == {"ref": tiny_backbone.ref, "identity": tiny_backbone.identity}
    assert sidecar["resolution"] == 64
    assert sidecar["timesteps"] == [7, 9]
    assert sidecar["feature_layers"] == ["vae.encoder"]
    assert sidecar["input_convention"] == "[-1,1] into the VAE"
    assert sidecar["score_normalisation"] == {"offset": 2.5, "scale": 4.0}
    assert sidecar["seed"] == 11
    assert sidecar["diqa_version"] and sidecar["created"]
    assert sidecar["training"] == {"epochs": 3}
    assert read_sidecar(path) == sidecar
    # No temporary files are left beside the checkpoint.
    assert sorted(p.name for p in path.parent.iterdir()) == ["conv.json", "conv.safetensors"]


def test_safetensors_holds_only_the_head_and_names_its_method(saved_head):
    from safetensors import safe_open

    _, path = saved_head
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["method"] == METHOD
        assert sorted(f.keys()) == ["conv.bias", "conv.weight", "out.bias", "out.weight"]


def test_saving_the_same_head_again_gives_the_same_bytes(saved_head, tmp_path):
    """Identical heads hash identically (safetensors alone writes its metadata in a random order)."""
    import hashlib

    model, path = saved_head
    digests = set()
    for i in range(8):
        again = save_head(model, tmp_path / f"again{i}.safetensors", normalisation={"offset": 2.5, "scale": 4.0})
        digests.add(hashlib.sha256(again.read_bytes()).hexdigest())
    assert digests == {hashlib.sha256(path.read_bytes()).hexdigest()}


def test_round_trip_gives_identical_scores(saved_head, tiny_backbone, tiny_pixels):
    model, path = saved_head
    loaded, sidecar = load_head(path, backbone=tiny_backbone)
    assert type(loaded) is LatentConv and loaded.config == {"hidden": 4, "seed": 11}
    pixels = tiny_pixels(3)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))
    assert sidecar["score_normalisation"]["scale"] == 4.0


def test_load_without_backbone_uses_the_sidecars(saved_head, tiny_pixels):
    model, path = saved_head
    loaded, _ = load_head(path, device="cpu", dtype="fp32", offline=True)
    assert loaded.backbone is not model.backbone
    with torch.no_grad():
        assert torch.equal(loaded(tiny_pixels(2)), model(tiny_pixels(2)))


def test_other_backbone_weights_warn_and_the_library_prints_nothing(saved_head, tiny_backbone, capsys):
    from diqa_cli.errors import DiqaWarning

    _, path = saved_head
    other = dataclasses.replace(tiny_backbone, identity="f" * 64)
    with pytest.warns(DiqaWarning, match="trained on backbone .*ffffffffffff"):
        load_head(path, backbone=other)
    assert capsys.readouterr().err == ""  # the CLI decides what to show (`diqa: warning: …`)


def test_pickle_checkpoints_are_refused_with_the_fix(tmp_path):
    released = tmp_path / "dpiqa_koniq.pth"
    torch.save({"w": torch.zeros(1)}, released)
    with pytest.raises(WeightsError, match="diqa weights convert"):
        load_head(released)


def test_missing_sidecar_is_named(saved_head):
    _, path = saved_head
    sidecar_path(path).unlink()
    with pytest.raises(WeightsError, match="no sidecar conv.json"):
        load_head(path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_head(tmp_path / "nothing.safetensors")


def test_checkpoint_of_another_shape_fails_naming_the_keys(saved_head, tiny_backbone):
    from safetensors.torch import load_file, save_file

    _, path = saved_head
    state = load_file(str(path))
    state["stray.weight"] = torch.zeros(1)
    del state["out.bias"]
    save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"missing keys \['out.bias'\].*unexpected keys \['stray.weight'\]"):
        load_head(path, backbone=tiny_backbone)


def test_seed_override_replaces_the_recorded_config(saved_head, tiny_backbone):
    _, path = saved_head
    loaded, _ = load_head(path, backbone=tiny_backbone, config_overrides={"seed": 3})
    assert loaded.config["seed"] == 3


def test_extra_may_not_replace_core_keys(tmp_path, tiny_backbone, latent_conv_method):
    model = LatentConv(tiny_backbone)
    with pytest.raises(ValueError, match="score_normalisation"):
        save_head(
            model,
            tmp_path / "h.safetensors",
            normalisation={"offset": 0, "scale": 1},
            extra={"score_normalisation": {}},
        )
    assert not (tmp_path / "h.safetensors").exists()


def test_relative_backbone_path_is_recorded_absolute(tmp_path, tiny_dir, tiny_backbone, latent_conv_method, monkeypatch):
    monkeypatch.chdir(tiny_dir.parent)
    relative = dataclasses.replace(tiny_backbone, ref=f"{tiny_dir.name}/backbone")
    path = save_head(LatentConv(relative), tmp_path / "h.safetensors", normalisation={"offset": 0, "scale": 1})
    assert read_sidecar(path)["backbone"]["ref"] == str(tiny_dir / "backbone")
    monkeypatch.chdir(tmp_path)  # loading from elsewhere still finds the backbone
    loaded, _ = load_head(path, device="cpu", dtype="fp32", offline=True)
    assert loaded.backbone.identity == tiny_backbone.identity
