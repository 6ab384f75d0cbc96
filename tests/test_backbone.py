"""Backbone loading (folder, single file, manifest name), refusals, device/dtype, encode, embeddings,
and the tiny models themselves."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from diqa_cli import backbone as backbone_module
from diqa_cli.backbone import clip_text_features, load_backbone, resolve_device, resolve_dtype
from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.tiny import TINY_CONFIG_DIR, write_tiny_backbone


def _load(ref, **kwargs):
    return load_backbone(str(ref), device="cpu", dtype="fp32", offline=True, **kwargs)


def _unet_out(backbone):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    with torch.no_grad():
        return backbone.unet(latents, torch.tensor([1, 500]), text).sample


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- tiny models ---------------------------------------------------------------------------


def test_tiny_backbone_is_written_identically_every_time(tiny_dir, tmp_path):
    again = write_tiny_backbone(tmp_path / "again")
    written = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert Path("backbone.safetensors") in written and Path("clip/model.safetensors") in written
    # The session's tiny folder may also hold heads other tests saved beside the backbone.
    for rel in written:
        assert (tiny_dir / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_tiny_folder_is_a_real_stable_diffusion_layout(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "backbone", local_files_only=True)
    assert pipe.vae_scale_factor == 8
    assert len(pipe.unet.down_blocks) == 4 and len(pipe.unet.up_blocks) == 4
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert pipe.tokenizer.model_max_length == 77


def test_shipped_tiny_tokenizer_matches_the_written_one(tiny_dir):
    for name in ("vocab.json", "tokenizer.json", "tokenizer_config.json"):
        assert (TINY_CONFIG_DIR / "tokenizer" / name).read_bytes() == (
            tiny_dir / "backbone/tokenizer" / name
        ).read_bytes()


def test_tiny_tokenizer_covers_any_text(tiny_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "clip", local_files_only=True)
    text = "Bad photo — ünïcode 日本 😀, 42%!"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # Nothing maps to the unknown token: decoding gives the text back (CLIP lower-cases and,
    # like the real tokenizer, splits digits into words of their own).
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


def test_tiny_bundle_has_a_head_for_every_registered_method(tmp_path):
    from diqa_cli.methods import list_methods
    from diqa_cli.tiny import write_tiny_bundle

    root = write_tiny_bundle(tmp_path / "bundle")
    identity = _load(root / "backbone").identity
    specs = list_methods()
    assert specs, "no method registered"
    assert (root / "slowfast.safetensors").is_file()  # video heads read it
    for spec in specs:
        head = root / "heads" / f"{spec.name}.safetensors"
        sidecar = json.loads(head.with_suffix(".json").read_text())
        assert head.stat().st_size > 0
        assert sidecar["method"] == spec.name
        assert sidecar["backbone"]["ref"] == str(root / "backbone")
        assert sidecar["backbone"]["identity"] == identity

    # The untrained student still tells photos apart (its BatchNorm statistics come from them).
    from diqa_cli.checkpoint import load_head
    from diqa_cli.synthetic import reference_photos

    student, _ = load_head(root / "heads" / "dpiqa-student.safetensors", device="cpu", dtype="fp32", offline=True)
    photos = torch.from_numpy(reference_photos(student.resolution)).permute(0, 3, 1, 2)
    with torch.no_grad():
        scores = student(photos)
    assert len(set(scores.tolist())) == len(photos), scores


@pytest.mark.parametrize(
    "name, unet_params, text_params",
    [("sd15", 859_520_964, 123_060_480), ("sd21-base", 865_910_724, 340_387_840)],
)
def test_shipped_configs_build_the_released_architectures(name, unet_params, text_params):
    """Parameter counts of the released SD 1.5 / 2.1-base models (VAE: 83,653,863)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = backbone_module.CONFIG_ROOT / name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == unet_params
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text.parameters()) == text_params
    assert unet.config.sample_size * 8 == 512


