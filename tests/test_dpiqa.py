"""DP-IQA teacher and student on the tiny backbone: shapes, determinism, gradients, released-key
conversion, checkpoints, prompts and registry entries."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from diqa_cli.errors import WeightsError


def _build(cls, backbone, seed, **overrides):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(backbone, **{**cls.tiny_config(), **overrides}).eval()


@pytest.fixture(scope="module")
def session_home(tiny_backbone):
    """The session's DIQA_HOME (module fixtures run before the per-test one is set): models
    built here share one cache of the 1485 prompt features instead of re-encoding them."""
    return os.environ["DIQA_HOME"]


@pytest.fixture(scope="module")
def teachers(tiny_backbone, session_home):
    from diqa_cli.models.dpiqa import DPIQA

    return {
        "a": _build(DPIQA, tiny_backbone, 1),
        "b": _build(DPIQA, tiny_backbone, 2),
        "frozen": _build(DPIQA, tiny_backbone, 3, finetune_unet=False),
    }


@pytest.fixture(scope="module")
def teacher(teachers):
    return teachers["a"]


def _released_teacher_state(model, backbone):
    """What RomGai/DP-IQA's ``torch.save(DPIQA().state_dict())`` holds: diqa's names plus the
    frozen VAE and the QFD's unused BatchNorm and distortion classifier."""
    state = dict(model.state_dict())
    state.update({f"vae.{k}": v for k, v in backbone.vae.state_dict().items()})
    width = model.config["decoder_channels"]
    state.update({f"QFD.bnc1.{k}": v for k, v in nn.BatchNorm2d(width).state_dict().items()})
    classifier = nn.Linear(model.config["fc_hidden"], 24)
    state.update({f"QFD.classifier_dist.{k}": v for k, v in classifier.state_dict().items()})
    return state


# --- prompts -------------------------------------------------------------------------------------


def test_prompts_are_the_released_1485_in_generator_order():
    from diqa_cli.models.dpiqa_prompts import DISTORTIONS, QUALITIES, SCENES, quality_prompts

    prompts = quality_prompts()
    assert (len(QUALITIES), len(SCENES), len(DISTORTIONS)) == (5, 9, 33)
    assert len(prompts) == 1485 and len(set(prompts)) == 1485
    assert prompts[0] == "a photo of a animal with jpeg2000 compression artifacts, which is of bad quality"
    assert prompts[-1] == "a photo of a others with other realistic artifacts, which is of perfect quality"
    # Qualities outermost, distortions innermost (itertools.product order of the released script).
    index = QUALITIES.index("good") * 9 * 33 + SCENES.index("still_life") * 33 + DISTORTIONS.index("pixelate")
    assert prompts[index] == "a photo of a still_life with pixelate artifacts, which is of good quality"


# --- teacher -------------------------------------------------------------------------------------


def test_teacher_returns_scores_and_an_8_channel_latent_sized_map(teacher, tiny_pixels):
    pixels = tiny_pixels(2)
    with torch.no_grad():
        scores, feature_map = teacher.forward_with_map(pixels)
        plain = teacher(pixels)
    latent = teacher.resolution // teacher.backbone.vae_scale_factor
    assert scores.shape == (2,) and feature_map.shape == (2, 8, latent, latent)
    assert torch.isfinite(scores).all() and (feature_map >= 0).all()  # the map ends in a ReLU
    assert torch.equal(plain, scores)
    assert teacher.feature_layers() == ["up.0", "up.1", "up.2", "up.3"]


def test_teacher_is_deterministic_and_batch_equals_singles(teacher, tiny_pixels):
    pixels = tiny_pixels(3)
    with torch.no_grad():
        first = teacher(pixels)
        again = teacher(pixels)
        singles = torch.cat([teacher(pixels[i : i + 1]) for i in range(3)])
    assert torch.equal(first, again)
    torch.testing.assert_close(singles, first, rtol=0, atol=1e-5)
    assert first.unique().numel() == 3  # different images, different scores


def test_teacher_gradients_reach_the_pixels(teacher, tiny_pixels):
    pixels = tiny_pixels(2).requires_grad_(True)
    teacher(pixels).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum() > 0
    teacher.zero_grad(set_to_none=True)


