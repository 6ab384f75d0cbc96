"""Evaluation of a head on a labels CSV through the normal scoring pipeline; SRCC / PLCC / KRCC.

Metrics come from :mod:`scipy.stats`; PLCC is computed on the scores as they are, without the
4-parameter logistic fit some papers apply first, as DP-IQA's released ``metrics.py`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diqa_cli.pipelines.datasets import Log, quiet
from diqa_cli.training.labels import default_split, read_labels, select_split

__all__ = ["correlations", "evaluate"]



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
    predictions: str | Path | None = None,
) -> dict[str, Any]:
    """Score the rows of ``split`` (default: ``test`` when the CSV has a split column, else every
    row) with the normal scoring pipeline (``diqa score``'s, or ``diqa score-video``'s for video
    methods) and correlate the reported scores with the MOS.

    Returns ``srcc``, ``plcc`` (no logistic fit), ``plcc_logistic`` (PLCC after the standard
    4-parameter logistic fit; None when it does not converge or there are fewer than 4 inputs),
    ``krcc``, ``n`` (inputs scored) and ``n_failed``; with ``keep_scores`` also ``predicted`` and
    ``target``, the scored inputs' scores and MOS. ``predictions`` names a CSV to write with one row
    per input: ``path, mos, score, status, error``.
    """
    from diqa_cli.checkpoint import load_head
    from diqa_cli.imageio import InputItem
    from diqa_cli.models.base import VideoQualityModel

    log = log or quiet
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
    predicted, target, failed, per_input = [], [], 0, []
    for row in scored:
        ok = row.get("status") == "ok" and row.get("score") is not None
        per_input.append({"path": row["path"], "mos": mos_by_path[row["path"]], "score": row.get("score") if ok else None,
                          "status": "ok" if ok else "error", "error": None if ok else row.get("error")})
        if ok:
            predicted.append(row["score"])
            target.append(mos_by_path[row["path"]])
        else:
            failed += 1
            log(f"diqa: {row.get('path')}: {row.get('error')}")
    if len(predicted) < 3:
        log(f"diqa: warning: only {len(predicted)} input(s) scored; correlations need at least 3 to mean anything")
    if predictions is not None:
        _write_predictions(Path(predictions), per_input)
    metrics = correlations(predicted, target)
    metrics["plcc_logistic"] = _plcc_after_logistic_fit(predicted, target)
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


def _plcc_after_logistic_fit(predicted, target) -> float | None:
    """PLCC between the MOS and the scores mapped by the fitted 4-parameter logistic (VQEG)."""
    import numpy as np

    from diqa_cli.plots import fit_logistic, logistic4

    params = fit_logistic(predicted, target)
    if params is None:
        return None
    mapped = logistic4(np.asarray(predicted, dtype=np.float64), *params)
    return correlations(mapped, target)["plcc"]


def _write_predictions(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    from diqa_cli.files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["path", "mos", "score", "status", "error"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
