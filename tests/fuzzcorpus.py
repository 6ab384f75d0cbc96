"""Seeded mutations of small valid images and videos of every format diqa reads, for
tests/test_fuzz_decode.py and tests/test_fuzz_video.py.

``seeds()`` gives one valid image per format; ``mutants(rng, count)`` gives ``count`` damaged
variants, each named after the format and the mutation, the same for the same seed.
``video_seeds()`` and ``video_mutants(seed, count)`` do the same for videos (PyAV writes them),
whose mutations add declared fields set to extremes: frame sizes, counts, time scales and
durations in the container and codec headers.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import struct
import time

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


def _mutated(bases: dict[str, bytes], mutations, seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` (name, bytes) copies of ``bases``, cycling through them in name order, each with
    one or two of ``mutations`` applied; the name lists what was done. Deterministic."""
    rng = np.random.default_rng(seed)
    ordered = sorted(bases.items())
    out = []
    for index in range(count):
        name, original = ordered[index % len(ordered)]
        data = bytearray(original)
        labels = []
        for _ in range(int(rng.integers(1, 3))):
            mutation = mutations[int(rng.integers(0, len(mutations)))]
            labels.append(mutation(data, rng))
        stem, ext = name.rsplit(".", 1)
        out.append((f"{index:05d}-{stem}-{'-'.join(labels)}.{ext}", bytes(data)))
    return out


