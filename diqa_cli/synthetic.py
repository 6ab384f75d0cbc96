"""A SYNTHETIC distortion set from scikit-image's bundled photos: a ranking benchmark with known truth.

Each source photo is centre-cropped to a square, resized to ``size`` and saved as the pristine
reference (level 0); then every distortion is applied at known strengths, level 1 (mild) to level 5
(strong). The quality label is synthetic, not a human opinion score:

    mos = 1 - level / 6        (reference 1.0, level 1 0.833, …, level 5 0.167)

It orders images by distortion strength within a distortion type; it says nothing about how people
rank a blurred image against a noisy one. Every report built on this set must say it is synthetic.

The train/test split is by SOURCE image (no photo appears in both), so a model cannot pass the test
by recognising content it was trained on.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from diqa_cli.errors import UsageError

__all__ = ["DISTORTIONS", "SOURCES", "synthetic_mos", "make_synthetic_set", "reference_photos"]

# Photos shipped inside the scikit-image wheel (no download). Grayscale ones are made RGB.
SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "brick",
    "gravel",
    "grass",
    "clock",
)
DEFAULT_SOURCES = SOURCES[:8]

# Strength of each distortion at levels 1..5. Blur sigmas are in pixels of a 128 px image and scale
# with ``size`` so a level looks alike at any size; the others are size-free.
DISTORTIONS = {
    "blur": (1.0, 2.0, 3.5, 5.0, 8.0),  # Gaussian sigma at 128 px
    "noise": (0.03, 0.06, 0.10, 0.16, 0.25),  # std of additive Gaussian noise on [0, 1]
    "jpeg": (50, 30, 18, 10, 5),  # JPEG quality (lower is stronger)
    "contrast": (0.75, 0.55, 0.40, 0.28, 0.18),  # factor pulling pixels toward the mean luminance
}
MAX_LEVEL = 5

LABEL_COLUMNS = ("path", "mos", "split", "source", "distortion", "level")


def synthetic_mos(level: int) -> float:
    """The synthetic quality label of a distortion level (0 = pristine reference)."""
    return 1.0 - level / (MAX_LEVEL + 1)


def make_synthetic_set(
    out_dir: str | Path,
    *,
    size: int = 64,
    sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES,
    distortions: tuple[str, ...] | list[str] = tuple(DISTORTIONS),
    levels: int = MAX_LEVEL,
    crops_per_source: int = 1,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write the images and ``labels.csv`` (columns ``path,mos,split,source,distortion,level``).

    ``levels`` picks that many strengths spread evenly over 1..5 (5: all of them; 3: levels 1, 3, 5),
    so a level number always means the same strength. ``crops_per_source`` > 1 adds square crops
    of 50-90 % of the photo's short side at seeded positions (the first is always the centred
    full-height crop): more varied content per photo, while the split stays by photo.
    Paths in the CSV are relative to its folder. Crops, noise and the split are drawn from
    ``seed``; the same arguments give the same files.
    """
    sources = list(dict.fromkeys(sources))
    distortions = list(dict.fromkeys(distortions))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise UsageError(f"unknown synthetic source {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    bad = [d for d in distortions if d not in DISTORTIONS]
    if bad:
        raise UsageError(f"unknown distortion {bad[0]!r}; choose from {', '.join(DISTORTIONS)}")
    if len(sources) < 2:
        raise UsageError("a synthetic set needs at least 2 source photos (one to train on, one to test)")
    if not 1 <= levels <= MAX_LEVEL:
        raise UsageError(f"levels must be between 1 and {MAX_LEVEL}, got {levels}")
    if crops_per_source < 1:
        raise UsageError(f"crops_per_source must be at least 1, got {crops_per_source}")
    if size < 16:
        raise UsageError(f"synthetic image size must be at least 16 px, got {size}")

    level_list = sorted({int(round(x)) for x in np.linspace(1, MAX_LEVEL, levels)})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    order = np.random.default_rng(seed).permutation(len(sources))
    n_test = min(len(sources) - 1, max(1, int(round(len(sources) * test_fraction))))
    test_sources = {sources[i] for i in order[:n_test]}

    rows = []
    for source_index, source in enumerate(sources):
        split = "test" if source in test_sources else "train"
        photo = _load_source(source)
        folder = out_dir / source
        folder.mkdir(exist_ok=True)
        crop_rng = np.random.default_rng([seed, source_index])
        for crop in range(crops_per_source):
            reference = _square(photo, size, None if crop == 0 else crop_rng)
            stem = source if crops_per_source == 1 else f"{source}_c{crop}"
            rel = f"{source}/{stem}_reference.png"
            _save(reference, out_dir / rel)
            rows.append((rel, synthetic_mos(0), split, source, "none", 0))
            for distortion_index, distortion in enumerate(distortions):
                for level in level_list:
                    rng = np.random.default_rng([seed, source_index, crop, distortion_index, level])
                    strength = DISTORTIONS[distortion][level - 1]
                    ext = "jpg" if distortion == "jpeg" else "png"
                    rel = f"{source}/{stem}_{distortion}_{level}.{ext}"
                    if distortion == "jpeg":
                        _save(reference, out_dir / rel, jpeg_quality=int(strength))
                    else:
                        _save(_distort(reference, distortion, strength, size, rng), out_dir / rel)
                    rows.append((rel, synthetic_mos(level), split, source, distortion, level))

    labels = out_dir / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABEL_COLUMNS)
        for rel, mos, split, source, distortion, level in rows:
            writer.writerow((rel, f"{mos:.6f}", split, source, distortion, level))
    (out_dir / "README.txt").write_text(
        "SYNTHETIC distortion set made by diqa from scikit-image's bundled photos.\n"
        "mos = 1 - level/6 is a synthetic label (distortion strength), not a human opinion score.\n"
        f"sources: {', '.join(sources)}; test sources: {', '.join(sorted(test_sources))}; "
        f"distortions: {', '.join(distortions)}; levels: {level_list}; crops per photo: {crops_per_source}; "
        f"size: {size}px; seed: {seed}\n"
    )
    return labels


