"""The overlay picture of a quality map: the map in viridis blended over the image (in grey, so
the map's colours read true), above a small legend strip with a colour bar (worse → better, within
this image) and the score. numpy and Pillow only."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diqa_cli.maps.viridis import VIRIDIS

__all__ = ["display_scale", "colourise", "overlay"]

# Share of the map's colour in the blend (the rest is the image's luminance).
MAP_ALPHA = 0.6
_LEGEND_BACKGROUND = (24, 24, 24)
_LEGEND_TEXT = (235, 235, 235)


def display_scale(raw: np.ndarray) -> np.ndarray:
    """A raw map scaled to [0, 1] for display: its 1st percentile to 0, its 99th to 1 (one stray
    pixel does not flatten the rest); a constant map is 0.5 everywhere."""
    values = np.asarray(raw, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if not finite.size:
        return np.full(values.shape, 0.5, dtype=np.float32)
    low, high = np.percentile(finite, [1, 99])
    if not high > low:
        low, high = float(finite.min()), float(finite.max())
    if not high > low:
        return np.full(values.shape, 0.5, dtype=np.float32)
    scaled = (np.nan_to_num(values, nan=low) - low) / (high - low)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def colourise(unit: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 viridis."""
    index = np.clip(np.rint(np.asarray(unit) * 255), 0, 255).astype(np.intp)
    return VIRIDIS[index]


def _luminance(image: np.ndarray) -> np.ndarray:
    """0-255 luminance of uint8 RGB, or of float RGB in [0, 1]."""
    image = np.asarray(image)
    rgb = image.astype(np.float32)
    if image.dtype != np.uint8:
        rgb *= 255.0
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # a Pillow without FreeType: its bitmap font
        return ImageFont.load_default()


def legend_height(width: int, height: int) -> int:
    """Height of the legend strip under an overlay of ``width`` x ``height`` pixels."""
    return int(np.clip(round(min(width, height) / 10), 14, 48))


def overlay(image: np.ndarray, raw: np.ndarray, *, score: float | None = None, label: str = "score") -> Image.Image:
    """The overlay of ``raw`` (H, W) on ``image`` (H, W, 3; float in [0, 1] or uint8): RGB, W wide
    and H plus a legend strip tall. The legend's colour bar runs from worse (left) to better
    (right) within this image; ``score`` is printed beside it as ``label score``."""
    raw = np.asarray(raw)
    if raw.shape != np.asarray(image).shape[:2]:
        raise ValueError(f"map {raw.shape} and image {np.asarray(image).shape[:2]} differ in size")
    height, width = raw.shape
    colour = colourise(display_scale(raw)).astype(np.float32)
    grey = _luminance(image)[..., None]
    blended = np.clip(MAP_ALPHA * colour + (1 - MAP_ALPHA) * grey, 0, 255).round().astype(np.uint8)

    strip = legend_height(width, height)
    canvas = Image.new("RGB", (width, height + strip), _LEGEND_BACKGROUND)
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(8, int(strip * 0.62)))
    pad = max(2, strip // 6)
    # Colour bar: "worse" ... "better" over the bar's ends.
    bar_width = max(8, int(width * 0.4))
    bar = np.repeat(colourise(np.linspace(0.0, 1.0, bar_width))[None], strip - 2 * pad, axis=0)
    canvas.paste(Image.fromarray(bar), (pad, height + pad))
    words_left, words_right = "worse", "better"
    text_y = height + strip / 2
    draw.text((pad + 2, text_y), words_left, fill=(255, 255, 255), font=font, anchor="lm")
    draw.text((pad + bar_width - 2, text_y), words_right, fill=(0, 0, 0), font=font, anchor="rm")
    if score is not None:
        draw.text((width - pad, text_y), f"{label} {score:.4g}", fill=_LEGEND_TEXT, font=font, anchor="rm")
    return canvas