def mutants(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` (name, bytes) damaged images, cycling through the formats; deterministic."""
    return _mutated(seeds(), MUTATIONS, seed, count)


# --------------------------------------------------------------------------- videos

# name -> (PyAV container format, encoder, options): every container of videoio.VIDEO_EXTENSIONS
# that PyAV can write here, with a codec it usually holds, and GIF (read as a video when named).
_VIDEO_FORMATS = {
    "h264.mp4": ("mp4", "libx264", {}),
    "mpeg4.m4v": ("mp4", "mpeg4", {}),
    "hevc.mp4": ("mp4", "libx265", {"options": {"x265-params": "log-level=none"}}),
    "av1.mp4": ("mp4", "libsvtav1", {"size": (64, 64)}),  # decord cannot read AV1: PyAV's path
    "h264.mov": ("mov", "libx264", {}),
    "h264.mkv": ("matroska", "libx264", {}),
    "ffv1.mkv": ("matroska", "ffv1", {}),
    "mjpeg.avi": ("avi", "mjpeg", {"pix_fmt": "yuvj420p"}),
    "vp9.webm": ("webm", "libvpx-vp9", {}),
    "vp8.webm": ("webm", "libvpx", {}),
    "wmv2.wmv": ("asf", "wmv2", {}),
    "flv1.flv": ("flv", "flv", {}),
    "mpeg2.ts": ("mpegts", "mpeg2video", {}),
    "mpeg1.mpg": ("mpeg", "mpeg1video", {"rate": 25}),  # MPEG-1 knows a few frame rates only
    "h263.3gp": ("3gp", "h263", {"size": (128, 96)}),  # H.263's picture sizes are fixed
    "raw.y4m": ("yuv4mpegpipe", "rawvideo", {}),
    "anim.gif": ("gif", "gif", {"pix_fmt": "rgb8"}),
}


def _encode_video(fmt: str, codec: str, *, size=(32, 24), rate=10, count=6, pix_fmt="yuv420p", options=None) -> bytes:
    import av

    width, height = size
    base = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    with av.open(out, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = options
        for i in range(count):  # texture that moves, so that frames differ
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(np.roll(base, 3 * i, axis=1)), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


@functools.lru_cache(maxsize=1)
def _video_seeds() -> tuple:
    previous = os.environ.get("SVT_LOG")
    os.environ["SVT_LOG"] = "1"  # the AV1 encoder's banner on stdout: errors only
    try:
        return tuple((name, _encode_video(fmt, codec, **args)) for name, (fmt, codec, args) in _VIDEO_FORMATS.items())
    finally:
        if previous is None:
            os.environ.pop("SVT_LOG", None)
        else:
            os.environ["SVT_LOG"] = previous


def video_seeds() -> dict[str, bytes]:
    """name -> bytes of a small valid video (6 frames, 32x24 where the codec allows); the name
    says the codec and, by its extension, the container."""
    return dict(_video_seeds())


_DOUBLES = (0.0, -1.0, 1e308, math.inf, math.nan, 4294967296.0)
_EXTREMES = {
    ">I": EXTREMES_32, "<I": EXTREMES_32, ">H": EXTREMES_16, "<H": EXTREMES_16, "B": (0, 1, 0x7F, 0xFF),
    ">d": _DOUBLES, ">f": (0.0, -1.0, 3e38, math.inf, math.nan),
    "3s": (b"\xff\xff\xff", b"\x00\x00\x00", b"\x00\x10\x01"),
}

# Where headers declare sizes, counts, times and offsets: marker -> (offset from the marker, field).
_DECLARED = {
    # MP4 / MOV / 3GP boxes (version 0 layouts), big-endian
    b"mvhd": ((16, ">I"), (20, ">I")),  # time scale, duration
    b"mdhd": ((16, ">I"), (20, ">I")),
    b"tkhd": ((24, ">I"), (80, ">I"), (84, ">I")),  # duration, width, height (16.16)
    **{entry: ((28, ">H"), (30, ">H")) for entry in (b"avc1", b"mp4v", b"hvc1", b"hev1", b"av01", b"s263")},
    b"stsz": ((8, ">I"), (12, ">I")),  # sample size, sample count
    b"stts": ((8, ">I"), (12, ">I"), (16, ">I")),  # entries, sample count, sample delta
    b"stsc": ((8, ">I"), (12, ">I"), (16, ">I")),
    b"stco": ((8, ">I"), (12, ">I")),
    b"stss": ((8, ">I"), (12, ">I")),
    b"ctts": ((8, ">I"), (12, ">I"), (16, ">I")),
    b"elst": ((8, ">I"), (12, ">I"), (16, ">I")),
    b"avcC": ((10, ">H"),),  # the SPS's length
    # AVI chunks, little-endian
    b"avih": ((8, "<I"), (24, "<I"), (32, "<I"), (36, "<I"), (40, "<I"), (44, "<I")),
    b"strh": ((28, "<I"), (32, "<I"), (36, "<I"), (40, "<I"), (44, "<I")),  # scale, rate, start, length
    b"strf": ((12, "<I"), (16, "<I"), (28, "<I")),  # width, height, image size
    b"idx1": ((4, "<I"), (16, "<I"), (20, "<I")),
    # Matroska / WebM elements as libavformat writes them (ID, then its size byte)
    b"\x2a\xd7\xb1\x83": ((4, "3s"),),  # TimecodeScale
    b"\x44\x89\x88": ((3, ">d"),),  # Duration
    b"\x44\x89\x84": ((3, ">f"),),
    b"\x23\xe3\x83\x84": ((4, ">I"),),  # DefaultDuration
    b"\xb0\x81": ((2, "B"),),  # PixelWidth
    b"\xba\x81": ((2, "B"),),  # PixelHeight
    b"\xb0\x82": ((2, ">H"),),
    b"\xba\x82": ((2, ">H"),),
    # FLV metadata (AMF numbers after their names)
    b"width": ((6, ">d"),),
    b"height": ((7, ">d"),),
    b"duration": ((9, ">d"),),
    b"framerate": ((10, ">d"),),
    # codec headers
    b"\xff\xc0": ((5, ">H"), (7, ">H")),  # JPEG SOF0 of each MJPEG frame: height, width
    b"\x9d\x01\x2a": ((3, "<H"), (5, "<H")),  # VP8 key frame: width, height
    b"\x00\x00\x01\xb3": ((4, "3s"),),  # MPEG-1/2 sequence header: 12-bit width and height
    b"GIF89a": ((6, "<H"), (8, "<H")),  # logical screen
    b"\x21\xf9\x04": ((4, "<H"),),  # GIF frame delay
}
_Y4M_FIELD = re.compile(rb" ([WHF])([0-9:]+)")
_Y4M_VALUES = (b"0", b"1", b"99999999", b"4294967295", b"65536", b"1:0", b"0:1", b"4294967295:1")


def _declared_field(data: bytearray, rng) -> str:
    """A size, count, time scale, duration or offset that a container or codec header declares,
    set to an extreme: huge frames, zero or huge counts and times, offsets past the end."""
    if data.startswith(b"YUV4MPEG2"):
        header = bytes(data[:data.find(b"\n") if b"\n" in data else len(data)])
        fields = list(_Y4M_FIELD.finditer(header))
        if fields:
            field = fields[int(rng.integers(0, len(fields)))]
            value = _Y4M_VALUES[int(rng.integers(0, len(_Y4M_VALUES)))]
            data[field.start(2):field.end(2)] = value
            return f"y4m{field.group(1).decode()}={value.decode()}"
    found = []
    for marker, fields in _DECLARED.items():
        at = data.find(marker)
        while at >= 0 and len(found) < 512:
            found.extend((at + offset, kind) for offset, kind in fields
                         if at + offset + struct.calcsize(kind) <= len(data))
            at = data.find(marker, at + 1)
    if not found:
        return _header_extreme(data, rng)
    at, kind = found[int(rng.integers(0, len(found)))]
    choices = _EXTREMES[kind]
    value = choices[int(rng.integers(0, len(choices)))]
    data[at:at + struct.calcsize(kind)] = value if kind == "3s" else struct.pack(kind, value)
    return f"decl{at}={value.hex() if kind == '3s' else value}"


VIDEO_MUTATIONS = (*MUTATIONS, _declared_field, _declared_field)


def video_mutants(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` (name, bytes) damaged videos, cycling through the formats; deterministic."""
    return _mutated(video_seeds(), VIDEO_MUTATIONS, seed, count)


# --------------------------------------------------------------------------- running

def resident_mib() -> float:
    """This process's resident memory, MiB (the fuzz tests hold that nothing piles up)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def fuzz_for_budget(tmp_path, fuzz, per_batch: int, noun: str) -> None:
    """``fuzz(folder, seed=, count=)`` over seeds 100, 101, … with ``per_batch`` cases each until
    ``$DIQA_FUZZ_SECONDS`` have passed; prints the outcome counts (shown with ``pytest -s``)."""
    budget = float(os.environ["DIQA_FUZZ_SECONDS"])
    started, seed, totals = time.monotonic(), 100, {}
    while time.monotonic() - started < budget:
        batch = tmp_path / f"seed{seed}"
        batch.mkdir()
        for key, count in fuzz(batch, seed=seed, count=per_batch).items():
            totals[key] = totals.get(key, 0) + count
        for path in batch.iterdir():
            path.unlink()
        seed += 1
    print(f"\nfuzzed {sum(totals.values())} {noun}, seeds 100-{seed - 1}:")
    for key, count in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{count:8d}  {key}")