def reference_photos(size: int, sources: tuple[str, ...] | list[str] = DEFAULT_SOURCES) -> np.ndarray:
    """The pristine ``sources`` photos, centre-cropped and resized to ``size``: float32
    (N, size, size, 3) RGB in [0, 1], as the synthetic set's references."""
    return np.stack([_square(_load_source(name), size, None) for name in sources])


def _load_source(name: str) -> np.ndarray:
    """A bundled photo as uint8 RGB (grayscale and binary photos made RGB)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3].astype(np.uint8)


def _square(photo: np.ndarray, size: int, rng) -> np.ndarray:
    """A square crop resized to ``size``, float RGB in [0, 1]: centred and full-height without
    ``rng``, else 50-90 % of the short side at a random position."""
    from PIL import Image

    h, w = photo.shape[:2]
    side = min(h, w)
    if rng is None:
        top, left = (h - side) // 2, (w - side) // 2
    else:
        side = int(side * rng.uniform(0.5, 0.9))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[top : top + side, left : left + side])
    crop = crop.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(crop, dtype=np.float32) / 255.0


def _distort(image: np.ndarray, distortion: str, strength: float, size: int, rng) -> np.ndarray:
    if distortion == "blur":
        from skimage.filters import gaussian

        return gaussian(image, sigma=strength * size / 128, channel_axis=-1, preserve_range=True)
    if distortion == "noise":
        return np.clip(image + rng.normal(0.0, strength, image.shape), 0.0, 1.0)
    if distortion == "contrast":
        luminance = float((image @ np.array([0.299, 0.587, 0.114])).mean())
        return luminance + strength * (image - luminance)
    raise ValueError(f"no pixel-space implementation for distortion {distortion!r}")


def _save(image: np.ndarray, path: Path, *, jpeg_quality: int | None = None) -> None:
    from PIL import Image

    pixels = Image.fromarray(np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8))
    if jpeg_quality is None:
        pixels.save(path, format="PNG")
    else:
        pixels.save(path, format="JPEG", quality=jpeg_quality)
