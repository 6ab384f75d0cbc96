"""Writing rows' quality maps (``diqa score --maps``, ``diqa score-video --maps``).

The image pipeline computes maps in the same pass as the scores (:func:`diqa_cli.maps.compute.quality_maps`)
and hands each scored row's map, on the model's grid, to :func:`write_row_map`, which decodes the
input again at its own size, resizes the map to it and writes the two files
(:class:`diqa_cli.maps.writer.MapWriter`). A row whose score was reused from a score database gets
its map from :func:`map_row`. A map that cannot be written (the file changed or vanished since it
was scored, a full disk) leaves the row's score alone: the row gets no map and a
:class:`~diqa_cli.errors.DiqaWarning` says why.
"""

from __future__ import annotations

import warnings

import numpy as np

from diqa_cli.errors import DiqaWarning, InputError, one_line
from diqa_cli.maps import MAP_COLUMN

__all__ = ["make_map_writer", "map_row", "write_row_map"]


def make_map_writer(directory, model):
    """The :class:`~diqa_cli.maps.writer.MapWriter` for ``model``'s maps in ``directory``."""
    from diqa_cli.maps.writer import MapWriter

    spec = model.spec
    return MapWriter(directory, method=spec.name, description=spec.map_description)


def _warn(path: str, reason: str) -> None:
    warnings.warn(f"{path}: quality map not written: {reason}", DiqaWarning, stacklevel=3)


def write_row_map(writer, row: dict, grid, *, max_pixels: int | None = None) -> None:
    """Write the map of an ``ok`` image row from ``grid`` (h, w) (a tensor on the model's grid);
    sets ``row['map']`` to the overlay's path, or None with a warning when it cannot be written."""
    from diqa_cli.imageio import load_image
    from diqa_cli.maps.compute import resize_maps

    path = row["path"]
    row[MAP_COLUMN] = None
    try:
        image = load_image(path, max_pixels=max_pixels)
        raw = resize_maps(grid[None].float(), image.shape[:2])[0].cpu().numpy()
        row[MAP_COLUMN] = writer.write(path, image, raw, score=row.get("score"), raw_score=row.get("raw_score"))
    except InputError as exc:
        _warn(path, exc.reason)
    except OSError as exc:
        _warn(path, f"{type(exc).__name__}: {one_line(exc)}")


def map_row(model, writer, row: dict, *, max_pixels: int | None = None) -> bool:
    """Compute and write the map of an ``ok`` image row that was not scored in this run (a score
    reused from a score database); True when the row changed. Error rows are left as they are."""
    import torch

    from diqa_cli.imageio import load_image, resize_for_model
    from diqa_cli.maps.compute import quality_maps

    if row.get("status") != "ok":
        return False
    path = row["path"]
    try:
        image = load_image(path, max_pixels=max_pixels)
    except InputError as exc:
        row[MAP_COLUMN] = None
        _warn(path, exc.reason)
        return True
    pixels = resize_for_model(image, model.resolution, resample=model.spec.resample)
    _, grid = quality_maps(model, torch.from_numpy(np.ascontiguousarray(pixels))[None].to(model.device, model.dtype))
    write_row_map(writer, row, grid[0], max_pixels=max_pixels)
    return True