def test_original_layout_names_match_stable_diffusion_checkpoints():
    """With SD's two layers per block (the tiny model has one), the diffusers -> original mapping
    gives the names found in released SD checkpoints (and diffusers converts them back)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diqa_cli.tiny import original_sd_state_dict

    sd15 = backbone_module.CONFIG_ROOT / "sd15"
    unet = UNet2DConditionModel.from_config(
        UNet2DConditionModel.load_config(sd15, subfolder="unet"),
        block_out_channels=(32, 32, 64, 64),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL.from_config(
        AutoencoderKL.load_config(sd15, subfolder="vae"),
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=8,
    )
    text = CLIPTextModel(CLIPTextConfig.from_pretrained(TINY_CONFIG_DIR / "text_encoder"))
    state = original_sd_state_dict(unet, vae, text)
    for key in (
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.1.proj_in.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.2.conv2.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in state, key
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)


# --- loading -------------------------------------------------------------------------------


def test_folder_and_single_file_give_the_same_backbone(tiny_dir):
    folder = _load(tiny_dir / "backbone")
    single = _load(tiny_dir / "backbone.safetensors")
    for a, b in ((folder.unet, single.unet), (folder.vae, single.vae)):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb)
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_unet_out(folder), _unet_out(single))
    assert (
        (folder.resolution, folder.vae_scale_factor)
        == (single.resolution, single.vae_scale_factor)
        == (64, 8)
    )
    assert single.config_dir.name == "tiny"  # guessed from the checkpoint's widths
    # A single file's identity is its SHA-256, the value a manifest records.
    assert single.identity == _sha256(tiny_dir / "backbone.safetensors")
    assert folder.identity != single.identity and len(folder.identity) == 64


def test_single_file_text_encoder_matches_the_folder_one(tiny_dir):
    prompts = ["Good Photo.", "Bad Photo."]
    from_folder = _load(tiny_dir / "backbone").prompt_embeddings(prompts)
    from_file = _load(tiny_dir / "backbone.safetensors").prompt_embeddings(prompts)
    assert from_folder.shape == (2, 77, 32)
    assert torch.equal(from_folder, from_file)
    assert not torch.equal(from_folder[0], from_folder[1])


def test_backbone_is_frozen_and_in_eval_mode(tiny_backbone):
    for module in (tiny_backbone.unet, tiny_backbone.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    assert tiny_backbone.alphas_cumprod.dtype == torch.float32
    assert tiny_backbone.alphas_cumprod.shape == (1000,)


def test_single_file_with_a_wrong_config_is_refused(tiny_dir):
    with pytest.raises(WeightsError, match="sd15"):
        _load(tiny_dir / "backbone.safetensors", config="sd15")
    with pytest.raises(UsageError, match="choose sd15, sd21-base, tiny"):
        _load(tiny_dir / "backbone.safetensors", config="sdxl")


def test_single_file_of_unknown_widths_asks_for_a_config(tmp_path):
    from safetensors.torch import save_file

    odd = tmp_path / "odd.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(48, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
                48, 99
            ),
        },
        str(odd),
    )
    with pytest.raises(UsageError, match="cross-attention width 99.*--config"):
        _load(odd)


def test_pickle_checkpoint_is_refused_unless_allowed(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(tiny_dir / "backbone.safetensors"))}, ckpt)
    with pytest.raises(WeightsError) as err:
        _load(ckpt)
    assert "diqa weights convert" in str(err.value) and "model.ckpt" in str(err.value)
    allowed = _load(ckpt, allow_pickle=True)
    assert torch.equal(_unet_out(allowed), _unet_out(_load(tiny_dir / "backbone")))


def test_folder_with_only_pickle_weights_is_refused(tiny_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir / "backbone", folder)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    shutil.rmtree(folder / "unet")
    unet.save_pretrained(folder / "unet", safe_serialization=False)
    with pytest.raises(WeightsError, match="diqa weights convert"):
        _load(folder)


def test_missing_path_and_non_diffusers_folder(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        _load(tmp_path / "nothing.safetensors")
    with pytest.raises(UsageError, match="not a diffusers folder"):
        _load(tmp_path)


# --- manifest names ------------------------------------------------------------------------


def _manifest(tmp_path, monkeypatch, entries: dict) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format": "diqa-weights-manifest/1", "entries": entries}))
    monkeypatch.setenv("DIQA_MANIFEST", str(path))


def _entry(name: str, folder: Path) -> dict:
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fmt = {".safetensors": "safetensors", ".json": "json", ".txt": "txt"}[p.suffix]
            files.append(
                {
                    "path": p.relative_to(folder).as_posix(),
                    "format": fmt,
                    "sha256": _sha256(p),
                    "size": p.stat().st_size,
                }
            )
    return {
        "name": name,
        "kind": "diffusers-backbone",
        "description": "tiny test backbone",
        "licence": "Apache-2.0",
        "source": "https://127.0.0.1.invalid/tiny",
        "files": files,
    }


def test_manifest_name_loads_from_the_cache_offline(tiny_dir, tmp_path, monkeypatch):
    from diqa_cli import weights

    _manifest(tmp_path, monkeypatch, {"tiny-sd": _entry("tiny-sd", tiny_dir / "backbone")})
    cached = weights.cache_dir() / "tiny-sd"
    shutil.copytree(tiny_dir / "backbone", cached)
    by_name = load_backbone("tiny-sd", device="cpu", dtype="fp32", offline=True)
    assert by_name.ref == "tiny-sd" and by_name.source == cached
    assert by_name.identity == _load(tiny_dir / "backbone").identity
    assert torch.equal(_unet_out(by_name), _unet_out(_load(tiny_dir / "backbone")))

    # The text encoder is a separate part: the backbone loads without it, embedding names it.
    shutil.rmtree(cached / "text_encoder")
    without_text = load_backbone("tiny-sd", device="cpu", dtype="fp32", offline=True)
    with pytest.raises(WeightsError, match="text_encoder/"):
        without_text.prompt_embeddings(["a photo"])


def test_offline_refusal_names_the_missing_file(tiny_dir, tmp_path, monkeypatch):
    from diqa_cli import weights

    _manifest(tmp_path, monkeypatch, {"tiny-sd": _entry("tiny-sd", tiny_dir / "backbone")})
    cached = weights.cache_dir() / "tiny-sd"
    shutil.copytree(tiny_dir / "backbone", cached)
    (cached / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError) as err:
        load_backbone("tiny-sd", device="cpu", dtype="fp32", offline=True)
    message = str(err.value)
    assert "unet/diffusion_pytorch_model.safetensors" in message
    assert "offline" in message and "diqa weights pull tiny-sd" in message


def test_unknown_manifest_name_is_a_usage_error(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="unknown weights entry"):
        load_backbone("sd15-typo", device="cpu", dtype="fp32", offline=True)


# --- device and dtype ----------------------------------------------------------------------


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(backbone_module, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(UsageError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(UsageError, match="choose auto, cpu, cuda, cuda:N or mps"):
        resolve_device("tpu")
    with pytest.raises(UsageError, match="number"):
        resolve_device("cuda:x")


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp32", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(UsageError, match="fp16 on the CPU"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(UsageError, match="choose auto, fp32, fp16 or bf16"):
        resolve_dtype("fp8", cpu)


def test_bf16_backbone_on_cpu_runs(tiny_dir):
    half = load_backbone(str(tiny_dir / "backbone"), device="cpu", dtype="bf16", offline=True)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.encode(torch.zeros(1, 3, 64, 64)).dtype == torch.bfloat16


# --- encode / decode -----------------------------------------------------------------------


def test_encode_is_the_scaled_posterior_mean(tiny_backbone, tiny_pixels):
    pixels = tiny_pixels(2) * 2 - 1
    with torch.no_grad():
        latents = tiny_backbone.encode(pixels)
        again = tiny_backbone.encode(pixels)
        posterior = tiny_backbone.vae.encode(pixels).latent_dist
    assert latents.shape == (2, 4, 8, 8)
    assert torch.equal(latents, again)
    assert torch.equal(latents, posterior.mean * tiny_backbone.vae.config.scaling_factor)
    sample = posterior.sample(torch.Generator().manual_seed(0)) * tiny_backbone.vae.config.scaling_factor
    assert not torch.equal(latents, sample)


def test_encode_decode_carry_gradients(tiny_backbone, tiny_pixels):
    pixels = (tiny_pixels(1) * 2 - 1).requires_grad_(True)
    decoded = tiny_backbone.decode(tiny_backbone.encode(pixels))
    assert decoded.shape == (1, 3, 64, 64)
    decoded.square().mean().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


# --- cached text embeddings ----------------------------------------------------------------


def _count_loads(monkeypatch, target, attribute):
    calls = []
    original = getattr(target, attribute)

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attribute, counting)
    return calls


def test_prompt_embeddings_cache_hit_does_not_load_the_text_encoder(tiny_dir, monkeypatch):
    from diqa_cli import home

    loads = _count_loads(monkeypatch, backbone_module.Backbone, "_load_text_encoder")
    prompts = ["Good Photo.", "Bad Photo.", "a blurry photo"]
    first = _load(tiny_dir / "backbone").prompt_embeddings(prompts)
    assert len(loads) == 1
    assert len(list(home.subdir("embeddings").glob("*.safetensors"))) == 1
    # A new run (new backbone object) reads the cache; the text encoder stays unloaded.
    second = _load(tiny_dir / "backbone").prompt_embeddings(prompts)
    assert len(loads) == 1
    assert torch.equal(first, second)
    # Different prompts are a different cache entry.
    _load(tiny_dir / "backbone").prompt_embeddings(prompts[:2])
    assert len(loads) == 2


def test_clip_text_features_are_pooled_projections_and_cached(tiny_dir, monkeypatch):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    prompts = ["sharp photo", "noisy photo"]
    loads = _count_loads(monkeypatch, CLIPTextModelWithProjection, "from_pretrained")
    features = clip_text_features(str(tiny_dir / "clip"), prompts, device="cpu", offline=True)
    assert features.shape == (2, 32) and len(loads) == 1
    assert torch.equal(
        clip_text_features(str(tiny_dir / "clip"), prompts, device="cpu", offline=True), features
    )
    assert len(loads) == 1

    model = CLIPTextModelWithProjection.from_pretrained(tiny_dir / "clip", local_files_only=True)
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir / "clip", local_files_only=True)
    with torch.no_grad():
        tokens = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
        expected = model(input_ids=tokens.input_ids).text_embeds
    torch.testing.assert_close(features, expected)


def test_identity_hash_follows_the_file_contents(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"first")
    assert backbone_module.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second!")  # new size and mtime: hashed again, not served from the cache
    assert backbone_module.file_sha256(path) == hashlib.sha256(b"second!").hexdigest()
