"""LGDM / PMG on the tiny backbone: registry entry, shapes, determinism, guidance that pulls the
trajectory toward the input, the frozen/trainable split, scoring without autograd, gradients for
enhancement, and the offline refusal of missing perceptual weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.methods import get_method
from diqa_cli.models.lgdm import LGDM

# The tiny U-Net's widths (32, 32, 64, 64) at the default layers down.1, down.2, mid, up.0 … up.3.
TINY_POOLED_WIDTH = 32 + 64 + 64 + 64 + 64 + 32 + 32


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return LGDM(tiny_backbone, **LGDM.tiny_config())


@pytest.fixture(scope="module")
def tiny_backbone64(tiny_backbone):
    """The tiny backbone in float64. In float32, batched and single convolutions round
    differently (~1e-7), and the random toy networks turn that into visible differences: a
    near-tie in AlexNet's max pooling routes the LPIPS gradient elsewhere, and the toy U-Net's
    middle block normalises GroupNorm groups of two values at 1x1 (SD's has 40 channels at 8x8).
    In float64 rounding no longer shows, while any real coupling between a batch's images would."""
    import copy
    import dataclasses

    return dataclasses.replace(
        tiny_backbone,
        unet=copy.deepcopy(tiny_backbone.unet).double(),
        vae=copy.deepcopy(tiny_backbone.vae).double(),
        dtype=torch.float64,
        alphas_cumprod=tiny_backbone.alphas_cumprod.double(),
    )


def test_registered_as_lgdm_and_pmg_and_marked_as_a_reconstruction():
    spec = get_method("pmg")
    assert spec is get_method("lgdm")
    assert spec.reconstruction is True
    assert "2506.00327" in spec.paper and "reconstruction" in spec.paper
    assert spec.default_backbone == "sd15"
    assert spec.input_convention == "[-1,1]"
    assert spec.timesteps == (100, 75, 50, 25)
    assert "no released code" in spec.licence
    assert spec.deviations and spec.score_direction == "higher is better"
    assert spec.aliases == ("pmg",)


def test_listing_the_method_does_not_import_torch():
    code = "import sys, diqa_cli.methods as m; m.get_method('pmg'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_scores_and_features_have_the_documented_shapes(model, tiny_backbone, tiny_pixels):
    pixels = tiny_pixels(3)
    with torch.no_grad():
        scores = model(pixels)
    features = model.extract_features(pixels)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert model.feature_shape == (4, 2 * TINY_POOLED_WIDTH)
    assert features.shape == (3, 4, 2 * TINY_POOLED_WIDTH)
    means_only = LGDM(tiny_backbone, **{**LGDM.tiny_config(), "pool": "mean", "guidance_steps": 0})
    assert means_only.extract_features(pixels).shape == (3, 4, TINY_POOLED_WIDTH)
    assert model.feature_layers() == ["down.1", "down.2", "mid", "up.0", "up.1", "up.2", "up.3"]


def test_same_input_same_score_and_a_batch_scores_like_its_singles(model, tiny_backbone, tiny_backbone64, tiny_pixels):
    pixels = tiny_pixels(2)
    with torch.no_grad():
        first = model(pixels)
        second = model(pixels)
    assert torch.equal(first, second)
    # Pixel guidance only: LPIPS and DISTS are per-image by construction (test_perceptual checks
    # their batches), and float64 VGG/AlexNet would be slow here.
    precise = LGDM(tiny_backbone64, **{**LGDM.tiny_config(), "perceptual": None}).double()
    with torch.no_grad():
        together = precise(pixels.double())
        singles = torch.cat([precise(pixels[i : i + 1].double()) for i in range(2)])
    torch.testing.assert_close(together, singles, rtol=1e-5, atol=1e-5)
    # A model rebuilt with the same seed draws the same trajectory noise.
    rebuilt = LGDM(tiny_backbone, **LGDM.tiny_config())
    assert torch.equal(rebuilt.extract_features(pixels), model.extract_features(pixels))
    other_seed = LGDM(tiny_backbone, **{**LGDM.tiny_config(), "seed": 1})
    assert not torch.equal(other_seed.extract_features(pixels), model.extract_features(pixels))


@pytest.mark.parametrize(
    "wrt, perceptual",
    [("z0", {"lpips-alex": 1.0}), ("z0", {"dists": 1.0}), ("zt", None)],
    ids=["z0-lpips", "z0-dists", "zt-pixels"],
)
def test_guidance_pulls_the_tweedie_estimate_toward_the_input(tiny_backbone64, tiny_pixels, wrt, perceptual):
    pixels = tiny_pixels(2).double()
    config = {**LGDM.tiny_config(), "perceptual": perceptual, "guidance_wrt": wrt}
    guided = LGDM(tiny_backbone64, **config).double()
    unguided = LGDM(tiny_backbone64, **{**config, "guidance_steps": 0}).double()
    with torch.no_grad():
        with_guidance = guided.trajectory(pixels, return_estimates=True)
        without = unguided.trajectory(pixels, return_estimates=True)
    assert len(with_guidance.estimates) == 4
    # The first timestep is the same noised input either way; guidance acts on the later ones.
    torch.testing.assert_close(with_guidance.estimates[0], without.estimates[0])
    # On the tiny random U-Net the Tweedie estimates of consecutive steps are only loosely
    # related, so the gradient through it (zt) is checked where its steps add up: the last one.
    checked = range(1, 4) if wrt == "z0" else [3]
    for step in checked:
        closer = guided.guidance_loss(with_guidance.estimates[step], pixels)
        farther = guided.guidance_loss(without.estimates[step], pixels)
        assert torch.all(closer < farther), (step, closer.tolist(), farther.tolist())
    assert not torch.allclose(with_guidance.features, without.features)


def test_only_the_aggregation_and_regressor_train(model, tiny_backbone, tiny_pixels):
    names = model.trainable_parameter_names()
    assert names and all(n.startswith(("aggregator.", "regressor.")) for n in names)
    assert "aggregator.mixing" in names
    assert set(model.checkpoint_state_dict()) == set(names)

    unet_before = {k: v.clone() for k, v in tiny_backbone.unet.state_dict().items()}
    perceptual_before = {k: v.clone() for k, v in model.perceptual.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
    params = [p for n, p in model.named_parameters() if n in set(names)]
    optimiser = torch.optim.SGD(params, lr=0.1)
    model.train()
    try:
        loss = model.training_loss(tiny_pixels(2), torch.tensor([0.2, 0.8]), torch.Generator())
        loss.backward()
        optimiser.step()
        optimiser.zero_grad()
    finally:
        model.eval()
    assert all(torch.equal(v, tiny_backbone.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, model.perceptual.state_dict()[k]) for k, v in perceptual_before.items())
    changed = [k for k, v in model.checkpoint_state_dict().items() if not torch.equal(v, head_before[k])]
    assert "regressor.2.weight" in changed and "aggregator.mixing" in changed
    model.load_checkpoint_state_dict(head_before)


def test_cached_features_through_the_head_give_the_scores(model, tiny_pixels):
    pixels = tiny_pixels(2)
    with torch.no_grad():
        direct = model(pixels)
        cached = model.head_forward(model.extract_features(pixels))
    torch.testing.assert_close(direct, cached)


@pytest.mark.parametrize("wrt", ["z0", "zt"])
def test_scores_agree_under_no_grad_inference_mode_and_with_autograd(tiny_backbone, tiny_pixels, wrt):
    model = LGDM(tiny_backbone, **{**LGDM.tiny_config(), "guidance_wrt": wrt})
    pixels = tiny_pixels(2)
    with torch.no_grad():
        plain = model(pixels)
    with torch.inference_mode():
        inference = model(pixels.clone())
    with_grad = model(pixels)
    torch.testing.assert_close(inference, plain)
    torch.testing.assert_close(with_grad.detach(), plain)
    assert not inference.requires_grad


@pytest.mark.parametrize("wrt", ["z0", "zt"])
def test_score_is_differentiable_with_respect_to_the_pixels(tiny_backbone, tiny_pixels, wrt):
    model = LGDM(tiny_backbone, **{**LGDM.tiny_config(), "guidance_wrt": wrt})
    pixels = tiny_pixels(1).requires_grad_(True)
    score = model(pixels)
    score.sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0


def test_checkpoint_round_trip_gives_the_same_scores(model, tiny_backbone, tiny_pixels, tmp_path):
    from diqa_cli.checkpoint import load_head, save_head

    path = save_head(model, tmp_path / "lgdm.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    loaded, sidecar = load_head(path, backbone=tiny_backbone, device="cpu", dtype="fp32")
    assert sidecar["method"] == "lgdm"
    assert sidecar["feature_layers"] == model.feature_layers()
    pixels = tiny_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), model(pixels))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"timesteps": [25, 50, 75]}, "strictly decreasing"),
        ({"timesteps": [1200, 50]}, "strictly decreasing"),
        ({"guidance_steps": 4}, "guidance_steps"),
        ({"perceptual": {"ssim": 1.0}}, "unknown perceptual distance"),
        ({"pool": "max"}, "pool"),
        ({"guidance_wrt": "x0"}, "guidance_wrt"),
        ({"guidance_weight": 2.0}, "unknown LGDM option"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(tiny_backbone, change, words):
    with pytest.raises(UsageError, match=words):
        LGDM(tiny_backbone, **{**LGDM.tiny_config(), **change})


def test_missing_perceptual_weights_are_refused_offline_with_the_fix(tiny_backbone):
    with pytest.raises(WeightsError, match=r"vgg16-397923af\.pth.*diqa weights pull vgg16-imagenet"):
        LGDM(tiny_backbone)  # the defaults: LPIPS-VGG and DISTS on ImageNet weights from the manifest
    # Pixel-space guidance alone needs no perceptual weights.
    pixel_only = LGDM(tiny_backbone, perceptual=None, projection_dim=8, hidden_dim=4)
    assert len(pixel_only.perceptual) == 0
