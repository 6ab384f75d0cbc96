"""Tiny random Stable Diffusion stand-ins, built from the real diffusers / transformers classes.

The tiny backbone has SD 1.5's structure at toy widths: a U-Net with 4 down blocks (3 with
cross-attention) and 4 up blocks, a 4-level VAE (scale factor 8, so 64 px images give 8x8 latents),
a CLIP text encoder with a byte-level BPE tokenizer that covers every character, and SD's
scaled-linear DDPM schedule. Its configs are the shipped ``diqa_cli/configs/tiny/`` folder (the
same folder single-file loading reads), so the tiny backbone and its single-file config cannot drift.

Weights are random from fixed seeds: writing twice gives the same bytes. Nothing here is a
quality model; it exists so tests, ``diqa demo`` and ``diqa weights tiny`` exercise the real
loading and feature code offline.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

TINY_CONFIG_DIR = Path(__file__).parent / "configs" / "tiny"
TINY_RESOLUTION = 64
# One seed per component, so changing one component's size leaves the others' bytes alone.
_SEEDS = {"unet": 0, "vae": 1, "text_encoder": 2, "clip": 3, "heads": 4}
# Single-file (original Stable Diffusion / LDM) prefixes, as in the checkpoints users download.
_LDM_UNET = "model.diffusion_model."
_LDM_VAE = "first_stage_model."
_LDM_CLIP = "cond_stage_model.transformer."

__all__ = [
    "TINY_CONFIG_DIR",
    "TINY_RESOLUTION",
    "write_tiny_backbone",
    "write_tiny_bundle",
    "original_sd_state_dict",
    "tiny_tokenizer_vocab",
]


def tiny_tokenizer_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary with no merges: every byte as a word piece and as a word end
    (``</w>``), so any text tokenizes; the two CLIP special tokens come last, as in CLIP's own."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pieces = alphabet + [f"{ch}</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    return {piece: i for i, piece in enumerate(pieces)}


def _write_tokenizer(directory: Path) -> None:
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(
        json.dumps(tiny_tokenizer_vocab(), ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # Reload through transformers so the folder also holds the tokenizer_config.json a
    # ``CLIPTokenizer.from_pretrained`` of a real SD folder would find (max length 77).
    tokenizer = CLIPTokenizer(
        vocab=tiny_tokenizer_vocab(), merges=[], model_max_length=77, pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(directory)


def _build_models():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEEDS["unet"])
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(TINY_CONFIG_DIR, subfolder="unet")
        )
        torch.manual_seed(_SEEDS["vae"])
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(TINY_CONFIG_DIR, subfolder="vae"))
        text_config = CLIPTextConfig.from_pretrained(TINY_CONFIG_DIR / "text_encoder")
        torch.manual_seed(_SEEDS["text_encoder"])
        text_encoder = CLIPTextModel(text_config)
        # Stands in for openai/clip-vit-large-patch14's text tower: its projected features have
        # the U-Net's cross-attention width, as ViT-L/14's 768 matches SD 1.5's.
        clip_config = CLIPTextConfig.from_dict(
            {
                **text_config.to_dict(),
                "projection_dim": unet.config.cross_attention_dim,
                "architectures": ["CLIPTextModelWithProjection"],
            }
        )
        torch.manual_seed(_SEEDS["clip"])
        clip = CLIPTextModelWithProjection(clip_config)
    return unet, vae, text_encoder, clip


def write_tiny_backbone(directory) -> Path:
    """Write ``directory/backbone/`` (diffusers folder), ``directory/backbone.safetensors``
    (single file, original SD key layout) and ``directory/clip/`` (text tower + tokenizer).
    Returns ``directory`` as a Path."""
    from safetensors.torch import save_file

    root = Path(directory)
    folder = root / "backbone"
    folder.mkdir(parents=True, exist_ok=True)
    unet, vae, text_encoder, clip = _build_models()

    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    _save_text_model(text_encoder, folder / "text_encoder")
    _write_tokenizer(folder / "tokenizer")
    scheduler_dir = folder / "scheduler"
    scheduler_dir.mkdir(exist_ok=True)
    for name in ("scheduler/scheduler_config.json", "model_index.json"):
        (folder / name).write_bytes((TINY_CONFIG_DIR / name).read_bytes())

    save_file(original_sd_state_dict(unet, vae, text_encoder), str(root / "backbone.safetensors"))

    _save_text_model(clip, root / "clip")
    _write_tokenizer(root / "clip")
    return root


def _save_text_model(model, directory: Path) -> None:
    """Save as the released SD / CLIP repositories lay it out: ``config.json`` and
    ``model.safetensors`` with ``text_model.*`` names (recent transformers flattens
    ``CLIPTextModel`` and would drop that prefix on its own save)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    prefix = "" if hasattr(model, "text_model") else "text_model."
    state = {prefix + key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def write_tiny_bundle(directory) -> Path:
    """``write_tiny_backbone`` plus what each model class's ``write_tiny_assets`` adds (the tiny
    SlowFast of video methods, ``directory/slowfast.safetensors``) and ``directory/heads/<method>.safetensors`` (+ sidecar) for every registered method,
    each head built from its ``tiny_config()`` with a fixed seed (heads with BatchNorm, the DP-IQA
    student, take its statistics from the bundled skimage photos). The sidecars name
    ``directory/backbone`` as their backbone."""
    import torch

    from diqa_cli.backbone import load_backbone
    from diqa_cli.checkpoint import save_head
    from diqa_cli.methods import list_methods, load_model_class
    from diqa_cli.models.base import BatchNormCalibration, TinyAssets
    from diqa_cli.synthetic import reference_photos

    logging.getLogger("diqa").info(
        "building tiny random models in %s (real classes at toy size, random weights: not a quality model)", directory
    )
    root = write_tiny_backbone(directory)
    backbone = load_backbone(str(root / "backbone"), device="cpu", dtype="fp32", offline=True)
    heads = root / "heads"
    heads.mkdir(exist_ok=True)
    for spec in list_methods():
        cls = load_model_class(spec)
        if isinstance(cls, TinyAssets):  # files its tiny_config points at (a video model's clip encoder)
            cls.write_tiny_assets(root)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEEDS["heads"])
            model = cls(backbone, **cls.tiny_config())
        if isinstance(model, BatchNormCalibration):
            # Untrained BatchNorm networks give every image the same score (the DP-IQA student).
            photos = torch.from_numpy(reference_photos(model.resolution)).permute(0, 3, 1, 2)
            model.set_batchnorm_statistics(photos)
        save_head(
            model, heads / f"{spec.name}.safetensors", normalisation={"offset": 0.0, "scale": 1.0}, extra={}
        )
    return root


