"""Image inputs: which files to read, and how each becomes the model's RGB floats in [0, 1].

Torch-free (numpy and Pillow only), so the CLI can expand and check inputs before importing torch.

Accepted inputs (``expand_inputs``)
  * a file path: always an input, even if it does not exist (it then fails with "no such file");
  * a directory: its image files (by extension, see ``IMAGE_EXTENSIONS``, case-insensitive), sorted
    by name; only its direct files unless ``recursive`` (``--recursive``) is set. Hidden names
    (starting with ".", such as macOS ``._IMG.jpg`` resource forks) are skipped, as a shell glob
    skips them; symlinked files are read, symlinked directories are not followed (no loops);
  * a glob pattern the shell did not expand (quoted): diqa expands it, sorted, and ``**`` spans
    directories only with ``recursive``. Each match is handled exactly as if the shell had passed
    it, so a matched directory is listed as above. A path that exists is never treated as a
    pattern, so a file literally named ``a[1].jpg`` still works;
  * ``-``: paths read from standard input, one per line, or NUL-separated (``find -print0``) when
    the text contains a NUL; each entry is a literal path (no globbing), in the given order, and
    handled like an argument. A file literally named ``-`` is given as ``./-``.
  The result keeps argument order, drops repeats of the same file (by resolved real path, so
  ``a.png``, ``./a.png`` and a symlink to it are one input; the first spelling wins), and every
  argument yields at least one item: a pattern matching nothing, a directory without images and an
  empty ``-`` each yield an item carrying its error, so every input gets exactly one output row.

Decoding (``load_image``)
  The array keeps the source's precision: uint8 (H, W, 3) for 8-bit sources (every Pillow mode
  but the ones below: RGB, L, P, 1, CMYK, YCbCr, RGBA, LA, ...), float32 (H, W, 3) in [0, 1] for
  16-bit and float sources. ``as_float_rgb`` turns either into floats in [0, 1].
  * EXIF orientation is applied, so the array has the shape a photo viewer shows.
  * 16-bit samples (Pillow modes ``I;16*``, and ``I`` as Pillow gives 16-bit PGM/PPM data) are
    divided by 65535; ``I`` from a TIFF uses the file's BitsPerSample (2**bits - 1). Integer data
    outside that range (signed TIFF) is min-max normalised. Nothing is clipped. Pillow 13 reads
    48-bit RGB and 64-bit RGBA PNG/TIFF as 8 bits per channel (the high byte); those are 8-bit
    sources.
  * Float images (mode ``F``, float TIFF): values already within [0, 1] are kept as they are;
    otherwise the image is min-max normalised to [0, 1] (a constant image outside [0, 1] is
    clipped).
    NaN or infinite pixels make the input fail.
  * Alpha (RGBA, LA, PA, palette or RGB/L with a transparent colour) is composited over white, a
    departure from the released code (whose ``convert("RGB")`` drops alpha, leaving whatever
    colour the transparent pixels store). The composite is Pillow's ``alpha_composite`` over an
    opaque white image, in 8-bit integer arithmetic, so these images stay 8-bit sources.
  * CMYK, palette, grayscale, bilevel, YCbCr, HSV, LAB... are converted to RGB by Pillow's
    ``convert("RGB")``, as in the papers' released code; embedded colour profiles are not applied.
  * Animated images (GIF, APNG, WebP) are scored on their first frame.
  * Pixel limit: an image whose header declares more than ``DEFAULT_MAX_PIXELS`` (100 megapixels)
    fails before any pixel is decoded ("decompression bomb" protection). Override it with the
    ``max_pixels`` argument or the ``DIQA_MAX_PIXELS`` environment variable. Pillow's own check
    stays on: while diqa decodes, ``Image.MAX_IMAGE_PIXELS`` is set to diqa's limit (and restored
    after), and the band where Pillow would only warn (DecompressionBombWarning, 1x to 2x its
    limit) is refused too, on the decoding thread only, without a warning filter (see
    ``_pixel_limit``).
  * The limit holds inside containers too: the size of every frame, tile or embedded image a
    Pillow loader is about to allocate (ICO and ICNS subimages, PNG or JPEG 2000 inside them, TIFF
    tiles, GIF and MPO frames) is checked against it, so a small container cannot declare a
    gigapixel subimage. A pipe is read into memory up to 8 bytes a pixel of the limit (plus 1 MiB).
  * Truncated files fail: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is left False and the pixel
    data is decoded in full before it is used.
  Missing, directory, unreadable, empty, non-image, corrupt, truncated and over-limit inputs raise
  ``InputError(path, reason)`` with a short one-line reason.

Model input (``resize_for_model``)
  Every image, whatever its size or aspect ratio (a 1x1 image included), is resized to R x R,
  ignoring aspect ratio, as the papers' released code does; upscaling a tiny image just blurs it.
  The filter is the method's (``resample``): DP-IQA's released transform is torchvision's
  ``Resize((512, 512))`` (Pillow BILINEAR, antialiased when shrinking), GenzIQA's is
  ``Resize((512, 512), interpolation=BICUBIC)``; both then ``ToTensor()``.
  * 8-bit sources take the released path exactly: the uint8 RGB image is resized by Pillow and
    divided by 255 in float32, so the array is bit-equal to
    ``Compose([Resize((R, R), interpolation=...), ToTensor()])(Image.open(p).convert("RGB"))``
    for every opaque image without EXIF rotation. Video frames (``videoio.resize_frame``) take
    the same path.
  * 16-bit and float sources keep their precision instead: the resize runs per channel in float
    (Pillow mode ``F``) and is clipped to [0, 1] afterwards because bicubic filtering overshoots
    at sharp edges. Here diqa departs from the released code on purpose: its
    ``convert("RGB")`` clips 16-bit grey to 0..255 (a 16-bit photo turns almost white) and
    float data to whole numbers.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
import stat
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TextIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diqa_cli.errors import InputError, UsageError, one_line

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "InputItem",
    "as_float_rgb",
    "expand_inputs",
    "iter_images",
    "load_image",
    "max_pixels_limit",
    "pil_for_model",
    "pillow_pixel_limit",
    "resize_for_model",
]

DEFAULT_MAX_PIXELS = 100_000_000
MAX_PIXELS_ENV = "DIQA_MAX_PIXELS"

# Extensions listed when a directory or pattern is walked. A fixed list rather than Pillow's
# registry, which also names formats no one means by "photos" (EPS, PDF, fonts, GRIB stubs).
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".avif", ".bmp",
        ".dib", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".tga", ".ico",
        ".jp2", ".j2k", ".jpx", ".qoi",
    }
)

RESAMPLE_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

_GLOB_CHARS = re.compile(r"[*?[]")

# Transparent pixels become white: most images with an alpha channel (logos, product shots,
# screenshots, documents) are made to be seen on a white page, and black would hide dark content,
# while a checkerboard would add texture that a quality model reads as a distortion.
_ALPHA_BACKGROUND = 255


@dataclass(frozen=True)
class InputItem:
    """One input as the user named it; ``error`` is set when it is known to fail already."""

    path: str
    error: str | None = None


# --------------------------------------------------------------------------- input expansion


def expand_inputs(
    args: list[str],
    *,
    recursive: bool = False,
    stdin: TextIO | None = None,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
    kind: str = "image",
) -> list[InputItem]:
    """Turn command-line arguments into the ordered, de-duplicated list of inputs.

    See the module docstring for the rules. ``stdin`` defaults to ``sys.stdin`` and is read at
    most once, at the first ``-``. ``extensions`` and ``kind`` name what a directory is searched
    for (``videoio.VIDEO_EXTENSIONS``, "video" for ``diqa score-video``).
    """
    items: list[InputItem] = []
    seen: set[str] = set()
    stdin_entries: list[str] | None = None
    for arg in args:
        if arg == "-":
            if stdin_entries is None:
                stdin_entries = _read_path_list(sys.stdin if stdin is None else stdin)
            found = [i for entry in stdin_entries for i in _path_items(entry, recursive, extensions, kind)]
            if not stdin_entries:
                found = [InputItem("-", "no paths on standard input")]
        elif _GLOB_CHARS.search(arg) and not os.path.lexists(arg):
            matches = sorted(glob.glob(arg, recursive=recursive))
            found = [i for match in matches for i in _path_items(match, recursive, extensions, kind)]
            if not matches:
                found = [InputItem(arg, "no files match this pattern")]
        else:
            found = _path_items(arg, recursive, extensions, kind)
        for item in found:
            key = os.path.realpath(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    return items


def _read_path_list(stream: TextIO) -> list[str]:
    # Read bytes where the stream has them so that file names that are not valid UTF-8 come back
    # as the same os-level names (surrogate escapes) rather than failing to decode.
    buffer = getattr(stream, "buffer", None)
    text = os.fsdecode(buffer.read()) if buffer is not None else stream.read()
    entries = text.split("\0") if "\0" in text else text.splitlines()
    return [entry for entry in entries if entry]


def _path_items(
    path: str, recursive: bool, extensions: frozenset[str] = IMAGE_EXTENSIONS, kind: str = "image"
) -> list[InputItem]:
    if not os.path.isdir(path):
        return [InputItem(path)]
    files = _directory_images(path, recursive, extensions)
    if files:
        return [InputItem(f) for f in files]
    hint = "" if recursive else " (subdirectories are searched only with --recursive)"
    return [InputItem(path, f"no {kind} files in this directory{hint}")]


def _directory_images(root: str, recursive: bool, extensions: frozenset[str] = IMAGE_EXTENSIONS) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(os.path.join(dirpath, name))
    return found


# --------------------------------------------------------------------------- decoding


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` if given, else ``$DIQA_MAX_PIXELS``, else 100 M."""
    if max_pixels is None:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(raw)
        except ValueError:
            max_pixels = 0
        if max_pixels < 1:
            raise UsageError(
                f"{MAX_PIXELS_ENV}={raw!r} is not a positive whole number of pixels; "
                f"set it like {MAX_PIXELS_ENV}={DEFAULT_MAX_PIXELS} or unset it"
            )
    elif max_pixels < 1:
        raise UsageError(f"max_pixels must be at least 1, got {max_pixels}")
    return max_pixels


