"""`diqa weights convert` on heads as the released code saves them: DP-IQA's one file (what it
drops, the VAE it was trained with), GenzIQA's and GenzVQA's several files taken together."""

from __future__ import annotations

import json

import pytest
import torch

from diqa_cli.errors import DiqaWarning, UsageError, WeightsError


def _lora_file(model) -> dict:
    """The U-Net LoRA as diffusers 0.17's save_attn_procs writes it: cross-attention from the
    model, self-attention LoRA at zero (the released training freezes it there)."""
    state = {k: v.clone() for k, v in model.checkpoint_state_dict().items() if ".processor." in k}
    for key in list(state):
        state[key.replace(".attn2.", ".attn1.")] = torch.zeros_like(state[key])
    return state


def _prompt_file(model) -> dict:
    ctx = model.checkpoint_state_dict()["ctx"].clone()
    return {"ctx": ctx, "token_prefix": torch.randn(2, 1, ctx.shape[-1]), "token_suffix": torch.randn(2, 60, ctx.shape[-1])}


@pytest.fixture(scope="module")
def genziqa(tiny_backbone):
    from diqa_cli.models.genziqa import GenzIQA

    model = GenzIQA(tiny_backbone, **GenzIQA.tiny_config(), seed=5)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _save_run(root, lora, prompts, step=500):
    """The released training's per-step layout."""
    unet = root / "unet_states" / f"flive-checkpoint-{step}" / "pytorch_model.bin"
    coop = root / "coop_states" / f"flive-checkpoint-{step}" / "coop_Model_state_dict.pth"
    for path, state in ((unet, lora), (coop, prompts)):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    return unet, coop


def test_genziqa_files_convert_in_one_step(genziqa, tmp_path, run_main, model_home):
    from diqa_cli.checkpoint import load_head, save_head

    unet, coop = _save_run(tmp_path, _lora_file(genziqa), _prompt_file(genziqa))
    out = tmp_path / "genziqa.safetensors"
    code, stdout, stderr = run_main(["weights", "convert", str(coop), str(unet), "-o", str(out), "-m", "genziqa"], home=model_home)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    # What was dropped, per prefix, on stderr and in the note.
    note = json.loads(out.with_suffix(".conversion.json").read_text())
    assert note["dropped_tensors"]["token_prefix"] == 1 and note["dropped_tensors"]["token_suffix"] == 1
    attn1 = sum(n for prefix, n in note["dropped_tensors"].items() if ".attn1." in prefix)
    assert attn1 == len(_lora_file(genziqa)) // 2
    assert "dropped" in stderr and "token_prefix* (1)" in stderr
    assert [s["file"] for s in note["sources"]] == ["coop_Model_state_dict.pth", "pytorch_model.bin"]

    # The converted head holds exactly what the saved model holds, under diqa's checkpoint names.
    head = save_head(genziqa, tmp_path / "reference.safetensors", normalisation={"offset": 0.0, "scale": 1.0})
    reference, _ = load_head(head, backbone=genziqa.backbone)
    from diqa_cli.files import read_safetensors

    converted = read_safetensors(out)
    assert set(converted) == set(reference.checkpoint_state_dict())
    assert all(torch.equal(converted[k], v) for k, v in reference.checkpoint_state_dict().items())


def test_genziqa_files_that_do_not_belong_together_are_refused(genziqa, tmp_path):
    from diqa_cli.weights import convert

    lora, prompts = _lora_file(genziqa), _prompt_file(genziqa)
    unet, _ = _save_run(tmp_path / "a", lora, prompts, step=500)
    _, coop_later = _save_run(tmp_path / "b", lora, prompts, step=1000)
    with pytest.raises(UsageError, match="different training steps"):
        convert([coop_later, unet], tmp_path / "x.safetensors", method="genziqa")

    narrow = {**prompts, "ctx": prompts["ctx"][:, :-1]}
    unet, coop = _save_run(tmp_path / "c", lora, narrow)
    with pytest.raises(WeightsError, match="not from the same model"):
        convert([coop, unet], tmp_path / "x.safetensors", method="genziqa")

    trained_self = {k: (torch.ones_like(v) if ".attn1." in k else v) for k, v in lora.items()}
    unet, coop = _save_run(tmp_path / "d", trained_self, prompts)
    with pytest.raises(WeightsError, match="self-attention"):
        convert([coop, unet], tmp_path / "x.safetensors", method="genziqa")

    unet, coop = _save_run(tmp_path / "e", lora, prompts)
    with pytest.raises(WeightsError, match="prompt-learner file"):
        convert([unet], tmp_path / "x.safetensors", method="genziqa")
    with pytest.raises(UsageError, match="released as one file"):
        convert([coop, unet], tmp_path / "x.safetensors", method="dpiqa")
    assert not (tmp_path / "x.safetensors").exists()


