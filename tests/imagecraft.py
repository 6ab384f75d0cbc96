"""Hand-made image files for the decoding tests: containers whose embedded image lies about its size.

Every helper returns bytes; nothing here is read from outside the test's tmp_path.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, features

HAS_JPEG2000 = features.check("jpg_2000")


def encoded(fmt: str, size=(16, 16), mode="RGB", seed=0, **save_args) -> bytes:
    """A small noisy image saved by Pillow as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, fmt, **save_args)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int) -> bytes:
    """A valid small RGB PNG whose IHDR (CRC fixed up) declares ``width`` x ``height``."""
    data = bytearray(encoded("PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def j2k_declaring(width: int, height: int) -> bytes:
    """A small JPEG 2000 codestream whose SIZ marker declares ``width`` x ``height``."""
    data = bytearray(encoded("JPEG2000", no_jp2=True))
    assert data[:4] == b"\xff\x4f\xff\x51"  # SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz ...
    data[8:16] = struct.pack(">II", width, height)
    return bytes(data)


def ico_holding(frame: bytes, declared=(16, 16)) -> bytes:
    """An ICO file with one frame (PNG or DIB bytes); the directory claims ``declared``."""
    width, height = (0 if side >= 256 else side for side in declared)
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", width, height, 0, 0, 1, 32, len(frame), 6 + 16)
    return header + entry + frame


def icns_holding(frame: bytes, kind: bytes = b"ic09") -> bytes:
    """A Mac .icns file with one PNG or JPEG 2000 element (``ic09``: the 512x512 slot)."""
    element = kind + struct.pack(">I", 8 + len(frame)) + frame
    return b"icns" + struct.pack(">I", 8 + len(element)) + element