# --- diffusers -> original Stable Diffusion key layout -------------------------------------------
#
# diffusers ships only the original -> diffusers direction (diffusers.loaders.single_file_utils).
# The inverse below is built from diffusers' own fixed-name tables plus the block arithmetic of
# the LDM U-Net / VAE, and every call checks it by running diffusers' converters on the result:
# the round trip must give back every tensor under its diffusers name, or writing fails.

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet_key(key: str, config) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in fixed:
        return fixed[key]
    per_block = config["layers_per_block"] + 1
    parts = key.split(".")
    group = parts[0]
    if group == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "resnets":
            return f"middle_block.{2 * index}." + _ldm_resnet(rest)
        return f"middle_block.{2 * index + 1}." + ".".join(rest)
    if group not in ("down_blocks", "up_blocks"):
        raise ValueError(f"no original Stable Diffusion name for U-Net key {key!r}")
    block, kind = int(parts[1]), parts[2]
    # input_blocks.0 is conv_in, so the down blocks start at 1; output_blocks start at 0.
    first = 1 + block * per_block if group == "down_blocks" else block * per_block
    stem = "input_blocks" if group == "down_blocks" else "output_blocks"
    if kind == "downsamplers":
        return f"{stem}.{first + per_block - 1}.0.op.{parts[-1]}"
    if kind == "upsamplers":
        # After the resnet (slot 0) and, in cross-attention blocks, the transformer (slot 1).
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1
        return f"{stem}.{first + per_block - 1}.{slot}.conv.{parts[-1]}"
    layer, rest = int(parts[3]), parts[4:]
    if kind == "resnets":
        return f"{stem}.{first + layer}.0." + _ldm_resnet(rest)
    return f"{stem}.{first + layer}.1." + ".".join(rest)


def _ldm_resnet(rest: list[str]) -> str:
    return ".".join([_RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]])


def _ldm_vae_key(key: str, config) -> str:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    coder, group = parts[0], parts[1]
    if group == "mid_block":
        kind, index, rest = parts[2], int(parts[3]), ".".join(parts[4:])
        if kind == "resnets":
            return f"{coder}.mid.block_{index + 1}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        for new, old in _VAE_ATTN_TO_LDM.items():
            if rest.startswith(new + "."):
                return f"{coder}.mid.attn_1.{old}{rest[len(new) :]}"
        raise ValueError(f"no original Stable Diffusion name for VAE key {key!r}")
    block, kind = int(parts[2]), parts[3]
    if group == "down_blocks":
        level, stem = block, "down"
    elif group == "up_blocks":
        # The original decoder numbers its levels from the lowest resolution up.
        level, stem = len(config["up_block_types"]) - 1 - block, "up"
    else:
        raise ValueError(f"no original Stable Diffusion name for VAE key {key!r}")
    if kind in ("downsamplers", "upsamplers"):
        return f"{coder}.{stem}.{level}.{stem}sample.conv.{parts[-1]}"
    rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
    return f"{coder}.{stem}.{level}.block.{parts[4]}.{rest}"


def original_sd_state_dict(unet, vae, text_encoder) -> dict:
    """The three models' weights in the original Stable Diffusion checkpoint layout
    (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.transformer.*``),
    checked against diffusers' own single-file converters."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    state = {}
    for key, value in unet.state_dict().items():
        state[_LDM_UNET + _ldm_unet_key(key, unet.config)] = value.contiguous()
    for key, value in vae.state_dict().items():
        ldm_key = _ldm_vae_key(key, vae.config)
        # The original VAE attention projections are 1x1 convolutions.
        if ".mid.attn_1." in ldm_key and value.ndim == 2:
            value = value[:, :, None, None]
        state[_LDM_VAE + ldm_key] = value.contiguous()
    text_prefix = _LDM_CLIP if hasattr(text_encoder, "text_model") else _LDM_CLIP + "text_model."
    for key, value in text_encoder.state_dict().items():
        state[text_prefix + key] = value.contiguous()

    for name, model, converted in (
        ("U-Net", unet, convert_ldm_unet_checkpoint(state, unet.config)),
        ("VAE", vae, convert_ldm_vae_checkpoint(state, vae.config)),
    ):
        expected = model.state_dict()
        wrong = sorted(set(expected) ^ set(converted))
        wrong += [k for k in expected if k in converted and not _same(expected[k], converted[k])]
        if wrong:
            raise RuntimeError(
                f"the original-layout {name} does not convert back through diffusers "
                f"({len(wrong)} keys differ, e.g. {wrong[:3]}); diffusers' single-file layout changed"
            )
    return state


def _same(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())
