"""How far half-precision scores are from float32 ones: each image method's model built once per
dtype from the same seed (same weights), scoring the same synthetic set; per method and dtype, the
median and largest relative error of the raw scores against float32 and their Spearman rank
correlation (SRCC) with the float32 scores.

The set is ``diqa_cli.synthetic`` (scikit-image photos with blur, noise, JPEG and contrast
distortions at known levels); the networks have random weights, so the scores themselves mean
nothing, but their distance between dtypes is what the same arithmetic does with trained weights
of the same size. On a GPU: fp16 and bf16 against fp32 at real size (512 px); ``--quick``: the tiny
networks at 64 px (on the CPU only bf16 runs; fp16 has no CPU kernels).

Usage: python bench/bench_precision.py [--device auto] [--dtypes fp16,bf16] [--methods all]
       [--sources 4] [--work DIR] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIQA_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import progress, report  # noqa: E402
from bench_real import build_image_model, prepare  # noqa: E402


def scores(spec, work: Path, pixels, *, quick: bool, device, dtype, batch: int) -> list[float]:
    import torch

    model = build_image_model(spec, work, quick=quick, device=device, dtype=dtype)
    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            out += model(pixels[start : start + batch].to(device, dtype)).float().cpu().tolist()
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtypes", help="compared with fp32 (default: fp16,bf16 on CUDA, bf16 on the CPU)")
    parser.add_argument("--methods", default="all", help="image methods, comma-separated, or all")
    parser.add_argument("--sources", type=int, default=4, help="photos in the synthetic set (x distortions x levels)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work", help="folder for the written networks (kept; shared with bench_real.py)")
    parser.add_argument("--quick", action="store_true", help="tiny networks at 64 px")
    args = parser.parse_args()

    import numpy as np
    import torch
    from PIL import Image
    from scipy.stats import spearmanr

    from diqa_cli.backbone import resolve_device, resolve_dtype
    from diqa_cli.methods import get_method, list_methods
    from diqa_cli.synthetic import DEFAULT_SOURCES, make_synthetic_set

    device = resolve_device(args.device)
    names = (args.dtypes or ("fp16,bf16" if device.type == "cuda" else "bf16")).split(",")
    dtypes = {name: resolve_dtype(name, device) for name in names}
    specs = list_methods("image") if args.methods == "all" else [get_method(m) for m in args.methods.split(",")]
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("DIQA_HOME", str(work / "home"))
        prepare(work, specs, args.quick, 1)
        side = 64 if args.quick else 512
        labels = make_synthetic_set(work / f"synthetic{side}", size=side, sources=DEFAULT_SOURCES[: args.sources])
        with open(labels, newline="") as handle:
            files = [labels.parent / row["path"] for row in csv.DictReader(handle)]
        pixels = torch.from_numpy(np.stack([
            np.asarray(Image.open(f).convert("RGB").resize((side, side)), dtype=np.float32) / 255 for f in files
        ])).permute(0, 3, 1, 2).contiguous()
        for spec in specs:
            progress(f"{spec.name}: {len(files)} synthetic images in fp32")
            reference = np.array(scores(spec, work, pixels, quick=args.quick, device=device, dtype=torch.float32,
                                        batch=args.batch_size))
            for name, dtype in dtypes.items():
                progress(f"{spec.name}: the same in {name}")
                half = np.array(scores(spec, work, pixels, quick=args.quick, device=device, dtype=dtype,
                                       batch=args.batch_size))
                relative = np.abs(half - reference) / np.maximum(np.abs(reference), 1e-12)
                report(bench="precision", method=spec.name, dtype=name, versus="fp32", device=device,
                       size=f"{side}px", n=len(files), median_rel_err=float(statistics.median(relative)),
                       max_rel_err=float(relative.max()),
                       # A random network may give every image the same score: no ranking to compare.
                       srcc_vs_fp32=f"{spearmanr(half, reference)[0]:.4f}" if reference.std() > 0 else "n/a(constant_scores)",
                       images="synthetic(skimage.data,distortions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
