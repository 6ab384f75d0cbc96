"""Label files as datasets publish them: column mapping, presets (each on a few rows written in its
published layout, with tiny images or videos), auto-detection, and the ``--init imagenet`` start of
the DP-IQA student (its "ImageNet" weights a local manifest entry made here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from diqa_cli.errors import UsageError
from diqa_cli.training import LabelRow, labels_source, read_labels


def _write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _images(folder: Path, names, tiny_images) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, tiny_images(len(names))):
        image.save(folder / name)


def _videos(folder: Path, names) -> None:
    """Two-frame 32x32 H.264 clips, a different grey level each."""
    import av
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        with av.open(str(folder / name), "w") as container:
            stream = container.add_stream("libx264", rate=2)
            stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
            pixels = np.full((32, 32, 3), 40 * (i + 1), dtype=np.uint8)
            for _ in range(2):
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


def _cell_column(names):
    """A MATLAB cell array of strings, one a row, as scipy.io.savemat writes an (N, 1) object array."""
    import numpy as np

    cells = np.empty((len(names), 1), dtype=object)
    for i, name in enumerate(names):
        cells[i, 0] = name
    return cells


# --- column mapping -------------------------------------------------------------------------


def test_columns_are_named_and_matched_ignoring_case(tmp_path):
    labels = _write_csv(
        tmp_path / "scores.csv", ["File", "Score", "Fold", "notes"], [["a.png", "3.5", "train", "x"], ["b.png", "2", "", ""]]
    )
    rows = read_labels(labels, path_col="file", mos_col="SCORE", split_col="fold")
    assert rows == [LabelRow(tmp_path / "a.png", 3.5, "train"), LabelRow(tmp_path / "b.png", 2.0, None)]
    # The default names are matched ignoring case too.
    plain = _write_csv(tmp_path / "plain.csv", ["Path", "MOS", "Split"], [["c.png", "1", "test"]])
    assert read_labels(plain) == [LabelRow(tmp_path / "c.png", 1.0, "test")]
    # --media-dir replaces the CSV's folder as the base of relative paths.
    media = tmp_path / "media"
    media.mkdir()
    assert read_labels(plain, media_dir=media)[0].path == media / "c.png"


def test_missing_columns_name_the_file_what_it_found_and_the_fix(tmp_path):
    labels = _write_csv(tmp_path / "scores.csv", ["image", "rating"], [["a.png", "3"]])
    with pytest.raises(UsageError) as info:
        read_labels(labels)
    message = str(info.value)
    assert "\n" not in message
    assert str(labels) in message and "missing column(s) path, mos (found: image, rating)" in message
    assert "--path-col" in message and "--preset" in message
    with pytest.raises(UsageError, match=r"missing column\(s\) fold \(found: image, rating\)"):
        read_labels(labels, path_col="image", mos_col="rating", split_col="fold")


def test_a_file_with_a_published_name_but_other_columns_stays_a_plain_labels_csv(tmp_path):
    labels = _write_csv(tmp_path / "dmos.csv", ["path", "mos"], [["a.png", "4"]])
    source = labels_source(labels)
    assert source.preset is None and not source.detected
    assert read_labels(labels) == [LabelRow(tmp_path / "a.png", 4.0, None)]


# --- presets, each in its published layout --------------------------------------------------


def _koniq(root: Path, tiny_images):
    names = ["10004473376.jpg", "10007357496.jpg", "10043785683.jpg", "100117038.jpg"]
    _images(root / "1024x768", names, tiny_images)
    header = ["image_name", "c1", "c2", "c3", "c4", "c5", "c_total", "MOS", "SD", "set"]
    sets = ["training", "test", "validation", "training"]
    mos = ["77.3836206897", "68.7285714286", "71.2043269231", "15.2293577982"]
    rows = [[n, "0.0", "0.0", "0.2", "0.7", "0.1", "105", m, "0.52", s] for n, m, s in zip(names, mos, sets)]
    labels = _write_csv(root / "koniq10k_distributions_sets.csv", header, rows)
    expected = [
        LabelRow(root / "1024x768" / n, float(m), s) for n, m, s in zip(names, mos, ["train", "test", "val", "train"])
    ]
    return labels, expected


def _clive(root: Path, tiny_images):
    from scipy.io import savemat

    import numpy as np

    names = [f"t{i}.bmp" for i in range(1, 8)] + ["10.bmp", "100.bmp", "1000.JPG"]
    mos = [50.0 + i for i in range(7)] + [63.9, 25.5, 80.25]
    _images(root / "Images" / "trainingImages", names[:7], tiny_images)
    _images(root / "Images", names[7:], tiny_images)
    (root / "Data").mkdir()
    savemat(str(root / "Data" / "AllImages_release.mat"), {"AllImages_release": _cell_column(names)})
    savemat(str(root / "Data" / "AllMOS_release.mat"), {"AllMOS_release": np.array([mos])})  # (1, N) as published
    expected = [LabelRow(root / "Images" / n, m, None) for n, m in zip(names[7:], mos[7:])]
    return root / "Data" / "AllMOS_release.mat", expected


def _spaq(root: Path, tiny_images):
    names = ["00001.jpg", "00002.jpg", "00003.jpg"]
    _images(root / "TestImage", names, tiny_images)
    header = ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"]
    rows = [[n, m, "50", "50", "50", "50", "50"] for n, m in zip(names, ["42.4", "71", "3.2"])]
    labels = _write_csv(root / "Annotations" / "MOS and Image attribute scores.csv", header, rows)
    return labels, [LabelRow(root / "TestImage" / n, float(m), None) for n, m in zip(names, ["42.4", "71", "3.2"])]


def _kadid(root: Path, tiny_images):
    names = ["I01_01_01.png", "I01_01_05.png", "I02_10_03.png"]
    _images(root / "images", names + ["I01.png", "I02.png"], tiny_images)
    rows = [[names[0], "I01.png", "4.57", "0.496"], [names[1], "I01.png", "1.43", "0.38"], [names[2], "I02.png", "3.1", "0.6"]]
    labels = _write_csv(root / "dmos.csv", ["dist_img", "ref_img", "dmos", "var"], rows)
    return labels, [LabelRow(root / "images" / r[0], float(r[2]), None) for r in rows]


def _konvid(root: Path, tiny_images):
    ids = ["2999049224", "3339962845", "5093585296"]
    _videos(root / "KoNViD_1k_videos", [i + ".mp4" for i in ids])
    labels = _write_csv(root / "KoNViD_1k_mos.csv", ["flickr_id", "mos"], [[i, m] for i, m in zip(ids, ["3.42", "2.1", "4.64"])])
    return labels, [LabelRow(root / "KoNViD_1k_videos" / f"{i}.mp4", float(m), None) for i, m in zip(ids, ["3.42", "2.1", "4.64"])]


def _livevqc(root: Path, tiny_images):
    from scipy.io import savemat

    import numpy as np

    names = ["A001.mp4", "A002.mp4", "B101.mp4"]
    mos = [80.232, 36.5, 61.0]
    _videos(root / "Video", names)
    savemat(str(root / "data.mat"), {"video_list": _cell_column(names), "mos": np.array(mos).reshape(-1, 1)})
    return root / "data.mat", [LabelRow(root / "Video" / n, m, None) for n, m in zip(names, mos)]


_LAYOUTS = {
    "koniq10k": _koniq,
    "clive": _clive,
    "spaq": _spaq,
    "kadid10k": _kadid,
    "konvid1k": _konvid,
    "livevqc": _livevqc,
}


@pytest.mark.parametrize("name", list(_LAYOUTS))
def test_each_preset_reads_its_published_layout(name, tmp_path, tiny_images):
    root = tmp_path / name
    root.mkdir()
    labels, expected = _LAYOUTS[name](root, tiny_images)

    source = labels_source(labels)  # recognised by its published name
    assert source.detected and source.preset.name == name
    rows = read_labels(labels)
    assert [r.path for r in rows] == [e.path for e in expected]
    assert [r.mos for r in rows] == pytest.approx([e.mos for e in expected])
    assert [r.split for r in rows] == [e.split for e in expected]
    assert all(r.path.is_file() for r in rows)
    # Named explicitly, and given the dataset's folder instead of the file: the same rows.
    assert read_labels(root, preset=name) == rows
    layout = source.layout()
    assert layout["preset"] == name and layout["higher_is_better"] is True
    assert len(layout["published_mos_range"]) == 2


def test_a_csv_preset_takes_a_split_column_added_to_the_published_file(tmp_path, tiny_images):
    root = tmp_path / "konvid"
    root.mkdir()
    labels, expected = _konvid(root, tiny_images)
    with labels.open() as fh:
        lines = fh.read().splitlines()
    folds = ["fold", "train", "test", "train"]
    labels.write_text("\n".join(f"{line},{fold}" for line, fold in zip(lines, folds)) + "\n")
    rows = read_labels(labels, preset="konvid1k", split_col="fold")
    assert [r.path for r in rows] == [e.path for e in expected]
    assert [r.split for r in rows] == ["train", "test", "train"]
    assert labels_source(labels, preset="konvid1k", split_col="fold").layout()["split_column"] == "fold"


def test_preset_errors_say_what_to_do(tmp_path, tiny_images):
    (tmp_path / "koniq").mkdir()
    labels, _ = _koniq(tmp_path / "koniq", tiny_images)
    (tmp_path / "koniq" / "1024x768").rename(tmp_path / "koniq" / "photos")
    with pytest.raises(UsageError, match=r"no 1024x768 or 512x384 folder beside it .*--media-dir"):
        read_labels(labels)
    assert read_labels(labels, media_dir=tmp_path / "koniq" / "photos")[0].path.is_file()

    with pytest.raises(UsageError, match=r"unknown --preset 'koniq'; choose one of koniq10k, clive"):
        labels_source(labels, preset="koniq")
    with pytest.raises(UsageError, match=r"preset koniq10k expects KonIQ-10k's koniq10k_distributions_sets.csv"):
        read_labels(_write_csv(tmp_path / "other.csv", ["path", "mos"], [["a", "1"]]), preset="koniq10k")

    xlsx = tmp_path / "spaq" / "Annotations" / "MOS and Image attribute scores.xlsx"
    xlsx.parent.mkdir(parents=True)
    xlsx.write_bytes(b"PK\x03\x04")
    with pytest.raises(UsageError, match=r"does not read Excel files; .*save it as CSV .*'MOS and Image attribute scores.csv'"):
        read_labels(xlsx)

    lonely = tmp_path / "clive" / "Data"
    lonely.mkdir(parents=True)
    from scipy.io import savemat

    savemat(str(lonely / "AllMOS_release.mat"), {"AllMOS_release": [[1.0, 2.0]]})
    with pytest.raises(UsageError, match=r"AllImages_release.mat \(with the variable AllImages_release\) must sit beside it"):
        read_labels(lonely / "AllMOS_release.mat")


# --- the commands -------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_and_eval_recognise_koniq_and_use_its_official_split(tmp_path, tiny_images, run_main, one_thread):
    root = tmp_path / "koniq10k"
    root.mkdir()
    labels, expected = _koniq(root, tiny_images)
    out = tmp_path / "student.safetensors"
    code, stdout, stderr = run_main(
        ["train", "-m", "dpiqa-student", "--data", str(labels), "--out", str(out), "--config", "tiny",
         "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--dtype", "fp32", "--offline"]
    )
    assert code == 0, stderr
    assert "koniq10k_distributions_sets.csv is KonIQ-10k's published label file: reading it with --preset koniq10k" in stderr
    assert "start random" in stderr
    record = json.loads(out.with_suffix(".json").read_text())["training"]
    train_mos = [r.mos for r in expected if r.split == "train"]
    assert record["split"] == "train" and record["n_train"] == len(train_mos) == 2
    assert record["normalised_mos"] == pytest.approx({"offset": min(train_mos), "scale": max(train_mos) - min(train_mos)})
    assert record["labels_layout"]["preset"] == "koniq10k"
    assert record["labels_layout"]["published_mos_range"] == [1.0, 100.0]
    assert record["labels_layout"]["mos_column"] == "MOS" and record["init"] == "random"

    code, stdout, stderr = run_main(
        ["eval", "--checkpoint", str(out), "--data", str(root), "--preset", "koniq10k", "--format", "json",
         "--device", "cpu", "--dtype", "fp32", "--offline"]
    )
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["split"] == "test" and result["n"] == 1 and result["n_failed"] == 0


def test_train_reads_named_columns_and_records_them(tmp_path, tiny_images, run_main, one_thread):
    _images(tmp_path / "pics", ["a.png", "b.png", "c.png"], tiny_images)
    labels = _write_csv(tmp_path / "ratings.csv", ["Image", "Rating"], [["a.png", "1"], ["b.png", "2"], ["c.png", "5"]])
    out = tmp_path / "s.safetensors"
    code, _, stderr = run_main(
        ["train", "-m", "dpiqa-student", "--data", str(labels), "--path-col", "image", "--mos-col", "rating",
         "--media-dir", str(tmp_path / "pics"), "--out", str(out), "--config", "tiny", "--epochs", "1",
         "--device", "cpu", "--dtype", "fp32", "--offline"]
    )
    assert code == 0, stderr
    record = json.loads(out.with_suffix(".json").read_text())["training"]
    assert record["n_train"] == 3 and record["normalised_mos"] == {"offset": 1.0, "scale": 4.0}
    assert record["labels_layout"]["path_column"] == "image" and record["labels_layout"]["preset"] is None

    code, _, stderr = run_main(
        ["train", "-m", "dpiqa-student", "--data", str(labels), "--out", str(out), "--config", "tiny", "--offline"]
    )
    assert code == 2 and "missing column(s) path, mos (found: Image, Rating)" in stderr


# --- --init imagenet --------------------------------------------------------------------------


@pytest.fixture
def imagenet_b0(tmp_path, monkeypatch):
    """'ImageNet' weights for the tiny student's EfficientNet-B0: a seeded torchvision B0 saved as
    a local manifest entry's safetensors file, in the weights cache, mapped for efficientnet_b0."""
    import hashlib

    import torch
    import torchvision
    from safetensors.torch import save_file

    from diqa_cli import weights
    from diqa_cli.models import dpiqa_student

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        state = {k: v.contiguous() for k, v in torchvision.models.efficientnet_b0(weights=None).state_dict().items()}
    staged = tmp_path / "b0.safetensors"
    save_file(state, str(staged))
    manifest = json.loads(weights.manifest_path().read_text(encoding="utf-8"))
    name = "efficientnet-b0-imagenet-test"
    manifest["entries"][name] = {
        "name": name,
        "kind": "torchvision-backbone",
        "description": "test stand-in for ImageNet EfficientNet-B0 weights",
        "licence": "test",
        "source": "https://example.invalid/models",
        "files": [{"path": "b0.safetensors", "format": "safetensors", "sha256": hashlib.sha256(staged.read_bytes()).hexdigest()}],
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest), encoding="utf-8")
    monkeypatch.setenv("DIQA_MANIFEST", str(path))
    monkeypatch.setitem(dpiqa_student.IMAGENET_WEIGHTS, "efficientnet_b0", name)
    return name, staged, state


