"""Training, distillation and evaluation on the tiny backbone and the SYNTHETIC distortion set.

The learning tests train DP-IQA heads for real (tiny backbone, CPU) and compare against the same
training on shuffled labels, so they fail if training or evaluation stops carrying the signal.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

from diqa_cli.errors import UsageError
from diqa_cli.synthetic import DISTORTIONS, make_synthetic_set, synthetic_mos
from diqa_cli.training import correlations, evaluate, read_labels, select_split, train

# --- labels ---------------------------------------------------------------------------------


def _write_csv(path, header, rows):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_read_labels_resolves_paths_against_the_csv_folder(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    absolute = tmp_path / "elsewhere.png"
    labels = _write_csv(
        folder / "labels.csv", ["path", "mos", "split"], [["a.png", "3.5", "train"], [str(absolute), "1", ""]]
    )
    rows = read_labels(labels)
    assert [r.path for r in rows] == [folder / "a.png", absolute]
    assert [r.mos for r in rows] == [3.5, 1.0]
    assert [r.split for r in rows] == ["train", None]


def test_read_labels_names_the_missing_column_and_what_it_found(tmp_path):
    labels = _write_csv(tmp_path / "labels.csv", ["file", "mos"], [["a.png", "1"]])
    with pytest.raises(UsageError, match=r"missing column\(s\) path \(found: file, mos\)"):
        read_labels(labels)


@pytest.mark.parametrize(
    ("rows", "message"),
    [([["a.png", "good"]], r"line 2: mos 'good' is not a number"), ([["a.png", "nan"]], r"line 2: .*not a finite")],
)
def test_read_labels_rejects_bad_mos_with_its_line(tmp_path, rows, message):
    labels = _write_csv(tmp_path / "labels.csv", ["path", "mos"], rows)
    with pytest.raises(UsageError, match=message):
        read_labels(labels)


def test_read_labels_missing_file_and_empty_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_labels(tmp_path / "nope.csv")
    with pytest.raises(UsageError, match="no rows"):
        read_labels(_write_csv(tmp_path / "empty.csv", ["path", "mos"], []))


def test_select_split_says_which_splits_exist(tmp_path):
    labels = _write_csv(tmp_path / "l.csv", ["path", "mos", "split"], [["a", "1", "train"], ["b", "2", "test"]])
    rows = read_labels(labels)
    assert [r.path.name for r in select_split(rows, "test")] == ["b"]
    assert len(select_split(rows, "all")) == 2
    with pytest.raises(UsageError, match=r"no rows in split 'val' \(present: test, train\)"):
        select_split(rows, "val")


def test_correlations_rank_order_and_undefined_cases():
    assert correlations([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx({"srcc": 1.0, "plcc": 0.99, "krcc": 1.0}, abs=0.01)
    assert correlations([4, 3, 2, 1], [1, 2, 3, 4])["srcc"] == pytest.approx(-1.0)
    constant = correlations([1, 1, 1], [1, 2, 3])
    assert all(value != value for value in constant.values())  # NaN: undefined, not a fake 0


# --- the synthetic set ----------------------------------------------------------------------


def test_synthetic_set_labels_levels_and_splits_by_photo(tmp_path):
    labels = make_synthetic_set(tmp_path / "syn", size=32, sources=("astronaut", "coffee", "chelsea", "camera"), seed=3)
    with labels.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "mos", "split", "source", "distortion", "level"]
    # One pristine reference plus 4 distortions x 5 levels per photo.
    assert len(rows) == 4 * (1 + len(DISTORTIONS) * 5)
    for row in rows:
        assert float(row["mos"]) == pytest.approx(synthetic_mos(int(row["level"])), abs=1e-6)
        assert (labels.parent / row["path"]).is_file()
        assert row["path"].endswith(".jpg") == (row["distortion"] == "jpeg")
    splits = {}
    for row in rows:
        splits.setdefault(row["source"], set()).add(row["split"])
    assert all(len(s) == 1 for s in splits.values()), "a photo must never be in both splits"
    assert {s.pop() for s in splits.values()} == {"train", "test"}
    assert "SYNTHETIC" in (labels.parent / "README.txt").read_text()


def test_synthetic_set_is_reproducible_and_levels_grow_stronger(tmp_path):
    import numpy as np
    from PIL import Image

    first = make_synthetic_set(tmp_path / "a", size=32, sources=("coffee", "rocket"), seed=1)
    second = make_synthetic_set(tmp_path / "b", size=32, sources=("coffee", "rocket"), seed=1)
    assert first.read_bytes() == second.read_bytes()
    assert (first.parent / "coffee" / "coffee_noise_3.png").read_bytes() == (
        second.parent / "coffee" / "coffee_noise_3.png"
    ).read_bytes()

    def error(name):
        ref = np.asarray(Image.open(first.parent / "coffee" / "coffee_reference.png"), dtype=float)
        return float(np.abs(np.asarray(Image.open(first.parent / "coffee" / name), dtype=float) - ref).mean())

    for distortion, ext in (("blur", "png"), ("noise", "png"), ("jpeg", "jpg"), ("contrast", "png")):
        errors = [error(f"coffee_{distortion}_{level}.{ext}") for level in range(1, 6)]
        assert errors == sorted(errors), f"{distortion} must move further from the reference at each level"


def test_synthetic_set_refuses_unknown_names(tmp_path):
    with pytest.raises(UsageError, match="unknown synthetic source 'lena'"):
        make_synthetic_set(tmp_path, sources=("lena", "coffee"))
    with pytest.raises(UsageError, match="unknown distortion 'rain'"):
        make_synthetic_set(tmp_path, distortions=("rain",))


# --- training on the tiny backbone ----------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """The tiny models' tensors give intra-op threads nothing to share; on a busy 2-core machine
    two threads made each training step several times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# DP-IQA's tiny head without U-Net fine-tuning (a random U-Net has nothing to fine-tune, and
