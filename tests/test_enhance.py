"""`diqa enhance`: EDICT's exact inversion, NLPD, the MAP loop and the command as users run it.

Everything runs on the tiny random backbone. Two facts about random networks shape the settings:

* A random U-Net is not a denoiser, so chaining DDIM steps through it multiplies its Lipschitz
  constant step after step: beyond one step the generated latent is a chaotic function of the
  starting noise (gradients of 1e3-1e7 that no finite step follows). Exactness does not care
  (EDICT inverts whatever the U-Net is) and is tested over many steps; the tests that follow the
  gradient use one step, where the objective is smooth.
* The tiny VAE keeps SD's scaling factor (0.18215), which leaves its latents at std ~0.03; the
  U-Net's group norms then amplify small perturbations a hundredfold. SD's factor was chosen to
  give unit-variance latents, so the optimisation tests use the recalibrated copy
  ``unit_latent_backbone_dir`` (conftest).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diqa_cli.enhance import OutputPlan, enhance_file, plan_outputs
from diqa_cli.enhance.edict import (
    ddim_schedule,
    edict_generate,
    edict_invert,
    unet_noise_predictor,
)
from diqa_cli.enhance.map import MapEnhancer, MapSettings
from diqa_cli.metric import Metric
from diqa_cli.enhance.nlpd import NLPD
from diqa_cli.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, UsageError
from diqa_cli.imageio import InputItem


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny networks run thousands of small ops; with two intra-op threads each op pays a
    thread barrier, which on a busy 2-core machine costs more than the op (30x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.fixture(scope="module")
def calibrated_prior(unit_latent_backbone_dir, dpiqa_head):
    """The DP-IQA head on the copy of the tiny backbone whose VAE scaling factor gives
    unit-variance latents (see the module docstring)."""
    from diqa_cli.backbone import load_backbone
    from diqa_cli.checkpoint import load_head

    backbone = load_backbone(str(unit_latent_backbone_dir), device="cpu", dtype="fp32", offline=True)
    model, sidecar = load_head(dpiqa_head, backbone=backbone, device="cpu", dtype="fp32")
    return Metric(model, sidecar)



def cli_args(dpiqa_head, *extra):
    """A fast `diqa enhance` on the tiny bundle: one EDICT step, one gradient step."""
    return [
        "enhance", "--prior", "dpiqa", "--checkpoint", str(dpiqa_head), "--device", "cpu", "--dtype", "fp32",
        "--inversion-steps", "1", "--iterations", "1", *extra,
    ]


@pytest.fixture
def photos(tmp_path, tiny_images):
    """An RGB photo of odd size, a greyscale (L) one, and one with a real alpha channel."""
    folder = tmp_path / "in"
    folder.mkdir()
    rgb, grey, rgba = tiny_images(3, size=80)
    rgb.resize((67, 45)).save(folder / "rgb.png")
    grey.convert("L").resize((33, 51)).save(folder / "grey.png")
    with_alpha = rgba.resize((41, 29)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 41, dtype=np.uint8), (29, 1))
    with_alpha.putalpha(Image.fromarray(alpha))
    with_alpha.save(folder / "alpha.png")
    return folder


# --- EDICT -------------------------------------------------------------------------------------


def test_edict_inversion_then_generation_gives_back_the_latent(tiny_backbone, tiny_pixels):
    backbone = tiny_backbone
    with torch.no_grad():
        latent = backbone.encode(tiny_pixels(2) * 2 - 1)
    predict = unet_noise_predictor(backbone.unet, backbone.prompt_embeddings([""]))
    schedule = ddim_schedule(backbone.alphas_cumprod, backbone.scheduler_config, 25)

    noise_x, noise_y = edict_invert(latent, predict, schedule)
    with torch.no_grad():
        x, y = edict_generate(noise_x, noise_y, predict, schedule)

    assert relative_error(noise_x, latent.double()) > 1.0  # the inversion really went somewhere
    assert relative_error(x, latent.double()) < 1e-4
    assert relative_error(y, latent.double()) < 1e-4


def test_edict_is_exact_for_any_unet_and_mixing_weight(tiny_backbone):
    from diffusers import UNet2DConditionModel

    config = {**tiny_backbone.unet.config, "block_out_channels": (32, 64), "layers_per_block": 1,
              "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        unet = UNet2DConditionModel.from_config(config).eval()
        context = torch.randn(1, 77, config["cross_attention_dim"])
        latent = torch.randn(1, 4, 8, 8)
    predict = unet_noise_predictor(unet, context)
    schedule = ddim_schedule(tiny_backbone.alphas_cumprod, tiny_backbone.scheduler_config, 12, p=0.7)

    with torch.no_grad():
        x, y = edict_generate(*edict_invert(latent, predict, schedule), predict, schedule)

    assert relative_error(x, latent.double()) < 1e-4
    assert relative_error(y, latent.double()) < 1e-4


def test_activation_checkpointing_gives_the_same_gradient(tiny_backbone):
    predict = unet_noise_predictor(tiny_backbone.unet, tiny_backbone.prompt_embeddings([""]))
    schedule = ddim_schedule(tiny_backbone.alphas_cumprod, tiny_backbone.scheduler_config, 3)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    grads = []
    for checkpointing in (False, True):
        noise = start.clone().requires_grad_(True)
        x, y = edict_generate(noise, noise * 0.5, predict, schedule, checkpointing=checkpointing)
        ((x + y) * weights).sum().backward()
        grads.append(noise.grad)

    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


# --- NLPD --------------------------------------------------------------------------------------


def test_nlpd_is_zero_for_identical_images_and_grows_with_distortion(tiny_pixels):
    images = tiny_pixels(2)
    nlpd = NLPD()
    assert torch.equal(nlpd(images, images), torch.zeros(2))

    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    by_noise = [nlpd((images + s * noise).clamp(0, 1), images) for s in (0.01, 0.05, 0.2)]
    blur = torch.nn.functional.avg_pool2d
    by_blur = [nlpd(blur(images, k, stride=1, padding=k // 2, count_include_pad=False), images) for k in (3, 5, 9)]
    for series in (by_noise, by_blur):
        assert bool((series[0] > 0).all())
        assert bool((series[0] < series[1]).all()) and bool((series[1] < series[2]).all())


def test_nlpd_is_differentiable(tiny_pixels):
    reference = tiny_pixels(1, size=16).double()
    moved = (reference * 0.8 + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: NLPD()(x, reference), (moved,))
    same = reference.clone().requires_grad_(True)
    NLPD()(same, reference).sum().backward()
    assert torch.isfinite(same.grad).all() and not same.grad.abs().sum()  # a minimum, no NaN from sqrt(0)


# --- the MAP loop ------------------------------------------------------------------------------


def enhance(prior, pixels, **settings):
    options = {"inversion_steps": 1, "iterations": 4, "patience": 0, **settings}
    return MapEnhancer(prior.model.backbone, prior, MapSettings(**options)).run(pixels)


def test_prior_score_rises_over_iterations(calibrated_prior, tiny_pixels):
    result = enhance(calibrated_prior, tiny_pixels(1), fidelity_weight=0.0)
    priors = [step["prior"] for step in result.history]

    assert result.inversion_error < 1e-6
    assert priors[-1] > priors[0]
    assert result.best_iteration > 0 and result.best["prior"] > priors[0]


def test_a_heavier_fidelity_weight_keeps_the_result_closer(calibrated_prior, tiny_pixels):
    pixels = tiny_pixels(3)[2:]
    free = enhance(calibrated_prior, pixels, fidelity_weight=0.0)
    held = enhance(calibrated_prior, pixels, fidelity_weight=500.0)
    start = held.history[0]["fidelity"]
    assert free.history[0]["fidelity"] == pytest.approx(start)

    assert held.history[-1]["fidelity"] < start  # the fidelity term pulls towards the input
    assert held.history[-1]["fidelity"] < free.history[-1]["fidelity"]


def test_enhancement_is_deterministic(calibrated_prior, tiny_pixels):
    pixels = tiny_pixels(1)
    first, second = (enhance(calibrated_prior, pixels, iterations=2) for _ in range(2))
    assert first.history == second.history
    assert torch.equal(first.image, second.image)


def test_zero_iterations_write_the_input_back(calibrated_prior, photos, tmp_path):
    plan = OutputPlan(str(photos / "rgb.png"), str(tmp_path / "same.png"))
    enhancer = MapEnhancer(calibrated_prior.model.backbone, calibrated_prior, MapSettings(inversion_steps=3, iterations=0))
    entry = enhance_file(plan, enhancer)

    assert entry["status"] == "ok" and entry["iterations"] == 0
    written = np.asarray(Image.open(plan.output), dtype=np.int16)
    original = np.asarray(Image.open(plan.input), dtype=np.int16)
    assert np.abs(written - original).max() <= 1  # the residual is zero up to float rounding
    assert entry["prior_after"] == pytest.approx(entry["prior_before"], abs=1e-4)


def test_ctrl_c_keeps_the_best_image_so_far(calibrated_prior, photos, tmp_path):
    class InterruptedPrior:
        """The prior as a user's Ctrl-C meets it: during the third gradient evaluation."""

        resolution, resample, model = calibrated_prior.resolution, calibrated_prior.resample, calibrated_prior.model

        def __init__(self):
            self.calls = 0

        def __call__(self, pixels):
            if torch.is_grad_enabled():
                self.calls += 1
                if self.calls == 3:
                    raise KeyboardInterrupt
            return calibrated_prior(pixels)

    plan = OutputPlan(str(photos / "rgb.png"), str(tmp_path / "out.png"))
    settings = MapSettings(inversion_steps=1, iterations=10, patience=0)
    entry = enhance_file(plan, MapEnhancer(calibrated_prior.model.backbone, InterruptedPrior(), settings))

    assert entry["status"] == "interrupted" and entry["stop_reason"] == "interrupted"
    assert entry["iterations"] == 2
    assert Image.open(plan.output).size == (67, 45)


