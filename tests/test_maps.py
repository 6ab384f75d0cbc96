"""Quality maps: `diqa score --maps`, `diqa score-video --maps`, `Metric.quality_map`, the files, and
whether a map is lower where an image was damaged (the patch test, on heads trained for it)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from diqa_cli.maps.render import display_scale, legend_height, overlay
from diqa_cli.maps.writer import MAP_FORMAT, MapWriter, read_raw_map


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is faster on a busy 2-core machine (as tests/test_training.py)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- rendering and files (no model) ----------------------------------------------------------------


def test_builtin_viridis_is_matplotlibs():
    matplotlib = pytest.importorskip("matplotlib")
    from diqa_cli.maps.viridis import VIRIDIS

    reference = np.round(np.asarray(matplotlib.colormaps["viridis"].colors) * 255).astype(np.uint8)
    assert np.array_equal(VIRIDIS, reference)


def test_display_scale_is_in_unit_range_and_robust():
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(33, 47)).astype(np.float32) * 1e-3
    raw[0, 0] = 1e6  # one wild value must not flatten the rest
    unit = display_scale(raw)
    assert unit.shape == raw.shape and unit.dtype == np.float32
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert np.percentile(unit, 75) - np.percentile(unit, 25) > 0.2
    assert np.all(display_scale(np.full((5, 4), 3.0)) == 0.5)
    assert np.all(display_scale(np.full((2, 2), np.nan)) == 0.5)


def test_overlay_keeps_the_image_size_above_a_legend():
    image = np.random.default_rng(1).random((37, 53, 3)).astype(np.float32)
    raw = np.linspace(-1, 1, 37 * 53, dtype=np.float32).reshape(37, 53)
    picture = overlay(image, raw, score=3.25)
    assert picture.mode == "RGB" and picture.size == (53, 37 + legend_height(53, 37))
    with pytest.raises(ValueError, match="differ in size"):
        overlay(image, raw[:-1])


def test_writer_files_decode_and_the_raw_map_reads_back_exactly(tmp_path):
    from PIL import Image

    raw = np.random.default_rng(2).normal(size=(41, 29)).astype(np.float32) * 1e-7  # tiny values survive
    image = (np.random.default_rng(3).random((41, 29, 3)) * 255).astype(np.uint8)
    writer = MapWriter(tmp_path / "maps", method="dpiqa", description="how")
    first = writer.write("a/photo.jpg", image, raw, score=0.5, raw_score=0.25)
    second = writer.write("b/photo.jpg", image, raw)  # same name in another folder: another file
    assert first != second and Path(first).name.startswith("photo.") and first.endswith(".map.png")
    with Image.open(first) as png:
        png.load()
        assert png.format == "PNG" and png.size == (29, 41 + legend_height(29, 41))
    values, info = read_raw_map(first.replace(".map.png", ".map.tiff"))
    assert values.dtype == np.float32 and np.array_equal(values, raw)
    assert info["format"] == MAP_FORMAT and info["source"] == "a/photo.jpg" and info["method"] == "dpiqa"
    assert info["score"] == 0.5 and info["raw_score"] == 0.25 and "low = worse here" in info["units"]
    # A re-run writes the same names; a video frame adds its time.
    assert writer.write("a/photo.jpg", image, raw) == first
    assert writer.stem("clip.mp4", time=1.5).endswith(".t0001500ms")
    (tmp_path / "file").write_text("x")
    from diqa_cli.errors import UsageError

    with pytest.raises(UsageError, match="is a file"):
        MapWriter(tmp_path / "file", method="x", description="y")


# --- the maps of a model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def metric(dpiqa_head):
    from diqa_cli import create_metric

    return create_metric(checkpoint=dpiqa_head, device="cpu", dtype="fp32", offline=True)


def test_quality_map_is_at_the_input_size_for_tensors_files_and_pil(metric, tiny_pixels, tmp_path):
    import torch
    from PIL import Image

    odd = tiny_pixels(2, 97)[:, :, :71, :]  # (2, 3, 71, 97)
    scores, maps = metric.quality_map(odd)
    assert maps.shape == (2, 71, 97) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    torch.testing.assert_close(scores, metric(odd))  # the same scores as a plain call
    one_score, one = metric.quality_map(odd[0])
    assert one.shape == (1, 71, 97)

    path = tmp_path / "odd.png"
    Image.fromarray((odd[1].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
    file_score, from_file = metric.quality_map(path)
    assert from_file.shape == (1, 71, 97) and file_score.tolist() == metric(path).tolist()
    with Image.open(path) as image:
        assert metric.quality_map(image)[1].shape == (1, 71, 97)
        assert [m.shape for m in metric.quality_map([path, image])[1]] == [(71, 97), (71, 97)]


def test_generic_map_is_the_first_order_score_change_of_blurring_the_detail():
    """For a score linear in the pixels the generic map's mean is exactly score(x) − score(blur x),
    up to the smoothing at the borders."""
    import torch

    from diqa_cli.maps.compute import _detail_scales, detail_map, gaussian_blur

    weights = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))

    def linear(x):
        return (x * weights).sum(dim=(1, 2, 3))

    pixels = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    scores, maps = detail_map(linear, pixels)
    assert maps.shape == (2, 40, 40)
    torch.testing.assert_close(scores, linear(pixels))
    blurred = gaussian_blur(pixels, _detail_scales(pixels)[0])
    change = linear(pixels) - linear(blurred)
    torch.testing.assert_close(maps.mean(dim=(1, 2)), change, rtol=0.1, atol=0.05 * change.abs().max().item())


def test_blur_occlusion_map_measures_each_cells_score_drop():
    """For a score linear in the pixels, the cells' drops add up exactly to score(x) − score(blur x),
    and a cell's drop comes from that cell alone."""
    import torch

    from diqa_cli.maps.compute import _detail_scales, blur_occlusion_map, gaussian_blur

    weights = torch.randn(1, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    calls = []

    def linear(x):
        calls.append(x.shape[0])
        return (x * weights).sum(dim=(1, 2, 3))

    pixels = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    scores, drops = blur_occlusion_map(linear, pixels)
    assert drops.shape == (2, 4, 4) and len(calls) == 17  # one plain scoring and one per cell
    torch.testing.assert_close(scores, linear(pixels))
    blurred = gaussian_blur(pixels, _detail_scales(pixels)[0])
    torch.testing.assert_close(drops.sum(dim=(1, 2)), linear(pixels) - linear(blurred), rtol=1e-4, atol=1e-4)
    corner = ((pixels - blurred) * weights)[..., :10, :9].sum(dim=(1, 2, 3))
    torch.testing.assert_close(drops[:, 0, 0], corner, rtol=1e-4, atol=1e-4)


def test_integrated_detail_map_adds_up_to_the_score_drop_of_blurring():
    """With steps along the path from the blurred image, the map's mean is score(x) − score(blur x)
    for a score with a curved gradient, where the one-step map is only its first-order estimate.
    (The score ignores a 10 px border, so the map's smoothing moves nothing across the edge.)"""
    import torch

    from diqa_cli.maps.compute import _detail_scales, detail_map, gaussian_blur

    weights = torch.zeros(1, 3, 64, 64)
    weights[..., 10:-10, 10:-10] = torch.randn(1, 3, 44, 44, generator=torch.Generator().manual_seed(0))

    def curved(x):
        return ((x * weights).sum(dim=(1, 2, 3)) / 30) ** 2

    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    drop = curved(pixels) - curved(gaussian_blur(pixels, _detail_scales(pixels)[0]))
    scores, integrated = detail_map(curved, pixels, steps=64)
    torch.testing.assert_close(scores, curved(pixels))
    error = (integrated.mean(dim=(1, 2)) - drop).abs()
    assert error.max() < 0.02 * drop.abs().max(), (integrated.mean(dim=(1, 2)), drop)
    one_step = detail_map(curved, pixels)[1].mean(dim=(1, 2))
    assert (one_step - drop).abs().max() > 5 * error.max()


def test_genziqa_map_is_its_integrated_detail_map(tiny_backbone, tiny_pixels):
    import torch

    from diqa_cli.maps.compute import detail_map, quality_maps
    from diqa_cli.models.genziqa import MAP_STEPS, GenzIQA

    model = GenzIQA(tiny_backbone, **GenzIQA.tiny_config()).eval()
    pixels = tiny_pixels(2)
    with torch.no_grad():
        expected = model(pixels)
    scores, maps = quality_maps(model, pixels)
    assert maps.shape == (2, 64, 64) and torch.isfinite(maps).all()
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    torch.testing.assert_close(maps, detail_map(model, pixels, steps=MAP_STEPS)[1])


# --- the command line ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_images):
    """Two photos of odd sizes and a broken file."""
    folder = tmp_path_factory.mktemp("photos")
    images = tiny_images(2, 96)
    images[0].resize((97, 81)).save(folder / "a.png")
    images[1].resize((45, 70)).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def _rows(out: str, fmt: str) -> list[dict]:
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(out)))
    if fmt == "json":
        return json.loads(out)
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_score_maps_writes_files_and_a_map_column(fmt, photos, dpiqa_head, run_main, model_home, metric, tmp_path):
    from PIL import Image

    maps = tmp_path / "maps"
    args = ["score", str(photos), "-c", str(dpiqa_head), "--device", "cpu", "--dtype", "fp32", "--offline", "-f", fmt]
    code, out, err = run_main([*args, "--maps", str(maps)], home=model_home)
    assert code == 3, err  # the broken file
    rows = {Path(r["path"]).name: r for r in _rows(out, fmt)}
    assert all("map" in row for row in rows.values())
    assert rows["broken.png"]["map"] in (None, "")  # error rows get none
    plain = {Path(r["path"]).name: r for r in _rows(run_main(args, home=model_home)[1], fmt)}
    assert "map" not in plain["a.png"]
    for name, size in (("a.png", (97, 81)), ("b.jpg", (45, 70))):
        row = rows[name]
        assert row["score"] == plain[name]["score"]  # maps change no score
        with Image.open(row["map"]) as png:
            png.load()
            assert png.size == (size[0], size[1] + legend_height(*size))
        raw, info = read_raw_map(row["map"].replace(".map.png", ".map.tiff"))
        assert raw.shape == (size[1], size[0]) and info["source"] == str(photos / name)
        _, api = metric.quality_map(photos / name, raw=True)
        np.testing.assert_allclose(raw, api[0].numpy(), rtol=1e-4, atol=1e-5 * float(np.abs(raw).max()))
    assert sorted(p.suffix for p in maps.iterdir()) == [".png", ".png", ".tiff", ".tiff"]


