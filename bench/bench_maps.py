"""What ``--maps`` costs: ``diqa score`` on the tiny bundle with and without quality maps, side by
side in one run on the same images.

For each image method of the tiny bundle (``diqa weights tiny``: random networks, so the scores and
maps mean nothing, only the times do) the same engine ``diqa score`` uses scores the images twice
per round, once plain and once with ``--maps`` into a fresh folder, the two alternated over the
rounds so a busy machine slows both alike; medians are reported. With maps, a batch's maps come
from the same pass as its scores (for the generic map: a backward pass to the pixels), then every
input is decoded again at its own size for the overlay PNG and the float TIFF. Model loading is
left out. The map files are written in the pipeline's decoding threads while the next batch runs.

Lines are ``key=value`` on stdout; the last is ``maps_ratio X.XX`` for the default method (DP-IQA):
time with maps / time without.

Usage: python bench/bench_maps.py [--images 32] [--size 384] [--repeats 3] [--methods dpiqa,lgdm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIQA_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_store import write_images  # noqa: E402  (the same synthetic crops)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=384, help="side of the input images in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default=None, help="comma-separated image methods (default: every one)")
    args = parser.parse_args()

    import torch

    # One intra-op thread, as the tests and the demo use: on a busy 2-core machine two threads made
    # the tiny models several times slower (and the timings erratic).
    torch.set_num_threads(1)
    from diqa_cli.engines import LocalEngine, ScorerOptions
    from diqa_cli.methods import default_method, list_methods
    from diqa_cli.tiny import write_tiny_bundle

    names = args.methods.split(",") if args.methods else [s.name for s in list_methods("image")]
    default = default_method("score").name
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="diqa-bench-maps-") as tmp:
        root = Path(tmp)
        os.environ["DIQA_HOME"] = str(root / "home")
        (root / "photos").mkdir()
        paths = write_images(root / "photos", args.images, args.size)
        print(f"bench_maps: writing the tiny bundle in {root}", file=sys.stderr, flush=True)
        bundle = write_tiny_bundle(root / "tiny")
        for name in names:
            head = str(bundle / "heads" / f"{name}.safetensors")
            common = {"checkpoint": head, "device": "cpu", "dtype": "fp32", "offline": True, "batch_size": args.batch_size}
            maps_dir = root / "maps"
            plain = LocalEngine(ScorerOptions(**common))
            mapped = LocalEngine(ScorerOptions(**common, maps=str(maps_dir)))
            list(plain.score(paths[:2]))  # warm-up: first-call costs (prompt features, allocator)
            list(mapped.score(paths[:2]))
            times = {"plain": [], "maps": []}
            for _ in range(args.repeats):
                for kind, engine in (("plain", plain), ("maps", mapped)):
                    shutil.rmtree(maps_dir, ignore_errors=True)
                    started = time.perf_counter()
                    rows = list(engine.score(paths))
                    times[kind].append(time.perf_counter() - started)
                    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
                    if kind == "maps":
                        assert all(Path(r["map"]).is_file() for r in rows)
            plain_s, maps_s = statistics.median(times["plain"]), statistics.median(times["maps"])
            ratios[name] = maps_s / plain_s
            how = "own" if mapped.scorer.model.spec.quality_map else "generic"
            print(f"method={name} map={how} images={len(paths)} size={args.size} repeats={args.repeats} "
                  f"plain_s={plain_s:.3f} maps_s={maps_s:.3f} plain_img_s={len(paths) / plain_s:.2f} "
                  f"maps_img_s={len(paths) / maps_s:.2f} ratio={ratios[name]:.2f}", flush=True)
            plain.close()
            mapped.close()
    if default in ratios:
        print(f"maps_ratio {ratios[default]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
