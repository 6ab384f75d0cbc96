"""LPIPS and DISTS distances: zero on identical images, growing with blur, usable as losses,
frozen, loaded from the diqa weights cache and refused offline when the weights are missing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diqa_cli.errors import WeightsError
from diqa_cli.perceptual import DISTS, LPIPSDistance, perceptual_distance

NAMES = ("lpips-alex", "lpips-vgg", "dists")
SIGMAS = (0.5, 1.0, 2.0, 4.0)


@pytest.fixture(scope="module")
def distances():
    """Each distance with random-weight backbones (no ImageNet weights exist here), built once."""
    return {name: perceptual_distance(name, backbone_weights=None) for name in NAMES}


@pytest.fixture(scope="module")
def astronaut():
    """scikit-image's astronaut at 96 px and Gaussian blurs of it, as (1, 3, H, W) in [0, 1]."""
    from PIL import Image
    from skimage import data, filters

    image = np.asarray(Image.fromarray(data.astronaut()).resize((96, 96), Image.Resampling.BICUBIC)) / 255.0

    def tensor(array):
        return torch.tensor(array, dtype=torch.float32).permute(2, 0, 1)[None]

    blurred = [tensor(filters.gaussian(image, sigma=s, channel_axis=-1)) for s in SIGMAS]
    return tensor(image), blurred


@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_and_growing_with_blur(distances, astronaut, name):
    metric = distances[name]
    image, blurred = astronaut
    with torch.no_grad():
        same = metric(image, image)
        grows = metric(image.expand(len(blurred), -1, -1, -1), torch.cat(blurred))
    assert same.shape == (1,)
    assert abs(float(same)) < 1e-5
    assert grows.shape == (len(SIGMAS),)
    assert float(grows[0]) > 1e-4
    assert torch.all(grows[1:] > grows[:-1]), grows.tolist()


@pytest.mark.parametrize("name", NAMES)
def test_gradient_descent_on_the_distance_moves_an_image_toward_the_reference(distances, astronaut, name):
    metric = distances[name]
    image, blurred = astronaut
    x = blurred[-1].clone().requires_grad_(True)
    start = float(metric(x, image).detach())
    optimiser = torch.optim.Adam([x], lr=0.01)
    for _ in range(10):
        optimiser.zero_grad()
        metric(x, image).sum().backward()
        optimiser.step()
    assert torch.isfinite(x.grad).all()
    assert float(metric(x, image).detach()) < 0.9 * start


def test_batched_distances_equal_one_at_a_time(distances, astronaut):
    image, blurred = astronaut
    pair = torch.cat(blurred[:2])
    for metric in distances.values():
        with torch.no_grad():
            together = metric(image.expand(2, -1, -1, -1), pair)
            alone = torch.cat([metric(image, pair[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)


def test_frozen_and_kept_in_eval_mode_inside_a_training_parent(distances, astronaut):
    image, blurred = astronaut
    parent = torch.nn.ModuleDict(distances)
    parent.train()
    for name, metric in distances.items():
        assert not any(m.training for m in metric.modules()), name
        assert not any(p.requires_grad for p in metric.parameters()), name
        # LPIPS' linear layers carry dropout: in training mode two calls would differ.
        with torch.no_grad():
            assert torch.equal(metric(image, blurred[1]), metric(image, blurred[1])), name


def test_random_backbones_are_the_same_every_time():
    a = LPIPSDistance("alex", backbone_weights=None)
    b = LPIPSDistance("alex", backbone_weights=None)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_unknown_choices_are_usage_errors():
    from diqa_cli.errors import UsageError

    with pytest.raises(UsageError, match="squeeze"):
        LPIPSDistance("squeeze", backbone_weights=None)
    with pytest.raises(UsageError, match="lpips-alex"):
        perceptual_distance("ssim", backbone_weights=None)
    with pytest.raises(UsageError, match="imagenet"):
        DISTS(backbone_weights="random")


# --- weights through the manifest and the diqa cache -----------------------------------------


def test_offline_refusal_names_the_missing_file_and_the_fix():
    with pytest.raises(WeightsError) as lpips_error:
        LPIPSDistance("alex")
    message = str(lpips_error.value)
    assert "alexnet-owt-7be5be79.pth" in message
    assert "diqa weights pull alexnet-imagenet" in message
    assert "offline" in message

    with pytest.raises(WeightsError) as vgg_error:
        perceptual_distance("lpips-vgg")
    assert "vgg16-397923af.pth" in str(vgg_error.value)
    assert "diqa weights pull vgg16-imagenet" in str(vgg_error.value)


def _cache_converted(entry_name: str, tensors: dict) -> None:
    """Put ``tensors`` where ``diqa weights convert`` leaves a converted torchvision pickle."""
    from safetensors.torch import save_file

    from diqa_cli import weights

    entry = weights.entry(entry_name)
    target = entry.local_dir / entry.files[0].converted_path
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))


def test_lpips_loads_its_imagenet_trunk_from_the_diqa_cache():
    import torchvision

    torch.manual_seed(1)
    alexnet = torchvision.models.alexnet()
    _cache_converted("alexnet-imagenet", alexnet.state_dict())

    metric = LPIPSDistance("alex")
    trunk = metric.lpips.net.state_dict()
    assert torch.equal(trunk["slice1.0.weight"], alexnet.features[0].weight.detach())
    assert torch.equal(trunk["slice5.10.bias"], alexnet.features[10].bias.detach())
    random_trunk = LPIPSDistance("alex", backbone_weights=None).lpips.net.state_dict()
    assert not torch.equal(trunk["slice1.0.weight"], random_trunk["slice1.0.weight"])


def test_dists_loads_vgg16_and_alpha_beta_from_the_diqa_cache(tmp_path, monkeypatch):
    """Through a manifest that has a ``dists`` entry (the shipped manifest may not have one yet)."""
    from safetensors.torch import save_file
    from torchvision.models.vgg import cfgs, make_layers

    from diqa_cli import weights

    manifest = json.loads(weights.manifest_path().read_text(encoding="utf-8"))
    manifest["entries"].setdefault(
        "dists",
        {
            "name": "dists",
            "kind": "perceptual",
            "description": "DISTS alpha/beta",
            "licence": "MIT",
            "source": "https://example.invalid/DISTS",
            "files": [{"path": "weights.pt", "format": "pickle", "sha256": None, "sha256_note": "test"}],
        },
    )
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.setenv("DIQA_MANIFEST", str(path))

    torch.manual_seed(2)
    features = make_layers(cfgs["D"])
    _cache_converted("vgg16-imagenet", {f"features.{k}": v for k, v in features.state_dict().items()})
    alpha = torch.rand(1, 1475, 1, 1)
    beta = torch.rand(1, 1475, 1, 1)
    dists_entry = weights.entry("dists")
    target = dists_entry.local_dir / dists_entry.files[0].converted_path
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({"alpha": alpha, "beta": beta}, str(target))

    metric = DISTS()
    assert torch.equal(metric.alpha.detach(), alpha)
    assert torch.equal(metric.beta.detach(), beta)
    state = metric.state_dict()  # VGG16's own layer indices survive inside the DISTS stages
    assert torch.equal(state["stages.0.0.weight"], features[0].weight.detach())
    assert torch.equal(state["stages.4.28.weight"], features[28].weight.detach())
