"""Video decoding for a video model, and the video scoring loop: one row per video.

The model is any :class:`~diqa_cli.models.base.VideoQualityModel`; its clip encoder (SlowFast for
GenzVQA) is any :class:`~diqa_cli.models.base.ClipEncoder`. For each video:

1. Clips for the encoder (one ``clip_frames``-frame clip per second of video, at most
   ``max_clips``; ``videoio.VideoReader.clips``) are decoded and encoded in groups of ``clip_batch``.
2. The chosen frames (``videoio.VideoReader.plan``: ``fps_sub`` per second and/or ``max_frames``;
   without either, the spec's ``frames_per_video``) are resized to the model's resolution with
   its spec's filter and passed to ``model.frame_features`` in batches of ``batch_size``.
3. ``model.video_score(all frame features, all clip features)`` gives the raw score.

Decoding runs one thread ahead of the networks (both release the GIL), in a decoder process
(``videoio.video_parts``): a decoder that crashes, hangs or runs out of memory costs its video only.
A video that cannot be decoded, or whose scoring fails, gets an error row; the run goes on.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diqa_cli.decodepool import DecoderStartError
from diqa_cli.errors import InputError, UsageError, WeightsError
from diqa_cli.pipelines.rows import error_row, failure_reason, reported_score, tree_cat

__all__ = ["VideoInput", "default_frames", "load_video_input", "score_frames", "score_videos"]

# Without --fps-sub or --max-frames, and without a spec value: frames spread over the video.
_DEFAULT_FRAMES = 8


@dataclass
class VideoInput:
    """One video decoded for a video model: frames (F, 3, R, R) in [0, 1], the clip encoder's
    features (a tuple of (N, D_k); None when no encoder was given), and what a row reports
    (``frames_sampled`` = decoded + ``frames_lost``)."""

    path: str
    frames: torch.Tensor
    timestamps: np.ndarray
    clip_features: tuple[torch.Tensor, ...] | None
    decoder: str
    duration: float
    frames_sampled: int
    frames_lost: int
    clips: int


@dataclass
class _Decoded:
    """What the decoding side of one video produced, filled in as it goes."""

    decoder: str | None = None  # which decoder read it (None until the video opened)
    duration: float | None = None
    frames_sampled: int = 0
    frame_stats: Any = None
    clip_stats: Any = None
    decode_seconds: float = 0.0


def default_frames(model, *, training: bool = False) -> int:
    """Frames per video when neither ``fps_sub`` nor ``max_frames`` is given (the spec's)."""
    spec = model.spec
    chosen = spec.training_frames_per_video if training else spec.frames_per_video
    return chosen or spec.frames_per_video or _DEFAULT_FRAMES


def _decode_items(path, *, model, encoder, fps_sub, max_frames, max_clips, decoder, batch, state: _Decoded,
                  keep_frames: bool = False):
    """Yield ("clip", (3, T, S, S) float32) for every encoder clip (none when ``encoder`` is
    None), then ("frames", (timestamps, (b, 3, R, R) float32, originals)) for the chosen frames in
    batches; ``originals`` are the decoded uint8 (H, W, 3) frames with ``keep_frames`` (quality
    maps), else None. Time spent here is decoding (and resizing), recorded in ``state.decode_seconds``.

    The video is decoded as ``videoio.video_parts`` says: in a decoder process by default (a
    crash, hang or runaway allocation costs this video only), which sends frames resized and
    clips cropped as uint8; the float conversion happens here, the same for both ways."""
    from diqa_cli.videoio import VideoRequest, model_pixels, normalise_clip, video_parts

    start = time.perf_counter()
    if fps_sub is None and max_frames is None:
        max_frames = default_frames(model)
    clips = {} if encoder is None else {"clip_len": encoder.clip_frames, "crop_size": encoder.crop_size}
    request = VideoRequest(
        resolution=model.resolution, resample=model.spec.resample, fps_sub=fps_sub, max_frames=max_frames,
        batch=batch, decoder=decoder, max_clips=max_clips, keep_frames=keep_frames, **clips,
    )
    for kind, value in video_parts(path, request, state):
        if kind == "clip":
            value = normalise_clip(value, encoder.config["mean"], encoder.config["std"])
        elif kind == "frames":
            times, resized, originals = value
            value = (times, model_pixels(resized), originals)
        else:
            continue
        state.decode_seconds += time.perf_counter() - start
        yield kind, value
        start = time.perf_counter()
    state.decode_seconds += time.perf_counter() - start


def _tensor_items(frames: torch.Tensor, timestamps, *, model, encoder, fps_sub, max_frames, max_clips, batch,
                  state: _Decoded):
    """:func:`_decode_items` for frames already in memory: (T, 3, H, W) in [0, 1] at the native
    rate with their ``timestamps`` in seconds. They are rounded to 8 bits, as decoded frames are,
    so the clips and chosen frames are those the file would give."""
    from diqa_cli.videoio import DecodeStats, normalise_clip, pick_frames, plan_clips, resize_frame, square_crop

    if frames.ndim != 4 or frames.shape[1] != 3 or not len(frames):
        raise UsageError(f"video frames must be a (T, 3, H, W) tensor with T >= 1, got {tuple(frames.shape)}")
    times = np.asarray(timestamps, dtype=np.float64)
    if times.shape != (len(frames),) or (len(times) > 1 and np.any(np.diff(times) <= 0)):
        raise UsageError(f"timestamps must be {len(frames)} increasing times in seconds, one per frame")
    rgb = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    state.decoder, state.duration = "tensor", float(times[-1] - times[0] + spacing)
    state.clip_stats, state.frame_stats = DecodeStats(), DecodeStats()
    times = times - times[0]
    if encoder is not None:
        for clip in plan_clips(times, end=state.duration, clip_len=encoder.clip_frames, max_clips=max_clips):
            crops = [square_crop(rgb[i], encoder.crop_size) for i in clip]
            yield "clip", normalise_clip(crops, encoder.config["mean"], encoder.config["std"])
    if fps_sub is None and max_frames is None:
        max_frames = default_frames(model)
    plan = pick_frames(times, duration=state.duration, fps_sub=fps_sub, max_frames=max_frames)
    state.frames_sampled = plan.sampled
    state.frame_stats.requested = state.frame_stats.decoded = len(plan.indices)
    for start in range(0, len(plan.indices), batch):
        chosen = plan.indices[start : start + batch]
        pixels = np.stack([resize_frame(rgb[i], model.resolution, resample=model.spec.resample) for i in chosen])
        yield "frames", (times[chosen], pixels, None)


def _background(items: Iterator, depth: int = 2) -> Iterator:
    """Run ``items`` in a thread ``depth`` items ahead, so decoding overlaps the networks (both
    release the GIL). Exceptions reach the consumer; closing the consumer stops the thread."""
    channel: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message) -> bool:
        while not stop.is_set():
            try:
                channel.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer as it is
            put(("error", exc))
        finally:
            with contextlib.suppress(Exception):
                items.close()

    worker = threading.Thread(target=run, name="diqa-video-decode", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = channel.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=10)