# skipping it makes a step about three times cheaper), with a shallower score path and wider FC
# layers, which leave the initial plateau in far fewer steps on the tiny backbone.
HEAD = {"finetune_unet": False, "decoder_channels": 32, "score_channels": [8], "fc_hidden": 64}
FIT = {"epochs": 40, "batch_size": 8, "lr": 2e-3}
DISTIL = {"epochs": 15, "batch_size": 8, "lr": 1e-3}


def _dpiqa_config():
    from diqa_cli.models.dpiqa import DPIQA

    return {**DPIQA.tiny_config(), **HEAD}


def _relabel(src, dst, *, mos=None, split=None):
    """Copy a labels CSV (paths made absolute, so it may live elsewhere) with its MOS mapped by
    ``mos(row)`` and/or its split by ``split(row)``."""
    with src.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["path"] = str(src.parent / row["path"])
        if mos is not None:
            row["mos"] = mos(row)
        if split is not None:
            row["split"] = split(row)
    with dst.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return dst


def _shuffled_training_mos(src, dst):
    """``src`` with the training rows' MOS shuffled among them (seeded); test rows unchanged."""
    with src.open(newline="") as fh:
        train_mos = [row["mos"] for row in csv.DictReader(fh) if row["split"] == "train"]
    random.Random(0).shuffle(train_mos)
    shuffled = iter(train_mos)
    return _relabel(src, dst, mos=lambda row: next(shuffled) if row["split"] == "train" else row["mos"])


def _learned_and_shuffled(method, labels, out_dir, **train_settings) -> dict[str, tuple[float, float]]:
    """Train ``method`` on ``labels`` and, with the same seed and settings, on the labels with the
    training MOS shuffled; SRCC of both heads on the held-out rows and on every row:
    ``{"test": (learned, shuffled), "all": (learned, shuffled)}``. The learned head is
    ``out_dir/learned.safetensors``."""
    heads = {"learned": out_dir / "learned.safetensors", "shuffled": out_dir / "shuffled.safetensors"}
    # Held-out scoring per epoch (eval_every) changes nothing here but the log; it is skipped for speed.
    common = dict(seed=0, device="cpu", dtype="fp32", offline=True, eval_every=0, **train_settings)
    train(method, labels, out=heads["learned"], **common)
    shuffled = _shuffled_training_mos(labels, out_dir / "shuffled.csv")
    train(method, shuffled, out=heads["shuffled"], **common)

    def srcc(head, split):
        return evaluate(head, labels, split=split, device="cpu", dtype="fp32", offline=True)["srcc"]

    return {split: (srcc(heads["learned"], split), srcc(heads["shuffled"], split)) for split in ("test", "all")}


