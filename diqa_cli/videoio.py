"""Video inputs: which frames to read, decoded as a stream, and the clips SlowFast reads.

Torch-free (numpy, Pillow, PyAV and decord only).

Opening (:func:`open_video`)
  Every file is first opened by PyAV, which reads only the container header: that names the
  streams (an audio-only file, a still image or a text file is refused here with a one-line
  reason) and the duration the stream declares. Frames then come from decord, the fast path, when
  it is installed and reads the file; otherwise, and for what decord cannot read (AV1, damaged
  streams, containers it rejects), from PyAV. ``decoder`` on the reader names which one decoded:
  ``decord``, ``pyav``, or ``decord+pyav`` when decord failed part-way through a file and PyAV
  took over the remaining frames. Both apply the stream's display rotation.

Frame picking (:func:`pick_frames`), by presentation timestamp, never by frame index
  * ``fps_sub=N``: N frames per second of video. Sample times are 0, 1/N, 2/N, … seconds from the
    first frame, up to the duration; each takes the frame being shown at that time (the last frame
    whose timestamp is not after it), so a variable-frame-rate video is sampled evenly in time. A
    frame is taken at most once: a 10 fps video asked for 24 frames a second gives 10.
  * ``max_frames=M``: at most M frames, spread uniformly over the whole video. Alone, it places M
    sample times evenly from the first frame to the start of the last one (the released GenzVQA
    loaders' ``np.linspace`` over the frames, done in time). With ``fps_sub`` it keeps M of the
    N-per-second samples, evenly spaced.
  * A one-frame video gives that one frame, whatever is asked.
  * A stream whose frames end before the duration its header declares (a file cut short) has
    sample times with no frame to show: each counts as a lost frame.

Decoding (:meth:`VideoReader.frames`) is a stream: only the chosen frames are converted to RGB and
handed on, in chunks, in time order. decord reads them with ``get_batch`` a chunk of indices at a
time; PyAV walks the packets, decodes what it must, keeps only the chosen frames and seeks to the
keyframe before the next chosen frame when that skips decoding. A frame that does not decode is
skipped and counted in ``DecodeStats.lost``; the rest of the video goes on.

Clips for SlowFast (:func:`plan_clips`, :meth:`VideoReader.clips`)
  One clip of ``clip_len`` (32) consecutive frames at the native rate starting at each whole
  second of the video (at least one clip), as the VQA feature extractors take them (SimpleVQA's
  per-second SlowFast chunks; GenzVQA's own extraction code was not released), at most
  ``max_clips`` spread evenly. A clip running past the end repeats the last frame; a frame lost
  inside a clip is replaced by the nearest earlier decoded frame. Each frame is resized so its short
  side is ``size`` (bilinear), centre-cropped to ``size`` x ``size``, and normalised with the
  Kinetics mean and std; a clip is float32 (3, T, size, size).

Errors: missing, directory, empty, unreadable or non-video files, files without a video stream,
still images, and streams with no decodable frame raise ``InputError(path, reason)`` with a short
one-line reason.

Bounded allocations: frames a header declares over the pixel limit (``DIQA_MAX_PIXELS``, 100
megapixels) are refused before any frame is decoded; ffmpeg is held to the limit for every frame
it allocates later (a larger frame met mid-stream is lost, not allocated); a decode chunk holds at
most the limit's pixels; frame plans grow with the frames, never with the duration a header
declares; and a header declaring more frames than the file has bytes (or 10 million) is read
with PyAV, as decord sizes an index by that count before reading anything.

Decoding for a model (:func:`video_parts`, what ``pipelines/videos.py`` uses) runs in a decoder
process by default (``diqa_cli.decodepool``): a decoder that crashes, hangs or runs out of memory
costs only its video.
"""

from __future__ import annotations

import bisect
import math
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from diqa_cli.errors import InputError, UsageError

__all__ = [
    "DECODERS",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "VIDEO_EXTENSIONS",
    "DecodeReport",
    "DecodeStats",
    "FrameBatch",
    "FramePlan",
    "VideoFrames",
    "VideoReader",
    "VideoRequest",
    "decode_for_model",
    "model_pixels",
    "open_video",
    "pick_frames",
    "plan_clips",
    "normalise_clip",
    "read_frames",
    "resize_frame",
    "square_crop",
    "video_parts",
]

DECODERS = ("auto", "decord", "pyav")

# Extensions listed when a directory or pattern is walked for videos.
VIDEO_EXTENSIONS = frozenset(
    {
        ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".wmv", ".flv", ".mpg", ".mpeg", ".ts",
        ".m2ts", ".mts", ".3gp", ".ogv", ".y4m",
    }
)

# SlowFast's Kinetics training normalisation (pytorchvideo's model-zoo transforms).
KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)

# ffmpeg demuxers that open a file that is not a video: still images (image2 and the
# ``*_pipe`` image demuxers) and ANSI art, which ffmpeg's tty demuxer reads from text files.
_NOT_VIDEO_FORMATS = ("image2", "tty")

# Frames a header may declare before decord is not asked to index the file (about 250 MB of index).
_DECORD_MAX_DECLARED_FRAMES = 10_000_000

# ffmpeg's int options (max_pixels) stop here.
_FFMPEG_INT_MAX = 2**31 - 1