def _encode_clips(encoder, clips: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    device = next(encoder.parameters()).device
    with torch.no_grad():
        return tuple(encoder.extract_features(torch.from_numpy(np.stack(clips)).to(device)))


def _join_clip_features(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat(column) for column in zip(*parts))


def _check_decoded(path, state: _Decoded, frames: list, clip_parts: list | None) -> None:
    if not frames:
        raise InputError(path, f"none of the {state.frames_sampled} chosen frames could be decoded")
    if clip_parts is not None and not clip_parts:
        raise InputError(path, "no clip for the clip encoder could be decoded")


def load_video_input(
    path: str,
    model,
    encoder=None,
    *,
    fps_sub: float | None = None,
    max_frames: int | None = None,
    max_clips: int = 16,
    decoder: str = "auto",
    clip_batch: int = 4,
) -> VideoInput:
    """Decode one video for ``model``: its chosen frames at the model's resolution and, with an
    ``encoder``, its clip features (computed here). Raises ``InputError`` when nothing usable decodes."""
    state = _Decoded()
    clips: list[np.ndarray] = []
    clip_parts: list[tuple[torch.Tensor, ...]] = []
    frames, times = [], []
    for kind, value in _decode_items(
        path, model=model, encoder=encoder, fps_sub=fps_sub, max_frames=max_frames,
        max_clips=max_clips, decoder=decoder, batch=8, state=state,
    ):
        if kind == "clip":
            clips.append(value)
            if len(clips) == clip_batch:
                clip_parts.append(_encode_clips(encoder, clips))
                clips = []
        else:
            times.append(value[0])
            frames.append(torch.from_numpy(value[1]))
    if clips:
        clip_parts.append(_encode_clips(encoder, clips))
    _check_decoded(path, state, frames, clip_parts if encoder is not None else None)
    features = tuple(f.cpu() for f in _join_clip_features(clip_parts)) if clip_parts else None
    return VideoInput(
        path=str(path),
        frames=torch.cat(frames),
        timestamps=np.concatenate(times),
        clip_features=features,
        decoder=state.decoder,
        duration=state.duration,
        frames_sampled=state.frames_sampled,
        frames_lost=state.frame_stats.lost,
        clips=len(features[0]) if features else 0,
    )


def score_videos(
    items: Iterable,
    model,
    encoder,
    *,
    normalisation: dict,
    fps_sub: float | None = None,
    max_frames: int | None = None,
    max_clips: int = 16,
    decoder: str = "auto",
    batch_size: int = 8,
    clip_batch: int = 4,
    per_frame: bool = False,
    timings: dict | None = None,
    maps=None,
) -> Iterator[dict[str, Any]]:
    """Score videos one after another with ``model`` and its clip ``encoder``; yields one row per
    item, in order.

    ``items``: paths or ``imageio.InputItem`` (whose ``error`` makes an error row). Row keys:
    ``path, score, raw_score, status, error, frames_sampled, frames_decoded, frames_lost, decoder,
    duration, clips, method, backbone, <model.clip_encoder_column>, seconds`` and, with
    ``per_frame``, ``per_frame``: [{"time": seconds, "score": reported score}] per decoded frame.
    ``timings`` (a dict) accumulates ``decode``, ``encoder`` (clip encoder), ``model`` (frame model and
    video score) and ``wall`` seconds
    (decoding overlaps the networks, so the parts can add up to more than the wall time).

    ``maps`` (a :class:`~diqa_cli.maps.writer.MapWriter`, ``diqa score-video --maps``): every
    scored frame of an ``ok`` video gets a quality map at the video's size
    (:func:`diqa_cli.maps.compute.video_quality_maps`, after the score), named by the frame's time;
    the row's ``map`` is the overlay of its worst frame (lowest frame score, highest where lower is
    better), and with ``per_frame`` each frame's entry names its own. The chosen frames are kept
    in memory for it.
    """
    context = {
        "method": model.method_name,
        "backbone": str(model.backbone.ref),
        model.clip_encoder_column: encoder.ref,
    }
    model.eval()
    totals = timings if timings is not None else {}
    for key in ("decode", "encoder", "model", "wall"):
        totals.setdefault(key, 0.0)
    for item in items:
        path = str(getattr(item, "path", item))
        error = getattr(item, "error", None)
        if error:
            yield error_row(path, error, **context)
            continue
        started = time.perf_counter()
        state = _Decoded()
        try:
            stream = _decode_items(
                path, model=model, encoder=encoder, fps_sub=fps_sub, max_frames=max_frames,
                max_clips=max_clips, decoder=decoder, batch=batch_size, state=state, keep_frames=maps is not None,
            )
            row = _score_stream(path, stream, model, encoder, state, normalisation, totals, clip_batch=clip_batch,
                                per_frame=per_frame, maps=maps)
        except InputError as exc:
            row = error_row(path, exc.reason, **context)
        except (UsageError, WeightsError, DecoderStartError):  # every video would fail the same way
            raise
        except Exception as exc:  # noqa: BLE001 - one video's failure must not stop the run
            row = error_row(path, failure_reason(exc), **context)
        totals["decode"] += state.decode_seconds
        seconds = time.perf_counter() - started
        totals["wall"] += seconds
        row.update(context, seconds=seconds)
        if state.decoder is not None and row["status"] == "error":
            row.update(decoder=state.decoder, duration=state.duration)
        yield row


def score_frames(
    frames: torch.Tensor,
    timestamps,
    model,
    encoder,
    *,
    normalisation: dict,
    fps_sub: float | None = None,
    max_frames: int | None = None,
    max_clips: int = 16,
    batch_size: int = 8,
    clip_batch: int = 4,
    per_frame: bool = False,
    path: str = "<frames>",
) -> dict[str, Any]:
    """The row of one video given as frames in memory: (T, 3, H, W) in [0, 1] at the native rate
    and their presentation ``timestamps`` (seconds). Frames and clips are chosen as for a file
    (``decoder`` in the row is ``"tensor"``); raises ``InputError`` when the model gives no finite score."""
    state = _Decoded()
    stream = _tensor_items(frames, timestamps, model=model, encoder=encoder, fps_sub=fps_sub, max_frames=max_frames,
                           max_clips=max_clips, batch=batch_size, state=state)
    context = {"method": model.method_name, "backbone": str(model.backbone.ref), model.clip_encoder_column: encoder.ref}
    row = _score_stream(path, stream, model, encoder, state, normalisation, {"encoder": 0.0, "model": 0.0},
                        clip_batch=clip_batch, per_frame=per_frame)
    return {**row, **context}


def _score_stream(path, stream, model, encoder, state, normalisation, totals, *, clip_batch,
                  per_frame, maps=None) -> dict[str, Any]:
    """Run the networks over a stream of ("clip", …) and ("frames", …) items (decoded a thread ahead)."""
    items = _background(stream)
    clips: list[np.ndarray] = []
    clip_parts: list[tuple[torch.Tensor, ...]] = []
    frame_parts, times = [], []
    kept_pixels, kept_frames = [], []  # for quality maps

    def encode_clips() -> None:
        began = time.perf_counter()
        clip_parts.append(_encode_clips(encoder, clips))
        clips.clear()
        totals["encoder"] += time.perf_counter() - began

    device, dtype = model.device, model.dtype
    with contextlib.closing(items), torch.no_grad():
        for kind, value in items:
            if kind == "clip":
                clips.append(value)
                if len(clips) == clip_batch:
                    encode_clips()
                continue
            if clips:
                encode_clips()
            began = time.perf_counter()
            frame_times, pixels, originals = value
            frame_parts.append(model.frame_features(torch.from_numpy(pixels).to(device, dtype)))
            times.extend(frame_times.tolist())
            if maps is not None:
                kept_pixels.append(torch.from_numpy(pixels))
                kept_frames.extend(originals)
            totals["model"] += time.perf_counter() - began
        if clips:
            encode_clips()
        _check_decoded(path, state, frame_parts, clip_parts)
        began = time.perf_counter()
        result = model.video_score(tree_cat(frame_parts), _join_clip_features(clip_parts))
        totals["model"] += time.perf_counter() - began
    raw = float(result.score)
    if not math.isfinite(raw):
        raise InputError(path, f"model returned a non-finite score ({raw})")
    row = {
        "path": path,
        "score": reported_score(raw, normalisation),
        "raw_score": raw,
        "status": "ok",
        "error": None,
        "frames_sampled": state.frames_sampled,
        "frames_decoded": state.frame_stats.decoded,
        "frames_lost": state.frame_stats.lost,
        "decoder": state.decoder,
        "duration": state.duration,
        "clips": sum(len(part[0]) for part in clip_parts),
    }
    if per_frame:
        frame_scores = result.frame_scores.cpu().tolist()
        row["per_frame"] = [{"time": t, "score": reported_score(s, normalisation)} for t, s in zip(times, frame_scores)]
    if maps is not None:
        began = time.perf_counter()
        clip_features = tuple(f.to(device) for f in _join_clip_features(clip_parts))
        _write_frame_maps(row, model, maps, torch.cat(kept_pixels).to(device, dtype), kept_frames, times,
                          clip_features, normalisation)
        totals["model"] += time.perf_counter() - began
    return row


def _write_frame_maps(row, model, writer, pixels, frames, times, clip_features, normalisation) -> None:
    """The quality maps of a scored video's frames (see :func:`score_videos`)."""
    import warnings

    from diqa_cli.errors import DiqaWarning, one_line
    from diqa_cli.maps.compute import resize_maps, video_quality_maps

    frame_scores, grids = video_quality_maps(model, pixels, clip_features)
    scores = [reported_score(s, normalisation) for s in frame_scores.float().cpu().tolist()]
    written = []
    try:
        for rgb, t, score, raw, grid in zip(frames, times, scores, frame_scores.tolist(), grids):
            full = resize_maps(grid[None], rgb.shape[:2])[0].cpu().numpy()
            written.append(writer.write(row["path"], rgb, full, score=score, raw_score=raw, time=t))
    except OSError as exc:
        warnings.warn(f"{row['path']}: quality maps not written: {type(exc).__name__}: {one_line(exc)}", DiqaWarning,
                      stacklevel=3)
        row["map"] = None
        return
    worst = max if model.spec.lower_better else min
    row["map"] = written[scores.index(worst(scores))]
    for entry, overlay in zip(row.get("per_frame") or [], written):
        entry["map"] = overlay