@pytest.fixture(scope="module")
def level_split(tmp_path_factory):
    """Three photos of the synthetic set, MOS put on a 1-5 scale (so normalisation matters),
    levels 2 and 4 held out: the test images are unseen, their labels lie between trained ones."""
    folder = tmp_path_factory.mktemp("synthetic")
    labels = make_synthetic_set(folder, size=64, sources=("coffee", "astronaut", "chelsea"), seed=0)
    return _relabel(
        labels,
        folder / "levels.csv",
        mos=lambda row: f"{1 + 4 * float(row['mos']):.6f}",
        split=lambda row: "test" if row["level"] in ("2", "4") else "train",
    )


def _train_tiny(tiny_dir, labels, out, **overrides):
    settings = {**FIT, **overrides}
    return train(
        "dpiqa",
        labels,
        backbone=str(tiny_dir / "backbone"),
        out=out,
        seed=settings.pop("seed", 0),
        config=settings.pop("config", _dpiqa_config()),
        device="cpu",
        dtype="fp32",
        offline=True,
        **settings,
    )


@pytest.fixture(scope="module")
def trained(tiny_dir, level_split, tmp_path_factory):
    """A DP-IQA head trained on the training levels: (checkpoint, labels)."""
    out = tmp_path_factory.mktemp("heads") / "dpiqa.safetensors"
    _train_tiny(tiny_dir, level_split, out)
    return out, level_split


@pytest.mark.slow
def test_training_learns_the_labels_not_chance(tiny_dir, trained, tmp_path):
    checkpoint, labels = trained

    # The same training on the same images with the training MOS shuffled among them.
    _train_tiny(tiny_dir, _shuffled_training_mos(labels, tmp_path / "shuffled.csv"), tmp_path / "shuffled.safetensors")

    def scores(head, split):
        return evaluate(head, labels, split=split, device="cpu", dtype="fp32", offline=True)

    # Held-out levels (unseen images; their labels lie between trained ones). Measured over
    # seeds 0-2: learned 0.59-0.76, shuffled -0.12-0.16.
    learned, chance = scores(checkpoint, None), scores(tmp_path / "shuffled.safetensors", None)
    assert learned["split"] == "test" and learned["n"] == 24 and learned["n_failed"] == 0
    assert learned["srcc"] > 0.45 and learned["srcc"] > chance["srcc"] + 0.3, (learned, chance)
    # Every image (seeds 0-2: learned 0.92-0.93, shuffled -0.18-0.21).
    learned, chance = scores(checkpoint, "all"), scores(tmp_path / "shuffled.safetensors", "all")
    assert learned["n"] == 63
    assert learned["srcc"] > 0.8 and learned["srcc"] > chance["srcc"] + 0.5, (learned, chance)
    assert learned["plcc"] > 0.7 and learned["krcc"] > 0.6


def test_lgdm_head_learns_from_features_computed_once_per_image(tiny_dir, level_split, tmp_path, monkeypatch):
    """LGDM's frozen hyperfeatures are computed once per image, not once per epoch, and its head
    learns from them (seeds 0-2, held-out levels: learned 0.40-0.43, shuffled -0.07-0.04;
    every image: 0.83-0.86 against -0.18-0.16)."""
    from diqa_cli.models.lgdm import LGDM

    featurised = []
    original = LGDM.extract_features

    def counting(self, pixels):
        featurised.append(len(pixels))
        return original(self, pixels)

    monkeypatch.setattr(LGDM, "extract_features", counting)
    srcc = _learned_and_shuffled(
        "lgdm", level_split, tmp_path, backbone=str(tiny_dir / "backbone"), epochs=100, batch_size=8, lr=1e-3,
        config="tiny",
    )
    assert sum(featurised) == 2 * 39  # two trainings of 100 epochs, one feature pass per image each

    learned, chance = srcc["test"]
    assert learned > 0.3 and learned > chance + 0.25, (learned, chance)
    learned, chance = srcc["all"]
    assert learned > 0.7 and learned > chance + 0.5, (learned, chance)