def test_prompt_and_image_adapters_both_condition_the_score(teacher, tiny_pixels):
    pixels = tiny_pixels(2)
    with torch.no_grad():
        base = teacher(pixels)
        # gamma starts at 1e-4, so the prompt adapter's MLP only shows once gamma grows.
        adapter_in = teacher.img_adapter.conv_in.weight
        for parameter, new_value in ((teacher.gamma, torch.ones_like(teacher.gamma)), (adapter_in, adapter_in * 50.0)):
            saved = parameter.detach().clone()
            parameter.copy_(new_value)
            changed = teacher(pixels)
            parameter.copy_(saved)
            assert (changed - base).abs().max() > 1e-6, "changing the adapter left the scores unchanged"
        assert torch.equal(teacher(pixels), base)


def test_half_precision_backbone_gives_float32_scores_close_to_full_precision(
    teachers, tiny_dir, tiny_pixels, session_home
):
    from diqa_cli.backbone import load_backbone
    from diqa_cli.models.dpiqa import DPIQA

    # bf16 is the half type CPUs run; the same dtype juggling serves fp16 on CUDA.
    half_backbone = load_backbone(str(tiny_dir / "backbone"), device="cpu", dtype="bf16", offline=True)
    half = _build(DPIQA, half_backbone, 3, finetune_unet=False)  # same heads as teachers["frozen"]
    pixels = tiny_pixels(2)
    with torch.no_grad():
        scores, feature_map = half.forward_with_map(pixels)
        full = teachers["frozen"](pixels)
    assert scores.dtype == torch.float32 and feature_map.dtype == torch.float32
    torch.testing.assert_close(scores, full, rtol=0.05, atol=1e-3)


def test_checkpoint_holds_the_unet_only_when_finetuned(teachers, tiny_backbone):
    finetuned = teachers["a"].checkpoint_state_dict()
    frozen = teachers["frozen"].checkpoint_state_dict()
    assert any(k.startswith("unet.") for k in finetuned)
    assert not any(k.startswith("unet.") for k in frozen)
    heads = {k for k in finetuned if not k.startswith("unet.")}
    assert heads == set(frozen)
    assert {"gamma", "text_adapter.fc.0.weight", "text_adapter.fc.2.weight", "QFD.se_fuse.fc.0.weight"} <= heads
    assert all(k.startswith(("gamma", "text_adapter.", "img_adapter.", "QFD.")) for k in heads)
    torch.testing.assert_close(teachers["a"].gamma.detach(), torch.full_like(teachers["a"].gamma, 1e-4))
    # Fine-tuning works on the model's own U-Net: the shared backbone's stays frozen.
    assert teachers["a"].unet is not tiny_backbone.unet
    assert teachers["frozen"].unet is tiny_backbone.unet
    assert not any(p.requires_grad for p in tiny_backbone.unet.parameters())


def test_frozen_unet_teacher_refuses_a_checkpoint_with_unet_weights(teachers):
    with pytest.raises(WeightsError, match="finetune_unet"):
        teachers["frozen"].load_checkpoint_state_dict(teachers["a"].checkpoint_state_dict())


def test_released_teacher_state_dict_converts_and_loads_unchanged(teachers, tiny_backbone, tiny_pixels, tmp_path):
    from safetensors.torch import load_file

    from diqa_cli.weights import convert

    source, target = teachers["a"], teachers["b"]
    pixels = tiny_pixels(2)
    with torch.no_grad():
        expected = source(pixels)
        assert not torch.allclose(target(pixels), expected)
    released = tmp_path / "koniq_model_plcc_best.pth"
    torch.save(_released_teacher_state(source, tiny_backbone), released)

    converted = load_file(str(convert(released, tmp_path / "dpiqa.safetensors", method="dpiqa")))
    assert not any(k.startswith(("vae.", "QFD.bnc1.", "QFD.classifier_dist.")) for k in converted)
    assert set(converted) == set(target.checkpoint_state_dict())
    saved = {k: v.clone() for k, v in target.state_dict().items()}
    try:
        target.load_checkpoint_state_dict(converted)
        with torch.no_grad():
            torch.testing.assert_close(target(pixels), expected, rtol=0, atol=1e-6)
    finally:
        target.load_state_dict(saved)


