"""DP-IQA student (Fu et al., arXiv 2405.19996): an EfficientNet distilled from the teacher.

As the released ``iqa_models/student.py`` builds it: torchvision's EfficientNet-B7 with its
average pool and classifier removed, the (2560, R/32, R/32) feature grid lifted by a stride-2
transposed convolution to 8 channels (ReLU), nearest-upsampled to the teacher's feature-map size
(64x64 at 512 px), flattened and regressed by FC 512 -> ReLU -> FC 512 -> ReLU -> FC 1. The input
is the same [0, 1] RGB as the teacher's, with no ImageNet normalisation (released convention).
Distillation matches its feature map to the teacher's (:meth:`DPIQAStudent.forward_with_map`).

The student needs no diffusion backbone: it is built with ``backbone=None`` (the registry spec
says ``needs_backbone: False``) and then takes its sizes from its own config. Given a backbone
(distillation builds it on the teacher's), it takes the resolution and map size from it.

Quality map (``diqa score --maps``): as the teacher's, the per-location contribution of the
8-channel feature map to the score through the FC head (gradient × activation).

Departures from the released code:

* ImageNet initialisation for training from scratch is opt-in,
  :meth:`DPIQAStudent.load_imagenet_weights` from the weights manifest (released:
  ``efficientnet_b7(pretrained=True)``, a download at construction);
* the map size and the first FC layer's width follow the resolution (released hard-codes 512 px);
* checkpoints hold the whole network, BatchNorm statistics included, since all of it is trained.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.models.base import QualityModel

__all__ = ["DPIQAStudent", "IMAGENET_WEIGHTS"]

# torchvision architectures the student may use; the released one is efficientnet_b7.
_ARCHITECTURES = tuple(f"efficientnet_b{i}" for i in range(8))
# Weights-manifest entries holding torchvision's ImageNet weights, per architecture.
IMAGENET_WEIGHTS = {"efficientnet_b7": "efficientnet-b7-imagenet"}
_RELEASED_PREFIXES = ("base_model.", "conv_transpose.", "fc1.", "fc2.", "fc3.")
_RELEASED_REQUIRED = ("conv_transpose.weight", "fc1.weight", "fc3.weight")
_RELEASED_RESOLUTION = 512
_VAE_SCALE_FACTOR = 8  # the teacher's map is its latent grid: SD's VAE downscales by 8


class DPIQAStudent(QualityModel):
    """DP-IQA's distilled student (see the module docstring).

    Config (defaults are the released values):
      arch          torchvision EfficientNet builder (``efficientnet_b7``; tiny: ``efficientnet_b0``)
      resolution    square input side (the backbone's when given one, else 512)
      map_size      side of the feature map matched to the teacher's (resolution / 8)
      map_channels  channels of that map (8)
      fc_hidden     width of the fully connected layers (512)
    """

    method_name = "dpiqa-student"

    def __init__(
        self,
        backbone=None,
        *,
        arch: str = "efficientnet_b7",
        resolution: int | None = None,
        map_size: int | None = None,
        map_channels: int = 8,
        fc_hidden: int = 512,
    ):
        import torchvision

        if arch not in _ARCHITECTURES:
            raise UsageError(f"dpiqa-student arch {arch!r} is not one of {', '.join(_ARCHITECTURES)}")
        resolution = int(resolution or (backbone.resolution if backbone is not None else _RELEASED_RESOLUTION))
        scale = backbone.vae_scale_factor if backbone is not None else _VAE_SCALE_FACTOR
        map_size = int(map_size or resolution // scale)
        if resolution % 32:
            raise UsageError(f"dpiqa-student resolution {resolution} must be a multiple of 32 (EfficientNet's stride)")
        super().__init__(
            backbone,
            arch=arch,
            resolution=resolution,
            map_size=map_size,
            map_channels=int(map_channels),
            fc_hidden=int(fc_hidden),
        )
        # weights=None: never a download here; ImageNet weights come from the manifest on request.
        self.base_model = getattr(torchvision.models, arch)(weights=None)
        features = self.base_model.classifier[1].in_features
        self.base_model.avgpool = nn.Identity()
        self.base_model.classifier = nn.Identity()
        self.conv_transpose = nn.ConvTranspose2d(
            features, int(map_channels), kernel_size=3, stride=2, padding=1, output_padding=1
        )
        self.fc1 = nn.Linear(int(map_channels) * map_size * map_size, int(fc_hidden))
        self.fc2 = nn.Linear(int(fc_hidden), int(fc_hidden))
        self.fc3 = nn.Linear(int(fc_hidden), 1)
        if backbone is not None:
            self.to(backbone.device)

    # --- scoring ---------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_with_map(pixels)[0]

    def forward_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, R, R) in [0, 1] -> scores (B,) and the feature map (B, 8, R/8, R/8)."""
        weight = self.fc3.weight
        # The released forward runs the whole torchvision model and re-views its flattened output
        # as the feature grid; the features module gives that grid directly.
        grid = self.base_model.features(pixels.to(weight.device, weight.dtype))
        feature_map = F.relu(self.conv_transpose(grid))
        size = self.config["map_size"]
        feature_map = F.interpolate(feature_map, size=(size, size), mode="nearest")
        return self.head(feature_map), feature_map

    def head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The feature map (B, 8, h, w) -> (B,) scores: the three FC layers."""
        x = F.relu(self.fc1(feature_map.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x).squeeze(-1)

    def quality_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (B,) and the quality map (B, R/8, R/8), made as the teacher's: each cell's
        contribution to the score through the FC head (gradient × activation of the 8-channel map)."""
        from diqa_cli.maps.compute import contribution_map

        with torch.no_grad():
            scores, feature_map = self.forward_with_map(pixels)
        return scores, contribution_map(feature_map, self.head)

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        from diqa_cli.tiny import TINY_RESOLUTION

        # EfficientNet-B0 (4 M parameters without its classifier) keeps torchvision's
        # architecture at a size tests build in a fraction of a second; B7 has 64 M.
        return {"arch": "efficientnet_b0", "resolution": TINY_RESOLUTION, "fc_hidden": 32}

    def set_batchnorm_statistics(self, pixels: torch.Tensor) -> None:
        """Replace BatchNorm's running statistics with those of ``pixels`` (B, 3, R, R) in [0, 1].

        A freshly initialised EfficientNet in eval mode shrinks its signal to nothing within a
        few blocks (unit running variance after torchvision's fan-out init), so every image gets
        the same score. Training sets these statistics; an untrained student (the tiny bundle's)
        takes them from one pass over real photos instead. Leaves the model in eval mode."""
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass sets the statistics
        self.train()
        try:
            with torch.no_grad():
                self(pixels)
        finally:
            for module, momentum in zip(norms, momenta):
                module.momentum = momentum  # as built, for any later training
            self.eval()

    # --- checkpoints -----------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything: all parameters train, and BatchNorm's running statistics go with them."""
        return {key: value.detach().contiguous() for key, value in self.state_dict().items()}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            parts = []
            for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
                if keys:
                    parts.append(f"{label} {keys[:5]}{' …' if len(keys) > 5 else ''}")
            raise WeightsError(
                f"checkpoint does not fit method {self.method_name!r} with arch {self.config['arch']!r} "
                f"at {self.resolution} px: " + "; ".join(parts)
            )
        self.load_state_dict(state, strict=True)

    def load_imagenet_weights(self, *, offline: bool = False) -> None:
        """Initialise the EfficientNet from torchvision's ImageNet weights, taken through the
        weights manifest (for training from scratch; a trained checkpoint replaces them)."""
        from diqa_cli.files import read_safetensors
        from diqa_cli.weights import resolve

        arch = self.config["arch"]
        name = IMAGENET_WEIGHTS.get(arch)
        if name is None:
            raise UsageError(
                f"no ImageNet weights in the manifest for {arch!r} (only {', '.join(IMAGENET_WEIGHTS)}); "
                "train it from random initialisation"
            )
        state = read_safetensors(resolve(name, offline=offline))
        # The ImageNet classifier is not part of the student.
        features = {key: value for key, value in state.items() if key.startswith("features.")}
        result = self.base_model.load_state_dict(features, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise WeightsError(
                f"weights {name!r} do not fit torchvision's {arch}: missing {result.missing_keys[:3]}, "
                f"unexpected {result.unexpected_keys[:3]}"
            )

    @classmethod
    def convert_released_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Check a released ``StudentEfficientNet.state_dict()`` (RomGai/DP-IQA): its names are
        already diqa's; any other layout is refused with a message naming what it found."""
        if any(key.startswith(("unet.", "QFD.", "img_adapter.")) for key in state):
            raise WeightsError(
                "this state dict holds unet.* / QFD.* keys: it is the DP-IQA teacher, not the student; "
                "convert it with --method dpiqa"
            )
        missing = [key for key in _RELEASED_REQUIRED if key not in state]
        if missing or not any(key.startswith("base_model.features.") for key in state):
            lacks = missing or ["base_model.features.*"]
            raise WeightsError(
                f"not a released DP-IQA student state dict: it lacks {', '.join(lacks)} (expected "
                "RomGai/DP-IQA's StudentEfficientNet.state_dict(): base_model.*, conv_transpose.*, fc1..fc3.*)"
            )
        unknown = [key for key in state if not key.startswith(_RELEASED_PREFIXES)]
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise WeightsError(
                f"not a released DP-IQA student state dict: unexpected keys {', '.join(unknown[:3])}{more}"
            )
        return dict(state)
