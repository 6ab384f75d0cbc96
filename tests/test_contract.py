"""The method contract, checked for every registered method and for a toy method defined here.

One parametrized suite on the tiny bundle (``diqa weights tiny``'s layout): the same input scores
the same twice, a batch scores like its singles, a saved head loads back to the same scores, the
sidecar's config rebuilds the same model, the layers a method declares exist, and the Python API
gives exactly the numbers ``diqa score`` / ``diqa score-video`` print. The toy method is two
definitions in this file (its spec and its model) and nothing else: passing here is what "adding a
method touches nothing outside its two files" means.
"""

from __future__ import annotations

import csv
import io
import warnings

import pytest
import torch
from torch import nn

from diqa_cli import methods
from diqa_cli.methods import MethodSpec, TrainingDefaults, list_methods, register_method
from diqa_cli.models.base import QualityModel, VideoQualityModel
from test_videoio import encode  # the clip builder the decoding tests use

TOY = "toy-contrast"


# --- the toy method: a spec and a model, nothing else ---------------------------------------------


TOY_SPEC = MethodSpec(
    name=TOY,
    summary="toy: a linear head on the per-channel mean and spread of the VAE latents (tests only)",
    paper="none (a test of the method contract)",
    model=f"{__name__}:ToyContrast",
    default_backbone="sd15",
    resolution=64,
    resample="bilinear",
    input_convention="[-1,1] into the VAE",
    feature_layers=("vae.encoder",),
    training=TrainingDefaults(1e-2, 0.0, 4, 2, None, "toy"),
)


class ToyContrast(QualityModel):
    method_name = TOY

    def __init__(self, backbone, *, seed: int = 0):
        super().__init__(backbone, seed=seed)
        self.vae = backbone.vae  # registered: a layer the model reads, frozen
        self.vae.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            channels = backbone.vae.config.latent_channels
            self.head = nn.Linear(2 * channels, 1).to(backbone.device, backbone.dtype)

    def forward(self, pixels):
        latents = self.backbone.encode(pixels * 2 - 1)
        stats = torch.cat([latents.mean(dim=(2, 3)), latents.std(dim=(2, 3))], dim=1)
        return self.head(stats).squeeze(1)

    def trainable_parameter_names(self):
        return [name for name, _ in self.named_parameters() if name.startswith("head.")]

    def feature_layers(self):
        return ["vae.encoder"]


# --- fixtures ------------------------------------------------------------------------------------

# GenzIQA's 16 U-Net passes per image make its run the longest: it runs with the slow tests.
IMAGE_METHODS = [pytest.param(s.name, marks=pytest.mark.slow) if s.name == "genziqa" else s.name
                 for s in list_methods("image")] + [TOY]
VIDEO_METHODS = [s.name for s in list_methods("video")]


@pytest.fixture(scope="module")
def toy_registered():
    register_method(TOY_SPEC)
    yield TOY
    methods._REGISTRY.pop(TOY, None)


