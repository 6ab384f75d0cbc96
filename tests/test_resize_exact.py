"""8-bit inputs reach the model bit-equal to the papers' released transforms.

DP-IQA: ``Resize((R, R))`` (bilinear) + ``ToTensor()``; GenzIQA: ``Resize((R, R), BICUBIC)`` +
``ToTensor()``; both on the PIL image converted to RGB. Every file is made here in tmp_path.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diqa_cli.imageio import InputItem, iter_images, load_image, resize_for_model
from diqa_cli.videoio import resize_frame

transforms = pytest.importorskip("torchvision.transforms")

FILTERS = {
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}
SIZES = [(300, 200), (7, 5), (1, 1), (1000, 333), (777, 1023)]


def released(pil_image: Image.Image, resolution: int, resample: str) -> np.ndarray:
    pipeline = transforms.Compose(
        [transforms.Resize((resolution, resolution), interpolation=FILTERS[resample]), transforms.ToTensor()]
    )
    return pipeline(pil_image.convert("RGB")).numpy()


def photo_like(size, seed=0) -> np.ndarray:
    """Noise over a gradient: sharp edges everywhere (bicubic overshoot) and every level used."""
    width, height = size
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    noisy = ramp + rng.normal(0, 60, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write(path, kind, size):
    rgb = Image.fromarray(photo_like(size))
    if kind == "rgb":
        rgb.save(path)
    elif kind == "gray":
        rgb.convert("L").save(path)
    elif kind == "palette":
        rgb.quantize(colors=200).save(path)
    elif kind == "jpeg":
        rgb.save(path, quality=80)
    return path


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("kind,suffix", [("rgb", ".png"), ("gray", ".png"), ("palette", ".png"), ("jpeg", ".jpg")])
def test_8bit_files_match_the_released_transform_bit_for_bit(tmp_path, kind, suffix, resample):
    items, expected = [], []
    for width, height in SIZES:
        path = write(tmp_path / f"{kind}_{width}x{height}{suffix}", kind, (width, height))
        with Image.open(path) as opened:
            assert opened.mode == {"rgb": "RGB", "gray": "L", "palette": "P", "jpeg": "RGB"}[kind]
            for resolution in (16, 512):  # shrinking (antialiased) and enlarging
                items.append((InputItem(str(path)), resolution))
                expected.append(released(opened, resolution, resample))
    for (item, resolution), want in zip(items, expected):
        ((_, pixels, error),) = iter_images([item], resolution, workers=1, resample=resample)
        assert error is None
        assert pixels.dtype == np.float32 and pixels.shape == want.shape
        assert np.array_equal(pixels, want), (item.path, resolution)
        direct = resize_for_model(load_image(item.path), resolution, resample=resample)
        assert np.array_equal(direct, want), (item.path, resolution)


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "1"])
def test_other_8bit_modes_take_the_exact_path(tmp_path, mode):
    path = tmp_path / f"{mode}.{'tif' if mode != '1' else 'png'}"
    Image.fromarray(photo_like((45, 31))).convert(mode).save(path)
    with Image.open(path) as opened:
        want = released(opened, 24, "bicubic")
    assert np.array_equal(resize_for_model(load_image(str(path)), 24, resample="bicubic"), want)


def test_alpha_is_composited_in_8bit_and_then_matches_the_released_transform(tmp_path):
    rgba = photo_like((41, 29))
    alpha = np.linspace(0, 255, 41 * 29).reshape(29, 41, 1).astype(np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(np.concatenate([rgba, alpha], axis=2), mode="RGBA").save(path)
    image = load_image(str(path))
    assert image.dtype == np.uint8
    with Image.open(path) as opened:
        white = Image.new("RGBA", opened.size, (255, 255, 255, 255))
        over_white = Image.alpha_composite(white, opened.convert("RGBA"))
        want = released(over_white, 64, "bilinear")
    assert np.array_equal(resize_for_model(image, 64, resample="bilinear"), want)
    # and it is the over-white composite, within 8-bit rounding of the float formula
    a = alpha / 255.0
    np.testing.assert_allclose(image / 255.0, rgba / 255.0 * a + (1 - a), atol=1 / 255 + 1e-9)


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_video_frames_take_the_same_exact_path(resample):
    frame = photo_like((320, 180), seed=3)
    want = released(Image.fromarray(frame), 224, resample)
    assert np.array_equal(resize_frame(frame, 224, resample=resample), want)


def test_16bit_png_keeps_more_than_8bit_precision(tmp_path):
    ramp = np.arange(1000, 1256, dtype=np.uint16)  # 256 levels within about one 8-bit step
    path = tmp_path / "gray16.png"
    Image.fromarray(np.tile(ramp, (4, 1))).save(path)
    with Image.open(path) as opened:
        assert opened.mode == "I;16"
    ((_, pixels, error),) = iter_images([InputItem(str(path))], 256, workers=1, resample="bilinear")
    assert error is None and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[1, 100], ramp / 65535, atol=1e-6)
    assert len(np.unique(pixels[2])) == 256  # 8 bits would leave two levels
