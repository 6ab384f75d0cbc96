"""Video decoding in decoder processes (diqa_cli.decodepool through videoio.video_parts): a video
whose decoder crashes, hangs, runs out of memory, answers garbage or chatters on stderr costs only
that video. Every file is made here in tmp_path."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from diqa_cli import decodepool, videoio
from diqa_cli.errors import InputError, UsageError
from diqa_cli.videoio import DecodeReport, VideoRequest, video_parts
from test_videoio import encode

# Run in each worker before it serves: videos whose name says so make the decoder misbehave the way
# a broken codec would, once the video has opened (the parent then knows its decoder and plan).
MISBEHAVING_DECODER = """
import os, signal, time
from diqa_cli import decodepool, videoio
_decode = videoio.decode_for_model
def _misbehaving(path, request, state):
    parts = _decode(path, request, state)
    yield next(parts)
    name = os.path.basename(path)
    if name.startswith("segv"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hang"):
        time.sleep(600)
    if name.startswith("hog"):
        hog = bytearray(8 << 30)
    if name.startswith("lies"):  # a clip that is not the size asked for
        yield "clip", __import__("numpy").zeros((1, 1, 1, 3), "uint8")
    if name.startswith("huge"):  # a header announcing 4 GB of arrays
        decodepool._answer_part = lambda status, meta, arrays: [decodepool._ANSWER.pack(3, 0, 2, 2**32 - 1, 1)]
    yield from parts
videoio.decode_for_model = _misbehaving
"""

REQUEST = VideoRequest(resolution=16, max_frames=4, batch=3, clip_len=8, max_clips=2, crop_size=12)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(encode(tmp_path_factory.mktemp("pool") / "a.mp4", "libx264", noise=True))


@pytest.fixture
def misbehaving(monkeypatch):
    monkeypatch.setattr(decodepool, "_worker_prelude", MISBEHAVING_DECODER)


def decode(path, request=REQUEST, **limits):
    """(parts, state, reason): everything a video gave before it ended or failed."""
    state, parts = DecodeReport(), []
    try:
        for part in video_parts(str(path), request, state, **limits):
            parts.append(part)
    except InputError as exc:
        return parts, state, exc.reason
    return parts, state, None


def copy(video, folder, name):
    path = folder / name
    path.write_bytes(open(video, "rb").read())
    return path


def assert_same_parts(a, b):
    assert [kind for kind, _ in a] == [kind for kind, _ in b]
    for (kind, x), (_, y) in zip(a, b):
        if kind == "open":
            assert x == y
        elif kind == "clip":
            assert x.dtype == y.dtype == np.uint8 and np.array_equal(x, y)
        else:
            assert all(np.array_equal(u, v) for u, v in zip(x[:2], y[:2]))
            assert (x[2] is None) == (y[2] is None)
            assert x[2] is None or all(np.array_equal(u, v) for u, v in zip(x[2], y[2]))


@pytest.mark.parametrize("keep_frames", [False, True])
def test_process_and_thread_decoding_give_the_same_parts_and_state(video, tmp_path, keep_frames):
    damaged = bytearray(encode(tmp_path / "d.mp4", "libx264", count=60, options={"g": "5"}, noise=True,
                               container_options={"movflags": "faststart"}).read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 3000] = bytes(3000)
    (tmp_path / "damaged.mp4").write_bytes(bytes(damaged))
    request = dataclasses.replace(REQUEST, keep_frames=keep_frames)
    for path in (video, tmp_path / "damaged.mp4", encode(tmp_path / "b.webm", "libvpx-vp9")):
        by_process = decode(path, request, isolation="process")
        by_thread = decode(path, request, isolation="thread")
        assert by_process[2] is by_thread[2] is None
        assert_same_parts(by_process[0], by_thread[0])
        assert by_process[1] == by_thread[1]
    assert by_process[1].frame_stats.decoded == 4 and [k for k, _ in by_process[0]].count("clip") == 2


def test_a_crashing_video_decoder_costs_only_that_video(video, tmp_path, misbehaving):
    crash = copy(video, tmp_path, "segv.mp4")
    first, crashed, after = decode(video), decode(crash), decode(video)
    assert first[2] is None and after[2] is None
    assert_same_parts(first[0], after[0])
    parts, state, reason = crashed
    assert reason == "decoder crashed (signal 11)" and parts == [("open", 20)]  # the crash came after
    assert state.decoder == "decord" and state.duration == pytest.approx(3.0)  # what it told before


def test_a_hanging_video_times_out_by_a_limit_that_grows_with_its_frames(video, tmp_path, misbehaving):
    started = time.monotonic()
    _, _, reason = decode(copy(video, tmp_path, "hang.mp4"), timeout_s=1, frame_timeout_s=0.05)
    assert time.monotonic() - started < 30
    # 4 frames plus 2 clips of 8 frames: 20 frames planned
    assert reason == "decoding took longer than 2 s (1 s + 0.05 s for each of 20 frames)"
    assert decode(video, timeout_s=1, frame_timeout_s=0.05)[2] is None  # the run goes on


def test_a_video_over_the_memory_ceiling_fails_alone(video, tmp_path, misbehaving):
    _, _, reason = decode(copy(video, tmp_path, "hog.mp4"), memory_mb=256)
    assert reason == "decoder ran out of memory (limit 256 MiB)"
    assert decode(video, memory_mb=256)[2] is None


@pytest.mark.parametrize("name", ["lies.mp4", "huge.mp4"])
def test_a_part_that_is_not_what_was_asked_is_refused_not_trusted(video, tmp_path, misbehaving, name):
    _, _, reason = decode(copy(video, tmp_path, name), timeout_s=30)
    assert reason == "decoder sent a malformed answer"


def test_a_slow_consumer_does_not_use_up_the_decoders_time_limit(video):
    # Parts wait for the consumer, at most a few of them; meanwhile the decoder's clock stops.
    request = VideoRequest(resolution=8, fps_sub=10, batch=1)  # 30 parts of one frame
    state, kinds = DecodeReport(), []
    for kind, _ in video_parts(video, request, state, timeout_s=1, frame_timeout_s=0.01):  # 1.3 s in all
        kinds.append(kind)
        time.sleep(0.1)  # 3 s in all
    assert kinds == ["open"] + ["frames"] * 30 and state.frame_stats.decoded == 30


def chattering_webm(path) -> str:
    """A VP8 WebM cut before its first frame ends: decord complains on stderr about the seek it
    cannot make (its own logging, which its QUIET level does not reach)."""
    data = encode(path, "libvpx", noise=True).read_bytes()
    path.write_bytes(data[: len(data) // 20])
    return str(path)


def test_native_video_decoder_chatter_does_not_reach_stderr(tmp_path, capfd, monkeypatch):
    path = chattering_webm(tmp_path / "cut.webm")
    decode(path, isolation="thread")
    if not capfd.readouterr().err:
        pytest.skip("this decord build prints nothing for the cut WebM")
    decode(path, isolation="process")
    assert capfd.readouterr().err == ""
    monkeypatch.setenv("DIQA_DEBUG", "1")
    decode(path, isolation="process")
    assert capfd.readouterr().err != ""  # --debug lets it through


def test_video_workers_that_cannot_start_stop_the_run_with_the_fix(video, monkeypatch):
    monkeypatch.setattr(decodepool, "_worker_prelude", "raise SystemExit(4)")
    with pytest.raises(decodepool.DecoderStartError, match="exit status 4.*DIQA_DEBUG=1.*DIQA_DECODE_ISOLATION=thread"):
        decode(video)


def test_an_idle_video_worker_is_reused_by_the_next_video(video):
    decode(video)
    memory_mb = decodepool.decode_limits(max_pixels=REQUEST.max_pixels).memory_mb
    key = (memory_mb, False, True, "")  # (memory ceiling, debug, video, test hook)
    (worker,) = decodepool._spare[key]  # apart from image workers, whose key ends (False, "")
    decode(video)
    assert decodepool._spare[key] == [worker]  # the same one served


def test_the_frame_time_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIQA_DECODE_FRAME_TIMEOUT", "0.25")
    assert decodepool.decode_limits(max_pixels=10).frame_timeout_s == 0.25
    assert decodepool.decode_limits(frame_timeout_s=2, max_pixels=10).frame_timeout_s == 2.0
    monkeypatch.setenv("DIQA_DECODE_FRAME_TIMEOUT", "slow")
    with pytest.raises(UsageError, match="DIQA_DECODE_FRAME_TIMEOUT='slow' is not a number of seconds"):
        videoio.video_parts("a.mp4", REQUEST, DecodeReport())
