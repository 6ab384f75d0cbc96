"""`diqa eval --plot` and the plots module: a golden image, the logistic fit, a plot that decodes,
and the one-line error without matplotlib."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from diqa_cli.plots import INSTALL_HINT, eval_plot, fit_logistic, logistic4

GOLDEN = Path(__file__).parent / "data" / "eval_plot_200x150.png"


def _golden_data():
    rng = np.random.default_rng(7)
    predicted = np.linspace(0.0, 1.0, 25) + rng.normal(0, 0.05, 25)
    target = logistic4(predicted, 4.5, 1.2, 0.5, 0.12) + rng.normal(0, 0.15, 25)
    return predicted, target


def test_logistic_fit_recovers_its_parameters():
    x = np.linspace(-2, 3, 60)
    y = logistic4(x, 5.0, 1.0, 0.4, 0.6)
    params = fit_logistic(x, y)
    np.testing.assert_allclose(np.abs(params), [5.0, 1.0, 0.4, 0.6], rtol=1e-3, atol=1e-3)
    assert fit_logistic([1, 2], [1, 2]) is None and fit_logistic([1, 1, 1, 1], [1, 2, 3, 4]) is None


def test_eval_plot_matches_the_golden_image(tmp_path):
    """200 x 150 px at 100 dpi, matplotlib's default style with its bundled font (the version pinned
    in constraints.txt). Compared by RMS difference, so anti-aliasing noise passes and a moved line,
    lost curve or changed title does not. DIQA_UPDATE_GOLDEN=1 rewrites the golden file."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "plot.png"
    predicted, target = _golden_data()
    fit = eval_plot(out, predicted, target, label="golden", width=200, height=150)
    assert fit["logistic"] is not None and fit["plcc_fitted"] > 0.9
    if os.environ.get("DIQA_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_bytes(out.read_bytes())
    actual = np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)
    expected = np.asarray(Image.open(GOLDEN).convert("RGB"), dtype=np.float64)
    assert actual.shape == expected.shape == (150, 200, 3)
    rms = float(np.sqrt(np.mean((actual - expected) ** 2)))
    assert rms < 6.0, f"plot differs from {GOLDEN.name}: RMS {rms:.2f} of 255 (run with DIQA_UPDATE_GOLDEN=1 if intended)"

    # Without the fitted curve the picture differs by far more than that tolerance.
    flat = tmp_path / "flat.png"
    eval_plot(flat, predicted, np.full_like(target, 3.0), label="golden", width=200, height=150)
    other = np.asarray(Image.open(flat).convert("RGB"), dtype=np.float64)
    assert float(np.sqrt(np.mean((other - expected) ** 2))) > 2 * 6.0


@pytest.fixture
def labels(tmp_path, tiny_images):
    folder = tmp_path / "set"
    folder.mkdir()
    with (folder / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "mos"])
        for i, image in enumerate(tiny_images(6, 64)):
            image.save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", 1 + 0.5 * i])
    return folder / "labels.csv"


def test_eval_plot_file_decodes_and_stdout_keeps_only_the_metrics(labels, dpiqa_head, run_main, model_home, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    plot = tmp_path / "eval.png"
    code, out, err = run_main(["eval", "--checkpoint", str(dpiqa_head), "--data", str(labels), "--device", "cpu",
                               "--dtype", "fp32", "--offline", "-f", "json", "--plot", str(plot)], home=model_home)
    assert code == 0, err
    result = json.loads(out)
    assert "predicted" not in result and result["n"] == 6
    assert f"wrote {plot}" in err
    with Image.open(plot) as picture:
        picture.load()
        assert picture.format == "PNG" and picture.size == (640, 480)


def test_plot_without_matplotlib_is_one_line_naming_the_extra(labels, dpiqa_head, run_main, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    code, out, err = run_main(["eval", "--checkpoint", str(dpiqa_head), "--data", str(labels), "--offline",
                               "--plot", str(tmp_path / "p.png")])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"diqa: error: --plot needs matplotlib, which is not installed; install it with: {INSTALL_HINT}"]
    assert not (tmp_path / "p.png").exists()
