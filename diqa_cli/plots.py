"""Plots: ``diqa eval --plot`` (predicted score against MOS with the 4-parameter logistic fit) and
the PNG strip ``diqa enhance --report`` writes beside its JSON (before, after, amplified difference
and the prior at every iteration).

matplotlib is optional (``pip install 'diqa-cli[plots]'``) and imported only here, through its
object-oriented API with the Agg canvas: no pyplot, no GUI backend, no global figure state, and
the user's matplotlibrc is set aside (``matplotlib.style.context("default")`` plus :data:`STYLE`),
so the same data give the same picture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from diqa_cli.errors import UsageError

__all__ = ["INSTALL_HINT", "eval_plot", "enhance_strip", "fit_logistic", "logistic4", "require_matplotlib"]

INSTALL_HINT = "pip install 'diqa-cli[plots]'"
# Fixed look: matplotlib's default style with its bundled font, whatever the user's settings.
STYLE = {"font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9,
         "figure.dpi": 100, "savefig.dpi": 100}


def require_matplotlib(what: str):
    """The ``matplotlib`` module, or a one-line usage error saying ``what`` needs it and how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(f"{what} needs matplotlib, which is not installed; install it with: {INSTALL_HINT}") from None
    return matplotlib


def logistic4(x, b1: float, b2: float, b3: float, b4: float):
    """The 4-parameter logistic of VQEG / IQA papers: (b1 − b2) / (1 + exp(−(x − b3) / |b4|)) + b2."""
    z = np.clip(-(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12), -500, 500)
    return (b1 - b2) / (1 + np.exp(z)) + b2


def fit_logistic(predicted, target) -> tuple[float, float, float, float] | None:
    """Least-squares parameters of :func:`logistic4` mapping ``predicted`` to ``target``, or None
    where the fit does not converge (too few points, constant scores)."""
    from scipy.optimize import curve_fit

    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if len(x) < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    start = [float(y.max()), float(y.min()), float(np.mean(x)), float(np.std(x)) or 1.0]
    import warnings

    from scipy.optimize import OptimizeWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)  # no covariance estimate: the parameters stand
            params, _ = curve_fit(logistic4, x, y, p0=start, maxfev=20000)
    except (RuntimeError, ValueError, TypeError):
        return None
    return tuple(float(p) for p in params) if np.all(np.isfinite(params)) else None


def _figure(width_px: int, height_px: int, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike, dpi: int) -> Path:
    from diqa_cli.files import atomic_write

    return atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None}))


def eval_plot(
    path: str | os.PathLike,
    predicted: Sequence[float],
    target: Sequence[float],
    *,
    label: str = "",
    width: int = 640,
    height: int = 480,
    dpi: int = 100,
) -> dict:
    """Write a scatter of ``predicted`` scores against ``target`` (MOS) with the fitted 4-parameter
    logistic curve, SRCC and PLCC in the title (PLCC of the scores as they are, and after the
    fit), ``label`` (method, split) above them; ``width`` x ``height`` pixels. Returns the fit:
    ``{"logistic": params or None, "plcc_fitted": float or None}``."""
    matplotlib = require_matplotlib("--plot")
    import matplotlib.style  # noqa: F401 - a submodule, not loaded by `import matplotlib`
    from diqa_cli.training.evaluate import correlations

    x = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    metrics = correlations(x, y)
    params = fit_logistic(x, y)
    fitted = correlations(logistic4(x, *params), y)["plcc"] if params is not None else None
    # Text scales with the picture (9 pt at 640 px wide), so a small plot keeps its title.
    points = float(np.clip(width / 70, 5, 9))
    style = {**STYLE, "font.size": points, "axes.titlesize": points, "axes.labelsize": points,
             "xtick.labelsize": points, "ytick.labelsize": points}
    with matplotlib.style.context("default"), matplotlib.rc_context(style):
        figure = _figure(width, height, dpi)
        axes = figure.add_subplot()
        axes.scatter(x, y, s=max(4, width / 80), alpha=0.7, color="#3b528b", edgecolors="none")
        if params is not None:
            grid = np.linspace(x.min(), x.max(), 200)
            axes.plot(grid, logistic4(grid, *params), color="#f98e09", linewidth=1.5)
        axes.set_xlabel("predicted score")
        axes.set_ylabel("MOS")
        fit = f" (fitted {fitted:.3f})" if fitted is not None else " (no logistic fit)"
        head = f"{label}, n={len(x)}" if label else f"n={len(x)}"
        axes.set_title(f"{head}\nSRCC {metrics['srcc']:.3f}  PLCC {metrics['plcc']:.3f}{fit}")
        axes.grid(True, alpha=0.3)
        figure.tight_layout(pad=0.4)
        _save(figure, path, dpi)
    return {"logistic": list(params) if params is not None else None, "plcc_fitted": fitted}


