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
from pathlib import Path
from typing import Any

from diqa_cli.errors import UsageError

__all__ = ["score_images", "load_scorer", "error_row"]


def error_row(path: str, reason: str, **context: Any) -> dict[str, Any]:
    """The row of an input that could not be scored."""
    return {"path": path, "score": None, "raw_score": None, "status": "error", "error": reason, **context}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def score_images(
    items: Iterable,
    model,
    *,
    batch_size: int = 8,
    workers: int = 2,
    normalisation: dict,
    progress: Callable[[dict], None] | None = None,
    max_pixels: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Score ``items`` (``imageio.InputItem`` or plain paths) with ``model``; yields one row per
    item, in order.

    Rows: ``path, score, raw_score, status ('ok'|'error'), error, method, backbone, seconds``,
    with ``score = raw_score * scale + offset`` from ``normalisation``. ``seconds`` is the image's
    share of its batch's forward pass (decoding overlaps with compute, so it is not counted).
    ``progress`` is called with each row as it is yielded; ``max_pixels`` is the decoder's
    decompression-bomb limit (``imageio.max_pixels_limit``). Images are resized with the filter
    of the method's released transform (``MethodSpec.resample``).
    """
    import numpy as np
    import torch

    from diqa_cli.imageio import InputItem, iter_images

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    offset, scale = float(normalisation["offset"]), float(normalisation["scale"])
    device, dtype = model.device, model.dtype
    context = {"method": model.method_name, "backbone": str(model.backbone.ref) if model.backbone is not None else None}
    model.eval()

    def forward(arrays: list) -> list[float]:
        pixels = torch.from_numpy(np.stack(arrays)).to(device=device, dtype=dtype)
        # no_grad rather than inference_mode: a method may switch gradients back on inside its
        # forward (guided sampling), which inference-mode tensors would forbid.
        with torch.no_grad():
            raw = model(pixels)
        if raw.shape != (len(arrays),):
            raise RuntimeError(f"model returned shape {tuple(raw.shape)} for a batch of {len(arrays)}")
        return raw.float().cpu().tolist()

    def finish(row: dict, raw: float, seconds: float) -> None:
        if not math.isfinite(raw):
            row.update(error_row(row["path"], f"model returned a non-finite score ({raw})", **context))
            return
        row.update(score=raw * scale + offset, raw_score=raw, status="ok", error=None, seconds=seconds)

    def fail(row: dict, exc: Exception) -> None:
        row.update(error_row(row["path"], f"scoring failed: {type(exc).__name__}: {_one_line(exc)}", **context))

    def run(batch: list[tuple[dict, Any]]) -> None:
        start = time.perf_counter()
        try:
            raws = forward([array for _, array in batch])
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
        for (row, _), raw in zip(batch, raws):
            finish(row, raw, seconds)

    queue: deque[dict] = deque()  # rows in input order; status None while still being scored
    batch: list[tuple[dict, Any]] = []

    def ready() -> Iterator[dict]:
        while queue and queue[0]["status"] is not None:
            row = queue.popleft()
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


def load_scorer(
    method: str | None,
    *,
    backbone: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    seed: int | None = None,
):
    """Build the model that scores: ``(model, sidecar)``.

    With ``checkpoint``, the head it holds (its sidecar names the method; a different ``method``
    is a usage error; without a sidecar, ``method``'s released configuration is assumed). Without, the method's first released weights from the registry, fetched
    through the weights manifest (a bare state dict gets :func:`checkpoint.released_sidecar`). ``backbone`` replaces the sidecar's backbone; ``seed`` replaces
    the recorded seed of methods that draw noise.
    """
    from diqa_cli.checkpoint import load_head, read_sidecar, released_sidecar, sidecar_path
    from diqa_cli.methods import get_method

    spec = get_method(method) if method else None
    sidecar = None
    if checkpoint is None:
        if spec is None:
            raise UsageError("name a method (--method) or a head checkpoint (--checkpoint)")
        if not spec.released_weights:
            raise UsageError(
                f"method {spec.name!r} has no released weights; pass --checkpoint HEAD.safetensors, "
                f"or train one with `diqa train --method {spec.name} --data labels.csv`"
            )
        from diqa_cli.weights import resolve

        name = spec.released_weights[0]
        checkpoint = str(resolve(name, offline=offline))
        if not sidecar_path(checkpoint).is_file():  # as published: a bare state dict
            sidecar = released_sidecar(spec, name)
    elif spec is not None and not sidecar_path(checkpoint).is_file():
        # A bare state dict, e.g. released weights after `diqa weights convert`: the named
        # method's released configuration describes it.
        sidecar = released_sidecar(spec, Path(checkpoint).name)
    else:
        trained = get_method(read_sidecar(checkpoint)["method"])
        if spec is not None and spec.name != trained.name:
            raise UsageError(
                f"--method {spec.name!r} does not match checkpoint {checkpoint!r}, a {trained.name!r} head; "
                f"drop --method or pass a {spec.name} checkpoint"
            )
    overrides = {"seed": seed} if seed is not None and _draws_noise(spec or get_method(_sidecar_method(checkpoint, sidecar))) else None
    return load_head(
        checkpoint,
        device=device,
        dtype=dtype,
        offline=offline,
        backbone_ref=backbone,
        config_overrides=overrides,
        sidecar=sidecar,
    )


def _sidecar_method(checkpoint: str, sidecar: dict | None) -> str:
    from diqa_cli.checkpoint import read_sidecar

    return (sidecar or read_sidecar(checkpoint))["method"]


def _draws_noise(spec) -> bool:
    """Whether ``--seed`` means anything for a method: only models that take a ``seed`` in their
    config draw noise (DP-IQA runs at t=1 without noise, so a seed is ignored there)."""
    import inspect

    from diqa_cli.methods import load_model_class

    return "seed" in inspect.signature(load_model_class(spec).__init__).parameters