class _OverLimit(Image.DecompressionBombError):
    """Raised by diqa's size check inside Pillow; the text is the reason's detail."""


_guard = threading.local()  # .limit: the pixel limit of the diqa decode running on this thread
_guard_lock = threading.Lock()
_guard_limits: list[int] = []  # the limits of every diqa decode running now, on any thread
_guard_saved: int | None = None
_pillow_check = None  # Pillow's own Image._decompression_bomb_check, once diqa has wrapped it


def _diqa_size_check(size, *args, **kwargs):
    """Stands in for ``Image._decompression_bomb_check``, which every Pillow loader calls on a
    size it is about to allocate (the image, an ICO or ICNS subimage, a TIFF tile, a GIF or MPO
    frame). On a thread running a diqa decode, a size over diqa's limit is refused, the whole
    band where Pillow would only warn included; elsewhere Pillow's own check runs unchanged."""
    limit = getattr(_guard, "limit", None)
    if limit is None:
        return _pillow_check(size, *args, **kwargs)
    width, height = size
    pixels = max(1, width) * max(1, height)
    if pixels > limit:
        raise _OverLimit(f"{width}x{height} = {pixels} exceeds the limit of {limit}")
    return None


def _install_size_check() -> None:
    global _pillow_check
    with _guard_lock:
        current = getattr(Image, "_decompression_bomb_check", None)
        if current is None or current is _diqa_size_check:
            return  # already wrapped, or a Pillow without the hook (MAX_IMAGE_PIXELS still holds)
        _pillow_check = current
        Image._decompression_bomb_check = _diqa_size_check