def _difference(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, float]:
    """|after − before| per pixel (mean over colour), amplified so its 99th percentile is white;
    the gain used."""
    diff = np.abs(after.astype(np.float64) - before.astype(np.float64)).mean(axis=2)
    top = float(np.percentile(diff, 99)) if diff.size else 0.0
    gain = 1.0 / top if top > 0 else 1.0
    return np.clip(diff * gain, 0, 1), gain


def enhance_strip(path: str | os.PathLike, entries: list[dict], *, max_pixels: int | None = None, dpi: int = 100) -> Path | None:
    """Write the PNG strip of an enhancement report's ``entries`` (``diqa enhance --report``): one
    row per enhanced image, with the input, the output, their absolute difference amplified (gain
    in the title) and the prior at every iteration (best iterate marked). Entries that failed or
    whose files cannot be read are left out; None when none is left."""
    matplotlib = require_matplotlib("the --report strip")
    import matplotlib.style  # noqa: F401 - a submodule, not loaded by `import matplotlib`
    from diqa_cli.errors import InputError
    from diqa_cli.imageio import load_image

    rows = []
    for entry in entries:
        if entry.get("status") not in ("ok", "interrupted"):
            continue
        try:
            before = load_image(entry["input"], max_pixels=max_pixels)
            after = load_image(entry["output"], max_pixels=max_pixels)
        except InputError:
            continue
        if before.shape != after.shape:
            continue
        rows.append((entry, before, after))
    if not rows:
        return None
    with matplotlib.style.context("default"), matplotlib.rc_context(STYLE):
        figure = _figure(4 * 250, 250 * len(rows), dpi)
        for index, (entry, before, after) in enumerate(rows):
            diff, gain = _difference(before, after)
            name = Path(entry["input"]).name
            panels = [(before, f"{name}: before, prior {entry.get('prior_before', float('nan')):.4g}"),
                      (after, f"after, prior {entry.get('prior_after', float('nan')):.4g}"),
                      (diff, f"|after − before| × {gain:.3g}")]
            for column, (image, title) in enumerate(panels):
                axes = figure.add_subplot(len(rows), 4, index * 4 + column + 1)
                axes.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
                axes.set_title(title, fontsize=8)
                axes.set_axis_off()
            axes = figure.add_subplot(len(rows), 4, index * 4 + 4)
            history = entry.get("history") or []
            steps = [h.get("iteration", i) for i, h in enumerate(history)]
            priors = [h.get("prior") for h in history]
            axes.plot(steps, priors, color="#3b528b", linewidth=1.2, marker="o", markersize=2)
            best = entry.get("best_iteration")
            if best is not None and 0 <= best < len(priors):
                axes.plot([steps[best]], [priors[best]], marker="*", color="#f98e09", markersize=9, linestyle="none",
                          label="kept (best objective)")
                axes.legend(fontsize=7, loc="best")
            axes.set_xlabel("iteration")
            axes.set_ylabel("prior score")
            axes.set_title("prior by iteration", fontsize=8)
            axes.grid(True, alpha=0.3)
        figure.tight_layout(pad=0.5)
        return _save(figure, path, dpi)