def test_genzvqa_modulator_files_convert_with_the_genziqa_files(tiny_backbone, tmp_path):
    from diqa_cli.files import read_safetensors
    from diqa_cli.models.genzvqa import GenzVQA
    from diqa_cli.weights import convert

    model = GenzVQA(tiny_backbone, **GenzVQA.tiny_config())
    state = model.checkpoint_state_dict()
    unet, coop = _save_run(tmp_path, _lora_file(model), _prompt_file(model))
    parts = []
    for part in ("linearBlocks", "fastAttn", "slowAttn"):  # any order: told apart by their contents
        path = tmp_path / f"{part}_epoch2.pth"
        torch.save({k[len(part) + 1 :]: v for k, v in state.items() if k.startswith(part + ".")}, path)
        parts.append(path)
    out = convert([*parts, unet, coop], tmp_path / "genzvqa.safetensors", method="genzvqa")
    converted = read_safetensors(out)
    assert set(converted) == set(state) and all(torch.equal(converted[k], v) for k, v in state.items())
    model.load_checkpoint_state_dict(converted)  # strict: every key in place

    with pytest.raises(WeightsError, match="three files"):
        convert([*parts[:2], unet, coop], tmp_path / "y.safetensors", method="genzvqa")


def test_dpiqa_conversion_reports_its_drops_and_the_vae_it_was_trained_with(tiny_dir, tiny_backbone, tmp_path):
    """The released teacher file holds its frozen VAE (vae.*) and unused layers: conversion drops
    them, counts them, and records the VAE's hash; scoring warns when the backbone's VAE differs."""
    import dataclasses

    from diqa_cli.checkpoint import load_head, released_sidecar
    from diqa_cli.methods import get_method
    from diqa_cli.models.dpiqa import DPIQA
    from diqa_cli.weights import conversion_summary, convert

    model = DPIQA(tiny_backbone, **DPIQA.tiny_config())
    released = {**model.checkpoint_state_dict(), **{f"vae.{k}": v for k, v in tiny_backbone.vae.state_dict().items()},
                "QFD.bnc1.weight": torch.ones(4), "QFD.classifier_dist.weight": torch.ones(24, 4)}
    src = tmp_path / "koniq_model_srcc_best.pth"
    torch.save(released, src)
    out = convert(src, tmp_path / "dpiqa.safetensors", method="dpiqa")
    note = json.loads(out.with_suffix(".conversion.json").read_text())
    vae_keys = len(tiny_backbone.vae.state_dict())
    assert note["dropped_tensors"] == {"QFD.bnc1.": 1, "QFD.classifier_dist.": 1, "vae.": vae_keys}
    assert set(note["vae_sha256"]) == {"fp32", "fp16", "bf16"}
    assert f"vae.* ({vae_keys})" in conversion_summary(out) and "own VAE" in conversion_summary(out)

    sidecar = released_sidecar(get_method("dpiqa"), out.name)
    sidecar["config"] = DPIQA.tiny_config()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DiqaWarning)  # the same VAE: no warning
        load_head(out, backbone=tiny_backbone, sidecar=sidecar)
    other_vae = {k: v + 0.01 for k, v in tiny_backbone.vae.state_dict().items()}
    vae = type(tiny_backbone.vae).from_config(tiny_backbone.vae.config)
    vae.load_state_dict(other_vae)
    with pytest.warns(DiqaWarning, match="another VAE"):
        load_head(out, backbone=dataclasses.replace(tiny_backbone, vae=vae), sidecar=sidecar)