def test_teacher_converter_refuses_other_layouts(teacher, tiny_backbone):
    from diqa_cli.models.dpiqa import DPIQA

    released = _released_teacher_state(teacher, tiny_backbone)
    student_like = {"base_model.features.0.0.weight": torch.zeros(1), "fc3.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match="dpiqa-student"):
        DPIQA.convert_released_state_dict(student_like)
    with pytest.raises(WeightsError, match="lacks gamma"):
        DPIQA.convert_released_state_dict({k: v for k, v in released.items() if k != "gamma"})
    with pytest.raises(WeightsError, match="unexpected keys optimizer.step"):
        DPIQA.convert_released_state_dict({**released, "optimizer.step": torch.zeros(1)})


def test_teacher_head_saves_and_reloads_with_the_same_scores(
    teacher, tiny_backbone, tiny_pixels, tmp_path, monkeypatch, session_home
):
    from diqa_cli.checkpoint import load_head, save_head

    monkeypatch.setenv("DIQA_HOME", session_home)  # the cached prompt features
    path = save_head(teacher, tmp_path / "dpiqa.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    model, sidecar = load_head(path, backbone=tiny_backbone)
    assert sidecar["config"]["clip"] == "./clip" and sidecar["timesteps"] == [1]
    assert "[0,1]" in sidecar["input_convention"]
    pixels = tiny_pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), teacher(pixels), rtol=0, atol=1e-6)


# --- student -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def students(tiny_pixels):
    """Two students with BatchNorm statistics from different images (untrained ones would give
    every image the same score; see ``DPIQAStudent.set_batchnorm_statistics``)."""
    from diqa_cli.models.dpiqa_student import DPIQAStudent

    first, second = _build(DPIQAStudent, None, 1), _build(DPIQAStudent, None, 2)
    first.set_batchnorm_statistics(tiny_pixels(6))
    second.set_batchnorm_statistics(tiny_pixels(12)[6:])
    return {"a": first, "b": second}


def test_student_needs_no_backbone_and_matches_the_teacher_map(students, teacher, tiny_pixels):
    student = students["a"]
    pixels = tiny_pixels(2)
    with torch.no_grad():
        scores, feature_map = student.forward_with_map(pixels)
        _, teacher_map = teacher.forward_with_map(pixels)
    assert student.backbone is None and student.resolution == teacher.resolution
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert feature_map.shape == teacher_map.shape  # what distillation's map loss compares


def test_student_is_deterministic_batch_equals_singles_and_differentiable(students, tiny_pixels):
    student = students["a"]
    pixels = tiny_pixels(3)
    with torch.no_grad():
        first = student(pixels)
    assert torch.equal(first, student(pixels.clone()))
    assert first.unique().numel() == 3  # different images, different scores
    # Batch against singles in float64: in float32 the convolutions of a batch of 3 and of 1 round
    # differently, and the random network amplified that to 1.6e-4 when earlier test modules had
    # changed the thread count; any real coupling between a batch's images would still show.
    precise = copy.deepcopy(student).double()
    with torch.no_grad():
        together = precise(pixels.double())
        singles = torch.cat([precise(pixels[i : i + 1].double()) for i in range(3)])
    torch.testing.assert_close(singles, together, rtol=0, atol=1e-5)
    pixels.requires_grad_(True)
    student(pixels).sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    student.zero_grad(set_to_none=True)


def test_released_student_state_dict_converts_and_loads_with_batchnorm_statistics(students, tiny_pixels, tmp_path):
    from safetensors.torch import load_file

    from diqa_cli.weights import convert

    source, target = students["a"], students["b"]
    pixels = tiny_pixels(2)
    with torch.no_grad():
        expected = source(pixels)
    released = tmp_path / "koniq_student_model_plcc_best.pth"
    torch.save(source.state_dict(), released)

    converted = load_file(str(convert(released, tmp_path / "student.safetensors", method="dpiqa-student")))
    assert any(k.endswith("running_mean") for k in converted)
    assert set(converted) == set(target.checkpoint_state_dict())
    target.load_checkpoint_state_dict(converted)
    with torch.no_grad():
        torch.testing.assert_close(target(pixels), expected, rtol=0, atol=1e-6)


def test_student_converter_and_loader_refuse_the_wrong_layout(students, teacher):
    from diqa_cli.models.dpiqa_student import DPIQAStudent

    with pytest.raises(WeightsError, match="--method dpiqa"):
        DPIQAStudent.convert_released_state_dict(teacher.checkpoint_state_dict())
    with pytest.raises(WeightsError, match="unexpected keys classifier.1.weight"):
        DPIQAStudent.convert_released_state_dict({**students["a"].state_dict(), "classifier.1.weight": torch.zeros(1)})
    b7_sized = {k: v for k, v in students["a"].state_dict().items() if not k.startswith("fc1.")}
    with pytest.raises(WeightsError, match="missing keys"):
        students["b"].load_checkpoint_state_dict(b7_sized)