@contextlib.contextmanager
def _pixel_limit(limit: int):
    """Hold Pillow to diqa's pixel limit while a decode runs on this thread.

    Pillow's own check is never switched off. While any diqa decode runs, ``Image.MAX_IMAGE_PIXELS``
    is the smallest limit among them (so Pillow refuses outright above twice that, in every
    loader), and restored when the last one ends. Pillow only *warns* between 1x and 2x its limit;
    turning that warning into an error would take a process-wide warning filter, which threads
    race on (``catch_warnings`` is not thread-safe). So diqa wraps the size check Pillow's
    loaders call before they allocate (``_diqa_size_check``): on this thread it refuses anything
    over ``limit``, with no warning band. Other threads keep Pillow's behaviour.
    """
    global _guard_saved
    _install_size_check()
    outer = getattr(_guard, "limit", None)
    _guard.limit = limit if outer is None else min(outer, limit)
    with _guard_lock:
        if not _guard_limits:
            _guard_saved = Image.MAX_IMAGE_PIXELS
        _guard_limits.append(limit)
        Image.MAX_IMAGE_PIXELS = min(_guard_limits)
    try:
        yield
    finally:
        _guard.limit = outer
        with _guard_lock:
            _guard_limits.remove(limit)
            Image.MAX_IMAGE_PIXELS = min(_guard_limits) if _guard_limits else _guard_saved