# --- outputs -----------------------------------------------------------------------------------


def test_output_plans(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for path in (first, second):
        Image.new("RGB", (4, 4)).save(path)
    items = [InputItem(str(first)), InputItem(str(second)), InputItem("gone.png", "no such file")]

    plans = plan_outputs(items, out_dir=tmp_path / "out")
    assert [p.output for p in plans[:2]] == [str(tmp_path / "out" / "x.png"), str(tmp_path / "out" / "x-2.png")]
    assert plans[2].error == "no such file"

    in_place = plan_outputs(items[:1], out_dir=tmp_path / "a")
    assert "the output is the input itself" in in_place[0].error
    assert plan_outputs(items[:1], out_dir=tmp_path / "a", overwrite=True)[0].error is None
    with pytest.raises(UsageError, match="use --out-dir"):
        plan_outputs(items[:2], output=tmp_path / "one.png")
    with pytest.raises(UsageError, match="cannot write images with the extension '.xyz'"):
        plan_outputs(items[:1], output=tmp_path / "one.xyz")
    beside = plan_outputs(items[:2])  # neither -o nor --out-dir: beside each input, never over it
    assert [p.output for p in beside] == [str(tmp_path / "a" / "x.enhanced.png"), str(tmp_path / "b" / "x.enhanced.png")]
    (tmp_path / "a" / "x.enhanced.png").write_bytes(b"an earlier result")
    assert "exists; pass --overwrite" in plan_outputs(items[:1])[0].error
    with pytest.raises(UsageError, match="give one of them"):
        plan_outputs(items[:1], output=tmp_path / "one.png", out_dir=tmp_path / "out")


def test_cli_keeps_size_and_mode_and_reports(run_main, dpiqa_head, photos, tmp_path):
    out_dir, report = tmp_path / "out", tmp_path / "report.json"
    inputs = [str(photos / name) for name in ("rgb.png", "grey.png", "alpha.png")]
    code, stdout, stderr = run_main(cli_args(dpiqa_head, *inputs, "--out-dir", str(out_dir), "--report", str(report)))

    assert code == EXIT_OK, stderr
    assert stdout.splitlines()[0] == "input,output,prior_before,prior_after,iterations,status,error"
    assert [line.split(",")[0] for line in stdout.splitlines()[1:]] == inputs  # a row per input, data only
    for name in ("rgb.png", "grey.png", "alpha.png"):
        before, after = Image.open(photos / name), Image.open(out_dir / name)
        assert (after.size, after.mode) == (before.size, before.mode)
    # Alpha is carried over exactly; only the colour under it is enhanced.
    assert np.array_equal(np.asarray(Image.open(out_dir / "alpha.png"))[..., 3],
                          np.asarray(Image.open(photos / "alpha.png"))[..., 3])
    assert sorted(os.listdir(out_dir)) == ["alpha.png", "grey.png", "rgb.png"]  # no temporary files left

    record = json.loads(report.read_text())
    assert record["settings"]["inversion_steps"] == 1 and record["seed"] == 0
    assert record["prior"]["method"] == "dpiqa"
    for entry in record["images"]:
        assert entry["status"] == "ok"
        assert {"prior_before", "prior_after", "fidelity", "iterations", "seconds"} <= set(entry)
    lines = [line for line in stderr.splitlines() if not line.startswith(("diqa: loading", "diqa: computing", "diqa: embedding"))]
    assert len(lines) == 4 and all(" -> " in line for line in lines[:3])  # the rest: stage messages
    # The PNG strip beside the report: a row per image (before, after, difference, prior curve).
    strip = tmp_path / "report.png"
    assert lines[3] == f"diqa: wrote {strip}"
    with Image.open(strip) as picture:
        picture.load()
        assert picture.format == "PNG" and picture.size == (1000, 750)


def test_cli_bad_inputs_are_reported_and_the_run_goes_on(run_main, dpiqa_head, photos, tmp_path):
    broken = photos / "broken.png"
    broken.write_bytes(b"not a picture at all")
    out_dir = tmp_path / "out"
    args = [str(broken), str(photos / "rgb.png"), str(photos / "missing.png")]
    code, _, stderr = run_main(cli_args(dpiqa_head, *args, "--out-dir", str(out_dir)))

    assert code == EXIT_PARTIAL
    assert f"diqa: {broken}: not an image or unsupported format" in stderr
    assert f"diqa: {photos / 'missing.png'}: no such file" in stderr
    assert os.listdir(out_dir) == ["rgb.png"]


def test_cli_never_replaces_files_unasked(run_main, dpiqa_head, photos, tmp_path):
    source = photos / "rgb.png"
    original = source.read_bytes()
    code, _, stderr = run_main(cli_args(dpiqa_head, str(source), "-o", str(source)))
    assert code == EXIT_USAGE and "the output is the input itself; pass --overwrite" in stderr
    assert source.read_bytes() == original

    existing = tmp_path / "taken.png"
    existing.write_bytes(b"keep me")
    code, _, stderr = run_main(cli_args(dpiqa_head, str(source), "-o", str(existing)))
    assert code == EXIT_USAGE and "exists; pass --overwrite" in stderr
    assert existing.read_bytes() == b"keep me"

    code, _, stderr = run_main(cli_args(dpiqa_head, str(source), "-o", str(existing), "--overwrite"))
    assert code == EXIT_OK, stderr
    assert Image.open(existing).size == (67, 45)


def test_cli_an_output_the_format_cannot_hold_fails_cleanly(run_main, dpiqa_head, photos, tmp_path):
    target = tmp_path / "out" / "alpha.jpg"  # JPEG has no alpha channel
    code, _, stderr = run_main(cli_args(dpiqa_head, str(photos / "alpha.png"), "-o", str(target)))

    assert code == EXIT_PARTIAL
    assert "cannot write" in stderr and "RGBA" in stderr
    assert os.listdir(target.parent) == []  # neither the output nor a temporary file


def test_cli_ctrl_c_writes_the_best_image_and_the_report(run_main, dpiqa_head, photos, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_call = Metric.forward

    def interrupted(self, pixels, **kwargs):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
        return real_call(self, pixels, **kwargs)

    monkeypatch.setattr(Metric, "forward", interrupted)
    out, report = tmp_path / "out.png", tmp_path / "r.json"
    code, _, stderr = run_main(cli_args(dpiqa_head, str(photos / "rgb.png"), "-o", str(out), "--report", str(report))
                               + ["--iterations", "5"])

    assert code == EXIT_INTERRUPTED
    assert Image.open(out).size == (67, 45)
    assert json.loads(report.read_text())["images"][0]["status"] == "interrupted"
    assert "interrupted" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prior", "genzvqa"], "enhancement needs an image method"),
        (["--prior", "dpiqq"], "did you mean 'dpiqa'"),
        (["--fidelity", "ssim"], "--fidelity 'ssim' is not one of nlpd, lpips, mse"),
        (["--iterations", "-1"], "--iterations must be 0 or more"),
        (["--output-mode", "blend"], "--output-mode 'blend' is not one of residual, decoded"),
    ],
)
def test_cli_usage_errors_name_the_fix(run_main, photos, tmp_path, args, message):
    code, _, stderr = run_main(["enhance", str(photos / "rgb.png"), "-o", str(tmp_path / "o.png"), *args])
    assert code == EXIT_USAGE
    assert message in stderr


