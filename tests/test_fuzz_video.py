"""Fuzzing video decoding: seeded damage to valid videos of every container and codec diqa reads
(tests/fuzzcorpus.py), decoded as ``diqa score-video`` decodes them (``videoio.video_parts`` in
decoder processes, clips and frames).

Whatever the bytes, each video ends in exactly one outcome: its parts, well formed and in order,
or an ``InputError`` with a one-line reason diqa knows. Time and memory stay bounded (the
workers' ceilings are set low here). The default run takes a few seconds; ``DIQA_FUZZ_VIDEOS=N``
changes its size, and ``DIQA_FUZZ_SECONDS=N`` runs the ``slow`` test, which fuzzes batches of
500 videos with seeds 100, 101, ... for N seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

import numpy as np
import pytest

import fuzzcorpus
from diqa_cli.errors import InputError
from diqa_cli.videoio import DecodeReport, VideoRequest, video_parts

REQUEST = VideoRequest(resolution=24, max_frames=3, batch=2, clip_len=4, max_clips=2, crop_size=16)
KNOWN_REASONS = (
    "not a readable video: ",
    "a still image (",
    "text (",
    "no video stream",
    "no decoder for its video stream",
    "the video stream holds no frames",
    "too many pixels: ",
    # the isolation doing its job:
    "decoder ran out of memory (limit ",
    "decoder crashed (",
    "decoding took longer than ",
)


def outcome(path: str, request: VideoRequest) -> str:
    """Decode one video; check its parts; the outcome's key ("ok", "no frames" or the reason)."""
    state = DecodeReport()
    kinds, frames, clips = [], 0, 0
    try:
        for kind, value in video_parts(path, request, state, memory_mb=512, timeout_s=20, frame_timeout_s=0.5):
            kinds.append(kind)
            if kind == "clip":
                assert value.shape == (request.clip_len, request.crop_size, request.crop_size, 3), path
                clips += 1
            elif kind == "frames":
                times, resized, originals = value
                assert resized.dtype == np.uint8 and resized.shape[1:] == (request.resolution, request.resolution, 3)
                assert len(times) == len(resized) <= request.batch and np.isfinite(times).all(), path
                assert (originals is not None) == request.keep_frames
                frames += len(resized)
    except InputError as exc:
        assert exc.reason and "\n" not in exc.reason, (path, exc.reason)
        assert exc.reason.startswith(KNOWN_REASONS), (path, exc.reason)  # "decoder failed:" is a bug
        return re.sub(r"\d+", "N", exc.reason)[:48]
    assert kinds[0] == "open" and kinds.count("open") == 1, (path, kinds)
    assert kinds[1:] == sorted(kinds[1:]), (path, kinds)  # the clips, then the frames
    assert clips <= request.max_clips and frames == state.frame_stats.decoded <= request.max_frames, path
    assert state.decoder in ("decord", "pyav", "decord+pyav"), (path, state.decoder)
    return "ok" if frames else "no frames"


def fuzz(tmp_path, seed: int, count: int) -> dict[str, int]:
    cases = fuzzcorpus.video_mutants(seed, count)
    paths = []
    for name, data in cases:
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    before = fuzzcorpus.resident_mib()
    started = time.monotonic()
    outcomes: dict[str, int] = {}
    for index, path in enumerate(paths):
        request = REQUEST if index % 3 else dataclasses.replace(REQUEST, keep_frames=True)
        key = outcome(path, request)
        outcomes[key] = outcomes.get(key, 0) + 1
    elapsed = time.monotonic() - started
    assert sum(outcomes.values()) == len(paths)  # one outcome per video
    assert elapsed < 60 + count * 0.5, elapsed  # a hang would cost 20 s, a loop forever
    assert fuzzcorpus.resident_mib() - before < 200  # frames are dropped as they go; nothing piles up here
    return outcomes


def test_every_container_has_a_valid_seed_that_decodes(tmp_path):
    seeds = fuzzcorpus.video_seeds()
    assert {"mp4", "mkv", "webm", "avi", "mov", "wmv", "flv", "ts", "mpg", "3gp", "y4m", "gif"} <= {
        name.rsplit(".", 1)[1] for name in seeds
    }
    for name, data in seeds.items():
        (tmp_path / name).write_bytes(data)
        assert outcome(str(tmp_path / name), REQUEST) == "ok", name


def test_the_corpus_is_the_same_for_the_same_seed():
    assert fuzzcorpus.video_mutants(7, 40) == fuzzcorpus.video_mutants(7, 40)
    assert fuzzcorpus.video_mutants(7, 40) != fuzzcorpus.video_mutants(8, 40)


def test_fuzzed_videos_each_get_one_outcome_and_nothing_escapes(tmp_path):
    outcomes = fuzz(tmp_path, seed=1, count=int(os.environ.get("DIQA_FUZZ_VIDEOS", "120")))
    assert outcomes.get("ok", 0) > 0 and len(outcomes) > 3  # the damage is varied, not all fatal


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DIQA_FUZZ_SECONDS"), reason="set DIQA_FUZZ_SECONDS=N to fuzz for N seconds")
def test_fuzzed_videos_for_a_time_budget(tmp_path):
    fuzzcorpus.fuzz_for_budget(tmp_path, fuzz, per_batch=500, noun="videos")