def pillow_pixel_limit(max_pixels: int | None = None):
    """Hold Pillow to diqa's pixel limit (``max_pixels``, else the one in force) while this
    thread opens an image itself (enhancement reads a file's mode and alpha after ``load_image``)."""
    return _pixel_limit(max_pixels_limit(max_pixels))


def load_image(path: str, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode one image file to RGB (H, W, 3): uint8 for 8-bit sources (values 0..255), float32
    in [0, 1] for 16-bit and float sources. ``resize_for_model`` takes either.

    Raises ``InputError(path, reason)`` for anything that cannot be used; see the module
    docstring for the conversion rules and the pixel limit.
    """
    image = _load(path, max_pixels_limit(max_pixels))
    return image if image.flags.writeable else image.copy()


def as_float_rgb(image: np.ndarray) -> np.ndarray:
    """``load_image``'s array as float32 (H, W, 3) in [0, 1] whatever the source's bit depth
    (uint8 is divided by 255, as ``ToTensor()`` does)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255)
    return image.astype(np.float32, copy=False)


def _load(path: str, limit: int) -> np.ndarray:
    """``load_image`` with the limit resolved; the array may be read-only."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except PermissionError:
        raise InputError(path, "permission denied") from None
    except OSError as exc:
        raise InputError(path, f"cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(path, "is a directory")
    # Pipes are allowed so that process substitution (`diqa score <(curl ...)`) works; devices and
    # sockets could block or never end.
    if not (stat.S_ISREG(info.st_mode) or stat.S_ISFIFO(info.st_mode)):
        raise InputError(path, "not a regular file")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise InputError(path, "empty file (0 bytes)")

    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(open(path, "rb"))
            if stat.S_ISFIFO(info.st_mode):  # Pillow needs to seek
                cap = _pipe_byte_limit(limit)
                data = source.read(cap + 1)
                if len(data) > cap:
                    raise InputError(
                        path, _too_many_pixels(f"the pipe sent more than {cap} bytes, 8 per pixel of the limit")
                    )
                source = io.BytesIO(data)
            else:
                source = _CappedReads(source, info.st_size)
            with _pixel_limit(limit):
                img = stack.enter_context(Image.open(source))
                width, height = img.size
                if width * height > limit:  # Pillow's open checked it already, through diqa's check
                    raise InputError(
                        path, _too_many_pixels(f"{width}x{height} = {width * height} exceeds the limit of {limit}")
                    )
                img.load()  # decode now, so that truncation and corruption surface here
                bits = _tiff_bits_per_sample(img)
                ImageOps.exif_transpose(img, in_place=True)
        except InputError:
            raise
        except PermissionError:
            raise InputError(path, "permission denied") from None
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except UnidentifiedImageError:
            raise InputError(path, "not an image or unsupported format") from None
        except _OverLimit as exc:  # the image, or a frame, tile or subimage a loader checked
            raise InputError(path, _too_many_pixels(str(exc))) from None
        except Image.DecompressionBombError as exc:  # Pillow's own check (a path diqa missed)
            raise InputError(path, f"too many pixels: {one_line(exc)}") from None
        except OSError as exc:
            if "truncated" in str(exc):
                raise InputError(path, "truncated image data") from None
            raise InputError(path, f"corrupt image data: {one_line(exc)}") from None
        except MemoryError:
            raise  # the caller knows the memory ceiling (see decodepool); not the file's fault alone
        except Exception as exc:  # loaders report damage as SyntaxError, struct.error, ...
            raise InputError(path, f"corrupt image data: {one_line(exc)}") from None
        return _to_rgb(img, bits, path)


class _CappedReads:
    """A file whose ``read(n)`` never asks for more than the bytes left in it.

    Loaders pass sizes read from the file itself (a PNG chunk length, a JPEG 2000 box length),
    and a buffered ``read(n)`` allocates n bytes before reading: a damaged 2 GB length asked for
    2 GB of memory to read a few hundred bytes. Everything else goes to the file unchanged.
    """

    def __init__(self, file, size: int):
        self._file = file
        self._size = size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > (1 << 20):
            n = max(0, min(n, self._size - self._file.tell()))
        return self._file.read(n)

    def __getattr__(self, name):
        return getattr(self._file, name)


def _pipe_byte_limit(limit: int) -> int:
    """Bytes read from a pipe at most: 8 a pixel (uncompressed 16-bit RGBA) plus 1 MiB of headers."""
    return 8 * limit + (1 << 20)


def _too_many_pixels(detail: str) -> str:
    return f"too many pixels: {detail} (possible decompression bomb; set {MAX_PIXELS_ENV} to change it)"


def _tiff_bits_per_sample(img: Image.Image) -> int | None:
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None  # 258: BitsPerSample
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return bits if isinstance(bits, int) else None


def _to_rgb(img: Image.Image, tiff_bits: int | None, path: str) -> np.ndarray:
    """uint8 (H, W, 3) for 8-bit sources, float32 (H, W, 3) in [0, 1] for 16-bit and float."""
    mode = img.mode
    if mode.startswith("I;16"):
        gray = np.asarray(img).astype(np.float32) / 65535.0
    elif mode == "I":
        values = np.asarray(img).astype(np.float64)
        top = float(2 ** (tiff_bits or 16) - 1)
        if values.min() >= 0 and values.max() <= top:
            gray = (values / top).astype(np.float32)
        else:
            gray = _min_max(values)
    elif mode == "F":
        values = np.asarray(img).astype(np.float64)
        if not np.isfinite(values).all():
            raise InputError(path, "float image has NaN or infinite pixels")
        if values.min() >= 0 and values.max() <= 1:
            gray = values.astype(np.float32)
        elif values.max() > values.min():
            gray = _min_max(values)
        else:
            gray = np.clip(values, 0, 1).astype(np.float32)
    else:
        try:
            if img.has_transparency_data:
                # Over white in 8-bit integer arithmetic, so the result takes the exact path too.
                rgba = img.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (_ALPHA_BACKGROUND,) * 4)
                rgb = Image.alpha_composite(white, rgba).convert("RGB")
            else:
                rgb = img if mode == "RGB" else img.convert("RGB")
        except ValueError as exc:  # a mode Pillow cannot convert (e.g. premultiplied "La")
            raise InputError(path, f"unsupported colour mode {mode}: {one_line(exc)}") from None
        return np.asarray(rgb)
    return np.repeat(gray[..., None], 3, axis=2)


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    return ((values - low) / (high - low)).astype(np.float32)


# --------------------------------------------------------------------------- model input


def resize_for_model(
    image: np.ndarray, resolution: int, *, resample: str = "bicubic"
) -> np.ndarray:
    """(H, W, 3) RGB -> float32 (3, R, R) in [0, 1], aspect ratio ignored.

    ``image`` is what ``load_image`` returns: uint8 for 8-bit sources, resized as an 8-bit Pillow
    image and divided by 255, bit-equal to the released ``Resize((R, R))`` + ``ToTensor()``; or
    float in [0, 1] (16-bit and float sources), resized per channel in float and clipped.
    ``resample`` is "bicubic" (default; GenzIQA's released transform) or "bilinear" (the default
    of torchvision's ``Resize``, which DP-IQA's released transform uses).
    """
    return _model_input(_resize(image, resolution, _resample_filter(resample)))


def _resize(image: np.ndarray, resolution: int, method: Image.Resampling) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (R, R, 3); float (H, W, 3) -> float32 (3, R, R) in [0, 1]. The
    uint8 result is four times smaller, which is what a decoder process sends back."""
    if image.dtype == np.uint8:
        return _resize_8bit(image, resolution, method)
    planes = np.ascontiguousarray(np.moveaxis(image, 2, 0), dtype=np.float32)
    size = (resolution, resolution)
    resized = np.stack([np.asarray(Image.fromarray(p).resize(size, method)) for p in planes])
    return np.clip(resized, 0.0, 1.0, out=resized)