@pytest.mark.parametrize("fidelity", ["mse", "lpips"])
def test_other_fidelity_distances_run(calibrated_prior, tiny_pixels, fidelity):
    from diqa_cli.enhance.map import build_fidelity

    distance = build_fidelity(fidelity, device="cpu", lpips_weights=None)  # LPIPS: random trunk, no download
    settings = MapSettings(inversion_steps=1, iterations=1, fidelity=fidelity)
    result = MapEnhancer(calibrated_prior.model.backbone, calibrated_prior, settings, fidelity=distance).run(tiny_pixels(1))

    assert [step["iteration"] for step in result.history] == [0, 1]
    assert all(step["fidelity"] > 0 and np.isfinite(step["objective"]) for step in result.history)


def test_cli_prints_a_row_per_input_and_keep_if_better_writes_nothing_that_did_not_improve(
    run_main, dpiqa_head, photos, tmp_path, monkeypatch
):
    import csv
    import io

    out = tmp_path / "out"
    code, stdout, _ = run_main(cli_args(dpiqa_head, str(photos / "rgb.png"), str(tmp_path / "gone.png"),
                                        "--out-dir", str(out), "-f", "csv"))
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert code == 3 and list(rows[0]) == ["input", "output", "prior_before", "prior_after", "iterations", "status", "error"]
    assert rows[0]["status"] == "ok" and rows[0]["output"] == str(out / "rgb.png") and float(rows[0]["prior_after"])
    assert rows[1]["status"] == "error" and "no such file" in rows[1]["error"]

    # A prior that never improves: with --keep-if-better nothing is written, and the row says why.
    def flat(self, pixels, **kwargs):
        return torch.zeros(len(pixels) if isinstance(pixels, torch.Tensor) and pixels.ndim == 4 else 1) + pixels.sum() * 0
    monkeypatch.setattr(Metric, "forward", flat)
    kept = tmp_path / "kept"
    code, stdout, err = run_main(cli_args(dpiqa_head, str(photos / "grey.png"), "--out-dir", str(kept),
                                          "--keep-if-better", "-f", "jsonl"))
    row = json.loads(stdout)
    assert code == 0 and row["status"] == "not-improved" and row["output"] is None
    assert "not written: the prior did not improve" in err
    assert not kept.exists() or list(kept.iterdir()) == []
