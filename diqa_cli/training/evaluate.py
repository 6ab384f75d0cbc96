"""Evaluation of a head on a labels CSV through the normal scoring pipeline; SRCC / PLCC / KRCC.

Metrics come from :mod:`scipy.stats`; PLCC is computed on the scores as they are, without the
4-parameter logistic fit some papers apply first, as DP-IQA's released ``metrics.py`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from diqa_cli.training.labels import default_split, read_labels, select_split

__all__ = ["correlations", "evaluate"]

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def correlations(predicted, target) -> dict[str, float]:
    """SRCC, PLCC (no logistic fit) and KRCC between predictions and labels."""
    import numpy as np
    from scipy import stats

    predicted = np.asarray(predicted, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if len(predicted) < 2 or np.ptp(predicted) == 0 or np.ptp(target) == 0:
        # Correlation is undefined for fewer than two points or a constant side.
        return {"srcc": float("nan"), "plcc": float("nan"), "krcc": float("nan")}
    return {
        "srcc": float(stats.spearmanr(predicted, target)[0]),
        "plcc": float(stats.pearsonr(predicted, target)[0]),
        "krcc": float(stats.kendalltau(predicted, target)[0]),
    }


def evaluate(
    checkpoint: str | Path,
    labels_csv: str | Path,
    *,
    split: str | None = None,
    backbone: str | None = None,
    clip_encoder: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    log: Log | None = None,
    keep_scores: bool = False,
) -> dict[str, Any]:
    """Score the rows of ``split`` (default: ``test`` when the CSV has a split column, else every
    row) with the normal scoring pipeline (``diqa score``'s, or ``diqa score-video``'s for video
    methods) and correlate the reported scores with the MOS.

    Returns ``srcc``, ``plcc`` (no logistic fit), ``krcc``, ``n`` (inputs scored) and ``n_failed``;
    with ``keep_scores`` also ``predicted`` and ``target``, the scored inputs' scores and MOS.
    """
    from diqa_cli.checkpoint import load_head
    from diqa_cli.imageio import InputItem
    from diqa_cli.models.base import VideoQualityModel

    log = log or _quiet
    rows = read_labels(labels_csv)
    if split is None:
        split = default_split(rows, "test")
    chosen = select_split(rows, split, source=labels_csv)
    model, sidecar = load_head(checkpoint, device=device, dtype=dtype, offline=offline, backbone_ref=backbone)
    model.eval()
    items = [InputItem(str(r.path)) for r in chosen]
    normalisation = sidecar["score_normalisation"]
    if isinstance(model, VideoQualityModel):
        from diqa_cli.pipelines.videos import score_videos

        encoder = model.load_clip_encoder(clip_encoder, relative_to=Path(checkpoint).parent, offline=offline)
        scored = score_videos(items, model, encoder, normalisation=normalisation, batch_size=batch_size)
    else:
        from diqa_cli.pipelines.images import score_images

        scored = score_images(items, model, batch_size=batch_size, workers=workers, normalisation=normalisation)
    mos_by_path = {str(r.path): r.mos for r in chosen}
    predicted, target, failed = [], [], 0
    for row in scored:
        if row.get("status") == "ok" and row.get("score") is not None:
            predicted.append(row["score"])
            target.append(mos_by_path[row["path"]])
        else:
            failed += 1
            log(f"diqa: {row.get('path')}: {row.get('error')}")
    metrics = correlations(predicted, target)
    kept = {"predicted": predicted, "target": target} if keep_scores else {}
    return {
        **metrics,
        **kept,
        "n": len(predicted),
        "n_failed": failed,
        "split": split or "all",
        "method": sidecar.get("method"),
        "checkpoint": str(checkpoint),
        "plcc_fit": "none",
    }