def _model_input(resized: np.ndarray) -> np.ndarray:
    """``_resize``'s result as the model's float32 (3, R, R)."""
    return _model_floats(resized) if resized.dtype == np.uint8 else resized


def _decode_resized(path: str, resolution: int, method: Image.Resampling, limit: int) -> np.ndarray:
    """One input from file to ``_resize``'s result; raises ``InputError`` (or MemoryError)."""
    return _resize(_load(path, limit), resolution, method)


def _resize_8bit(rgb: np.ndarray, resolution: int, method: Image.Resampling) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (R, R, 3), as torchvision's ``Resize`` does on a PIL image."""
    return np.asarray(Image.fromarray(rgb, mode="RGB").resize((resolution, resolution), method))


def _model_floats(resized: np.ndarray) -> np.ndarray:
    """uint8 (R, R, 3) -> float32 (3, R, R), as ``ToTensor()``: a true float32 division by 255."""
    out = np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)
    out /= np.float32(255)
    return out


def pil_for_model(image: Image.Image, resolution: int, *, resample: str = "bicubic") -> np.ndarray:
    """An image already opened with Pillow -> the model input ``iter_images`` would give for its
    file: EXIF orientation applied, converted as :func:`load_image` converts, then
    :func:`resize_for_model`. The caller's image is not modified."""
    image.load()
    bits = _tiff_bits_per_sample(image)
    upright = ImageOps.exif_transpose(image)
    return resize_for_model(_to_rgb(upright, bits, "<PIL image>"), resolution, resample=resample)