@pytest.fixture(scope="module")
def bundle(toy_registered, tmp_path_factory):
    """``diqa weights tiny``'s bundle, written with the toy method registered."""
    from diqa_cli.tiny import write_tiny_bundle

    return write_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory, tiny_images):
    """Three photos of different sizes and aspect ratios, as files."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, (image, size) in enumerate(zip(tiny_images(3, 96), [(96, 96), (120, 70), (50, 81)])):
        path = folder / f"photo{i}.png"
        image.resize(size).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("clips") / "clip.mp4", "libx264", noise=True)


def head(bundle, name):
    return bundle / "heads" / f"{name}.safetensors"


def metric_for(bundle, name, **kwargs):
    from diqa_cli import create_metric

    return create_metric(checkpoint=head(bundle, name), device="cpu", dtype="fp32", offline=True, **kwargs)


def cli_scores(run_main, command, paths, checkpoint) -> dict[str, float]:
    code, out, err = run_main([command, *map(str, paths), "-c", str(checkpoint), "-f", "csv", "--offline"])
    assert code == 0, err
    return {row["path"]: float(row["score"]) for row in csv.DictReader(io.StringIO(out))}


# --- settings known before loading -------------------------------------------------------------


@pytest.mark.parametrize("name", [s.name for s in list_methods()] + [TOY])
def test_settings_known_before_loading_are_the_loaded_models(name, bundle, toy_registered):
    """A score store looks results up before it builds anything (``ScorerOptions.settings``):
    what it computes from the files must be what the built model is, or it would reuse wrongly."""
    from diqa_cli.backbone import dtype_name
    from diqa_cli.engines import ScorerOptions
    from diqa_cli.errors import DiqaWarning
    from diqa_cli.files import file_sha256

    for overrides in ({}, {"seed": 5, "backbone": str(bundle / "backbone.safetensors")}):
        options = ScorerOptions(checkpoint=str(head(bundle, name)), device="cpu", dtype="fp32", offline=True, **overrides)
        settings = options.settings()
        with warnings.catch_warnings():
            # The single file holds the folder's weights in another layout: the head says so.
            warnings.simplefilter("ignore", DiqaWarning)
            model = options.load().model
        assert settings.method == model.method_name
        assert settings.checkpoint_sha256 == file_sha256(head(bundle, name))
        assert settings.resolution == model.resolution and settings.dtype == dtype_name(model.dtype)
        assert settings.seed == int(model.config.get("seed", 0))
        if model.spec.draws_noise and "seed" in overrides:
            assert settings.seed == 5
        if model.backbone is None:
            assert settings.backbone_identity == ""
        else:
            assert (settings.backbone_identity, settings.backbone_ref) == (model.backbone.identity, model.backbone.ref)


# --- image methods -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_image_method_keeps_the_contract(name, bundle, tiny_pixels, photos, run_main, tmp_path):
    from diqa_cli.checkpoint import load_head, read_sidecar, save_head
    from diqa_cli.methods import get_method, load_model_class
    from diqa_cli.taps import feature_info

    metric = metric_for(bundle, name)
    spec = get_method(name)
    assert metric.spec is spec and metric.lower_better is spec.lower_better and metric.licence == spec.licence
    pixels = tiny_pixels(2).double()

    # The same input twice gives the same score; a batch gives its singles' scores.
    first, again = metric(pixels), metric(pixels)
    assert first.shape == (2,) and torch.isfinite(first).all()
    assert torch.equal(first, again)
    singles = torch.cat([metric(pixels[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(first, singles, rtol=1e-4, atol=1e-4)
    assert first[0] != first[1], "two different photos should get two different scores"
    raw = metric(pixels, raw=True)

    # Saving and loading the head gives the same scores.
    saved = save_head(metric.model, tmp_path / f"{name}.safetensors", normalisation={"offset": 1.0, "scale": 2.0})
    from diqa_cli import create_metric

    reloaded = create_metric(checkpoint=saved, device="cpu", dtype="fp32", offline=True)
    torch.testing.assert_close(reloaded(pixels, raw=True), raw, rtol=0, atol=0)
    torch.testing.assert_close(reloaded(pixels), raw * 2 + 1)

    # The sidecar's config rebuilds the same model (same trainable tensors, same scores).
    sidecar = read_sidecar(saved)
    rebuilt = load_model_class(spec)(metric.model.backbone, **sidecar["config"])
    assert sorted(rebuilt.checkpoint_state_dict()) == sorted(metric.model.checkpoint_state_dict())
    loaded, _ = load_head(saved, backbone=metric.model.backbone)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels.float()), raw)

    # The layers a method says it reads exist in what it reads them from.
    model = metric.model
    for layer in model.feature_layers():
        modules = dict(model.named_modules())
        if model.backbone is not None:
            modules.update({f"unet.{k}": v for k, v in model.backbone.unet.named_modules()})
            modules.update({f"vae.{k}": v for k, v in model.backbone.vae.named_modules()})
        try:
            feature_info(model.backbone.unet, [layer])
        except Exception:  # noqa: BLE001 - not a U-Net tap name: then a module path
            assert layer in modules or f"unet.{layer}" in modules, f"{name}: declared layer {layer!r} does not exist"

    # Python API on files == `diqa score` CSV, number for number.
    expected = cli_scores(run_main, "score", photos, head(bundle, name))
    from_api = metric(photos)
    assert from_api.tolist() == [expected[str(p)] for p in photos]
    rows = list(metric.score_files(photos))
    assert [row["score"] for row in rows] == [expected[str(p)] for p in photos]
    assert all(row["checkpoint"] == str(head(bundle, name)) for row in rows)


@pytest.mark.parametrize("name", IMAGE_METHODS)
def test_any_tensor_size_is_resized_and_losses_reach_the_pixels(name, bundle, tiny_pixels):
    from PIL import Image

    metric = metric_for(bundle, name)
    odd = tiny_pixels(2, 96)[:, :, :71, :]  # (2, 3, 71, 96): not the method's size
    scores = metric(odd)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert metric(odd[0]).shape == (1,)  # (3, H, W) is one image

    loss_metric = metric_for(bundle, name, as_loss=True)
    pixels = odd[:1].clone().requires_grad_(True)
    loss = loss_metric(pixels)
    assert loss.ndim == 0
    torch.testing.assert_close(loss, -metric(odd[:1]).mean())  # higher is better: the loss is the negated score
    loss.backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss_metric.parameters())

    # A PIL image scores as its file would.
    image = Image.fromarray((odd[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    assert metric(image).shape == (1,)

    # A quality map at the input's size: the method's own where its spec says how it is made (its
    # model then implements QualityMapModel), else the generic one (the toy method).
    from diqa_cli.models.base import QualityMapModel

    map_scores, maps = metric.quality_map(odd)
    assert maps.shape == (2, 71, 96) and torch.isfinite(maps).all() and maps.abs().sum() > 0
    torch.testing.assert_close(map_scores, scores)
    assert isinstance(metric.model, QualityMapModel) == bool(metric.spec.quality_map), name


def test_a_path_that_cannot_be_scored_raises_a_diqa_error_naming_it(bundle, tmp_path):
    from diqa_cli import DiqaError, InputError

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    metric = metric_for(bundle, TOY)
    with pytest.raises(InputError, match="broken.png") as info:
        metric(broken)
    assert isinstance(info.value, DiqaError)
    rows = list(metric.score_files([broken, tmp_path / "missing.jpg"]))
    assert [row["status"] for row in rows] == ["error", "error"] and "no such file" in rows[1]["error"]


# --- video methods -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VIDEO_METHODS)
def test_video_method_keeps_the_contract(name, bundle, clip, run_main, tmp_path):
    from diqa_cli import create_metric
    from diqa_cli.checkpoint import save_head
    from diqa_cli.videoio import read_frames

    metric = metric_for(bundle, name)
    assert isinstance(metric.model, VideoQualityModel) and metric.is_video

    # Same video twice, same score; frames in batches of 1 or 8, same score.
    first, again = metric(clip), metric(clip)
    assert torch.equal(first, again) and torch.isfinite(first).all()
    one_by_one = next(metric.score_files([clip], batch_size=1))["score"]
    assert one_by_one == pytest.approx(float(first[0]), rel=1e-5, abs=1e-6)

    # Saved and loaded, the same score.
    saved = save_head(metric.model, tmp_path / f"{name}.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    reloaded = create_metric(checkpoint=saved, device="cpu", dtype="fp32", offline=True,
                             clip_encoder=str(bundle / "slowfast.safetensors"))
    torch.testing.assert_close(reloaded(clip, raw=True), metric(clip, raw=True))

    # The API on the file == `diqa score-video` CSV; the decoded frames as a tensor == the file.
    expected = cli_scores(run_main, "score-video", [clip], head(bundle, name))
    assert metric(clip).tolist() == [expected[str(clip)]]
    # Quality maps of the scored frames, one file pair per frame, the row naming the worst one.
    (row,) = metric.score_files([clip], max_frames=2, maps=tmp_path / "maps")
    assert row["status"] == "ok" and row["map"] in {str(p) for p in (tmp_path / "maps").glob("*.map.png")}
    assert len(list((tmp_path / "maps").glob("*.map.tiff"))) == 2

    decoded = read_frames(str(clip))  # every frame
    frames = torch.from_numpy(decoded.frames).permute(0, 3, 1, 2).float() / 255
    from_tensor = metric(frames, timestamps=decoded.timestamps)
    assert from_tensor.tolist() == pytest.approx([expected[str(clip)]], rel=1e-5)