# Seconds of float noise ignored when matching sample times to frame timestamps (0.1 ms: far
# below any frame interval).
_TIME_TOLERANCE = 1e-4


# --------------------------------------------------------------------------- frame picking


@dataclass(frozen=True)
class FramePlan:
    """Which frames to read: ``indices`` into the reader's timeline (sorted, unique) and
    ``unreachable``, the sample times that fall after the last frame of a stream cut short."""

    indices: np.ndarray
    unreachable: int = 0

    @property
    def sampled(self) -> int:
        return len(self.indices) + self.unreachable


def pick_frames(
    timestamps: Sequence[float],
    *,
    duration: float,
    available: float | None = None,
    fps_sub: float | None = None,
    max_frames: int | None = None,
) -> FramePlan:
    """Choose frames by time (see the module docstring).

    ``timestamps``: start time of every frame in seconds, ascending, the first at 0.
    ``duration``: the video's duration. ``available``: for a stream cut short, the time its last
    frame stops showing; sample times from then on have no frame (``FramePlan.unreachable``).
    """
    times = np.asarray(timestamps, dtype=np.float64)
    if times.ndim != 1 or len(times) == 0:
        raise ValueError("pick_frames needs at least one frame timestamp")
    _check_sampling(fps_sub, max_frames)
    duration = max(float(duration), float(times[-1]))
    if fps_sub is not None:
        # The tolerance keeps 3.0 s at 4 fps at 12 samples despite float rounding.
        count = max(1, math.ceil(duration * fps_sub - 1e-6))
        if max_frames is None or count <= max_frames:
            return _every_sample(times, count, fps_sub, available)
        targets = np.round(np.linspace(0, count - 1, max_frames)) / fps_sub
    else:
        # Evenly from the first frame to the start of the last frame the stream declares.
        missing = duration - available if available is not None else 0.0
        targets = np.linspace(0.0, float(times[-1]) + max(0.0, missing), max_frames)
    reachable = targets < available if available is not None else np.ones(len(targets), dtype=bool)
    # Decoders give timestamps with float noise (decord: 0.10000000149 for 0.1 s); a frame that
    # starts within _TIME_TOLERANCE after a sample time is the one shown at it.
    chosen = np.searchsorted(times, targets[reachable] + _TIME_TOLERANCE, side="right") - 1
    return FramePlan(indices=np.unique(np.clip(chosen, 0, len(times) - 1)), unreachable=int((~reachable).sum()))


def _every_sample(times: np.ndarray, count: int, fps_sub: float, available: float | None) -> FramePlan:
    """``pick_frames`` for the ``count`` sample times k / fps_sub, found frame by frame instead of
    sample by sample: the same plan in memory that grows with the frames, not with the samples
    (a header may declare years of video). Sample times rise with k, so the samples that show
    frame i are those from the first one at or after its start, if that one is before the next
    frame's start."""
    reachable = count if available is None else min(count, int(_first_sample(np.array([available]), fps_sub, 0.0)[0]))
    first = _first_sample(times, fps_sub, _TIME_TOLERANCE)
    chosen = first < reachable
    chosen[:-1] &= first[:-1] / fps_sub + _TIME_TOLERANCE < times[1:]
    if reachable and times[0] > _TIME_TOLERANCE:  # samples before the first frame show the first frame
        chosen[0] = True
    return FramePlan(indices=np.flatnonzero(chosen), unreachable=count - reachable)


def _first_sample(starts: np.ndarray, rate: float, tolerance: float) -> np.ndarray:
    """For each start, the smallest k >= 0 whose sample time k / rate (+ ``tolerance``, as float
    arithmetic gives it) is at or after it: estimated, then stepped until exact."""
    k = np.maximum(np.ceil((starts - tolerance) * rate), 0.0)
    for _ in range(8):  # the estimate is off by a rounding step or two
        lower = (k > 0) & ((k - 1) / rate + tolerance >= starts)
        higher = k / rate + tolerance < starts
        if not (lower.any() or higher.any()):
            break
        k = k - lower + higher
    return k


def _check_sampling(fps_sub: float | None, max_frames: int | None) -> None:
    if fps_sub is None and max_frames is None:
        raise UsageError("choose frames with fps_sub (frames per second) and/or max_frames (a count)")
    if fps_sub is not None and not (math.isfinite(fps_sub) and fps_sub > 0):
        raise UsageError(f"--fps-sub must be a positive number of frames per second, got {fps_sub}")
    if max_frames is not None and max_frames < 1:
        raise UsageError(f"--max-frames must be at least 1, got {max_frames}")


def plan_clips(
    timestamps: Sequence[float], *, end: float, clip_len: int = 32, max_clips: int = 16
) -> list[np.ndarray]:
    """Frame indices of the SlowFast clips: one clip of ``clip_len`` consecutive frames from each
    whole second of the video (at least one), at most ``max_clips`` spread evenly; indices past
    the last frame repeat it."""
    times = np.asarray(timestamps, dtype=np.float64)
    if clip_len < 1 or max_clips < 1:
        raise UsageError(f"clips need clip_len and max_clips of at least 1 (got {clip_len}, {max_clips})")
    seconds = max(1, math.floor(max(float(end), float(times[-1])) + 1e-6))
    # The seconds are chosen before they are looked up: a header may declare years of video.
    chosen = np.arange(seconds, dtype=np.float64) if seconds <= max_clips else np.round(np.linspace(0, seconds - 1, max_clips))
    starts = np.searchsorted(times, chosen + _TIME_TOLERANCE, side="right") - 1
    last = len(times) - 1
    return [np.minimum(np.arange(start, start + clip_len), last) for start in np.clip(starts, 0, last)]


