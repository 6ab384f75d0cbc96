"""``--engine ray`` against one process on the same device: the same DP-IQA head (SD 1.5-sized
random U-Net at 512 px; ``--quick``: the tiny one) scoring the same JPEGs, in one run.

* one process: ``LocalEngine`` (model loaded first, not timed) scoring every file;
* Ray: ``RayEngine`` with one actor (one GPU on a GPU machine), timed twice over the same files:
  the first pass includes the actor's start and model load, the second is the steady state.

Printed: images/s of each and ``ray_overhead`` = steady Ray time / one-process time - 1 (target on
a GPU: at most 0.10). Images synthetic, weights random.

Usage: python bench/bench_ray.py [--device auto] [--dtype auto] [--images 64] [--batch-size 8]
       [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIQA_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import progress, report  # noqa: E402
from bench_real import build_image_model, prepare  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", help="folder for the written networks (kept; shared with bench_real.py)")
    parser.add_argument("--quick", action="store_true", help="tiny networks at 64 px")
    args = parser.parse_args()

    from diqa_cli.backbone import resolve_device
    from diqa_cli.checkpoint import save_head
    from diqa_cli.engines import LocalEngine, ScorerOptions
    from diqa_cli.engines.ray_engine import RayEngine, connect
    from diqa_cli.methods import get_method

    device = resolve_device(args.device)
    spec = get_method("dpiqa")
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DIQA_HOME", str(work / "home"))  # Ray workers inherit it
        prepare(work, [spec], args.quick, 8)
        head = work / ("dpiqa-tiny-ray.safetensors" if args.quick else "dpiqa-sd15-ray.safetensors")
        if not head.exists():
            model = build_image_model(spec, work, quick=args.quick, device="cpu", dtype="fp32")
            save_head(model, head, normalisation={"offset": 0.0, "scale": 1.0})
            del model
        photos = sorted(str(p) for p in (work / "photos").glob("*.jpg"))
        paths = [photos[i % len(photos)] for i in range(args.images)]
        options = ScorerOptions(checkpoint=str(head), device=args.device, dtype=args.dtype, offline=True,
                                batch_size=args.batch_size)

        progress("one process: loading, then scoring")
        with LocalEngine(options) as engine:
            list(engine.score(paths[: args.batch_size]))  # warm-up
            started = time.perf_counter()
            local_rows = list(engine.score(paths))
            local_s = time.perf_counter() - started
        connect()
        with RayEngine(options, actors=1) as ray_engine:
            progress("ray: first pass (actor start and model load)")
            started = time.perf_counter()
            list(ray_engine.score(paths))
            first_s = time.perf_counter() - started
            progress("ray: second pass (steady)")
            started = time.perf_counter()
            ray_rows = list(ray_engine.score(paths))
            ray_s = time.perf_counter() - started
            shape = f"{ray_engine.actors}_actor(s)"
        import ray

        ray.shutdown()
        worst = max(abs(a["raw_score"] - b["raw_score"]) for a, b in zip(local_rows, ray_rows, strict=True))
        report(bench="ray", method="dpiqa", size="tiny_64px" if args.quick else "512px", device=device,
               n=len(paths), batch=args.batch_size, local_img_per_s=len(paths) / local_s,
               ray_first_pass_img_per_s=len(paths) / first_s, ray_steady_img_per_s=len(paths) / ray_s,
               ray_overhead=f"{ray_s / local_s - 1:.3f}", ray=shape, max_abs_score_diff=worst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