def test_nothing_is_written_without_maps(photos, dpiqa_head, run_main, model_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in photos.rglob("*"))
    code, out, _ = run_main(["score", str(photos / "a.png"), "-c", str(dpiqa_head), "-f", "jsonl", "--offline"], home=model_home)
    assert code == 0 and "map" not in json.loads(out)
    assert list(tmp_path.iterdir()) == [] and sorted(photos.rglob("*")) == before


def test_maps_with_a_score_database_reuse_scores_and_still_write_maps(photos, dpiqa_head, run_main, model_home, tmp_path):
    import shutil

    from diqa_cli.store import open_store

    db, maps = tmp_path / "scores.sqlite", tmp_path / "maps"
    args = ["score", str(photos / "a.png"), str(photos / "b.jpg"), "-c", str(dpiqa_head), "-f", "jsonl", "--offline",
            "--db", str(db), "--maps", str(maps)]
    first = _rows(run_main(args, home=model_home)[1], "jsonl")
    shutil.rmtree(maps)
    code, out, err = run_main(args, home=model_home)
    assert code == 0 and "reused 2 of 2" in err
    second = _rows(out, "jsonl")
    assert [r["cached"] for r in second] == [True, True]
    assert [r["score"] for r in second] == [r["score"] for r in first]
    assert all(Path(r["map"]).is_file() for r in second)
    with open_store(db, create=False) as store:
        assert sorted(Path(r["map"]).name for r in store.rows()) == sorted(Path(r["map"]).name for r in second)

    # The report made from the database shows the maps.
    report = tmp_path / "report.html"
    code, _, err = run_main(["report", str(db), "-o", str(report)], home=model_home)
    assert code == 0, err
    assert report.read_text().count("data:image/jpeg") >= 4  # two thumbnails and two maps