def test_init_imagenet_starts_the_student_from_the_manifest_weights(tmp_path, tiny_images, imagenet_b0, run_main, one_thread):
    import shutil

    import torch

    from diqa_cli import weights
    from diqa_cli.files import read_safetensors

    name, staged, state = imagenet_b0
    _images(tmp_path / "pics", ["a.png", "b.png", "c.png"], tiny_images)
    labels = _write_csv(tmp_path / "labels.csv", ["path", "mos"], [["pics/a.png", "1"], ["pics/b.png", "2"], ["pics/c.png", "3"]])
    args = ["train", "-m", "dpiqa-student", "--data", str(labels), "--config", "tiny", "--epochs", "1",
            "--lr", "1e-9", "--device", "cpu", "--dtype", "fp32", "--offline"]

    # Not pulled yet: the weights error names the entry and the command that fetches it.
    code, _, stderr = run_main([*args, "--init", "imagenet", "--out", str(tmp_path / "x.safetensors")])
    assert code == 1 and f"diqa weights pull {name}" in stderr

    target = weights.entry(name).local_dir / "b0.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(staged, target)
    out = tmp_path / "imagenet.safetensors"
    code, _, stderr = run_main([*args, "--init", "imagenet", "--out", str(out)])
    assert code == 0, stderr
    assert "start imagenet" in stderr
    assert json.loads(out.with_suffix(".json").read_text())["training"]["init"] == "imagenet"

    trunk = {k: v for k, v in state.items() if k.startswith("features.") and v.is_floating_point() and "running" not in k}
    saved = read_safetensors(out)
    # One step at lr 1e-9 moves no weight by more than ~1e-9: the trunk is the manifest's.
    assert all(torch.allclose(saved[f"base_model.{k}"], v, atol=1e-6) for k, v in trunk.items())
    random_out = tmp_path / "random.safetensors"
    assert run_main([*args, "--out", str(random_out)])[0] == 0
    assert not torch.allclose(read_safetensors(random_out)["base_model.features.0.0.weight"], trunk["features.0.0.weight"], atol=1e-3)


def test_init_imagenet_is_a_usage_error_for_a_method_without_an_imagenet_start(tmp_path, run_main):
    labels = _write_csv(tmp_path / "labels.csv", ["path", "mos"], [["a.png", "1"], ["b.png", "2"]])
    code, _, stderr = run_main(
        ["train", "-m", "dpiqa", "--data", str(labels), "--init", "imagenet", "--out", str(tmp_path / "h.safetensors"), "--offline"]
    )
    assert code == 2
    assert "--init imagenet: method 'dpiqa' has no ImageNet start (methods that have one: dpiqa-student)" in stderr
