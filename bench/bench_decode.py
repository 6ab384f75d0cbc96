"""Decoding isolation measured side by side in one run: worker processes against threads.

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

Report lines are ``key=value`` on stdout, progress on stderr; the last line is ``speedup X.XX``,
processes' images/s over threads' (below 1: isolation costs that much throughput).

Usage: python bench/bench_decode.py [--images 100] [--resolution 512] [--workers 2] [--repeats 3]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
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
