"""U-Net feature taps on the tiny backbone: shapes as published, hooks always removed, early stop."""

from __future__ import annotations

import pytest
import torch

from diqa_cli.errors import UsageError
from diqa_cli.taps import UNetTaps, _blocks, feature_info, tap_names

ALL = ["down.0", "down.1", "down.2", "down.3", "mid", "up.0", "up.1", "up.2", "up.3"]


def _inputs(backbone, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, backbone.unet.config.cross_attention_dim, generator=generator)
    return latents, torch.full((batch,), 10), text


def _hooks_left(unet) -> int:
    return sum(len(m._forward_hooks) for m in unet.modules())


def test_tap_names_follow_execution_order(tiny_backbone):
    assert tap_names(tiny_backbone.unet) == ALL


def test_features_have_the_published_channels_and_stride(tiny_backbone):
    latents, t, text = _inputs(tiny_backbone)
    infos = feature_info(tiny_backbone.unet, ALL)
    with UNetTaps(tiny_backbone.unet, ALL) as taps, torch.no_grad():
        feats = taps(latents, t, text)
    assert list(feats) == ALL
    for info in infos:
        side = 8 // info.reduction
        assert feats[info.name].shape == (2, info.channels, side, side), info
    # SD structure: the deepest blocks are 8x below the latent grid, the last up block at full size.
    assert {i.name: i.reduction for i in infos}["mid"] == 8
    assert {i.name: i.reduction for i in infos}["up.3"] == 1


def test_unknown_feature_name_lists_the_valid_ones(tiny_backbone):
    with pytest.raises(UsageError) as err:
        feature_info(tiny_backbone.unet, ["up.9"])
    assert "'up.9'" in str(err.value) and "down.0" in str(err.value) and "mid" in str(err.value)
    with pytest.raises(UsageError):
        UNetTaps(tiny_backbone.unet, [])


def test_last_up_block_tap_is_what_the_unet_feeds_its_output_head(tiny_backbone):
    unet = tiny_backbone.unet
    latents, t, text = _inputs(tiny_backbone)
    with torch.no_grad():
        full = unet(latents, t, text).sample
        with UNetTaps(unet, ["up.3"]) as taps:
            last = taps(latents, t, text)["up.3"]
        rebuilt = unet.conv_out(unet.conv_act(unet.conv_norm_out(last)))
    torch.testing.assert_close(rebuilt, full, rtol=0, atol=1e-6)


def test_hooks_removed_after_normal_exit_and_after_an_exception(tiny_backbone):
    unet = tiny_backbone.unet
    latents, t, text = _inputs(tiny_backbone)
    with UNetTaps(unet, ["down.1", "up.2"]) as taps:
        assert _hooks_left(unet) == 2
        with torch.no_grad():
            taps(latents, t, text)
    assert _hooks_left(unet) == 0

    with pytest.raises(ValueError, match="boom"):
        with UNetTaps(unet, ALL) as taps:
            raise ValueError("boom")
    assert _hooks_left(unet) == 0

    # An error inside the U-Net itself (wrong text width) also leaves no hook behind.
    with pytest.raises(RuntimeError):
        with UNetTaps(unet, ["up.3"]) as taps, torch.no_grad():
            taps(latents, t, text[..., :5])
    assert _hooks_left(unet) == 0


def test_calling_outside_the_with_block_is_refused(tiny_backbone):
    latents, t, text = _inputs(tiny_backbone)
    taps = UNetTaps(tiny_backbone.unet, ["mid"])
    with pytest.raises(RuntimeError, match="with"):
        taps(latents, t, text)


@pytest.mark.parametrize("last", ["down.2", "mid", "up.1", "up.3"])
def test_unet_stops_right_after_the_last_needed_block(tiny_backbone, last):
    unet = tiny_backbone.unet
    latents, t, text = _inputs(tiny_backbone)
    calls: dict[str, int] = {}
    watched = {name: module for name, _, module in _blocks(unet)}
    watched["conv_norm_out"] = unet.conv_norm_out
    watched["conv_out"] = unet.conv_out
    handles = [
        module.register_forward_hook(lambda m, a, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
        for name, module in watched.items()
    ]
    try:
        with UNetTaps(unet, ["down.0", last]) as taps, torch.no_grad():
            feats = taps(latents, t, text)
    finally:
        for handle in handles:
            handle.remove()
    ran = ALL[: ALL.index(last) + 1]
    assert set(feats) == {"down.0", last}
    assert calls == {n: 1 for n in ran}, "later blocks or conv_out ran"


def test_same_input_and_seed_give_bit_identical_features(tiny_backbone, tiny_pixels):
    backbone = tiny_backbone
    pixels = tiny_pixels(2)

    def run():
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            latents = backbone.encode(pixels * 2 - 1)
            noise = torch.randn(latents.shape, generator=generator)
            t = torch.tensor([50, 50])
            a = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            text = backbone.prompt_embeddings(["a photo", "a photo"])
            with UNetTaps(backbone.unet, ["up.0", "up.1", "up.2", "up.3"]) as taps:
                return taps(noisy, t, text)

    first, second = run(), run()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # Different images give different features (the taps see the input).
    assert not torch.equal(first["up.3"][0], first["up.3"][1])


def test_features_carry_gradients_to_the_input(tiny_backbone):
    latents, t, text = _inputs(tiny_backbone, batch=1)
    latents.requires_grad_(True)
    with UNetTaps(tiny_backbone.unet, ["mid"]) as taps:
        taps(latents, t, text)["mid"].square().sum().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
