"""The batched scoring pipeline: decoded images in, one row per input out, in input order.

Decoding runs in ``imageio.iter_images``' threads ahead of the model (prefetch), so it overlaps
with the forward passes, which release the GIL. Good images are stacked into batches; rows leave
as soon as every row before them is done, so an error row never waits for a batch to fill unless
an unfinished image is ahead of it. A batch whose forward pass fails (CUDA out of memory, one
odd input) is retried image by image, so one bad input cannot cost the others their scores.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from diqa_cli.errors import UsageError
from diqa_cli.pipelines.rows import error_row, failure_reason, reported_score

__all__ = ["score_images"]

_PENDING_MAP = "_pending_map"  # a row's map being written (never leaves this module)


def score_images(
    items: Iterable,
    model,
    *,
    batch_size: int = 8,
    workers: int = 2,
    normalisation: dict,
    progress: Callable[[dict], None] | None = None,
    max_pixels: int | None = None,
    maps=None,
) -> Iterator[dict[str, Any]]:
    """Score ``items`` (``imageio.InputItem`` or plain paths) with ``model``; yields one row per
    item, in order.

    Rows: ``path, score, raw_score, status ('ok'|'error'), error, method, backbone, seconds``,
    with ``score = raw_score * scale + offset`` from ``normalisation``. ``seconds`` is the image's
    share of its batch's forward pass (decoding overlaps with compute, so it is not counted).
    ``progress`` is called with each row as it is yielded; ``max_pixels`` is the decoder's
    decompression-bomb limit (``imageio.max_pixels_limit``). Images are resized with the filter
    of the method's released transform (``MethodSpec.resample``).

    ``maps`` (a :class:`~diqa_cli.maps.writer.MapWriter`, ``diqa score --maps``): each batch's
    quality maps come from the same pass as its scores (:func:`diqa_cli.maps.compute.quality_maps`)
    and every ``ok`` row gets ``map``, the overlay written for it (see
    :mod:`diqa_cli.pipelines.maps`) in ``workers`` threads while the next batch runs; a row is
    yielded once its files exist. Without it nothing about maps is computed.
    """
    import numpy as np
    import torch

    from diqa_cli.imageio import InputItem, iter_images

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    device, dtype = model.device, model.dtype
    context = {"method": model.method_name, "backbone": str(model.backbone.ref) if model.backbone is not None else None}
    model.eval()

    def forward(arrays: list) -> tuple[list[float], Any]:
        pixels = torch.from_numpy(np.stack(arrays)).to(device=device, dtype=dtype)
        grids = None
        if maps is not None:
            from diqa_cli.maps.compute import quality_maps

            raw, grids = quality_maps(model, pixels)  # switches gradients on where it needs them
        else:
            # no_grad rather than inference_mode: a method may switch gradients back on inside its
            # forward (guided sampling), which inference-mode tensors would forbid.
            with torch.no_grad():
                raw = model(pixels)
        if raw.shape != (len(arrays),):
            raise RuntimeError(f"model returned shape {tuple(raw.shape)} for a batch of {len(arrays)}")
        return raw.float().cpu().tolist(), grids

    def finish(row: dict, raw: float, seconds: float) -> None:
        if not math.isfinite(raw):
            row.update(error_row(row["path"], f"model returned a non-finite score ({raw})", **context))
            return
        row.update(score=reported_score(raw, normalisation), raw_score=raw, status="ok", error=None, seconds=seconds)

    def fail(row: dict, exc: Exception) -> None:
        row.update(error_row(row["path"], failure_reason(exc), **context))

    def run(batch: list[tuple[dict, Any]]) -> None:
        start = time.perf_counter()
        try:
            raws, grids = forward([array for _, array in batch])
        except Exception as exc:  # noqa: BLE001 - any failure falls back to one image at a time
            if len(batch) == 1:
                fail(batch[0][0], exc)
                return
            if device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory batch leaves its blocks cached
            for one in batch:
                run([one])
            return
        seconds = (time.perf_counter() - start) / len(batch)
        for index, ((row, _), raw) in enumerate(zip(batch, raws)):
            finish(row, raw, seconds)
            if grids is not None and row["status"] == "ok":
                # Written in a thread while the next batch runs; the row waits for it in ready().
                row[_PENDING_MAP] = map_pool.submit(write_row_map, maps, row, grids[index], max_pixels=max_pixels)

    queue: deque[dict] = deque()  # rows in input order; status None while still being scored
    batch: list[tuple[dict, Any]] = []
    map_pool = None
    if maps is not None:
        from concurrent.futures import ThreadPoolExecutor

        from diqa_cli.pipelines.maps import write_row_map

        map_pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="diqa-maps")

    def ready() -> Iterator[dict]:
        while queue and queue[0]["status"] is not None:
            row = queue.popleft()
            pending = row.pop(_PENDING_MAP, None)
            if pending is not None:
                pending.result()  # its files exist before the row names them
            if progress is not None:
                progress(row)
            yield row

    items = (item if isinstance(item, InputItem) else InputItem(str(item)) for item in items)
    decoded = iter_images(
        items,
        model.resolution,
        workers=workers,
        prefetch=2 * batch_size,  # the next batch decodes while this one runs
        max_pixels=max_pixels,
        resample=model.spec.resample,
    )
    try:
        for item, array, error in decoded:
            path = str(item.path)
            if array is None:
                queue.append(error_row(path, error or "could not be decoded", **context))
            else:
                row = {"path": path, "score": None, "raw_score": None, "status": None, "error": None, **context}
                queue.append(row)
                batch.append((row, array))
                if len(batch) == batch_size:
                    run(batch)
                    batch = []
            yield from ready()
        if batch:
            run(batch)
        yield from ready()
    finally:
        if map_pool is not None:
            map_pool.shutdown(wait=True, cancel_futures=True)
