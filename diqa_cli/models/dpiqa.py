"""DP-IQA teacher (Fu et al., arXiv 2405.19996), as its released code (RomGai/DP-IQA) builds it.

One Stable Diffusion 1.5 U-Net pass per image, at timestep 1 with no noise added:

* the image, RGB in [0, 1] (the released convention, *not* SD's [-1, 1]), goes straight into the
  VAE; the latent is the posterior mean times the VAE scaling factor;
* the cross-attention context is the 1485 quality prompts' pooled, projected CLIP ViT-L/14 text
  features (:mod:`diqa_cli.models.dpiqa_prompts`), one token per prompt, passed through a
  residual text adapter ``texts + gamma * mlp(texts)``;
* a T2I image adapter (diffusers' own ``FullAdapter``) turns the same [0, 1] image into one
  residual per down block, added the T2I way (``down_intrablock_additional_residuals``: after
  each down block's last resnet/attention pair, before its downsampler). diffusers 0.42 adds
  them where the released code's copy of the diffusers 0.24 forward did;
* the four up-block outputs feed the Quality Feature Decoder (QFD): each bicubic-resized to the
  latent size, conv3x3 + squeeze-excitation, concatenated, fused by conv3x3 + SE, reduced by 1x1
  convolutions to an 8-channel feature map (the distillation target) and regressed by three
  fully connected layers to one score.

The released teacher fine-tunes the whole U-Net (``finetune_unet``, default True, as released);
diqa then trains its own copy of the U-Net, which is part of the checkpoint. Parameter names are the released ones (``unet.*``,
``gamma``, ``text_adapter.*``, ``img_adapter.*``, ``QFD.*``), so a converted released state
dict loads unchanged.

Quality map (``diqa score --maps``; not in the paper): the per-location contribution of the
QFD's 8-channel feature map to the score through the FC head, gradient × activation summed over
channels, on the latent grid (R/8); its mean is the FC head's first-order score without its bias.

Departures from the released code:

* the VAE posterior mean, not a sample: the same image always gets the same score;
* the VAE encoder is not run under ``no_grad``, so gradients reach the pixels through it too
  (enhancement climbs them); scores are unchanged;
* the unused QFD modules (BatchNorm ``bnc1``, Dropout, the 24-way ``classifier_dist``) are not
  built, and the frozen VAE is not stored; :meth:`DPIQA.convert_released_state_dict` drops them;
* the prompt features are computed by diqa from the released word lists and cached (the
  released code loads a ``quality_embeddings.pth`` that is not in its repository);
* sizes follow the backbone: the QFD resizes to the latent size and its first FC layer takes
  ``8 * latent²`` inputs (64 and 32768 at SD 1.5's 512 px, the released values); the released
  code hard-codes them.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.models.base import QualityModel
from diqa_cli.models.dpiqa_prompts import quality_prompts

__all__ = ["DPIQA", "TextAdapter", "SELayer", "QualityFeatureDecoder"]

# The four up-block outputs, in U-Net order. The QFD takes them in reverse, as released: its
# conv1 reads up.3 (the last, highest-resolution block) and conv4 reads up.0.
FEATURE_LAYERS = ("up.0", "up.1", "up.2", "up.3")
_QFD_ORDER = ("up.3", "up.2", "up.1", "up.0")
DEFAULT_CLIP = "clip-vit-large-patch14"

# Keys of a released DPIQA.state_dict() diqa keeps, and those it drops on purpose.
_RELEASED_KEPT_PREFIXES = ("unet.", "text_adapter.", "img_adapter.", "QFD.")
_RELEASED_DROPPED_PREFIXES = (
    "vae.",  # frozen SD VAE: diqa takes it from the backbone
    "QFD.bnc1.",  # BatchNorm2d the released forward never calls
    "QFD.classifier_dist.",  # 24-way distortion classifier the released forward never calls
)
_RELEASED_REQUIRED = ("gamma", "text_adapter.fc.0.weight", "text_adapter.fc.2.weight", "QFD.fc3.weight")


class TextAdapter(nn.Module):
    """Residual MLP on the prompt features: ``texts + gamma * fc(texts)`` (gamma lives on the
    model, as released, so its name is the top-level ``gamma``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, texts: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        return texts + gamma * self.fc(texts)


class SELayer(nn.Module):
    """Squeeze-and-excitation: channel weights from the global mean, two bias-free linears."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class QualityFeatureDecoder(nn.Module):
    """The released QFD, less its unused modules. ``in_channels`` are the widths of the four
    inputs in the order the released forward takes them (up.3, up.2, up.1, up.0)."""

    def __init__(
        self,
        in_channels: tuple[int, int, int, int],
        map_size: int,
        channels: int,
        score_channels: tuple[int, ...],
        fc_hidden: int,
        reduction: int,
    ):
        super().__init__()
        self.map_size = map_size
        for index, width in enumerate(in_channels, start=1):
            setattr(self, f"conv{index}", nn.Conv2d(width, channels, kernel_size=3, padding=1))
            setattr(self, f"se{index}", SELayer(channels, reduction))
        self.fuse_conv = nn.Conv2d(channels * len(in_channels), channels, kernel_size=3, padding=1)
        self.se_fuse = SELayer(channels, reduction)
        widths = (channels, *score_channels)
        for index in range(1, len(widths)):
            setattr(self, f"conv_score{index}", nn.Conv2d(widths[index - 1], widths[index], kernel_size=1))
        self._score_convs = len(score_channels)
        self.fc1 = nn.Linear(score_channels[-1] * map_size * map_size, fc_hidden)
        self.fc2 = nn.Linear(fc_hidden, fc_hidden)
        self.fc3 = nn.Linear(fc_hidden, 1)

    def forward(self, *features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (self.map_size, self.map_size)
        branches = []
        for index, x in enumerate(features, start=1):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
            branches.append(getattr(self, f"se{index}")(getattr(self, f"conv{index}")(x)))
        fused = self.se_fuse(self.fuse_conv(torch.cat(branches, dim=1)))
        feature_map = fused
        for index in range(1, self._score_convs + 1):
            feature_map = F.relu(getattr(self, f"conv_score{index}")(feature_map))
        return self.head(feature_map), feature_map

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The 8-channel feature map (B, 8, h, w) -> (B,) scores: the three FC layers."""
        x = F.relu(self.fc1(feature_map.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x).squeeze(-1)


class DPIQA(QualityModel):
    """DP-IQA teacher on a Stable Diffusion backbone (see the module docstring).

    Config (defaults are the released values):
      resolution       square input side; default the backbone's (512 for SD 1.5)
      clip             CLIP giving the prompt features: a weights-manifest name
                       (``clip-vit-large-patch14``), a folder, or a ``./``/``../`` path taken
                       relative to the folder that holds the backbone (how the tiny bundle
                       names the tiny CLIP it writes beside its backbone)
      finetune_unet    train the whole U-Net with the heads (True, as released); the model then
                       holds its own copy of the U-Net (the backbone's stays frozen and shared,
                       at the cost of a second U-Net in memory) and the checkpoint holds it too
      gamma_init       text adapter's residual scale at initialisation (1e-4)
      text_adapter_hidden  hidden width of the text adapter MLP (default: the feature width)
      adapter_res_blocks   resnet blocks per level of the image adapter (2)
      decoder_channels     QFD width (512); se_reduction (16)
      score_channels       QFD 1x1 reduction widths ([128, 32, 8]; the last is the map's)
      fc_hidden            QFD fully connected width (512)
    """

    method_name = "dpiqa"

    def __init__(
        self,
        backbone,
        *,
        resolution: int | None = None,
        clip: str = DEFAULT_CLIP,
        finetune_unet: bool = True,
        gamma_init: float = 1e-4,
        text_adapter_hidden: int | None = None,
        adapter_res_blocks: int = 2,
        decoder_channels: int = 512,
        se_reduction: int = 16,
        score_channels: list[int] | tuple[int, ...] = (128, 32, 8),
        fc_hidden: int = 512,
    ):
        from diffusers.models.adapter import FullAdapter

        from diqa_cli.backbone import clip_text_features
        from diqa_cli.models.xattn import install_shared_context_processors
        from diqa_cli.taps import feature_info

        unet = backbone.unet
        resolution = int(resolution or backbone.resolution)
        block_channels = list(unet.config.block_out_channels)
        # The image adapter halves its grid once per U-Net level after the VAE's downscale.
        multiple = backbone.vae_scale_factor * 2 ** (len(block_channels) - 1)
        if resolution % multiple:
            raise UsageError(
                f"DP-IQA resolution {resolution} must be a multiple of {multiple} for this backbone "
                f"(VAE factor {backbone.vae_scale_factor}, then x2 per U-Net level); "
                f"try {resolution // multiple * multiple or multiple}"
            )
        score_channels = [int(c) for c in score_channels]
        super().__init__(
            backbone,
            resolution=resolution,
            clip=str(clip),
            finetune_unet=bool(finetune_unet),
            gamma_init=float(gamma_init),
            text_adapter_hidden=text_adapter_hidden,
            adapter_res_blocks=int(adapter_res_blocks),
            decoder_channels=int(decoder_channels),
            se_reduction=int(se_reduction),
            score_channels=score_channels,
            fc_hidden=int(fc_hidden),
        )

        prompts = quality_prompts()
        texts = clip_text_features(self._clip_ref(backbone, str(clip)), prompts, device=backbone.device)
        text_dim = texts.shape[-1]
        if text_dim != unet.config.cross_attention_dim:
            raise UsageError(
                f"CLIP {clip!r} gives {text_dim}-d prompt features but the U-Net cross-attends to "
                f"{unet.config.cross_attention_dim}-d tokens; DP-IQA needs a CLIP whose projection width "
                "matches the U-Net (CLIP ViT-L/14's 768 for SD 1.5)"
            )
        # Not saved: regenerated (and cached) from the prompts, as in the released code.
        self.register_buffer("class_embeddings", texts.float(), persistent=False)

        if finetune_unet and self.building_for_checkpoint():
            # The checkpoint brings the whole fine-tuned U-Net: build its structure without memory
            # (meta tensors); loading assigns the checkpoint's tensors instead of copying into a copy.
            with torch.device("meta"):
                unet = type(unet).from_config(unet.config).requires_grad_(True)
        elif finetune_unet:
            # Training changes the U-Net's weights: work on a copy, so the backbone's U-Net stays
            # frozen and pretrained for anything else built on it.
            unet = copy.deepcopy(unet).requires_grad_(True)
        # The prompt context is the same for every image: its keys and values are projected once.
        install_shared_context_processors(unet)
        self.unet = unet
        self.gamma = nn.Parameter(torch.full((text_dim,), float(gamma_init), device=backbone.device))
        self.text_adapter = TextAdapter(text_dim, int(text_adapter_hidden or text_dim))
        self.img_adapter = FullAdapter(
            in_channels=3,
            channels=block_channels,
            num_res_blocks=int(adapter_res_blocks),
            downscale_factor=backbone.vae_scale_factor,
        )
        widths = {info.name: info.channels for info in feature_info(unet, list(FEATURE_LAYERS))}
        self.QFD = QualityFeatureDecoder(
            in_channels=tuple(widths[name] for name in _QFD_ORDER),
            map_size=resolution // backbone.vae_scale_factor,
            channels=int(decoder_channels),
            score_channels=tuple(score_channels),
            fc_hidden=int(fc_hidden),
            reduction=int(se_reduction),
        )
        for module in (self.text_adapter, self.img_adapter, self.QFD):
            module.to(backbone.device)
        self._context_cache: tuple | None = None  # (key, (tokens, D) context in the U-Net's dtype)

    @staticmethod
    def _clip_ref(backbone, clip: str) -> str:
        if not clip.startswith(("./", "../")):
            return clip
        if backbone.source is None:
            raise UsageError(
                f"clip {clip!r} is relative to the backbone's folder, but backbone {backbone.ref!r} "
                "was not loaded from disk; pass a manifest name or an absolute folder"
            )
        return str(Path(backbone.source).parent / clip)

    # --- scoring ---------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(pixels)[0]

    def forward_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, R, R) in [0, 1] -> scores (B,) and the QFD feature map (B, 8, R/8, R/8), the
        student's distillation target."""
        from diqa_cli.taps import UNetTaps

        backbone = self.backbone
        unet_dtype = self.unet.dtype
        head_dtype = self.QFD.fc3.weight.dtype
        pixels = pixels.to(backbone.device)
        batch = pixels.shape[0]

        latents = backbone.encode(pixels).to(unet_dtype)  # [0, 1] straight in: the released convention
        residuals = [r.to(unet_dtype) for r in self.img_adapter(pixels.to(head_dtype))]
        # A batch-expanded view (stride 0): the U-Net's cross-attention projects it once.
        context = self._prompt_context().unsqueeze(0).expand(batch, -1, -1)
        timestep = torch.ones(batch, dtype=torch.long, device=backbone.device)
        with UNetTaps(self.unet, list(FEATURE_LAYERS)) as taps:
            features = taps(latents, timestep, context, down_intrablock_additional_residuals=residuals)
        return self.QFD(*(features[name].to(head_dtype) for name in _QFD_ORDER))

    def _prompt_context(self) -> torch.Tensor:
        """The text adapter's output on the prompt features, (tokens, D) in the U-Net's dtype. The
        same for every image: recomputed on every call while training or while gradients should
        reach the adapter, otherwise kept until ``gamma`` or the adapter's weights change (an
        optimiser step or a checkpoint load bumps their version counters)."""
        params = (self.gamma, *self.text_adapter.parameters())

        def compute() -> torch.Tensor:
            texts = self.class_embeddings.to(self.QFD.fc3.weight.dtype)
            return self.text_adapter(texts, self.gamma).to(self.unet.dtype)

        if self.training or (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
            return compute()
        key = (self.unet.dtype, self.class_embeddings.data_ptr(), tuple((p.data_ptr(), p._version) for p in params))
        if self._context_cache is None or self._context_cache[0] != key:
            # Outside any inference mode, so the kept tensor can join a later autograd graph.
            with torch.inference_mode(False), torch.no_grad():
                self._context_cache = (key, compute())
        return self._context_cache[1]

    def quality_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and the quality map (B, R/8, R/8): each latent cell's contribution to the
        score through the QFD's FC head, gradient × activation of the 8-channel feature map summed
        over its channels (:func:`diqa_cli.maps.compute.contribution_map`)."""
        from diqa_cli.maps.compute import contribution_map

        with torch.no_grad():
            scores, feature_map = self.forward_with_map(pixels)
        return scores, contribution_map(feature_map, self.QFD.head)

    def feature_layers(self) -> list[str]:
        return list(FEATURE_LAYERS)

    def trainable_parameter_names(self) -> list[str]:
        """The adapters and the QFD, plus the U-Net only when it is fine-tuned."""
        names = super().trainable_parameter_names()
        if self.config["finetune_unet"]:
            return names
        return [name for name in names if not name.startswith("unet.")]

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # Without fine-tuning, self.unet is the backbone's own: loading U-Net weights into it
        # would silently change the backbone for everything else built on it.
        if not self.config["finetune_unet"] and any(key.startswith("unet.") for key in state):
            raise WeightsError(
                "this DP-IQA checkpoint holds a fine-tuned U-Net (unet.* keys), but the model was built "
                "with finetune_unet=false; build it with finetune_unet=true (the released default)"
            )
        if next(self.unet.parameters()).is_meta:
            # Built for this checkpoint: its U-Net tensors become the parameters (no second copy),
            # in the backbone's dtype; the rest loads as usual.
            self.check_checkpoint_keys(state)
            own = {k[len("unet.") :]: v.to(self.backbone.dtype) for k, v in state.items() if k.startswith("unet.")}
            self.unet.load_state_dict(own, strict=True, assign=True)
            self.unet.to(self.backbone.device).requires_grad_(True)
            self.load_state_dict({k: v for k, v in state.items() if not k.startswith("unet.")}, strict=False)
            return
        super().load_checkpoint_state_dict(state)

    def uses_backbone_unet(self) -> bool:
        """A fine-tuned teacher runs its own U-Net; the backbone's is then only needed to build it."""
        return not self.config["finetune_unet"]

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        # The tiny bundle writes its CLIP as clip/ beside backbone/ and backbone.safetensors.
        return {
            "clip": "./clip",
            "decoder_channels": 16,
            "se_reduction": 4,
            "score_channels": [16, 8, 8],
            "fc_hidden": 16,
            "adapter_res_blocks": 1,
        }

    # --- released checkpoints --------------------------------------------------------------
    @classmethod
    def convert_released_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a released ``DPIQA.state_dict()`` (RomGai/DP-IQA) to diqa's checkpoint layout.

        The names are already diqa's; this drops ``vae.*`` (diqa loads the frozen VAE from the
        backbone) and the unused ``QFD.bnc1.*`` / ``QFD.classifier_dist.*``, and refuses any
        other layout with a message naming what it found.
        """
        if any(key.startswith("base_model.") for key in state):
            raise WeightsError(
                "this state dict holds base_model.* keys: it is the DP-IQA student (EfficientNet), "
                "not the teacher; convert it with --method dpiqa-student"
            )
        missing = [key for key in _RELEASED_REQUIRED if key not in state]
        if missing or not any(key.startswith("img_adapter.") for key in state):
            lacks = missing or ["img_adapter.*"]
            raise WeightsError(
                f"not a released DP-IQA teacher state dict: it lacks {', '.join(lacks)} (expected "
                "RomGai/DP-IQA's DPIQA.state_dict(): unet.*, vae.*, gamma, text_adapter.*, img_adapter.*, QFD.*)"
            )
        kept, unknown = {}, []
        for key, value in state.items():
            if key.startswith(_RELEASED_DROPPED_PREFIXES):
                continue
            if key == "gamma" or key.startswith(_RELEASED_KEPT_PREFIXES):
                kept[key] = value
            else:
                unknown.append(key)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise WeightsError(
                f"not a released DP-IQA teacher state dict: unexpected keys {', '.join(unknown[:3])}{more}"
            )
        return kept