@pytest.mark.slow
def test_genziqa_prompts_and_lora_learn_the_labels_not_chance(unit_latent_backbone_dir, level_split, tmp_path):
    """GenzIQA has no head: its score is the pooled cross-attention logits plus the denoising-error
    difference, so only the context vectors and the LoRA can carry the labels. On the tiny backbone
    with unit-variance latents (conftest) they do (seeds 0-2, held-out levels: learned 0.52-0.54,
    shuffled -0.16-0.13; every image: 0.86-0.90 against 0.21-0.22). The first ~15 epochs mostly
    move the score's offset (~18 on the tiny U-Net) onto the normalised MOS, hence the lr."""
    srcc = _learned_and_shuffled(
        "genziqa", level_split, tmp_path, backbone=str(unit_latent_backbone_dir), epochs=100, batch_size=8, lr=3e-3,
        config="tiny",
    )
    learned, chance = srcc["test"]
    assert learned > 0.2 and learned > chance + 0.25, (learned, chance)
    learned, chance = srcc["all"]
    assert learned > 0.7 and learned > chance + 0.5, (learned, chance)


def test_sidecar_records_training_and_scores_come_back_on_the_mos_scale(trained):
    from diqa_cli.checkpoint import load_head, read_sidecar
    from diqa_cli.imageio import InputItem
    from diqa_cli.pipelines.images import score_images

    checkpoint, labels = trained
    sidecar = read_sidecar(checkpoint)
    rows = read_labels(labels)
    train_mos = [r.mos for r in rows if r.split == "train"]
    assert sidecar["score_normalisation"] == pytest.approx({"offset": min(train_mos), "scale": max(train_mos) - min(train_mos)})
    record = sidecar["training"]
    assert record["seed"] == 0 and record["epochs"] == FIT["epochs"] and record["lr"] == FIT["lr"]
    assert record["batch_size"] == FIT["batch_size"] and record["optimizer"] == "AdamW"
    assert record["n_train"] == 39 and record["split"] == "train"
    assert sidecar["backbone"]["identity"] and sidecar["timesteps"] == [1]
    assert sidecar["feature_layers"] == ["up.0", "up.1", "up.2", "up.3"]

    model, _ = load_head(checkpoint, device="cpu", dtype="fp32", offline=True)
    scored = list(
        score_images(
            [InputItem(str(r.path)) for r in rows if r.split == "train"],
            model,
            normalisation=sidecar["score_normalisation"],
        )
    )
    scores = [row["score"] for row in scored]
    # Scores live on the 1-5 MOS scale the head was trained on, not on the normalised [0, 1].
    assert sum(scores) / len(scores) == pytest.approx(sum(train_mos) / len(train_mos), abs=0.5)
    assert max(scores) > 2.5
    for row in scored:
        assert row["score"] == pytest.approx(row["raw_score"] * (max(train_mos) - min(train_mos)) + min(train_mos))


def test_training_is_seeded(tiny_dir, level_split, tmp_path):
    """Same command, same head, tensor for tensor; another seed, another head."""
    from safetensors.torch import load_file

    heads = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _train_tiny(tiny_dir, level_split, tmp_path / f"{name}.safetensors", epochs=1, seed=seed)
        heads[name] = load_file(str(tmp_path / f"{name}.safetensors"))
    assert heads["a"].keys() == heads["b"].keys() == heads["c"].keys()
    assert all(heads["a"][k].equal(heads["b"][k]) for k in heads["a"])
    assert not all(heads["a"][k].equal(heads["c"][k]) for k in heads["a"])
    assert json.loads((tmp_path / "c.json").read_text())["training"]["seed"] == 1


