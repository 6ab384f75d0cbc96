"""``diqa demo``: the whole pipeline end to end, offline, in a few minutes on a laptop CPU.

It builds the tiny random backbone (:mod:`diqa_cli.tiny`) in the cache, makes a SYNTHETIC
distortion set from scikit-image's bundled photos (:mod:`diqa_cli.synthetic`: blur, noise, JPEG
and contrast at 5 levels, train and test split by source photo), trains a DP-IQA head on the
training photos, scores the held-out photos with the normal scoring pipeline, and prints one row
per held-out image and the SRCC of the scores against the synthetic MOS (1 - level/6).

This is a tiny random-backbone demo on a synthetic distortion set, not a quality model: the
U-Net and VAE are random, the labels are distortion strengths, and the SRCC says only that the
training and scoring machinery learns to rank these distortions on unseen photos.

The head is DP-IQA's tiny config without U-Net fine-tuning: fine-tuning a random U-Net teaches
it nothing a real one would keep, and skipping it makes each step about three times cheaper.
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["DEMO_LABEL", "run_demo"]

DEMO_LABEL = "tiny random-backbone demo on a synthetic distortion set — not a quality model"

# Tuned so the whole demo (imports, tiny backbone, data, training, scoring) stays well under
# 3 minutes on 2 CPU cores: 6 photos x 21 images, 2 photos held out.
import os
DEMO_SOURCES = tuple(os.environ.get("XDEMO_SOURCES", "astronaut,coffee,chelsea,rocket,hubble_deep_field,camera").split(","))
DEMO_SIZE = 64
DEMO_EPOCHS = int(os.environ.get('XDEMO_EPOCHS', 20))
DEMO_BATCH = int(os.environ.get('XDEMO_BATCH', 16))
DEMO_LR = float(os.environ.get('XDEMO_LR', 3e-3))
DEMO_SEED = int(os.environ.get("XDEMO_SEED", 0))
# DP-IQA's tiny head, without U-Net fine-tuning (see the module docstring), with a shallower
# score path and wider FC layers: on the tiny backbone it leaves its initial plateau sooner.
DEMO_HEAD = {"finetune_unet": False, "decoder_channels": 32, "score_channels": [8], "fc_hidden": 64}
_TINY_DONE = ".diqa-tiny-complete"


def _tiny_backbone(log: Callable[[str], None]) -> Path:
    """The tiny backbone under DIQA_HOME/tiny, written once (its bytes are fixed by seeds)."""
    from diqa_cli.home import subdir

    root = subdir("tiny")
    if not (root / _TINY_DONE).is_file():
        from diqa_cli.tiny import write_tiny_backbone

        log(f"diqa demo: writing the tiny random backbone to {root}")
        write_tiny_backbone(root)
        (root / _TINY_DONE).write_text("written by diqa demo\n")
    return root


def run_demo(
    out_dir: str | Path | None = None,
    *,
    epochs: int | None = None,
    keep: bool = False,
    log: Callable[[str], None] | None = None,
    stdout=None,
) -> dict[str, Any]:
    """Run the demo; the table and the SRCC line go to ``stdout``, progress to ``log``.

    ``out_dir`` holds the synthetic set and the trained head and is kept; without it they go to a
    temporary folder under DIQA_HOME/demo, removed at the end unless ``keep``.
    Returns ``{"srcc", "n", "seconds"...}`` for callers and tests.
    """
    import time

    from diqa_cli.checkpoint import load_head
    from diqa_cli.home import subdir
    from diqa_cli.imageio import InputItem
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.scoring import score_images
    from diqa_cli.synthetic import make_synthetic_set
    from diqa_cli.training import correlations, train

    stdout = stdout or sys.stdout
    log = log or (lambda message: print(message, file=sys.stderr))
    start = time.perf_counter()
    log(f"diqa demo: {DEMO_LABEL}")
    tiny_root = _tiny_backbone(log)

    if out_dir is None:
        work = Path(tempfile.mkdtemp(prefix="run-", dir=subdir("demo")))
        remove = not keep
    else:
        work = Path(out_dir)
        work.mkdir(parents=True, exist_ok=True)
        remove = False
    try:
        labels = make_synthetic_set(work / "synthetic", size=DEMO_SIZE, sources=DEMO_SOURCES, seed=DEMO_SEED)
        with labels.open(newline="") as fh:
            records = list(csv.DictReader(fh))
        test = {str(labels.parent / r["path"]): r for r in records if r["split"] == "test"}
        log(
            f"diqa demo: SYNTHETIC set {labels}: {len(records) - len(test)} training and {len(test)} held-out "
            "images (blur, noise, JPEG, contrast at 5 levels; split by source photo)"
        )
        head = work / "dpiqa-tiny-demo.safetensors"
        train(
            "dpiqa",
            labels,
            backbone=str(tiny_root / "backbone"),
            out=head,
            epochs=epochs or DEMO_EPOCHS,
            batch_size=DEMO_BATCH,
            lr=DEMO_LR,
            seed=DEMO_SEED,
            config={**DPIQA.tiny_config(), **DEMO_HEAD},
            device="cpu",
            dtype="fp32",
            offline=True,
            log=log,
        )

        model, sidecar = load_head(head, device="cpu", dtype="fp32", offline=True)
        scored = score_images(
            [InputItem(path) for path in test],
            model,
            batch_size=DEMO_BATCH,
            workers=2,
            normalisation=sidecar["score_normalisation"],
        )
        print(f"# {DEMO_LABEL}", file=stdout)
        print(f"{'path':<44} {'distortion':<10} {'level':>5} {'synthetic_mos':>13} {'score':>8}", file=stdout)
        predicted, target = [], []
        for row in scored:
            record = test[row["path"]]
            mos = float(record["mos"])
            score = f"{row['score']:.4f}" if row["status"] == "ok" else "error"
            print(f"{record['path']:<44} {record['distortion']:<10} {record['level']:>5} {mos:>13.4f} {score:>8}", file=stdout)
            if row["status"] == "ok":
                predicted.append(row["score"])
                target.append(mos)
        metrics = correlations(predicted, target)
        print(
            f"SRCC {metrics['srcc']:.4f} (score vs synthetic MOS = 1 - level/6, {len(predicted)} held-out images "
            f"of unseen photos; {DEMO_LABEL})",
            file=stdout,
        )
        seconds = time.perf_counter() - start
        log(f"diqa demo: done in {seconds:.0f} s; files in {work}" if not remove else f"diqa demo: done in {seconds:.0f} s")
        return {**metrics, "n": len(predicted), "seconds": seconds, "checkpoint": str(head), "labels": str(labels)}
    finally:
        if remove:
            shutil.rmtree(work, ignore_errors=True)
