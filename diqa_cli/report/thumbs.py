"""Thumbnails for the report: small JPEGs of images, of a video's first frame, of quality maps.

A file that cannot be read gives ``None`` (the report shows a placeholder), never an exception.
Images are decoded at reduced size where the format allows (JPEG's DCT scaling through
``Image.draft``), with EXIF orientation applied and transparency over white, as the scorer sees
them; an image whose header declares more pixels than the scorer's limit is not decoded at all.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageOps

__all__ = ["MODES", "Thumb", "Thumbnails", "make_thumbnail", "resolve_input"]

MODES = ("embedded", "linked", "none")
_JPEG_QUALITY = 70


@dataclass(frozen=True)
class Thumb:
    """Where the report finds one thumbnail: a CSS class holding a data URI (embedded) or a
    relative file name (linked); and its size in pixels."""

    width: int
    height: int
    css_class: str | None = None
    src: str | None = None


def resolve_input(path: str, base_dirs: tuple[Path, ...] = ()) -> Path | None:
    """The file a row's path names: as written (absolute, or relative to the working folder),
    else relative to each of ``base_dirs`` (the source file's folder); None when none exists."""
    candidates = [Path(path)]
    if not os.path.isabs(path):
        candidates += [base / path for base in base_dirs]
    for candidate in candidates:
        try:
            if candidate.is_file():
                return candidate
        except OSError:  # a name too long, a permission problem
            continue
    return None


def make_thumbnail(path: str | os.PathLike, size: int, *, video: bool = False) -> Image.Image | None:
    """An RGB image at most ``size`` px on its long side, or None when ``path`` cannot be read."""
    try:
        image = _first_frame(path) if video else _open_image(path, size)
        if image is None:
            return None
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
        return image
    except Exception:  # noqa: BLE001 - a broken input gets a placeholder, whatever its fault
        return None


def _open_image(path, size: int) -> Image.Image | None:
    from diqa_cli.imageio import max_pixels_limit

    with Image.open(path) as image:
        width, height = image.size
        if width * height > max_pixels_limit():
            return None  # the scorer refuses it too; do not decode a possible bomb
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            return _from_floats(path)
        image.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return image.convert("RGB")


def _from_floats(path) -> Image.Image:
    """16-bit and float images through the scorer's own conversion to [0, 1]."""
    import numpy as np

    from diqa_cli.imageio import load_image

    pixels = load_image(str(path))
    return Image.fromarray((pixels * 255.0 + 0.5).clip(0, 255).astype(np.uint8))


def _first_frame(path) -> Image.Image | None:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            return None
        for frame in container.decode(video=0):
            return frame.to_image().convert("RGB")
    return None


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=_JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


class Thumbnails:
    """The thumbnails of one report, each (file, size) made once however many rows name it.

    ``mode``: ``embedded`` (data URIs in one CSS rule per file, so a file named by several rows is
    stored once), ``linked`` (JPEG files in ``folder``, named by a hash of the input's path, linked
    relative to the report's folder ``report_dir``) or ``none``.
    """

    def __init__(self, mode: str, *, folder: Path | None = None, report_dir: Path | None = None, workers: int = 2):
        if mode not in MODES:
            raise ValueError(f"thumbnail mode {mode!r} is not one of {', '.join(MODES)}")
        if mode == "linked" and (folder is None or report_dir is None):
            raise ValueError("linked thumbnails need a folder and the report's folder")
        self.mode = mode
        self.folder = folder
        self.report_dir = report_dir
        self.workers = max(1, workers)
        self.styles: list[tuple[str, str]] = []  # (css class, data URI), embedded mode
        self.failed = 0
        self._made: dict[tuple[str, bool, int], Thumb | None] = {}

    def make_all(self, files: list[tuple[Path | None, bool, int]]) -> None:
        """Make the thumbnails of ``files`` (``(path or None, is_video, long side in px)``),
        ``workers`` at a time."""
        if self.mode == "none":
            return
        todo = list(dict.fromkeys((str(p), video, size) for p, video, size in files if p is not None))
        todo = [key for key in todo if key not in self._made]
        if self.mode == "linked" and todo:
            self.folder.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="diqa-thumb") as pool:
            for key, encoded in zip(todo, pool.map(self._encode, todo)):
                self._made[key] = self._place(key, encoded)

    def get(self, path: Path | None, size: int, *, video: bool = False) -> Thumb | None:
        """The thumbnail of ``path`` made by :meth:`make_all`; None for a placeholder."""
        if path is None or self.mode == "none":
            return None
        return self._made.get((str(path), video, size))

    def _encode(self, key: tuple[str, bool, int]) -> tuple[bytes, int, int] | None:
        image = make_thumbnail(key[0], key[2], video=key[1])
        return None if image is None else (_jpeg(image), image.width, image.height)

    def _place(self, key: tuple[str, bool, int], encoded) -> Thumb | None:
        if encoded is None:
            self.failed += 1
            return None
        data, width, height = encoded
        if self.mode == "embedded":
            css_class = f"t{len(self.styles) + 1}"
            self.styles.append((css_class, "data:image/jpeg;base64," + base64.b64encode(data).decode("ascii")))
            return Thumb(width, height, css_class=css_class)
        name = hashlib.sha1(f"{key[0]}\0{key[1]}".encode("utf-8", "surrogateescape")).hexdigest()[:20]
        name += f"-{key[2]}.jpg"
        target = self.folder / name
        target.write_bytes(data)
        relative = Path(os.path.relpath(target, self.report_dir)).as_posix()
        return Thumb(width, height, src=quote(relative, errors="surrogateescape"))
