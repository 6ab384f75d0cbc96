"""The score store and the Ray engine, measured side by side in one run on the same images.

1. Re-scoring an unchanged folder with ``--db`` against scoring it from scratch: the re-run
   hashes every file (XXH3-128) and looks its result up instead of decoding and scoring it.
2. ``--engine ray`` on a local Ray instance (loopback only) against the single process, same
   inputs, same scorer. The Ray time includes starting the actors and loading one model per
   actor (what every ``diqa score --engine ray`` run pays); starting the Ray instance itself
   is reported apart.

Everything is built here: the tiny random backbone and a DP-IQA head from its tiny config
(``diqa_cli.tiny``), and small images cut from scikit-image's photos. The scores mean nothing
(random networks); the timings show what the store saves and what Ray costs on this machine.
Model loading in this process is reported apart and left out of the ratios.

Usage: python bench/bench_store.py [--images 200] [--size 96] [--ray-actors N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "camera", "cat")


def write_images(folder: Path, count: int, size: int) -> list[str]:
    """``count`` distinct PNGs of ``size`` px: crops of scikit-image's photos at shifting offsets."""
    import numpy as np
    from PIL import Image
    from skimage import data

    photos = []
    for name in _PHOTOS:
        pixels = getattr(data, name)()
        photos.append(Image.fromarray(pixels if pixels.ndim == 3 else np.stack([pixels] * 3, -1)).convert("RGB"))
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = min(w, h) // 2
        left = (i * 37) % (w - side)
        top = (i * 53) % (h - side)
        path = folder / f"img{i:04d}.png"
        photo.crop((left, top, left + side, top + side)).resize((size, size)).save(path)
        paths.append(str(path))
    return paths


def build_head(root: Path) -> Path:
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.checkpoint import save_head
    from diqa_cli.methods import get_method, load_model_class
    from diqa_cli.tiny import write_tiny_backbone

    bundle = write_tiny_backbone(root / "tiny")
    backbone = load_backbone(str(bundle / "backbone"), device="cpu", dtype="fp32", offline=True)
    cls = load_model_class(get_method("dpiqa"))
    torch.manual_seed(0)
    head = bundle / "heads" / "dpiqa.safetensors"
    save_head(cls(backbone, **cls.tiny_config()), head, normalisation={"offset": 0.0, "scale": 1.0}, extra={})
    return head


def timed(fn):
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--ray-actors", type=int, default=None, help="default: diqa's (one per 4 CPUs)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="diqa-bench-store-") as tmp:
        root = Path(tmp)
        os.environ["DIQA_HOME"] = str(root / "home")  # Ray workers inherit it
        (root / "photos").mkdir()
        paths = write_images(root / "photos", args.images, args.size)
        head = build_head(root)

        from diqa_cli.engines import LocalEngine, ScorerOptions
        from diqa_cli.engines.ray_engine import RayEngine, connect
        from diqa_cli.store import ReuseRun, open_store

        options = ScorerOptions(checkpoint=str(head), device="cpu", dtype="fp32", offline=True)
        engine, load_s = timed(lambda: LocalEngine(options))
        rows, scratch_s = timed(lambda: list(engine.score(paths)))
        assert all(r["status"] == "ok" for r in rows)

        with open_store(root / "scores.sqlite") as store:
            first = ReuseRun(paths, engine, store)
            _, first_s = timed(lambda: list(first))
            again = ReuseRun(paths, engine, store)
            _, again_s = timed(lambda: list(again))
        assert (first.scored, again.reused) == (len(paths), len(paths))

        _, ray_start_s = timed(lambda: connect())
        with RayEngine(options, actors=args.ray_actors) as ray_engine:
            ray_rows, ray_s = timed(lambda: list(ray_engine.score(paths)))
            shape = f"{ray_engine.actors} actor(s), {ray_engine.resources}"
        assert [r["path"] for r in ray_rows] == paths
        import ray

        ray.shutdown()
        worst = max(abs(a["score"] - b["score"]) for a, b in zip(rows, ray_rows, strict=True))

        n = len(paths)
        print(f"{n} images of {args.size} px, tiny random backbone, DP-IQA head, CPU (model load {load_s:.1f} s, not counted)")
        print(f"{'single process, from scratch':<44} {scratch_s:8.2f} s  {n / scratch_s:7.1f} img/s")
        print(f"{'first run with --db (hash + record)':<44} {first_s:8.2f} s  {n / first_s:7.1f} img/s")
        print(f"{'unchanged re-run with --db (' + str(again.reused) + ' reused)':<44} {again_s:8.2f} s  {n / again_s:7.1f} img/s")
        print(f"{'--engine ray, local, incl. actor start':<44} {ray_s:8.2f} s  {n / ray_s:7.1f} img/s"
              f"   ({shape}; Ray instance start {ray_start_s:.1f} s apart; max |score diff| {worst:.1e})")
        print(f"rescore_speedup {scratch_s / again_s:.2f}   (scratch / unchanged re-run with --db)")
        print(f"ray_vs_single {scratch_s / ray_s:.2f}   (single process time / Ray time; >1 means Ray is faster)")


if __name__ == "__main__":
    main()
