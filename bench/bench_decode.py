"""Decoding isolation measured side by side in one run: worker processes against threads (images)
and against decoding in the calling thread (videos).

1. Throughput: ``imageio.iter_images`` over ``--images`` synthetic JPEGs (crops of scikit-image's
   photos, 1024x768, quality 90) resized to ``--resolution``, with ``isolation="thread"`` and
   ``isolation="process"``, same ``--workers``, runs alternated so that a busy machine slows
   both alike; medians. The process runs find idle workers from an earlier call, as every call
   after the first in a Python process does (the first call's start-up is measured in 2).
2. Start-up, in fresh Python processes: the time from ``iter_images`` to its first row for one
   small image, on the first call (workers start: a Python start plus the numpy and Pillow
   imports) and on a later call (the first call's idle workers serve it); and, for comparison,
   starting as many processes that import the decoder with multiprocessing's "forkserver"
   (first and later start) and "spawn".

3. Videos: ``videoio.video_parts`` on a synthetic h264 clip (scikit-image's astronaut panning,
   ``--video-seconds`` at 25 fps, ``--video-size``) with GenzVQA's default plan (8 frames resized
   to ``--resolution``, one 32-frame SlowFast clip of 224 px per second), in a decoder process
   and in this thread, runs alternated, medians; the process runs find an idle worker. Also the
   bytes the worker sent through the pipe per second of that run, the CPU time the calling process
   spent (in-thread: all the decoding; isolated: reading the pipe), and the first call's cost in a
   fresh Python process (the worker's start: Python, numpy, Pillow, PyAV and decord).

Report lines are ``key=value`` on stdout, progress on stderr; the last line is ``speedup X.XX``,
processes' images/s over threads' (below 1: isolation costs that much throughput), or with
``--part videos`` the isolated video decoding's rate over the in-thread one.

Usage: python bench/bench_decode.py [--part both|images|videos] [--images 100] [--resolution 512]
       [--workers 2] [--repeats 3] [--video-seconds 8] [--video-size 640x360]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel")


def write_jpegs(folder: Path, count: int, size=(1024, 768)) -> list[str]:
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = []
    for name in _PHOTOS:
        pixels = getattr(data, name)()
        rgb = pixels if pixels.ndim == 3 else np.stack([pixels] * 3, -1)
        photos.append(Image.fromarray(rgb).convert("RGB"))
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side_w, side_h = w * 3 // 4, h * 3 // 4
        left, top = (i * 37) % (w - side_w), (i * 53) % (h - side_h)
        path = folder / f"img{i:04d}.jpg"
        photo.crop((left, top, left + side_w, top + side_h)).resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def timed_pass(paths, resolution, workers, isolation) -> float:
    from diqa_cli.imageio import InputItem, iter_images

    started = time.perf_counter()
    rows = 0
    for _, pixels, error in iter_images([InputItem(p) for p in paths], resolution, workers=workers,
                                        prefetch=4 * workers, isolation=isolation):
        if error is not None:
            raise SystemExit(f"decoding failed: {error}")
        rows += pixels is not None
    elapsed = time.perf_counter() - started
    assert rows == len(paths)
    return elapsed


_STARTUP_CHILD = r"""
import json, multiprocessing, sys, time
from diqa_cli.imageio import InputItem, iter_images
item, workers = InputItem(sys.argv[1]), int(sys.argv[2])
times = {}
for call in ("first", "later"):  # a later call finds the first call's workers idle
    started = time.perf_counter()
    next(iter(iter_images([item], 64, workers=workers, isolation="process")))
    times[f"diqa_{call}_call_s"] = time.perf_counter() - started