def test_maps_are_refused_with_the_ray_engine(photos, dpiqa_head, run_main, model_home, tmp_path):
    code, _, err = run_main(["score", str(photos / "a.png"), "-c", str(dpiqa_head), "--engine", "ray",
                             "--maps", str(tmp_path / "m"), "--offline"], home=model_home)
    assert code == 2 and "--engine local" in err


def test_methods_say_how_each_map_is_made(run_main):
    from diqa_cli.methods import GENERIC_QUALITY_MAP, list_methods

    code, out, _ = run_main(["methods", "--format", "json"])
    listed = {m["name"]: m for m in json.loads(out)}
    for spec in list_methods():
        assert listed[spec.name]["quality_map"] == spec.map_description
        assert spec.quality_map, f"{spec.name}: every built-in method has its own map"
    assert GENERIC_QUALITY_MAP not in {m["quality_map"] for m in listed.values()}
    assert "map" in run_main(["methods"])[1]


# --- videos ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from diqa_cli.tiny import write_tiny_bundle

    return write_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    import av
    from skimage import data

    path = tmp_path_factory.mktemp("clips") / "clip.mp4"
    photo = data.astronaut()[::5, ::5][:82, :98]  # 98 x 82: not the model's size
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 98, 82, "yuv420p"
        for i in range(12):
            frame = np.clip(photo / 255 + rng.normal(0, 0.02 * i, photo.shape), 0, 1)
            for packet in stream.encode(av.VideoFrame.from_ndarray((frame * 255).astype(np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_score_video_maps_one_per_scored_frame(bundle, clip, run_main, tmp_path):
    maps = tmp_path / "maps"
    head = bundle / "heads" / "genzvqa.safetensors"
    code, out, err = run_main(["score-video", str(clip), "-c", str(head), "-f", "json", "--per-frame", "--max-frames", "4",
                               "--maps", str(maps), "--offline"])
    assert code == 0, err
    (row,) = json.loads(out)
    frames = row["per_frame"]
    assert len(frames) == 4 and all(Path(f["map"]).is_file() for f in frames)
    worst = min(frames, key=lambda f: f["score"])
    assert row["map"] == worst["map"]
    for frame in frames:
        raw, info = read_raw_map(frame["map"].replace(".map.png", ".map.tiff"))
        assert raw.shape == (82, 98) and info["time"] == pytest.approx(frame["time"])
    assert len(list(maps.glob("*.map.tiff"))) == 4


def test_video_generic_maps_follow_the_video_score(bundle, clip):
    import torch

    from diqa_cli import create_metric
    from diqa_cli.maps.compute import video_detail_maps
    from diqa_cli.pipelines.videos import load_video_input

    metric = create_metric(checkpoint=bundle / "heads" / "genzvqa.safetensors", device="cpu", dtype="fp32", offline=True)
    video = load_video_input(str(clip), metric.model, metric.clip_encoder, max_frames=3)
    scores, maps = video_detail_maps(metric.model, video.frames, video.clip_features)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64) and torch.isfinite(maps).all()
    assert maps.abs().sum() > 0


# --- the patch test: is the map lower where the image was damaged? -------------------------------------------
#
# A head of each method is trained on the SYNTHETIC blur and noise set of four photos (levels 1, 3
# and 5; every photo in training: the question is where the damage is in a photo the head knows,
# not generalisation). Each photo then gets one quadrant blurred or noised at level-5 strength, in
# each of its four quadrants in turn, and the map's mean inside the damaged quadrant is compared
# with its mean outside. A (photo, distortion) case passes when inside is lower on average over the
# four placements: one placement alone confounds the damage with the map's own layout (DP-IQA's head
# has separate weights for every position of its flattened map, so even a clean photo's map has a
# fixed pattern), which the average over placements cancels.

PATCH_SOURCES = ("astronaut", "coffee", "chelsea", "rocket")
# DP-IQA's head as tests/test_training.py trains it (no U-Net fine-tuning, a shallower score path).
_DPIQA_HEAD = {"finetune_unet": False, "decoder_channels": 32, "score_channels": [8], "fc_hidden": 64}
PATCH_TRAINING = {
    "dpiqa": {"epochs": 40, "lr": 2e-3, "backbone": "tiny"},
    "dpiqa-student": {"epochs": 30, "lr": 1e-3, "backbone": None},
    "lgdm": {"epochs": 100, "lr": 1e-3, "backbone": "unit"},  # the prior must see the image, not the noise
    "genziqa": {"epochs": 100, "lr": 3e-3, "backbone": "unit"},  # unit-variance latents (conftest)
}


@pytest.fixture(scope="module")
def patch_set(tmp_path_factory):
    from diqa_cli.synthetic import make_synthetic_set

    folder = tmp_path_factory.mktemp("patch_set")
    labels = make_synthetic_set(folder, size=64, sources=PATCH_SOURCES, distortions=("blur", "noise"), levels=3, seed=0)
    with labels.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["split"] = "train"
    every = folder / "all_train.csv"
    with every.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return every


def _train_patch_head(method, labels, out, tiny_dir, unit_latent_backbone_dir):
    from diqa_cli.training import train

    settings = PATCH_TRAINING[method]
    backbone = {"tiny": str(tiny_dir / "backbone"), "unit": str(unit_latent_backbone_dir), None: None}[settings["backbone"]]
    config = "tiny"
    if method == "dpiqa":
        from diqa_cli.models.dpiqa import DPIQA

        config = {**DPIQA.tiny_config(), **_DPIQA_HEAD}
    train(method, labels, backbone=backbone, out=out, epochs=settings["epochs"], batch_size=8, lr=settings["lr"], seed=0,
          config=config, device="cpu", dtype="fp32", offline=True)
    return out


def _patch_differences(metric, labels, map_fn=None) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """{(photo, distortion): [(map mean inside, outside), for each quadrant damaged]}."""
    import torch
    from PIL import Image

    from diqa_cli.synthetic import DISTORTIONS, _distort

    size, half = 64, 32
    quadrants = [(y, x) for y in (0, half) for x in (0, half)]
    images, masks, keys = [], [], []
    for photo in PATCH_SOURCES:
        clean = np.asarray(Image.open(labels.parent / photo / f"{photo}_reference.png").convert("RGB"), dtype=np.float64) / 255
        for index, distortion in enumerate(("blur", "noise")):
            damaged = _distort(clean, distortion, DISTORTIONS[distortion][-1], size, np.random.default_rng(index))
            for y, x in quadrants:
                mask = np.zeros((size, size), bool)
                mask[y : y + half, x : x + half] = True
                images.append(np.where(mask[..., None], damaged, clean))
                masks.append(mask)
                keys.append((photo, distortion))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    maps = (map_fn or (lambda p: metric.quality_map(p, raw=True)[1]))(pixels).numpy()
    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for key, mask, one in zip(keys, masks, maps):
        found.setdefault(key, []).append((float(one[mask].mean()), float(one[~mask].mean())))
    return found


def _summary(found) -> tuple[int, int, str]:
    """(cases whose inside − outside is negative on average over the placements, placements where it
    is, a line per case and the means inside and outside over every placement)."""
    differences = {key: [inside - outside for inside, outside in pairs] for key, pairs in found.items()}
    cases = sum(np.mean(d) < 0 for d in differences.values())
    placements = sum(x < 0 for d in differences.values() for x in d)
    table = "; ".join(f"{p} {k}: " + " ".join(f"{x:+.3g}" for x in d) for (p, k), d in differences.items())
    inside = np.mean([i for pairs in found.values() for i, _ in pairs])
    outside = np.mean([o for pairs in found.values() for _, o in pairs])
    return cases, placements, f"{table}; mean inside {inside:.4g}, outside {outside:.4g}"


# Measured with seed 0 (cases and placements where inside is lower; then the raw map's mean inside
# and outside the damaged quadrant over all 32 placements):
# * dpiqa: own map 6/8 cases, 24/32 placements, inside 0.601 / outside 0.644 (the bottom-right
#   quadrant reads higher inside in every case: the head's positional weights); generic map 7/8,
#   28/32, −0.163 / 0.144;
# * dpiqa-student: own 6/8, 23/32, 0.525 / 0.575 (the top-left quadrant, likewise); generic 7/8,
#   28/32, −0.267 / 0.370;
# * lgdm (blur occlusion, 4 x 4 cells): own 8/8, 23/32, −0.028 / 0.012; generic 4/8, 17/32;
# * genziqa (detail map integrated over 8 steps): own 6/8, 22/32; generic (one step) 5/8, 18/32.
# Maps measured on the same heads and not kept: LGDM's gradient × activation of its hyperfeature
# maps 4/8 (15/32), its gradient × latent 5/8, its detail map integrated over 8 steps 4/8 and 5/8 (the
# guided trajectory's gradients jump); GenzIQA's logits around the pooled term per position 4/8
# (16/32: noised patches raise the logits there), its gradient × latent 4/8 (18/32; 7/8 on a head
# trained with two threads instead of one: its cells are large terms that cancel), blur occlusion
# 6/8 (19/32).
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, generic_localises",
    # The generic (gradient) map is held to the same bar only where the score's gradient is
    # informative; on LGDM and GenzIQA it is what their own maps replace (numbers above).
    [("dpiqa", True), ("dpiqa-student", True), ("lgdm", False), ("genziqa", False)],
)
def test_the_map_is_lower_where_the_image_was_damaged(method, generic_localises, patch_set, tiny_dir,
                                                      unit_latent_backbone_dir, tmp_path):
    from diqa_cli import create_metric
    from diqa_cli.maps.compute import detail_map

    head = _train_patch_head(method, patch_set, tmp_path / f"{method}.safetensors", tiny_dir, unit_latent_backbone_dir)
    metric = create_metric(checkpoint=head, device="cpu", dtype="fp32", offline=True)
    own = _summary(_patch_differences(metric, patch_set))
    generic = _summary(_patch_differences(metric, patch_set, lambda p: detail_map(metric.model, metric._model_input(p))[1]))
    print(f"\n{method} own map: {own[0]}/8 cases, {own[1]}/32 placements; generic map: {generic[0]}/8, {generic[1]}/32")
    print(f"{method} own: {own[2]}\n{method} generic: {generic[2]}")
    # Three cases in four: the positional pattern of a head may outweigh one photo's damage.
    assert own[0] >= 6, f"{method}: own map passes {own[0]}/8 cases ({own[1]}/32 placements): {own[2]}"
    assert generic[0] >= 6 or not generic_localises, f"{method}: generic map passes {generic[0]}/8 cases ({generic[1]}/32 placements): {generic[2]}"