# --------------------------------------------------------------------------- results


@dataclass
class DecodeStats:
    """What one read asked for and what came back (``lost`` = requested frames that did not decode)."""

    requested: int = 0
    decoded: int = 0

    @property
    def lost(self) -> int:
        return self.requested - self.decoded


@dataclass(frozen=True)
class FrameBatch:
    """Decoded frames in time order: uint8 RGB arrays (H, W, 3) with their indices and times."""

    indices: np.ndarray
    timestamps: np.ndarray
    frames: list[np.ndarray]


@dataclass
class VideoFrames:
    """The chosen frames of one video, with what a row reports about it.

    ``frames``: uint8 (F, H, W, 3), or float32 (F, 3, R, R) in [0, 1] when read at a resolution.
    ``frames_sampled`` = frames decoded (``len(frames)``) + ``frames_lost``.
    """

    path: str
    frames: np.ndarray
    timestamps: np.ndarray  # seconds from the first frame of the video
    indices: np.ndarray
    fps: float  # average frame rate (frames over their span)
    duration: float  # seconds
    decoder: str
    frames_lost: int
    frames_sampled: int
    details: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- decoders


def _ffmpeg_reason(exc: BaseException) -> str:
    """ffmpeg's message without the errno and the repeated file name."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(exc).__name__


def _frame_rgb(frame) -> np.ndarray:
    """One PyAV frame as upright uint8 RGB (H, W, 3): the display rotation applied, as decord and
    the ffmpeg command line (which the released loaders call through scikit-video) apply it."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = (int(getattr(frame, "rotation", 0) or 0) // 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


