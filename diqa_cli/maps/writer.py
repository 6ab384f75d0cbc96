"""The files of one quality map: an overlay PNG for people and the raw map for scripts.

For an input ``photos/cat.jpg`` ``diqa score --maps DIR`` writes

* ``DIR/cat.<id>.map.png``: the overlay (:func:`diqa_cli.maps.render.overlay`), the input's size
  plus a legend strip; its path is the row's ``map`` column;
* ``DIR/cat.<id>.map.tiff``: the raw map, a single-channel 32-bit float TIFF at the input's size
  (height x width, after EXIF rotation), lossless. Its ImageDescription tag holds JSON: the format
  (``diqa-quality-map/1``), source path, method, how the map is made, its units, score and raw score.
  ``read_raw_map`` reads both back; so do Pillow (mode ``F``), tifffile and most image tools.

``<id>`` is the first 8 hex digits of the SHA-256 of the input's absolute path, so inputs with the
same name in different folders do not collide and a re-run writes the same names (replacing the
files). A video's frames add the frame's time: ``clip.<id>.t0001500ms.map.png``. Files are written
atomically (a reader never sees half a file).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from diqa_cli.errors import UsageError

__all__ = ["MAP_FORMAT", "MapWriter", "read_raw_map"]

MAP_FORMAT = "diqa-quality-map/1"
_MAX_STEM = 96


class MapWriter:
    """Writes maps into ``directory`` (created on first use) for one method.

    ``description`` says how the maps are made (the spec's ``map_description``); ``units`` what the
    raw values are. :meth:`write` returns the overlay's path, which rows carry as ``map``.
    """

    def __init__(self, directory: str | os.PathLike, *, method: str, description: str, units: str | None = None):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise UsageError(f"--maps {str(self.directory)!r} is a file; name a folder (it is created if missing)")
        self.method = method
        self.description = description
        self.units = units or (
            "raw score units (the head's score normalisation not applied), not normalised; "
            "low = worse here"
        )
        self.written = 0

    def stem(self, path: str, time: float | None = None) -> str:
        """The name of ``path``'s map files without ``.map.png`` / ``.map.tiff``."""
        absolute = os.path.abspath(os.fsdecode(path))
        digest = hashlib.sha256(os.fsencode(absolute)).hexdigest()[:8]
        base = Path(absolute).name
        stem = (base.rsplit(".", 1)[0] if "." in base[1:] else base)[:_MAX_STEM] or "input"
        name = f"{stem}.{digest}"
        if time is not None:
            name += f".t{max(0, round(time * 1000)):07d}ms"
        return name

    def write(
        self,
        path: str,
        image: np.ndarray,
        raw: np.ndarray,
        *,
        score: float | None = None,
        raw_score: float | None = None,
        time: float | None = None,
    ) -> str:
        """Write the overlay and the raw map of input ``path`` (``image`` (H, W, 3) float in [0, 1]
        or uint8, ``raw`` (H, W) at the same size); returns the overlay's path."""
        from PIL import Image

        from diqa_cli.files import atomic_write
        from diqa_cli.maps.render import overlay

        raw = np.ascontiguousarray(raw, dtype=np.float32)
        if raw.ndim != 2:
            raise ValueError(f"a quality map is (H, W), got {raw.shape}")
        stem = self.stem(path, time)
        png = self.directory / f"{stem}.map.png"
        tiff = self.directory / f"{stem}.map.tiff"
        self.directory.mkdir(parents=True, exist_ok=True)
        info: dict[str, Any] = {
            "format": MAP_FORMAT,
            "source": os.fsdecode(path),
            "method": self.method,
            "map": self.description,
            "units": self.units,
            "score": score,
            "raw_score": raw_score,
        }
        if time is not None:
            info["time"] = time
        description = json.dumps(info, ensure_ascii=True)
        atomic_write(tiff, lambda tmp: Image.fromarray(raw).save(tmp, format="TIFF", description=description))
        picture = overlay(image, raw, score=score)
        # zlib level 1: a fifth of level 6's time for a fifth more bytes (measured on 384 px overlays).
        atomic_write(png, lambda tmp: picture.save(tmp, format="PNG", compress_level=1))
        self.written += 1
        return str(png)


def read_raw_map(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """A raw map file (``.map.tiff``) -> ((H, W) float32 array, its JSON description)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode != "F":
            raise UsageError(f"{str(path)!r} is not a diqa raw quality map (mode {image.mode}, expected 32-bit float)")
        values = np.array(image, dtype=np.float32)
        text = image.tag_v2.get(270, "{}") if hasattr(image, "tag_v2") else "{}"
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        info = {}
    return values, info
