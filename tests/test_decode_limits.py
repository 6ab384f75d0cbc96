"""Decompression bombs: no declared size, in any container, gets allocated past the pixel limit.

Files are built by hand (tests/imagecraft.py) in tmp_path: an ICO holding a PNG or DIB, an ICNS
holding a JPEG 2000 codestream (the reported case, ~260 gigapixels), a GIF frame larger than
its screen. Memory is measured in a child process under an address-space cap, so a regression
fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import warnings

import pytest
from PIL import Image

import imagecraft
from diqa_cli import imageio
from diqa_cli.errors import InputError
from diqa_cli.imageio import InputItem, iter_images, load_image

HUGE_PNG = (200_000, 200_000)
HUGE_J2K = (510_000, 510_000)  # 260 gigapixels, as in the report

needs_jpeg2000 = pytest.mark.skipif(not imagecraft.HAS_JPEG2000, reason="Pillow built without openjpeg")


def dib_declaring(width, height):
    """A BMP's DIB part (what ICO frames hold) declaring ``width`` x ``height`` (doubled, for
    the AND mask, as ICO wants)."""
    bmp = bytearray(imagecraft.encoded("BMP"))
    dib = bmp[14:]
    dib[4:12] = struct.pack("<ii", width, 2 * height)
    return bytes(dib)


def gif_frame_declaring(width, height):
    """A 16x16 GIF whose first image descriptor is ``width`` x ``height``."""
    data = bytearray(imagecraft.encoded("GIF"))
    at = data.index(b"\x2c\x00\x00\x00\x00")  # image separator at (0, 0)
    data[at + 5:at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def bombs(tmp_path):
    files = {
        "png.ico": imagecraft.ico_holding(imagecraft.png_declaring(*HUGE_PNG)),
        "dib.ico": imagecraft.ico_holding(dib_declaring(60_000, 60_000)),
        "png.icns": imagecraft.icns_holding(imagecraft.png_declaring(*HUGE_PNG)),
        "frame.gif": gif_frame_declaring(65_535, 65_535),
        "top.png": imagecraft.png_declaring(*HUGE_PNG),
    }
    if imagecraft.HAS_JPEG2000:
        files["j2k.icns"] = imagecraft.icns_holding(imagecraft.j2k_declaring(*HUGE_J2K))
        files["top.j2k"] = imagecraft.j2k_declaring(*HUGE_J2K)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / name for name in files]


@pytest.mark.parametrize(
    "name,declared",
    [
        ("png.ico", "200000x200000"),
        ("dib.ico", "60000x120000"),  # checked before the AND mask is split off
        ("png.icns", "200000x200000"),
        ("frame.gif", "65535x65535"),
        ("top.png", "200000x200000"),
        pytest.param("j2k.icns", "510000x510000", marks=needs_jpeg2000),
        pytest.param("top.j2k", "510000x510000", marks=needs_jpeg2000),
    ],
)
def test_a_huge_embedded_or_declared_size_is_refused_by_name(tmp_path, name, declared):
    path = tmp_path / name
    path.write_bytes({p.name: p for p in bombs(tmp_path)}[name].read_bytes())
    with pytest.raises(InputError) as info:
        load_image(str(path))
    assert info.value.reason.startswith(f"too many pixels: {declared} = ")
    assert "exceeds the limit of 100000000" in info.value.reason


CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # a regression fails, not the machine
from diqa_cli.imageio import InputItem, iter_images
rows = [(item.path, None if pixels is None else list(pixels.shape), error)
        for item, pixels, error in iter_images([InputItem(p) for p in sys.argv[1:]], 64, workers=2)]
# VmHWM, not ru_maxrss: Linux carries the forking parent's peak into a child's ru_maxrss.
with open("/proc/self/status") as status:
    peak_mib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
print(json.dumps({"rows": rows, "peak_mib": peak_mib}))
"""


def test_bombs_get_error_rows_the_run_goes_on_and_memory_stays_bounded(tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(imagecraft.encoded("PNG", size=(64, 48)))
    inputs = [str(p) for p in bombs(tmp_path)] + [str(good)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    done = subprocess.run([sys.executable, "-c", CHILD, *inputs], capture_output=True, text=True,
                          timeout=120, env=env, check=True)
    report = json.loads(done.stdout)
    rows = report["rows"]
    assert [row[0] for row in rows] == inputs
    for path, shape, error in rows[:-1]:
        assert shape is None and error.startswith("too many pixels: "), (path, error)
    assert rows[-1] == [str(good), [3, 64, 64], None]
    assert report["peak_mib"] < 400, report["peak_mib"]  # the bombs declare 4 to 1000 GB; measured 35 MiB


def test_the_band_where_pillow_only_warns_is_refused_on_every_decoder_thread(tmp_path):
    path = tmp_path / "300px.png"
    Image.new("RGB", (30, 10)).save(path)  # 300 pixels: Pillow warns above 200, fails above 400
    inside = tmp_path / "150px.png"
    Image.new("RGB", (15, 10)).save(inside)
    items = [InputItem(str(path)), InputItem(str(inside))] * 20
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = list(iter_images(items, 8, workers=4, prefetch=8, max_pixels=200))
    assert [row[2] is None for row in rows] == [False, True] * 20
    assert all(row[2].startswith("too many pixels: 30x10 = 300 exceeds the limit of 200") for row in rows[::2])
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillows_limit_is_diqas_while_decoding_and_restored_after(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    seen = []
    transpose = imageio.ImageOps.exif_transpose

    def spy(img, **kwargs):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return transpose(img, **kwargs)

    monkeypatch.setattr(imageio.ImageOps, "exif_transpose", spy)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)
    load_image(str(path), max_pixels=1_000)
    assert seen == [1_000]  # never None: Pillow's check stays on, at diqa's limit
    assert Image.MAX_IMAGE_PIXELS == 5_000


def test_other_threads_keep_pillows_own_check(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = tmp_path / "x.png"
    Image.new("RGB", (4, 4)).save(path)
    load_image(str(path), max_pixels=1_000)  # diqa's check is in place from here on
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Image._decompression_bomb_check((150, 1))  # Pillow's warning band, outside diqa
    assert [w.category for w in caught] == [Image.DecompressionBombWarning]
    with pytest.raises(Image.DecompressionBombError):
        Image._decompression_bomb_check((201, 1))
    errors = []

    def elsewhere():
        try:
            Image._decompression_bomb_check((201, 1))
        except Image.DecompressionBombError as exc:
            errors.append(exc)

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert len(errors) == 1


def test_a_pipe_sending_more_than_the_limit_allows_is_cut_off(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cap = imageio._pipe_byte_limit(1_000)

    def endless():
        try:
            with open(fifo, "wb") as pipe:
                chunk = b"\0" * 65536
                for _ in range(cap // len(chunk) + 2):
                    pipe.write(chunk)
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=endless)
    writer.start()
    with pytest.raises(InputError) as info:
        load_image(str(fifo), max_pixels=1_000)
    writer.join()
    assert info.value.reason.startswith("too many pixels: the pipe sent more than")