def _resample_filter(name: str) -> Image.Resampling:
    try:
        return RESAMPLE_FILTERS[name]
    except KeyError:
        raise UsageError(
            f"unknown resample filter {name!r}; choose one of {', '.join(RESAMPLE_FILTERS)}"
        ) from None


def iter_images(
    items: Iterable[InputItem],
    resolution: int,
    *,
    workers: int = 2,
    prefetch: int = 8,
    max_pixels: int | None = None,
    resample: str = "bicubic",
    isolation: str | None = None,
    memory_mb: int | None = None,
    timeout_s: float | None = None,
) -> Iterator[tuple[InputItem, np.ndarray | None, str | None]]:
    """Yield ``(item, pixels, error)`` in input order, decoding ahead of the consumer.

    ``pixels`` is ``resize_for_model``'s (3, R, R) array, or None with ``error`` the one-line
    reason. At most ``prefetch`` inputs are decoded or decoding ahead of the consumer, which
    bounds memory. A bad input never raises. Options are checked here, before the first decode.

    ``isolation`` (default ``$DIQA_DECODE_ISOLATION``, else "process"): "process" decodes in
    ``workers`` worker processes, each input under a memory ceiling (``memory_mb``, default
    ``$DIQA_DECODE_MEMORY_MB``) and a time limit (``timeout_s``, default
    ``$DIQA_DECODE_TIMEOUT``), so a decoder that crashes, hangs or runs out of memory costs only
    its input; "thread" decodes in ``workers`` threads of this process, without those limits.
    See ``diqa_cli.decodepool``.
    """
    from diqa_cli import decodepool

    if workers < 1 or prefetch < 1:
        raise UsageError(f"workers and prefetch must be at least 1, got {workers} and {prefetch}")
    method = _resample_filter(resample)
    limit = max_pixels_limit(max_pixels)
    mode = decodepool.isolation_mode(isolation)
    if mode == "process":
        limits = decodepool.decode_limits(memory_mb, timeout_s, max_pixels=limit)
        return decodepool.decode_in_processes(
            items, resolution, method, limit, workers=workers, prefetch=prefetch, limits=limits
        )

    def decode(item: InputItem) -> tuple[InputItem, np.ndarray | None, str | None]:
        if item.error is not None:
            return item, None, item.error
        try:
            resized = _decode_resized(item.path, resolution, method, limit)
        except InputError as exc:
            return item, None, exc.reason
        except MemoryError:
            return item, None, "ran out of memory while decoding"
        return item, _model_input(resized), None

    return _decode_ahead(items, decode, workers, prefetch)


def _decode_ahead(items, decode, workers, prefetch):
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diqa-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(decode, item))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        # The consumer may stop early (`| head -1`, Ctrl-C): drop queued decodes, let running
        # ones finish (at most `workers`), so no thread outlives the iterator.
        pool.shutdown(wait=True, cancel_futures=True)
