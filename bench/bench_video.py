"""`diqa score-video` cost on the tiny backbone: seconds per second of video, and how that time
splits between decoding and the networks (SlowFast, U-Net), for both decoders and two frame
samplings, measured side by side in one run.

Everything is built here: the tiny random backbone and SlowFast (``diqa_cli.tiny``,
``diqa_cli.models.slowfast``), a GenzVQA head from its tiny config, and a synthetic clip panning
over scikit-image's astronaut photo. The scores mean nothing (random networks); the timings show
where the time of a video goes. Decoding runs in a thread ahead of the networks, so the parts can
add up to more than the wall time.

Usage: python bench/bench_video.py [--seconds 8] [--fps 25] [--size 320x180] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_clip(path: Path, seconds: float, fps: int, width: int, height: int) -> Path:
    """An h264 clip panning across the astronaut photo (real texture, real motion)."""
    import av
    import numpy as np
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((width * 2, height * 2))
    pixels = np.asarray(photo)
    frames = int(seconds * fps)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            x = int((width * i) / max(1, frames - 1))
            y = int((height * i) / max(1, frames - 1))
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[y : y + height, x : x + width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def measure(clip, model, slowfast, *, decoder, fps_sub, max_frames, repeats) -> dict:
    """Best of ``repeats`` runs (the first also warms the caches) of one setting."""
    from diqa_cli.pipelines.videos import score_videos

    best = None
    for _ in range(repeats):
        timings: dict = {}
        started = time.perf_counter()
        (row,) = list(
            score_videos(
                [str(clip)], model, slowfast, normalisation={"offset": 0.0, "scale": 1.0},
                fps_sub=fps_sub, max_frames=max_frames, decoder=decoder, timings=timings,
            )
        )
        wall = time.perf_counter() - started
        if row["status"] != "ok":
            raise SystemExit(f"bench video failed: {row['error']}")
        result = {**timings, "wall": wall, "duration": row["duration"], "frames": row["frames_decoded"],
                  "decoder": row["decoder"], "clips": row["clips"]}
        if best is None or wall < best["wall"]:
            best = result
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", default="320x180")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))

    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.models.genzvqa import GenzVQA
    from diqa_cli.models.slowfast import load_slowfast, write_tiny_slowfast
    from diqa_cli.tiny import write_tiny_backbone

    with tempfile.TemporaryDirectory(prefix="diqa-bench-video-") as tmp:
        root = Path(tmp)
        os.environ.setdefault("DIQA_HOME", str(root / "home"))
        write_tiny_backbone(root)
        backbone = load_backbone(str(root / "backbone"), device="cpu", dtype="fp32", offline=True)
        slowfast = load_slowfast(str(write_tiny_slowfast(root)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GenzVQA(backbone, **GenzVQA.tiny_config()).eval()
        clip = synthetic_clip(root / "clip.mp4", args.seconds, args.fps, width, height)

        settings = [
            ("8 frames (default)", None, None),
            ("--fps-sub 4", 4.0, None),
        ]
        print(
            f"video bench: tiny random backbone + tiny SlowFast (not a quality model), synthetic h264 clip "
            f"{args.seconds:g} s at {args.fps} fps, {width}x{height}, CPU, {torch.get_num_threads()} threads"
        )
        header = f"{'setting':<30} {'frames':>6} {'s/s video':>10} {'decode s':>9} {'slowfast s':>10} {'unet s':>8} {'decode %':>9} {'networks %':>11}"
        print(header)
        results = {}
        for label, fps_sub, max_frames in settings:
            for decoder in ("decord", "pyav"):
                r = measure(clip, model, slowfast, decoder=decoder, fps_sub=fps_sub, max_frames=max_frames,
                            repeats=args.repeats)
                results[(label, decoder)] = r
                networks = r["encoder"] + r["model"]
                busy = r["decode"] + networks
                print(
                    f"{r['decoder'] + ', ' + label:<30} {r['frames']:>6} {r['wall'] / r['duration']:>10.3f} "
                    f"{r['decode']:>9.3f} {r['encoder']:>10.3f} {r['model']:>8.3f} "
                    f"{100 * r['decode'] / busy:>8.1f}% {100 * networks / busy:>10.1f}%"
                )
        for label, _, _ in settings:
            fast, slow = results[(label, "decord")], results[(label, "pyav")]
            print(f"ratio decode time pyav/decord, {label}: {slow['decode'] / max(fast['decode'], 1e-9):.2f}")
        for label, _, _ in settings:
            r = results[(label, "decord")]
            print(f"ratio networks/decode time, decord, {label}: {(r['encoder'] + r['model']) / max(r['decode'], 1e-9):.2f}")
        base, dense = results[(settings[0][0], "decord")], results[(settings[1][0], "decord")]
        print(f"ratio s/s video --fps-sub 4 over 8 frames, decord: {dense['wall'] / base['wall']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