def test_unreadable_images_are_skipped_named_and_counted(tiny_dir, level_split, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with level_split.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["path"] = str(level_split.parent / row["path"])
    rows += [
        {**rows[0], "path": str(tmp_path / "missing.png"), "split": "train"},
        {**rows[0], "path": str(tmp_path / "corrupt.png"), "split": "test"},
    ]
    labels = tmp_path / "with_bad.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    messages = []
    record = _train_tiny(tiny_dir, labels, tmp_path / "head.safetensors", epochs=1, log=messages.append)
    assert record["n_train"] == 39 and record["n_failed"] == 1
    assert any("missing.png" in m and "no such file" in m for m in messages)

    result = evaluate(tmp_path / "head.safetensors", labels, device="cpu", dtype="fp32", offline=True)
    assert result["n"] == 24 and result["n_failed"] == 1


def test_training_refuses_labels_it_cannot_learn_from(tiny_dir, tmp_path):
    same = _write_csv(tmp_path / "same.csv", ["path", "mos"], [["a.png", "3"], ["b.png", "3"]])
    with pytest.raises(UsageError, match="every training MOS is 3.0"):
        _train_tiny(tiny_dir, same, tmp_path / "x.safetensors")
    no_train = _write_csv(tmp_path / "test_only.csv", ["path", "mos", "split"], [["a.png", "1", "test"]])
    with pytest.raises(UsageError, match=r"no rows in split 'train' \(present: test\)"):
        _train_tiny(tiny_dir, no_train, tmp_path / "x.safetensors")


def test_init_continues_a_head_of_the_same_method_only(tiny_dir, trained, tmp_path):
    checkpoint, labels = trained
    record = _train_tiny(tiny_dir, labels, tmp_path / "more.safetensors", epochs=1, init_checkpoint=checkpoint)
    assert record["init_checkpoint"] == str(checkpoint)
    # It starts from the trained head: one more epoch keeps most of what it learned.
    assert evaluate(tmp_path / "more.safetensors", labels, device="cpu", dtype="fp32", offline=True)["srcc"] > 0.4
    with pytest.raises(UsageError, match="is a 'dpiqa' head; it cannot start 'dpiqa-student' training"):
        train("dpiqa-student", labels, out=tmp_path / "s.safetensors", init_checkpoint=checkpoint, device="cpu", dtype="fp32", offline=True)


def test_distilled_student_follows_its_teacher(trained, tmp_path):
    from diqa_cli.checkpoint import load_head, read_sidecar
    from diqa_cli.imageio import InputItem
    from diqa_cli.pipelines.images import score_images
    from diqa_cli.training import distill

    teacher_checkpoint, labels = trained
    out = tmp_path / "student.safetensors"
    record = distill(
        teacher_checkpoint, labels, out=out, config="tiny", device="cpu", dtype="fp32", offline=True, **DISTIL
    )
    sidecar = read_sidecar(out)
    assert sidecar["method"] == "dpiqa-student"
    assert sidecar["training"]["distilled_from"]["checkpoint"] == str(teacher_checkpoint)
    assert record["n_train"] == 39

    items = [InputItem(str(r.path)) for r in read_labels(labels)]
    scores = {}
    for name, path in (("teacher", teacher_checkpoint), ("student", out)):
        model, side = load_head(path, device="cpu", dtype="fp32", offline=True)
        scores[name] = [row["score"] for row in score_images(items, model, normalisation=side["score_normalisation"])]
    # Measured over seeds 0-2: 0.63-0.72 (labels misaligned with images: -0.08).
    assert correlations(scores["student"], scores["teacher"])["srcc"] > 0.45


@pytest.mark.slow
def test_student_learns_the_labels_from_mos_without_any_diffusion_weights(level_split, tmp_path):
    """`diqa train --method dpiqa-student` with no --backbone loads nothing of SD 1.5 (none is in
    this test's weights cache, and the run is offline), and the EfficientNet learns the labels
    (seeds 0-2, held-out levels: learned 0.61-0.78, shuffled -0.11-0.05; every image: 0.81-0.89
    against -0.02-0.06)."""
    from diqa_cli.checkpoint import read_sidecar

    srcc = _learned_and_shuffled("dpiqa-student", level_split, tmp_path, epochs=30, batch_size=8, lr=1e-3, config="tiny")
    sidecar = read_sidecar(tmp_path / "learned.safetensors")
    assert sidecar["backbone"] == {"ref": None, "identity": None} and sidecar["training"]["n_train"] == 39

    learned, chance = srcc["test"]
    assert learned > 0.4 and learned > chance + 0.3, (learned, chance)
    learned, chance = srcc["all"]
    assert learned > 0.7 and learned > chance + 0.5, (learned, chance)


def test_distill_refuses_a_teacher_that_is_not_dpiqa(trained, tmp_path):
    from diqa_cli.checkpoint import save_head, load_head
    from diqa_cli.training import distill

    teacher_checkpoint, labels = trained
    teacher, _ = load_head(teacher_checkpoint, device="cpu", dtype="fp32", offline=True)
    from diqa_cli.methods import get_method, load_model_class

    student_cls = load_model_class(get_method("dpiqa-student"))
    student = student_cls(teacher.backbone, **student_cls.tiny_config())
    save_head(student, tmp_path / "student.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    with pytest.raises(UsageError, match=r"is a 'dpiqa-student' head; distillation needs the head of a teacher method \(dpiqa\)"):
        distill(tmp_path / "student.safetensors", labels, out=tmp_path / "x.safetensors", device="cpu", dtype="fp32", offline=True)


# --- the command line -----------------------------------------------------------------------


def test_eval_command_prints_metrics_as_table_or_json(trained):
    from typer.testing import CliRunner

    from diqa_cli.cli import app

    checkpoint, labels = trained
    runner = CliRunner()
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(labels), "--device", "cpu", "--dtype", "fp32"]
    predictions = checkpoint.parent / "predictions.csv"
    as_json = runner.invoke(app, [*args, "--format", "json", "--predictions", str(predictions)])
    assert as_json.exit_code == 0, as_json.output
    result = json.loads(as_json.stdout)  # stdout holds the data alone
    assert set(result) >= {"srcc", "plcc", "plcc_logistic", "krcc", "n", "n_failed"} and result["n"] == 24
    assert "dpiqa head on split 'test'" in as_json.stderr
    with predictions.open(newline="") as fh:
        written = list(csv.DictReader(fh))
    assert len(written) == 24 and list(written[0]) == ["path", "mos", "score", "status", "error"]
    assert correlations([float(r["score"]) for r in written], [float(r["mos"]) for r in written])["srcc"] == pytest.approx(result["srcc"])

    table = runner.invoke(app, args)
    assert table.exit_code == 0
    lines = dict(line.split() for line in table.stdout.splitlines())
    assert float(lines["srcc"]) == pytest.approx(result["srcc"], abs=1e-4)
    assert set(lines) == {"srcc", "plcc", "plcc_logistic", "krcc", "n", "n_failed"}

    everything = runner.invoke(app, [*args, "--split", "all", "--format", "json"])
    assert json.loads(everything.stdout)["n"] == 63


def test_train_command_writes_the_head_and_prints_its_path(tiny_dir, level_split, tmp_path):
    from typer.testing import CliRunner

    from diqa_cli.cli import app

    out = tmp_path / "cli.safetensors"
    config = json.dumps(_dpiqa_config())
    result = CliRunner().invoke(
        app,
        ["train", "--method", "dpiqa", "--data", str(level_split), "--backbone", str(tiny_dir / "backbone"),
         "--out", str(out), "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--seed", "5",
         "--config", config, "--device", "cpu", "--dtype", "fp32", "--offline"],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert "epoch 1/1" in result.stderr
    assert json.loads(out.with_suffix(".json").read_text())["training"]["seed"] == 5

    bad = CliRunner().invoke(app, ["train", "--method", "dpiqa", "--data", str(level_split), "--out", str(out), "--config", "{oops"])
    assert bad.exit_code != 0
    assert "--config" in str(bad.exception) or "--config" in bad.output


def _write_clip(path, seed, noise):
    """A 6-frame 64x48 clip of a photo with Gaussian noise of std ``noise``."""
    import av
    import numpy as np
    from skimage import data

    photo = np.asarray(data.astronaut()[::8, ::8][:48, :64], dtype=np.float32) / 255
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(6):
            frame = np.clip(photo + rng.normal(0, noise, photo.shape), 0, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray((frame * 255).astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_genzvqa_trains_on_videos_from_a_genziqa_head_and_evaluates(tiny_dir, tiny_backbone, tmp_path):
    """`diqa train --method genzvqa --data videos.csv --init genziqa.safetensors`, then eval."""
    from diqa_cli.checkpoint import read_sidecar, save_head
    from diqa_cli.models.genziqa import GenzIQA
    from diqa_cli.models.slowfast import write_tiny_slowfast

    write_tiny_slowfast(tmp_path)  # tmp_path/slowfast.safetensors, where tiny heads in heads/ look
    (tmp_path / "heads").mkdir()
    image_head = tmp_path / "heads" / "genziqa.safetensors"
    # Seed 7: prompts unlike the ones a fresh GenzVQA (seed 0) would draw.
    save_head(GenzIQA(tiny_backbone, **{**GenzIQA.tiny_config(), "seed": 7}), image_head, normalisation={"offset": 0.0, "scale": 1.0})

    clips = [_write_clip(tmp_path / f"clip{i}.mp4", i, noise) for i, noise in enumerate((0.0, 0.1, 0.3))]
    labels = _write_csv(
        tmp_path / "videos.csv", ["path", "mos"],
        [[clips[0].name, "4.5"], [clips[1].name, "3.0"], [clips[2].name, "1.2"], ["gone.mp4", "2.0"]],
    )
    messages = []
    out = tmp_path / "genzvqa.safetensors"
    record = train(
        "genzvqa", labels, out=out, epochs=1, batch_size=2, seed=0, init_checkpoint=image_head, config="tiny",
        device="cpu", dtype="fp32", offline=True, log=messages.append,
    )
    assert record["n_train"] == 3 and record["n_failed"] == 1
    assert any("gone.mp4" in m for m in messages)
    sidecar = read_sidecar(out)
    assert sidecar["method"] == "genzvqa" and sidecar["training"]["init_checkpoint"] == str(image_head)
    # The head names the SlowFast it was trained with, by a path that works from anywhere.
    assert Path(sidecar["config"]["slowfast"]).resolve() == (tmp_path / "slowfast.safetensors").resolve()

    # It started from the GenzIQA prompts: two AdamW steps at lr 1e-4 moved them, but barely.
    from safetensors.torch import load_file

    start, trained = load_file(str(image_head))["ctx"], load_file(str(out))["ctx"]
    assert 0 < (trained - start).abs().max() < 1e-3

    result = evaluate(out, labels, device="cpu", dtype="fp32", offline=True)
    assert result["split"] == "all" and result["n"] == 3 and result["n_failed"] == 1
    assert result["srcc"] == result["srcc"]  # scores differ between videos: a number, not NaN


def test_epochs_report_held_out_srcc_and_a_val_split_keeps_the_best_epoch(tiny_dir, level_split, tmp_path):
    """With a test split every epoch logs its held-out SRCC and the last head is saved; with a val
    split the best epoch's head is saved instead, and the record says which."""
    lines: list[str] = []
    record = _train_tiny(tiny_dir, level_split, tmp_path / "t.safetensors", epochs=4, log=lines.append)
    epochs = [line for line in lines if line.startswith("diqa: epoch ")]
    assert len(epochs) == 4 and all("held-out (test) SRCC" in line for line in epochs)
    assert record["holdout"]["split"] == "test" and record["holdout"]["kept"] == "last epoch"
    assert len(record["holdout"]["srcc_per_epoch"]) == 4

    val_labels = _relabel(level_split, tmp_path / "val.csv", split=lambda row: "val" if row["split"] == "test" else "train")
    record = _train_tiny(tiny_dir, val_labels, tmp_path / "v.safetensors", epochs=4)
    srcc = record["holdout"]["srcc_per_epoch"]
    best = max(range(4), key=lambda i: srcc[i])
    assert record["holdout"]["kept"] == f"epoch {best + 1} (best val SRCC)"
    kept = evaluate(tmp_path / "v.safetensors", val_labels, split="val", device="cpu", dtype="fp32", offline=True)
    assert kept["srcc"] == pytest.approx(srcc[best], abs=1e-6)


def test_eval_warns_when_too_few_inputs_make_the_correlations_meaningless(trained, tmp_path):
    checkpoint, labels = trained
    few = _relabel(labels, tmp_path / "few.csv")
    with few.open(newline="") as fh:
        rows = list(csv.DictReader(fh))[:2]
    with few.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    said: list[str] = []
    result = evaluate(checkpoint, few, split="all", device="cpu", dtype="fp32", offline=True, log=said.append)
    assert result["n"] == 2 and result["plcc_logistic"] is None
    assert any("only 2 input(s) scored" in line for line in said)
