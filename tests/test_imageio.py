"""Input expansion and robust decoding (diqa_cli.imageio); every file is made here in tmp_path."""

from __future__ import annotations

import io
import os
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from diqa_cli.errors import InputError, UsageError
from diqa_cli.imageio import (
    DEFAULT_MAX_PIXELS,
    InputItem,
    as_float_rgb,
    expand_inputs,
    iter_images,
    load_image,
    max_pixels_limit,
    resize_for_model,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


def save_rgb(path, size=(6, 4), color=(10, 200, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def noise_image(path, size=(48, 48), **save_args):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, **save_args)
    return path


def write_png16(path, samples, color_type):
    """A 16-bit-per-sample PNG written by hand: Pillow cannot save 48/64-bit colour PNGs."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind, data):
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return path


def loaded(path):
    """``load_image`` as floats in [0, 1], whatever the source's bit depth."""
    return as_float_rgb(load_image(str(path)))


def opened_mode(path):
    with Image.open(path) as image:
        return image.mode


def reason_for(path, **kwargs):
    with pytest.raises(InputError) as info:
        load_image(str(path), **kwargs)
    assert info.value.path == str(path)
    assert "\n" not in info.value.reason
    return info.value.reason


def paths(items):
    return [item.path for item in items]


# --------------------------------------------------------------------------- expand_inputs


def test_plain_paths_keep_argument_order_and_missing_files(tmp_path):
    b = save_rgb(tmp_path / "b.png")
    a = save_rgb(tmp_path / "a.png")
    missing = tmp_path / "nope.jpg"
    items = expand_inputs([str(b), str(missing), str(a)])
    assert paths(items) == [str(b), str(missing), str(a)]
    assert all(item.error is None for item in items)
    assert reason_for(missing) == "no such file"


def test_directory_lists_its_direct_images_sorted(tmp_path):
    for name in ["b.JPG", "a.png", "c.tiff", ".hidden.png", "sub/deep.png"]:
        save_rgb(tmp_path / "photos" / name)
    (tmp_path / "photos" / "notes.txt").write_text("not listed")
    items = expand_inputs([str(tmp_path / "photos")])
    assert [os.path.basename(p) for p in paths(items)] == ["a.png", "b.JPG", "c.tiff"]


def test_recursive_directory_walks_subdirectories_in_sorted_order(tmp_path):
    for name in ["z.png", "a/y.png", "a/b/x.png", "c/w.png", ".git/v.png"]:
        save_rgb(tmp_path / "root" / name)
    root = tmp_path / "root"
    items = expand_inputs([str(root)], recursive=True)
    rel = [os.path.relpath(p, root) for p in paths(items)]
    assert rel == ["z.png", os.path.join("a", "y.png"), os.path.join("a", "b", "x.png"),
                   os.path.join("c", "w.png")]


def test_directory_without_images_yields_one_error_item(tmp_path):
    (tmp_path / "empty").mkdir()
    save_rgb(tmp_path / "nested" / "sub" / "x.png")
    empty, nested = expand_inputs([str(tmp_path / "empty"), str(tmp_path / "nested")])
    assert empty.error.startswith("no image files in this directory")
    assert "--recursive" in nested.error
    assert paths(expand_inputs([str(tmp_path / "nested")], recursive=True)) == [
        str(tmp_path / "nested" / "sub" / "x.png")]


def test_glob_patterns_are_expanded_sorted(tmp_path):
    for name in ["img10.jpg", "img2.jpg", "img1.jpg", "other.png"]:
        save_rgb(tmp_path / name)
    items = expand_inputs([str(tmp_path / "img*.jpg")])
    assert [os.path.basename(p) for p in paths(items)] == ["img1.jpg", "img10.jpg", "img2.jpg"]


def test_double_star_spans_directories_only_when_recursive(tmp_path):
    for name in ["top.png", "a/mid.png", "a/b/deep.png"]:
        save_rgb(tmp_path / name)
    pattern = str(tmp_path / "**" / "*.png")
    recursive = expand_inputs([pattern], recursive=True)
    assert [os.path.relpath(p, tmp_path) for p in paths(recursive)] == [
        os.path.join("a", "b", "deep.png"), os.path.join("a", "mid.png"), "top.png"]
    # Without recursion `**` is a plain `*`: exactly one directory level, as in the shell.
    assert [os.path.relpath(p, tmp_path) for p in paths(expand_inputs([pattern]))] == [
        os.path.join("a", "mid.png")]


def test_glob_matching_nothing_gives_an_error_item_naming_the_pattern(tmp_path):
    pattern = str(tmp_path / "*.webp")
    (item,) = expand_inputs([pattern])
    assert item.path == pattern
    assert item.error == "no files match this pattern"


def test_glob_matched_directory_is_listed_like_a_shell_expansion(tmp_path):
    save_rgb(tmp_path / "2024-01" / "a.png")
    save_rgb(tmp_path / "2024-02" / "b.png")
    items = expand_inputs([str(tmp_path / "2024-*")])
    assert [os.path.basename(p) for p in paths(items)] == ["a.png", "b.png"]


def test_existing_path_with_glob_characters_is_taken_literally(tmp_path):
    literal = save_rgb(tmp_path / "shot[1].png")
    save_rgb(tmp_path / "shot1.png")
    assert paths(expand_inputs([str(literal)])) == [str(literal)]


def test_same_file_named_twice_or_via_relative_path_or_symlink_is_one_input(tmp_path, monkeypatch):
    a = save_rgb(tmp_path / "a.png")
    b = save_rgb(tmp_path / "b.png")
    os.symlink(a, tmp_path / "link.png")
    monkeypatch.chdir(tmp_path)
    items = expand_inputs(["./a.png", str(b), str(a), "a.png", "link.png", str(tmp_path), "-"],
                          stdin=io.StringIO(f"{a}\n"))
    assert paths(items) == ["./a.png", str(b)]


def test_stdin_dash_reads_one_path_per_line_in_given_order(tmp_path):
    c, a = save_rgb(tmp_path / "c.png"), save_rgb(tmp_path / "a.png")
    first = save_rgb(tmp_path / "first.png")
    items = expand_inputs([str(first), "-"], stdin=io.StringIO(f"{c}\r\n\n{a}\n"))
    assert paths(items) == [str(first), str(c), str(a)]


def test_stdin_dash_reads_nul_separated_paths(tmp_path):
    odd = save_rgb(tmp_path / "line\nbreak.png")
    plain = save_rgb(tmp_path / "plain.png")
    stream = io.TextIOWrapper(io.BytesIO(os.fsencode(f"{odd}\0{plain}\0")))
    assert paths(expand_inputs(["-"], stdin=stream)) == [str(odd), str(plain)]


def test_stdin_directory_entries_and_empty_stdin(tmp_path):
    save_rgb(tmp_path / "d" / "x.png")
    assert paths(expand_inputs(["-"], stdin=io.StringIO(f"{tmp_path / 'd'}\n"))) == [
        str(tmp_path / "d" / "x.png")]
    (item,) = expand_inputs(["-"], stdin=io.StringIO(""))
    assert item == InputItem("-", "no paths on standard input")


# --------------------------------------------------------------------------- load_image: decoding


def test_rgb_png_values_and_layout(tmp_path):
    path = save_rgb(tmp_path / "x.png", size=(5, 3), color=(0, 51, 255))
    image = load_image(str(path))
    assert image.dtype == np.uint8 and image.shape == (3, 5, 3)  # 8-bit sources stay 8-bit
    assert image[0, 0].tolist() == [0, 51, 255]
    assert image.flags.writeable
    floats = as_float_rgb(image)
    assert floats.dtype == np.float32
    np.testing.assert_allclose(floats[0, 0], [0.0, 0.2, 1.0], atol=1e-6)


def test_16bit_and_float_sources_load_as_float32(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(np.array([[0, 1000]], np.uint16)).save(path)
    image = load_image(str(path))
    assert image.dtype == np.float32 and image.shape == (1, 2, 3)
    assert as_float_rgb(image) is image


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((4, 8, 3), np.uint8)
    pixels[:, :4] = RED
    pixels[:, 4:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = load_image(str(path))
    assert image.shape == (8, 4, 3)  # portrait, as a viewer shows it
    assert image[0, 2, 0] > 0.8 and image[0, 2, 2] < 0.2  # the left (red) half is now on top
    assert image[7, 2, 2] > 0.8 and image[7, 2, 0] < 0.2


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_is_scaled_by_bit_depth_not_clipped(tmp_path, suffix):
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(np.array([[0, 32768, 65535]], np.uint16)).save(path)
    assert opened_mode(path) == "I;16"
    image = load_image(str(path))
    np.testing.assert_allclose(image[0, :, 0], [0.0, 32768 / 65535, 1.0], atol=1e-6)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_16bit_big_endian_tiff(tmp_path):
    path = tmp_path / "be.tif"
    Image.frombytes("I;16B", (2, 1), np.array([16384, 65535], ">u2").tobytes()).save(path)
    assert opened_mode(path) == "I;16B"
    np.testing.assert_allclose(load_image(str(path))[0, :, 1], [16384 / 65535, 1.0], atol=1e-6)


def test_48bit_rgb_png_scales_to_the_right_range(tmp_path):
    samples = np.array([[[65535, 32768, 1000]]], np.uint16)
    image = loaded(write_png16(tmp_path / "rgb48.png", samples, color_type=2))
    # Pillow keeps the high byte of each sample: right scale, 8-bit precision.
    np.testing.assert_allclose(image[0, 0], samples[0, 0] / 65535, atol=1.5 / 255)


def test_16bit_pgm_with_small_maxval_is_scaled(tmp_path):
    path = tmp_path / "twelve_bit.pgm"
    path.write_bytes(b"P5 3 1 4095\n" + np.array([0, 2048, 4095], ">u2").tobytes())
    np.testing.assert_allclose(load_image(str(path))[0, :, 0], [0, 2048 / 4095, 1], atol=1e-3)


def test_32bit_integer_tiff_uses_its_bit_depth_and_signed_data_is_normalised(tmp_path):
    unsigned = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 2**30]], np.int32)).save(unsigned)
    np.testing.assert_allclose(load_image(str(unsigned))[0, :, 0], [0, 2**30 / (2**32 - 1)],
                               rtol=1e-6)
    signed = tmp_path / "signed.tif"
    Image.fromarray(np.array([[-5, 0, 5]], np.int32)).save(signed)
    np.testing.assert_allclose(load_image(str(signed))[0, :, 0], [0, 0.5, 1])