class _PyAVStream:
    """A video stream read with PyAV: its frame timeline from one demux pass (no decoding), then
    chosen frames decoded on request."""

    name = "pyav"

    def __init__(self, path: str, header, max_pixels: int):
        self.path = path
        self.stream_index = header.stream_index
        self.time_base = header.time_base
        self.max_pixels = max_pixels
        self.seekable = True  # until a seek fails
        self._container = None
        entries = []  # (timestamp, keyframe, duration) per packet, in decode order
        container, stream = self._open()
        import av

        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError:  # damaged beyond this point: the timeline ends here
                break
            if packet.size == 0:  # the flush packet at the end of the stream
                continue
            stamp = packet.pts if packet.pts is not None else packet.dts
            entries.append((stamp, bool(packet.is_keyframe), int(packet.duration or 0)))
        if not entries:
            raise InputError(path, "the video stream holds no frames")
        self.has_pts = all(stamp is not None for stamp, _, _ in entries)
        if self.has_pts:
            order = sorted(range(len(entries)), key=lambda i: entries[i][0])
            self.pts = np.array([entries[i][0] for i in order], dtype=np.int64)
            keep = np.concatenate([[True], np.diff(self.pts) > 0])  # a repeated stamp is one frame
            self.pts = self.pts[keep]
            keys = [entries[i][0] for i in order if entries[i][1]]
            self.keyframes = np.array(sorted(set(keys)), dtype=np.int64)
            last = entries[order[-1]][2]
            self.timestamps = (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)
            spacing = float(np.median(np.diff(self.timestamps))) if len(self.pts) > 1 else 0.0
            last_duration = last * float(self.time_base) if last > 0 else spacing or header.frame_interval
        else:
            # No timestamps in the container (raw elementary streams): frames in output order at
            # the nominal rate, and no seeking (nothing to seek by).
            self.pts = np.arange(len(entries), dtype=np.int64)
            self.keyframes = np.zeros(1, dtype=np.int64)
            self.timestamps = self.pts.astype(np.float64) * header.frame_interval
            last_duration = header.frame_interval
        self.end = float(self.timestamps[-1] + last_duration)

    def _open(self):
        import av

        if self._container is not None:
            self._container.close()
        self._container = av.open(self.path, metadata_errors="ignore")
        stream = self._container.streams[self.stream_index]
        stream.thread_type = "AUTO"
        # ffmpeg checks every frame buffer it allocates against this (a size change mid-stream
        # included): a frame over diqa's pixel limit fails to decode instead of being allocated.
        stream.codec_context.options = {"max_pixels": str(min(self.max_pixels, _FFMPEG_INT_MAX))}
        return self._container, stream

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def _decoded(self, seek_pts: int | None) -> Iterator:
        """Frames from the start (a fresh open) or from the keyframe at or before ``seek_pts``."""
        import av

        if seek_pts is None or self._container is None:
            container, stream = self._open()
        else:
            container, stream = self._container, self._container.streams[self.stream_index]
        if seek_pts is not None:
            try:
                container.seek(int(seek_pts), stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError:  # a damaged index: from the start, and no more seeking
                self.seekable = False
                container, stream = self._open()
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.error.FFmpegError:
                return
            try:
                frames = packet.decode()
            except av.error.FFmpegError:  # a damaged packet: its frame is lost, the next may decode
                continue
            yield from frames

    def decode(self, indices: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(index, rgb) for each of ``indices`` (sorted) that decodes, in order."""
        wanted = self.pts[indices]
        pos, count = 0, len(indices)
        seekable = self.has_pts and len(self.keyframes) > 0  # damage can leave no packet marked key
        frames, check = self._decoded(None), None
        # Each seek goes to a later keyframe than the last one: a seek that lands before its
        # keyframe (some demuxers seek coarsely) decodes on from there instead of seeking again.
        jumped = -math.inf
        while pos < count:
            jump = None
            for output, frame in enumerate(frames):
                stamp = frame.pts if self.has_pts else output
                if stamp is None:
                    continue
                if check is not None:
                    landed_late, check = stamp > check, None
                    if landed_late:  # the seek overshot: read this file from the start instead
                        seekable, jump = False, -1
                        break
                while pos < count and wanted[pos] < stamp:  # passed without decoding: lost
                    pos += 1
                if pos < count and wanted[pos] == stamp:
                    yield int(indices[pos]), _frame_rgb(frame)
                    pos += 1
                if pos >= count:
                    return
                if seekable and self.seekable:
                    key = self.keyframes[max(0, np.searchsorted(self.keyframes, wanted[pos], side="right") - 1)]
                    if key > max(stamp, jumped):  # the next chosen frame starts a later group: skip to it
                        jump = jumped = int(key)
                        break
            else:
                return  # the stream ended; the rest did not decode
            if jump == -1:
                frames = self._decoded(None)
            else:
                frames, check = self._decoded(jump), int(wanted[pos])


class _DecordStream:
    """A video read with decord: its own frame index and random access with ``get_batch``."""

    name = "decord"

    def __init__(self, path: str, header):
        import decord

        decord.logging.set_level(decord.logging.QUIET)
        self.reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
        count = len(self.reader)
        if count == 0:
            raise RuntimeError("decord found no frames")
        spans = np.asarray(self.reader.get_frame_timestamp(np.arange(count)), dtype=np.float64)
        # decord gives a frame without a timestamp (MPEG program and transport streams stamp only
        # some) ffmpeg's "no value", INT64_MIN ticks; PyAV's timeline orders such frames itself.
        missing = float(-(2**63) * header.time_base) if header.time_base else -math.inf
        if not np.isfinite(spans).all() or np.isclose(spans[:, 0], missing, rtol=1e-3).any():
            raise RuntimeError("decord gives some frames no timestamp")
        if np.any(np.diff(spans[:, 0]) < 0):
            raise RuntimeError("decord's frame timestamps go backwards")
        self.timestamps = spans[:, 0] - spans[0, 0]
        self.end = float(max(spans[-1, 1], spans[-1, 0]) - spans[0, 0])

    def get_batch(self, indices: Sequence[int]) -> np.ndarray:
        return self.reader.get_batch([int(i) for i in indices]).asnumpy()

    def close(self) -> None:
        self.reader = None


@dataclass(frozen=True)
class _Header:
    stream_index: int
    time_base: object
    declared_duration: float | None
    frame_interval: float  # 1 / the stream's nominal rate (0 when unknown)
    codec: str
    width: int
    height: int
    # The most frames the header declares (its frame count, or its durations times its rates), and
    # the file's size
    declared_frames: float
    file_bytes: int


def _read_header(path: str) -> _Header:
    """Open with PyAV (header only) and find the video stream, or explain why there is none."""
    import av

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(path, "is a directory, not a video")
    if st.st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise InputError(path, f"not a readable video: truncated, damaged or not a video file ({_ffmpeg_reason(exc)})") from None
    except OSError as exc:
        raise InputError(path, f"cannot be read ({exc.strerror or exc})") from None
    with container:
        fmt = container.format.name
        if fmt in _NOT_VIDEO_FORMATS or fmt.endswith("_pipe"):
            kind = "text" if fmt == "tty" else "a still image"
            raise InputError(path, f"{kind} ({fmt}), not a video; images are scored with `diqa score`")
        attached = av.stream.Disposition.attached_pic
        videos = [s for s in container.streams.video if not (s.disposition & attached)]
        if not videos:
            kinds = sorted({s.type for s in container.streams} - {"video"})
            cover = " and cover art" if container.streams.video else ""
            found = f" (only {', '.join(kinds)}{cover})" if kinds else ""
            raise InputError(path, f"no video stream{found}")
        # A stream whose codec ffmpeg does not know (or whose header names none) has no context.
        known = [s for s in videos if s.codec_context is not None]
        if not known:
            raise InputError(path, "no decoder for its video stream: an unknown codec or a damaged header")
        stream = known[0]
        declared = None
        if stream.duration is not None and stream.time_base:
            declared = float(stream.duration * stream.time_base)
        elif container.duration is not None and len(container.streams) == 1:
            declared = container.duration / 1_000_000  # av.time_base: microseconds
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        durations = [declared or 0.0, (container.duration or 0) / 1_000_000]
        rates = [float(r) for r in (stream.average_rate, stream.guessed_rate, stream.base_rate) if r]
        return _Header(
            stream_index=stream.index,
            time_base=stream.time_base,
            declared_duration=declared,
            frame_interval=1.0 / float(rate) if rate else 0.0,
            codec=stream.codec_context.name,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            declared_frames=max(max(durations) * max(rates, default=0.0), float(stream.frames or 0)),
            file_bytes=st.st_size,
        )


# --------------------------------------------------------------------------- the reader


class VideoReader:
    """One open video: its frame timeline read up front, frames decoded on request.

    Attributes: ``path``, ``timestamps`` (seconds from the first frame, ascending), ``end`` (when
    the last frame stops showing), ``duration`` (the longer of ``end`` and the declared duration),
    ``fps`` (frames over their span), ``codec``, ``decoder`` (see the module docstring) and
    ``fallback`` (why PyAV decoded instead of decord, or None). Use as a context manager.

    ``max_pixels`` (default: ``imageio.max_pixels_limit()``, 100 megapixels or
    ``$DIQA_MAX_PIXELS``) bounds what a frame may allocate: a stream whose header declares larger
    frames is refused before any frame is decoded, ffmpeg refuses to allocate a larger frame met
    later in the stream (that frame is lost), and frames are decoded in batches of at most that
    many pixels in all.
    """

    def __init__(self, path: str, *, decoder: str = "auto", max_pixels: int | None = None):
        from diqa_cli.imageio import _too_many_pixels, max_pixels_limit

        if decoder not in DECODERS:
            raise UsageError(f"--decoder {decoder!r} is not one of {', '.join(DECODERS)}")
        self.path = str(path)
        self.max_pixels = max_pixels_limit(max_pixels)
        self._header = _read_header(self.path)
        width, height = self._header.width, self._header.height
        if width * height > self.max_pixels:
            raise InputError(self.path, _too_many_pixels(f"frames of {width}x{height} = {width * height} exceed the "
                                                         f"limit of {self.max_pixels}"))
        self.codec = self._header.codec
        self.fallback: str | None = None
        self._used: list[str] = []
        self._source: _DecordStream | _PyAVStream
        frames = self._header.declared_frames
        if decoder in ("auto", "decord") and frames > min(self._header.file_bytes, _DECORD_MAX_DECLARED_FRAMES):
            # decord sizes an index by the header's frame count (or duration times rate), some 25
            # bytes a frame, before it reads a packet: a header declaring years of video made it
            # allocate gigabytes and abort (std::bad_alloc), which no Python code can catch. No
            # frame takes less than a byte of the file.
            reason = f"its header declares {frames:.3g} frames, more than decord can be trusted to index"
            if decoder == "decord":
                raise InputError(self.path, f"decord cannot read it ({reason}); use --decoder pyav")
            self.fallback = reason
            self._source = _PyAVStream(self.path, self._header, self.max_pixels)
        elif decoder in ("auto", "decord"):
            try:
                self._source = _DecordStream(self.path, self._header)
            except ImportError:
                if decoder == "decord":
                    raise UsageError("--decoder decord: decord is not installed on this platform; use --decoder pyav") from None
                self.fallback = "decord is not installed"
                self._source = _PyAVStream(self.path, self._header, self.max_pixels)
            except Exception as exc:  # noqa: BLE001 - decord raises its own error types and RuntimeError
                if decoder == "decord":
                    raise InputError(self.path, f"decord cannot read it ({_ffmpeg_reason(exc)[:160]})") from None
                self.fallback = f"decord cannot read it ({_short_decord_reason(exc)})"
                self._source = _PyAVStream(self.path, self._header, self.max_pixels)
        else:
            self._source = _PyAVStream(self.path, self._header, self.max_pixels)
        self.timestamps = self._source.timestamps
        self.end = self._source.end
        declared = self._header.declared_duration
        # The header's duration is the video's unless the frames clearly outlast it; only a clearly
        # longer one means frames are missing (decoders and headers round the last frame a little).
        slack = max(self._header.frame_interval, 0.05)
        self.duration = declared if declared is not None and declared >= self.end - slack else self.end
        self.cut_short = self.duration > self.end + slack
        self.fps = len(self.timestamps) / self.end if self.end > 0 else 0.0

    @property
    def frame_count(self) -> int:
        return len(self.timestamps)

    @property
    def decoder(self) -> str:
        """Which decoder produced frames so far (the one open when nothing was read yet)."""
        return "+".join(self._used) if self._used else self._source.name

    def plan(self, *, fps_sub: float | None = None, max_frames: int | None = None) -> FramePlan:
        return pick_frames(
            self.timestamps,
            duration=self.duration,
            available=self.end if self.cut_short else None,
            fps_sub=fps_sub,
            max_frames=max_frames,
        )

    def clip_plan(self, *, clip_len: int = 32, max_clips: int = 16) -> list[np.ndarray]:
        return plan_clips(self.timestamps, end=self.end, clip_len=clip_len, max_clips=max_clips)

    # --- decoding ------------------------------------------------------------------------------
    def _mark(self, name: str) -> None:
        if name not in self._used:
            self._used.append(name)

    def _switch_to_pyav(self, reason: str, pending: np.ndarray) -> np.ndarray:
        """decord failed part-way: PyAV takes over; decord's frame indices are mapped to PyAV's by
        timestamp (within half a frame), and those with no match stay unread (lost)."""
        self.fallback = f"decord failed part-way ({reason})"
        old = self.timestamps
        self._source.close()
        self._source = _PyAVStream(self.path, self._header, self.max_pixels)
        new = self._source.timestamps
        spacing = float(np.median(np.diff(new))) if len(new) > 1 else max(self.end, 1e-3)
        nearest = np.clip(np.searchsorted(new, old[pending]), 0, len(new) - 1)
        earlier = np.clip(nearest - 1, 0, len(new) - 1)
        better = np.abs(new[earlier] - old[pending]) < np.abs(new[nearest] - old[pending])
        nearest = np.where(better, earlier, nearest)
        close = np.abs(new[nearest] - old[pending]) <= spacing / 2
        # From here on the reader's timeline is PyAV's.
        self.timestamps, self.end = new, self._source.end
        return np.unique(nearest[close])

    def frames(self, indices, *, batch: int = 8, stats: DecodeStats | None = None) -> Iterator[FrameBatch]:
        """Decode ``indices`` (frame indices of this reader's timeline) in chunks of ``batch``, in
        time order; frames that do not decode are skipped and counted in ``stats``. A chunk holds
        at most ``max_pixels`` pixels of frames (fewer than ``batch`` frames when they are huge)."""
        indices = np.unique(np.asarray(indices, dtype=np.int64))
        stats = stats if stats is not None else DecodeStats()
        stats.requested += len(indices)
        if batch < 1:
            raise UsageError(f"batch must be at least 1, got {batch}")
        # decord's get_batch allocates a whole chunk as one array, PyAV's chunk is a list of frames.
        batch = max(1, min(batch, self.max_pixels // max(1, self._header.width * self._header.height)))
        pending = indices
        if isinstance(self._source, _DecordStream):
            while len(pending):
                chunk = pending[:batch]
                try:
                    arrays = self._source.get_batch(chunk)
                except Exception as exc:  # noqa: BLE001 - damaged data surfaces as decord errors
                    pending = self._switch_to_pyav(_short_decord_reason(exc), pending)
                    break
                self._mark("decord")
                stats.decoded += len(chunk)
                yield FrameBatch(chunk, self.timestamps[chunk], list(arrays))
                pending = pending[batch:]
            else:
                return
        group: list[tuple[int, np.ndarray]] = []
        for index, rgb in self._source.decode(pending):
            self._mark("pyav")
            group.append((index, rgb))
            if len(group) == batch:
                stats.decoded += len(group)
                yield self._batch(group)
                group = []
        if group:
            stats.decoded += len(group)
            yield self._batch(group)

    def _batch(self, group: list[tuple[int, np.ndarray]]) -> FrameBatch:
        index = np.array([i for i, _ in group], dtype=np.int64)
        return FrameBatch(index, self.timestamps[index], [rgb for _, rgb in group])

    def clips(
        self,
        plan: list[np.ndarray],
        *,
        size: int = 224,
        mean: Sequence[float] = KINETICS_MEAN,
        std: Sequence[float] = KINETICS_STD,
        stats: DecodeStats | None = None,
    ) -> Iterator[np.ndarray]:
        """The clips of ``plan`` (from :meth:`clip_plan`) as float32 (3, T, size, size), decoded
        once each frame however many clips share it; a clip with no decodable frame is skipped."""
        for crops in self.clip_crops(plan, size=size, stats=stats):
            yield normalise_clip(crops, mean, std)

    def clip_crops(self, plan: list[np.ndarray], *, size: int = 224, stats: DecodeStats | None = None
                   ) -> Iterator[np.ndarray]:
        """:meth:`clips` before normalisation: each clip's square crops, uint8 (T, size, size, 3)
        (a quarter of the float clip's bytes, which is what a decoder process sends back)."""
        if not plan:
            return
        needed = np.unique(np.concatenate(plan))
        # Frames are matched by time, not index: should decord fail part-way, PyAV's frames (with
        # its own indices) still land in the right clips.
        spacing = float(np.median(np.diff(self.timestamps))) if len(self.timestamps) > 1 else 1.0
        tolerance = max(spacing / 2, 1e-4)
        todo = [self.timestamps[clip] for clip in plan]
        times: list[float] = []  # sorted times of the cached frames
        cache: dict[float, np.ndarray] = {}

        def lookup(t: float) -> np.ndarray | None:
            at = bisect.bisect_left(times, t - tolerance)
            return cache[times[at]] if at < len(times) and times[at] <= t + tolerance else None

        def finish(clip_times: np.ndarray) -> np.ndarray | None:
            found = [lookup(float(t)) for t in clip_times]
            if all(frame is None for frame in found):
                return None
            # A lost frame repeats the nearest earlier decoded one (the first decoded, at the start).
            last = next(frame for frame in found if frame is not None)
            frames = []
            for frame in found:
                last = frame if frame is not None else last
                frames.append(last)
            return np.stack(frames)

        def evict() -> None:
            first = float(todo[0].min()) - tolerance if todo else math.inf
            while times and times[0] < first:
                del cache[times.pop(0)]

        # One clip's worth of frames per decode chunk keeps memory bounded.
        for frames in self.frames(needed, batch=max(len(c) for c in plan), stats=stats):
            for t, rgb in zip(frames.timestamps.tolist(), frames.frames):
                if t not in cache:  # a damaged stream can give two frames one time: the later one stays
                    bisect.insort(times, t)
                cache[t] = square_crop(rgb, size)
            seen = float(frames.timestamps[-1]) + tolerance
            while todo and float(todo[0].max()) <= seen:
                clip = finish(todo.pop(0))
                evict()
                if clip is not None:
                    yield clip
        while todo:  # the stream ended early: what decoded of the remaining clips
            clip = finish(todo.pop(0))
            if clip is not None:
                yield clip

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short_decord_reason(exc: BaseException) -> str:
    """decord's errors carry a source location and a C++ backtrace; keep the message only."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for marker in ("ERROR ", "Error: ", "Check failed: "):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    return text[:160]


def normalise_clip(frames: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Square uint8 RGB frames (S, S, 3) of one clip -> float32 (3, T, S, S), normalised."""
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(3, 1, 1, 1)
    clip = np.stack(frames).astype(np.float32).transpose(3, 0, 1, 2) / 255.0
    return (clip - mean_arr) / std_arr


def square_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """Short side to ``size`` (bilinear), then the centre ``size`` x ``size`` square (uint8)."""
    height, width = rgb.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    image = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def resize_frame(rgb: np.ndarray, resolution: int, *, resample: str = "bicubic") -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (3, R, R) in [0, 1], aspect ratio ignored: the same exact
    8-bit path as images (``imageio.resize_for_model``), bit-equal to the released
    ``Resize((R, R))`` + ``ToTensor()`` on the frame as a PIL image."""
    from diqa_cli.imageio import resize_for_model

    if rgb.dtype != np.uint8:
        raise ValueError(f"resize_frame takes the decoder's uint8 RGB frames, got {rgb.dtype}")
    return resize_for_model(rgb, resolution, resample=resample)


def open_video(path: str, *, decoder: str = "auto", max_pixels: int | None = None) -> VideoReader:
    """Open ``path`` for reading (see :class:`VideoReader`); raises ``InputError`` for a bad input."""
    return VideoReader(path, decoder=decoder, max_pixels=max_pixels)


def read_frames(
    path: str,
    *,
    fps_sub: float | None = None,
    max_frames: int | None = None,
    resolution: int | None = None,
    resample: str = "bicubic",
    decoder: str = "auto",
    batch: int = 8,
) -> VideoFrames:
    """The chosen frames of one video in memory (only those; the video is streamed), every frame
    when neither ``fps_sub`` nor ``max_frames`` is given: uint8 (F, H, W, 3), or float32
    (F, 3, R, R) in [0, 1] resized to ``resolution``. Raises ``InputError`` when no chosen frame
    decodes."""
    with open_video(path, decoder=decoder) as reader:
        if fps_sub is None and max_frames is None:
            plan = FramePlan(indices=np.arange(reader.frame_count))
        else:
            plan = reader.plan(fps_sub=fps_sub, max_frames=max_frames)
        stats = DecodeStats()
        frames, times, indices = [], [], []
        for chunk in reader.frames(plan.indices, batch=batch, stats=stats):
            for rgb in chunk.frames:
                frames.append(rgb if resolution is None else resize_frame(rgb, resolution, resample=resample))
            times.extend(chunk.timestamps.tolist())
            indices.extend(chunk.indices.tolist())
        if not frames:
            raise InputError(path, f"none of the {plan.sampled} chosen frames could be decoded")
        if len({f.shape for f in frames}) > 1:
            raise InputError(path, "the frame size changes within the stream; read it at a fixed resolution")
        return VideoFrames(
            path=str(path),
            frames=np.stack(frames),
            timestamps=np.asarray(times),
            indices=np.asarray(indices, dtype=np.int64),
            fps=reader.fps,
            duration=reader.duration,
            decoder=reader.decoder,
            frames_lost=stats.lost + plan.unreachable,
            frames_sampled=plan.sampled,
            details={"codec": reader.codec, "frame_count": reader.frame_count, "fallback": reader.fallback},
        )


# --------------------------------------------------------------------------- decoding for a model


@dataclass(frozen=True)
class VideoRequest:
    """What a video model needs decoded from one video: the chosen frames (``fps_sub`` and/or
    ``max_frames``, see :func:`pick_frames`) resized to ``resolution`` with ``resample``, in
    batches of ``batch``; with ``clip_len``, first the clip encoder's clips (:meth:`VideoReader.clip_crops`,
    at most ``max_clips`` of ``crop_size``); with ``keep_frames``, the chosen frames at full size
    too (quality maps). Plain numbers and strings: it travels to a decoder process as JSON."""

    resolution: int
    max_frames: int | None = None
    fps_sub: float | None = None
    resample: str = "bicubic"
    batch: int = 8
    decoder: str = "auto"
    clip_len: int | None = None
    max_clips: int = 16
    crop_size: int = 224
    keep_frames: bool = False
    max_pixels: int | None = None

    def __post_init__(self):
        from diqa_cli.imageio import _resample_filter, max_pixels_limit

        _check_sampling(self.fps_sub, self.max_frames)
        _resample_filter(self.resample)
        if self.decoder not in DECODERS:
            raise UsageError(f"--decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if min(self.resolution, self.batch, self.max_clips, self.crop_size, self.clip_len or 1) < 1:
            raise UsageError("resolution, batch, clip_len, max_clips and crop_size must be at least 1")
        object.__setattr__(self, "max_pixels", max_pixels_limit(self.max_pixels))


@dataclass
class DecodeReport:
    """What decoding one video found, filled in as it goes (:func:`decode_for_model`'s ``state``):
    the decoder that read it, the duration, the frames sampled, and the chosen frames' and the
    clips' :class:`DecodeStats`. ``decoder`` stays None until the video opens."""

    decoder: str | None = None
    duration: float | None = None
    frames_sampled: int = 0
    frame_stats: DecodeStats = field(default_factory=DecodeStats)
    clip_stats: DecodeStats = field(default_factory=DecodeStats)


def decode_for_model(path: str, request: VideoRequest, state) -> Iterator[tuple[str, object]]:
    """Decode one video for a model, in this process, as a stream of parts in this order:

    * ``("open", planned)``: the video opened; ``planned`` frames are to be decoded (the chosen
      frames plus the clips' distinct frames), which sets a decoder process's time limit;
    * ``("clip", crops)`` for each clip: uint8 (T, S, S, 3), as :meth:`VideoReader.clip_crops`;
    * ``("frames", (timestamps, resized, originals))`` in batches of ``request.batch``: float64
      times (b,), uint8 (b, R, R, 3) resized as ``imageio.resize_for_model`` resizes 8-bit images
      (``model_pixels`` makes them the model's floats), and the uint8 full-size frames with
      ``keep_frames`` (else None).

    ``state`` (a :class:`DecodeReport`, or any object with its attributes) is filled in as the
    stream goes. Raises ``InputError`` for a video that cannot be opened.
    """
    from diqa_cli.imageio import _resample_filter, _resize_8bit

    method = _resample_filter(request.resample)
    reader = open_video(path, decoder=request.decoder, max_pixels=request.max_pixels)
    state.decoder, state.duration = reader.decoder, reader.duration
    state.clip_stats, state.frame_stats = DecodeStats(), DecodeStats()
    try:
        sampling = {"fps_sub": request.fps_sub, "max_frames": request.max_frames}
        clip_plan = reader.clip_plan(clip_len=request.clip_len, max_clips=request.max_clips) if request.clip_len else []
        planned = len(np.unique(np.concatenate(clip_plan))) if clip_plan else 0
        yield "open", planned + len(reader.plan(**sampling).indices)
        for crops in reader.clip_crops(clip_plan, size=request.crop_size, stats=state.clip_stats):
            yield "clip", crops
        # Planned after the clips: should decord have failed on them, PyAV's timeline is the one.
        plan = reader.plan(**sampling)
        state.frames_sampled = plan.sampled
        state.frame_stats.requested += plan.unreachable  # sample times past a cut-short end: lost
        times: list[float] = []
        resized: list[np.ndarray] = []
        originals: list[np.ndarray] = []
        # The reader's chunks may be smaller than a batch (huge frames); the model's batches are not.
        for chunk in reader.frames(plan.indices, batch=request.batch, stats=state.frame_stats):
            for t, rgb in zip(chunk.timestamps.tolist(), chunk.frames):
                times.append(t)
                resized.append(_resize_8bit(rgb, request.resolution, method))
                if request.keep_frames:
                    originals.append(rgb)
                if len(times) == request.batch:
                    yield "frames", (np.asarray(times), np.stack(resized), originals if request.keep_frames else None)
                    times, resized, originals = [], [], []
        if times:
            yield "frames", (np.asarray(times), np.stack(resized), originals if request.keep_frames else None)
    finally:
        state.decoder = reader.decoder  # "decord+pyav" when PyAV took over part-way
        reader.close()


def model_pixels(resized: np.ndarray) -> np.ndarray:
    """uint8 (b, R, R, 3) -> the model's float32 (b, 3, R, R) in [0, 1], bit-equal to
    :func:`resize_frame` on each frame (``ToTensor()``'s float32 division by 255)."""
    out = np.ascontiguousarray(resized.transpose(0, 3, 1, 2), dtype=np.float32)
    out /= np.float32(255)
    return out


def video_parts(
    path: str,
    request: VideoRequest,
    state,
    *,
    isolation: str | None = None,
    memory_mb: int | None = None,
    timeout_s: float | None = None,
    frame_timeout_s: float | None = None,
) -> Iterator[tuple[str, object]]:
    """:func:`decode_for_model`'s parts, decoded as ``isolation`` says (default
    ``$DIQA_DECODE_ISOLATION``, else "process"): "process" decodes in a decoder process under a
    memory ceiling and a time limit (``diqa_cli.decodepool``), so a decoder that crashes, hangs or
    runs out of memory costs only this video (``InputError`` with the reason); "thread" decodes
    in the calling thread, without those limits. The parts and ``state`` are the same either way.
    """
    from diqa_cli import decodepool

    if decodepool.isolation_mode(isolation) == "thread":
        return decode_for_model(path, request, state)
    if request.decoder == "decord":
        import importlib.util

        if importlib.util.find_spec("decord") is None:
            raise UsageError("--decoder decord: decord is not installed on this platform; use --decoder pyav")
    limits = decodepool.decode_limits(memory_mb, timeout_s, frame_timeout_s, max_pixels=request.max_pixels)
    return decodepool.decode_video_in_processes(path, request, state, limits=limits)
