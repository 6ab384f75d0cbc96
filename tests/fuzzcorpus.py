"""Seeded mutations of small valid images of every format diqa reads, for tests/test_fuzz_decode.py.

``seeds()`` gives one valid file per format; ``mutants(rng, count)`` gives ``count`` damaged
variants, each named after the format and the mutation, the same for the same seed.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

import imagecraft

EXTREMES_16 = (0, 1, 0x7FFF, 0xFFFF)
EXTREMES_32 = (0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000)


def _save(image: Image.Image, fmt: str, **args) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **args)
    return out.getvalue()


def seeds() -> dict[str, bytes]:
    """name -> bytes of a small valid image; a name's extension tells the format."""
    rng = np.random.default_rng(12)
    pixels = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    rgba = Image.fromarray(np.dstack([pixels, rng.integers(0, 256, (17, 23), dtype=np.uint8)]))
    files = {
        "rgb.png": _save(rgb, "PNG"),
        "palette.png": _save(rgb.quantize(16), "PNG", transparency=3),
        "gray16.png": _save(Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)), "PNG"),
        "anim.png": _save(rgb, "PNG", save_all=True, append_images=[rgba.convert("RGB")]),
        "rgb.jpg": _save(rgb, "JPEG", quality=80),
        "progressive.jpg": _save(rgb, "JPEG", quality=80, progressive=True),
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "anim.gif": _save(rgb.quantize(32), "GIF", save_all=True, append_images=[rgba.convert("RGB").quantize(8)]),
        "lossy.webp": _save(rgb, "WEBP", quality=70),
        "alpha.webp": _save(rgba, "WEBP", lossless=True),
        "raw.tif": _save(rgb, "TIFF"),
        "lzw.tif": _save(rgba, "TIFF", compression="tiff_lzw"),
        "jpeg.tif": _save(rgb, "TIFF", compression="jpeg"),
        "float.tif": _save(Image.fromarray(pixels[..., 1].astype(np.float32) / 255), "TIFF"),
        "rgb.bmp": _save(rgb, "BMP"),
        "rle.bmp": _save(rgb.quantize(16), "BMP"),
        "png.ico": _save(rgba, "ICO", sizes=[(16, 16)]),
        "bmp.ico": _save(rgb.resize((16, 16)), "ICO", sizes=[(16, 16)], bitmap_format="bmp"),
        "rgb.ppm": _save(rgb, "PPM"),
        "gray.pgm": _save(rgb.convert("L"), "PPM"),
        "rgb.tga": _save(rgb, "TGA", compression="tga_rle"),
        "png.icns": imagecraft.icns_holding(_save(rgb.resize((512, 512)), "PNG")),
    }
    if imagecraft.HAS_JPEG2000:
        files["rgb.jp2"] = _save(rgb, "JPEG2000")
        files["rgb.j2k"] = _save(rgb, "JPEG2000", no_jp2=True)
    return files


def _bit_flips(data: bytearray, rng) -> str:
    count = int(rng.integers(1, 9))
    for _ in range(count):
        at = int(rng.integers(0, len(data)))
        data[at] ^= 1 << int(rng.integers(0, 8))
    return f"flip{count}"


def _truncate(data: bytearray, rng) -> str:
    if len(data) < 2:
        return _bit_flips(data, rng)
    keep = int(rng.integers(1, len(data)))
    del data[keep:]
    return f"cut{keep}"


def _overwrite(data: bytearray, rng) -> str:
    at = int(rng.integers(0, len(data)))
    length = int(rng.integers(1, 33))
    data[at:at + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    return f"junk{at}"


def _header_extreme(data: bytearray, rng) -> str:
    """A 16- or 32-bit field near the start (where headers keep sizes, counts and offsets) set
    to an extreme, in either byte order: huge declared sizes, zero sizes, offsets past the end."""
    width = 2 if rng.integers(0, 2) else 4
    span = min(len(data) - width, 96)
    if span <= 0:
        return _bit_flips(data, rng)
    at = int(rng.integers(0, span + 1))
    value = int(rng.choice(EXTREMES_16 if width == 2 else EXTREMES_32))
    order = "<" if rng.integers(0, 2) else ">"
    data[at:at + width] = struct.pack(order + ("H" if width == 2 else "I"), value)
    return f"field{at}={value:#x}"


def _duplicate(data: bytearray, rng) -> str:
    """A slice repeated in place: chunks, segments and IFD entries that appear twice."""
    at = int(rng.integers(0, len(data)))
    length = int(rng.integers(1, 65))
    data[at:at] = data[at:at + length] * int(rng.integers(2, 5))
    return f"dup{at}"


MUTATIONS = (_bit_flips, _truncate, _overwrite, _header_extreme, _duplicate)


def mutants(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` (name, bytes) damaged images, cycling through the formats; deterministic."""
    rng = np.random.default_rng(seed)
    bases = sorted(seeds().items())
    out = []
    for index in range(count):
        name, original = bases[index % len(bases)]
        data = bytearray(original)
        labels = []
        for _ in range(int(rng.integers(1, 3))):
            mutation = MUTATIONS[int(rng.integers(0, len(MUTATIONS)))]
            labels.append(mutation(data, rng))
        stem, ext = name.rsplit(".", 1)
        out.append((f"{index:05d}-{stem}-{'-'.join(labels)}.{ext}", bytes(data)))
    return out