def test_float_tiff_within_unit_range_is_kept(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.25, 0.75, 1.0]], np.float32)).save(path)
    assert opened_mode(path) == "F"
    np.testing.assert_allclose(load_image(str(path))[0, :, 2], [0.25, 0.75, 1.0])


def test_float_tiff_outside_unit_range_is_min_max_normalised(tmp_path):
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.array([[-1.0, 0.0, 3.0]], np.float32)).save(path)
    np.testing.assert_allclose(load_image(str(path))[0, :, 0], [0.0, 0.25, 1.0])


def test_float_tiff_with_nan_fails(tmp_path):
    path = tmp_path / "nan.tif"
    Image.fromarray(np.array([[0.5, np.nan]], np.float32)).save(path)
    assert reason_for(path) == "float image has NaN or infinite pixels"


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(path, quality=95)  # pure cyan
    assert opened_mode(path) == "CMYK"
    np.testing.assert_allclose(loaded(path)[4, 4], [0.0, 1.0, 1.0], atol=0.03)


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 0])
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=1)
    np.testing.assert_allclose(loaded(path)[0], [[1, 0, 0], [1, 1, 1]])


def test_la_png_alpha_is_composited_on_white(tmp_path):
    la = np.array([[[0, 255], [0, 0], [0, 128]]], np.uint8)
    path = tmp_path / "la.png"
    Image.fromarray(la, mode="LA").save(path)
    np.testing.assert_allclose(loaded(path)[0, :, 0], [0.0, 1.0, 1 - 128 / 255], atol=1e-6)