# For comparison: multiprocessing's start methods, each starting `workers` processes that import
# the decoder (what diqa's workers would cost through them); a later start reuses the fork server.
for method in ("forkserver", "spawn"):
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["diqa_cli.imageio"])
    for call in ("first", "later"):
        started = time.perf_counter()
        procs = [ctx.Process(target=__import__, args=("diqa_cli.imageio",)) for _ in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        times[f"{method}_{call}_start_s"] = time.perf_counter() - started
print(json.dumps(times))
"""


def startup(path: str, workers: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    out = subprocess.run([sys.executable, "-c", _STARTUP_CHILD, path, str(workers)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def timed_video(path: str, request, isolation: str) -> tuple[float, float, int]:
    """Seconds to take every part of one video, the CPU seconds this process spent on it (what
    competes with the networks), and the bytes of its arrays."""
    import resource

    from diqa_cli.videoio import DecodeReport, video_parts

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    started, cpu_started = time.perf_counter(), cpu()
    sent = 0
    for kind, value in video_parts(path, request, DecodeReport(), isolation=isolation):
        if kind == "clip":
            sent += value.nbytes
        elif kind == "frames":
            sent += value[1].nbytes
    return time.perf_counter() - started, cpu() - cpu_started, sent


_VIDEO_STARTUP_CHILD = r"""
import json, sys, time
from diqa_cli.videoio import DecodeReport, VideoRequest, video_parts
request = VideoRequest(resolution=64, max_frames=2)
times = {}
for call in ("first", "later"):  # a later call finds the first call's worker idle
    started = time.perf_counter()
    list(video_parts(sys.argv[1], request, DecodeReport(), isolation="process"))
    times[f"video_{call}_call_s"] = time.perf_counter() - started
print(json.dumps(times))
"""


def bench_videos(args, folder: Path) -> float:
    """Isolated over in-thread video decoding, as a ratio of rates (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_video import synthetic_clip

    from diqa_cli.videoio import VideoRequest

    width, height = (int(v) for v in args.video_size.split("x"))
    print(f"writing a {args.video_seconds:g} s {width}x{height} h264 clip...", file=sys.stderr)
    clip = str(synthetic_clip(folder / "clip.mp4", args.video_seconds, 25, width, height))
    request = VideoRequest(resolution=args.resolution, max_frames=8, clip_len=32, max_clips=16, crop_size=224)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _VIDEO_STARTUP_CHILD, clip], env=env, capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout))
    for key in runs[0]:
        print(f"startup_{key}={statistics.median(r[key] for r in runs):.3f}")

    timed_video(clip, request, "process")  # the worker then waits idle
    times = {"thread": [], "process": []}
    cpu = {"thread": [], "process": []}
    for repeat in range(args.repeats):
        order = ("thread", "process") if repeat % 2 == 0 else ("process", "thread")
        for isolation in order:
            elapsed, used, sent = timed_video(clip, request, isolation)
            times[isolation].append(elapsed)
            cpu[isolation].append(used)
            print(f"  video {isolation}: {elapsed:.2f} s", file=sys.stderr)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    print(f"video_seconds={args.video_seconds:g} size={width}x{height} fps=25 resolution={args.resolution} "
          f"frames=8 clips={min(16, max(1, int(args.video_seconds)))}x32 crop=224 repeats={args.repeats}")
    print(f"video_thread_s={seconds['thread']:.3f}")
    print(f"video_process_s={seconds['process']:.3f}")
    print(f"video_thread_caller_cpu_s={statistics.median(cpu['thread']):.3f} "
          f"video_process_caller_cpu_s={statistics.median(cpu['process']):.3f}")
    print(f"video_pipe_mb={sent / 1e6:.1f} video_pipe_mb_per_s={sent / 1e6 / seconds['process']:.0f}")
    return seconds["thread"] / seconds["process"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("both", "images", "videos"), default="both")
    parser.add_argument("--video-seconds", type=float, default=8.0)
    parser.add_argument("--video-size", default="640x360")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.part != "images":
            video_ratio = bench_videos(args, Path(tmp))
            print(f"{'speedup' if args.part == 'videos' else 'video_process_over_thread'} {video_ratio:.2f}")
            if args.part == "videos":
                return
        print(f"writing {args.images} JPEGs (1024x768)...", file=sys.stderr)
        paths = write_jpegs(Path(tmp), args.images)

        print("start-up in fresh processes...", file=sys.stderr)
        runs = [startup(paths[0], args.workers) for _ in range(args.repeats)]
        for key in runs[0]:
            print(f"startup_{key}={statistics.median(r[key] for r in runs):.3f}")

        timed_pass(paths[:2], args.resolution, args.workers, "process")  # workers then wait idle
        times = {"thread": [], "process": []}
        for repeat in range(args.repeats):
            order = ("thread", "process") if repeat % 2 == 0 else ("process", "thread")
            for isolation in order:
                elapsed = timed_pass(paths, args.resolution, args.workers, isolation)
                times[isolation].append(elapsed)
                print(f"  {isolation}: {elapsed:.2f} s", file=sys.stderr)
        rates = {k: args.images / statistics.median(v) for k, v in times.items()}
        print(f"images={args.images} size=1024x768 resolution={args.resolution} workers={args.workers} "
              f"repeats={args.repeats} cpus={os.cpu_count()}")
        print(f"thread_images_per_s={rates['thread']:.1f}")
        print(f"process_images_per_s={rates['process']:.1f}")
        print(f"speedup {rates['process'] / rates['thread']:.2f}")


if __name__ == "__main__":
    main()