# --- registry ------------------------------------------------------------------------------------


def test_registry_entries_name_the_manifest_weights_and_what_each_needs():
    from diqa_cli.methods import get_method, load_model_class
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.models.dpiqa_student import DPIQAStudent
    from diqa_cli.weights import entry

    teacher_spec, student_spec = get_method("dpiqa"), get_method("dpiqa-student")
    assert load_model_class(teacher_spec) is DPIQA and load_model_class(student_spec) is DPIQAStudent
    assert teacher_spec.timesteps == (1,) and teacher_spec.default_backbone == "sd15"
    assert student_spec.needs_backbone is False
    for spec in (teacher_spec, student_spec):
        assert spec.score_direction == "higher is better" and spec.resolution == 512
        assert "CC BY-NC-SA 4.0" in spec.licence and spec.deviations
        for name in spec.released_weights:
            assert entry(name).method == spec.name


def test_student_head_saves_and_scores_without_any_diffusion_backbone(students, tiny_images, tmp_path, monkeypatch):
    """A student checkpoint must score on a machine that has no Stable Diffusion weights: the
    sidecar records no backbone and loading it never asks for one."""
    import diqa_cli.backbone
    from diqa_cli.checkpoint import load_head, read_sidecar, save_head
    from diqa_cli.imageio import expand_inputs
    from diqa_cli.pipelines.images import score_images

    path = save_head(students["a"], tmp_path / "student.safetensors", normalisation={"offset": 1.0, "scale": 4.0},
                     extra={})
    assert read_sidecar(path)["backbone"] == {"ref": None, "identity": None}

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone-free head loaded a diffusion backbone")

    monkeypatch.setattr(diqa_cli.backbone, "load_backbone", no_backbone)
    model, sidecar = load_head(path, device="cpu", dtype="fp32")
    files = []
    for i, image in enumerate(tiny_images(2)):
        files.append(tmp_path / f"{i}.png")
        image.save(files[-1])
    rows = list(score_images(expand_inputs([str(f) for f in files]), model,
                             normalisation=sidecar["score_normalisation"]))
    with torch.no_grad():
        expected = students["a"](torch.stack([torch.from_numpy(_model_input(f, model)) for f in files]))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["backbone"] for r in rows] == [None, None]
    for row, raw in zip(rows, expected.tolist()):
        assert row["raw_score"] == pytest.approx(raw, rel=1e-5, abs=1e-6)
        assert row["score"] == pytest.approx(raw * 4.0 + 1.0, rel=1e-5, abs=1e-6)


def _model_input(path, model):
    from diqa_cli.imageio import load_image, resize_for_model

    return resize_for_model(load_image(str(path)), model.resolution, resample=model.spec.resample)


def test_a_teacher_with_its_own_unet_keeps_one_unet_in_memory_when_scoring(dpiqa_head, tiny_backbone, tiny_pixels):
    """The released teacher carries its fine-tuned U-Net: scoring builds it from the checkpoint's
    tensors (no copy of the backbone's first) and frees the backbone's, with unchanged scores."""
    from diqa_cli.checkpoint import read_sidecar
    from diqa_cli.files import read_safetensors
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.scoring import load_scorer

    model, _ = load_scorer(None, checkpoint=str(dpiqa_head), device="cpu", dtype="fp32", offline=True)
    assert model.config["finetune_unet"] and all(p.is_meta for p in model.backbone.unet.parameters())
    assert not any(p.is_meta for p in model.parameters())

    reference = DPIQA(tiny_backbone, **read_sidecar(dpiqa_head)["config"])  # the copy-then-load way
    reference.load_checkpoint_state_dict(read_safetensors(dpiqa_head))
    pixels = tiny_pixels(2)
    with torch.no_grad():
        assert torch.equal(model(pixels), reference(pixels))
    assert not any(p.is_meta for p in tiny_backbone.unet.parameters())  # a backbone loaded elsewhere is left alone

    kept, _ = load_scorer(None, checkpoint=str(dpiqa_head), device="cpu", dtype="fp32", offline=True,
                          keep_backbone_unet=True)
    assert not any(p.is_meta for p in kept.backbone.unet.parameters())  # enhancement runs the diffusion on it