def test_rgb_png_transparent_colour_key_becomes_white(tmp_path):
    image = Image.new("RGB", (2, 1), RED)
    image.putpixel((1, 0), (0, 255, 0))
    path = tmp_path / "keyed.png"
    image.save(path, transparency=(0, 255, 0))
    np.testing.assert_allclose(loaded(path)[0], [[1, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("mode", ["1", "L"])
def test_bilevel_and_grayscale_become_equal_rgb_channels(tmp_path, mode):
    path = tmp_path / f"{mode}.png"
    Image.fromarray(np.array([[0, 255]], np.uint8)).convert(mode).save(path)
    image = loaded(path)
    np.testing.assert_allclose(image[0], [[0, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize(
    "suffix,extra", [(".gif", {}), (".png", {}), (".webp", {"lossless": True})]
)
def test_animated_images_use_their_first_frame(tmp_path, suffix, extra):
    first, second = Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)
    path = tmp_path / f"anim{suffix}"
    first.save(path, save_all=True, append_images=[second], duration=100, loop=0, **extra)
    with Image.open(path) as image:
        assert image.n_frames == 2
    np.testing.assert_allclose(loaded(path)[2, 2], [1, 0, 0], atol=0.02)


# --------------------------------------------------------------------------- load_image: failures


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_files_fail(tmp_path, suffix):
    whole = noise_image(tmp_path / f"whole{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) * 6 // 10])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert reason_for(cut) == "truncated image data"


def test_corrupt_png_data_fails(tmp_path):
    data = bytearray(noise_image(tmp_path / "ok.png").read_bytes())
    start = data.find(b"IDAT") + 20
    data[start:start + 40] = bytes(b ^ 0xFF for b in data[start:start + 40])
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert reason_for(path).startswith("corrupt image data")


@pytest.mark.parametrize(
    "name,content",
    [("random.png", np.random.default_rng(1).bytes(300)), ("notes.jpg", b"just some text\n")],
)
def test_non_images_fail(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert reason_for(path) == "not an image or unsupported format"


def test_empty_file_directory_and_device_fail(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert reason_for(empty) == "empty file (0 bytes)"
    assert reason_for(tmp_path) == "is a directory"
    assert reason_for("/dev/null") == "not a regular file"


def test_named_pipe_is_read_like_a_file(tmp_path):
    png = save_rgb(tmp_path / "source.png", color=(0, 0, 255)).read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # what `diqa score <(curl ...)` hands over
    writer = threading.Thread(target=fifo.write_bytes, args=(png,))
    writer.start()
    image = loaded(fifo)
    writer.join()
    np.testing.assert_allclose(image[0, 0], [0, 0, 1])


def test_unreadable_file_fails_with_permission_denied(tmp_path):
    path = save_rgb(tmp_path / "secret.png")
    path.chmod(0)
    if os.geteuid() != 0:
        assert reason_for(path) == "permission denied"
        return
    # Root reads anything, so check as an unprivileged user in a child process.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(65534)
            load_image(str(path))
            message = b"loaded"
        except InputError as exc:
            message = exc.reason.encode()
        except BaseException as exc:  # report anything else to the parent
            message = repr(exc).encode()
        os.write(write_end, message)
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        assert pipe.read().decode() == "permission denied"


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    path = save_rgb(tmp_path / "big.png", size=(20, 20))
    reason = reason_for(path, max_pixels=399)
    assert reason.startswith("too many pixels: 20x20 = 400 exceeds the limit of 399")
    assert load_image(str(path), max_pixels=400).shape == (20, 20, 3)
    monkeypatch.setenv("DIQA_MAX_PIXELS", "399")
    assert reason_for(path).startswith("too many pixels")


def test_pixel_limit_default_and_bad_environment_value(monkeypatch):
    monkeypatch.delenv("DIQA_MAX_PIXELS", raising=False)
    assert max_pixels_limit() == DEFAULT_MAX_PIXELS == 100_000_000
    monkeypatch.setenv("DIQA_MAX_PIXELS", "lots")
    with pytest.raises(UsageError, match="DIQA_MAX_PIXELS"):
        max_pixels_limit()


def test_pillows_own_bomb_guard_neither_warns_nor_overrides_the_diqa_limit(tmp_path, monkeypatch):
    path = save_rgb(tmp_path / "wide.png", size=(20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # Pillow would warn at 150, fail at 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(str(path), max_pixels=1000).shape == (20, 20, 3)
    assert reason_for(path, max_pixels=100).startswith("too many pixels: 20x20")
    assert Image.MAX_IMAGE_PIXELS == 150  # Pillow's setting is restored after decoding


# --------------------------------------------------------------------------- resize_for_model


def test_tiny_image_is_resized_to_the_model_resolution():
    out = resize_for_model(np.full((1, 1, 3), [0.2, 0.4, 0.6], np.float32), 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 7, 9], [0.2, 0.4, 0.6], atol=1e-6)


def test_resize_ignores_aspect_ratio_and_keeps_16bit_precision():
    level = 1000 / 65535  # between two 8-bit steps
    out = resize_for_model(np.full((5, 40, 3), level, np.float32), 8)
    assert out.shape == (3, 8, 8)
    np.testing.assert_allclose(out, level, atol=1e-6)


def test_resize_matches_pillows_8bit_resize_of_the_same_image():
    pixels = np.random.default_rng(2).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    for resample, pillow_filter in [("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)]:
        ours = resize_for_model(pixels.astype(np.float32) / 255, 12, resample=resample)
        theirs = np.asarray(Image.fromarray(pixels).resize((12, 12), pillow_filter)) / 255
        np.testing.assert_allclose(ours.transpose(1, 2, 0), theirs, atol=1.5 / 255)


def test_resize_clips_bicubic_overshoot():
    board = np.kron(np.indices((4, 4)).sum(0) % 2, np.ones((3, 3))).astype(np.float32)
    raw = np.asarray(Image.fromarray(board, mode="F").resize((29, 29), Image.BICUBIC))
    assert raw.max() > 1 and raw.min() < 0  # the filter itself overshoots here
    out = resize_for_model(np.repeat(board[..., None], 3, axis=2), 29)
    assert out.min() == 0.0 and out.max() == 1.0


def test_resize_rejects_unknown_filter():
    with pytest.raises(UsageError, match="bicubic"):
        resize_for_model(np.zeros((2, 2, 3), np.float32), 4, resample="lanczos")


# --------------------------------------------------------------------------- iter_images


def test_iter_images_yields_every_input_in_order_with_errors_as_text(tmp_path):
    good = save_rgb(tmp_path / "good.png", color=(255, 255, 255))
    bad = tmp_path / "bad.jpg"
    bad.write_text("not a jpeg")
    items = [InputItem(str(good)), InputItem(str(bad)), InputItem(str(tmp_path / "gone.png")),
             InputItem("*.none", "no files match this pattern"), InputItem(str(good))]
    rows = list(iter_images(items, 8, workers=2, prefetch=2))
    assert [row[0] for row in rows] == items
    assert [row[2] for row in rows] == [None, "not an image or unsupported format", "no such file",
                                        "no files match this pattern", None]
    assert rows[0][1].shape == (3, 8, 8) and np.allclose(rows[0][1], 1.0)
    assert rows[1][1] is None


def test_iter_images_decodes_at_most_prefetch_inputs_ahead(tmp_path):
    good = save_rgb(tmp_path / "good.png")
    pulled = []

    def many_inputs():
        for index in range(40):
            pulled.append(index)
            yield InputItem(str(good))

    rows = iter_images(many_inputs(), 4, workers=2, prefetch=3)
    next(rows)
    assert len(pulled) == 3
    next(rows)
    assert len(pulled) == 4
    assert sum(1 for _ in rows) == 38


def test_iter_images_stops_cleanly_when_the_consumer_stops(tmp_path):
    good = save_rgb(tmp_path / "good.png")
    rows = iter_images([InputItem(str(good))] * 20, 4, prefetch=5)
    next(rows)
    rows.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("diqa-decode")]


def test_iter_images_checks_its_options_before_decoding():
    with pytest.raises(UsageError):
        iter_images([], 8, workers=0)
    with pytest.raises(UsageError):
        iter_images([], 8, resample="nearest")
