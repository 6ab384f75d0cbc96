"""The contract every method's torch implementation follows.

A :class:`QualityModel` binds a method's trainable parts to a loaded
:class:`diqa_cli.backbone.Backbone`. Every model takes the same input, a batch of RGB images
resized to the method's square resolution with values in [0, 1], shape (B, 3, R, R), and turns
it into its own convention (released-code input range, VAE latents…) inside ``forward``. This
one input convention is what lets the scoring pipeline, training and enhancement share models.

Constructor keyword arguments are the model's *config*: they are JSON-serialisable, saved in the
checkpoint sidecar and passed back on load, so one call rebuilds the model (diffusers'
``register_to_config`` habit).

Optional capabilities are declared as :class:`typing.Protocol` classes below and tested with
``isinstance`` by generic code (training, distillation, conversion, the tiny bundle, the video
pipeline); generic code never asks for a method by name.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from diqa_cli.methods import MethodSpec, get_method


# True while a model is built to receive a checkpoint's weights (``checkpoint.load_head``): a model
# may then skip copying pretrained weights that the checkpoint replaces anyway.
_WEIGHTS_FROM_CHECKPOINT = contextvars.ContextVar("diqa_weights_from_checkpoint", default=False)


@contextlib.contextmanager
def weights_from_checkpoint():
    """Build models inside this block when a checkpoint's weights will be loaded into them."""
    token = _WEIGHTS_FROM_CHECKPOINT.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FROM_CHECKPOINT.reset(token)


class QualityModel(nn.Module):
    """Base class: subclasses set ``method_name`` and implement ``forward``."""

    method_name: ClassVar[str]

    def __init__(self, backbone, **config: Any):
        super().__init__()
        self.config: dict[str, Any] = dict(config)
        # Not a submodule attribute: the backbone's frozen parts are registered by subclasses
        # that need them, so state dicts name them exactly as the released code does.
        self.__dict__["backbone"] = backbone

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method_name)

    # --- scoring -------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """(B, 3, R, R) in [0, 1] -> (B,) raw scores, differentiable with respect to ``pixels``."""
        raise NotImplementedError

    # --- training and checkpoints --------------------------------------------------------
    def trainable_parameter_names(self) -> list[str]:
        """Names (as in ``state_dict``) of the parameters training updates and checkpoints hold:
        those left requiring gradients by the constructor, or the ones recorded by :meth:`freeze`."""
        recorded = self.__dict__.get("_trainable_names")
        if recorded is not None:
            return list(recorded)
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def freeze(self) -> QualityModel:
        """No parameter gradients (scoring, a loss on the pixels), while the model still knows
        which parameters training updates and its checkpoints hold."""
        self.__dict__["_trainable_names"] = self.trainable_parameter_names()
        self.requires_grad_(False)
        return self

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a head checkpoint holds: the trainable parameters and the buffers they need."""
        keep = set(self.trainable_parameter_names())
        state = self.state_dict()
        return {k: v.detach().contiguous() for k, v in state.items() if k in keep}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint strictly: every expected key present, no unexpected key."""
        self.check_checkpoint_keys(state)
        self.load_state_dict(state, strict=False)

    def check_checkpoint_keys(self, state: dict[str, torch.Tensor]) -> None:
        """Refuse a checkpoint that lacks a trainable parameter or holds a key the model does not have."""
        expected = set(self.trainable_parameter_names())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - set(self.state_dict()))
        if missing or unexpected:
            from diqa_cli.errors import WeightsError

            parts = []
            if missing:
                parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
            raise WeightsError(f"checkpoint does not fit method {self.method_name!r}: " + "; ".join(parts))

    def training_loss(self, pixels: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Loss for one batch; targets are MOS already normalised. Methods whose training differs
        from inference (random timesteps, fresh noise) override this."""
        return nn.functional.mse_loss(self(pixels).float(), targets.float())

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """Config for a small head on the tiny backbone (``diqa weights tiny``, tests, demo)."""
        return {}

    @property
    def device(self) -> torch.device:
        """Where inputs go: the backbone's device, or the parameters' for a model that runs
        without a diffusion backbone (the DP-IQA student)."""
        if self.backbone is not None:
            return self.backbone.device
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype inputs are cast to (the backbone's, else the parameters')."""
        if self.backbone is not None:
            return self.backbone.dtype
        return next(self.parameters()).dtype

    @property
    def resolution(self) -> int:
        """Square side of the input this model was built for (config ``resolution``, else the
        backbone's native resolution)."""
        return int(self.config.get("resolution") or self.backbone.resolution)

    def feature_layers(self) -> list[str]:
        """Names of the backbone layers the method reads (recorded in the sidecar)."""
        return []

    def uses_backbone_unet(self) -> bool:
        """Whether scoring runs the backbone's own U-Net. A head that carries its own (fine-tuned)
        U-Net says no, and scoring then frees the backbone's (``scoring.load_scorer``)."""
        return True

    @staticmethod
    def building_for_checkpoint() -> bool:
        """True inside :func:`weights_from_checkpoint` (see there)."""
        return _WEIGHTS_FROM_CHECKPOINT.get()


# --- optional capabilities ---------------------------------------------------------------------


@runtime_checkable
class CachedFeatures(Protocol):
    """Frozen features that no trainable parameter changes: training computes them once per image
    and fits the head on them (LGDM's hyperfeatures)."""

    def extract_features(self, pixels: torch.Tensor) -> Any:
        """(B, 3, R, R) in [0, 1] -> a tensor or nest of tensors with B first."""

    def head_forward(self, features: Any) -> torch.Tensor:
        """Features of a batch -> (B,) raw scores."""


@runtime_checkable
class FeatureMapModel(Protocol):
    """Gives the spatial map its score is read from: a distillation teacher (the map is the
    target) or student (the map is matched), and the source of quality maps."""

    def forward_with_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, R, R) in [0, 1] -> ((B,) raw scores, (B, C, h, w) map)."""


@runtime_checkable
class QualityMapModel(Protocol):
    """Makes its own quality map from its own computation (the spec's ``quality_map`` says how, in
    one line). A model without this capability gets the generic map of
    :func:`diqa_cli.maps.compute.detail_map`.

    Convention: **low values mean "worse here"** for a method where higher scores are better (the
    generic code negates the maps of ``lower_better`` methods, so the convention holds for all), in
    score units, not normalised (``diqa_cli.maps`` normalises for display only)."""

    def quality_map(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, R, R) in [0, 1] -> ((B,) raw scores, equal to ``forward``'s, and (B, h, w) maps
        on the model's own grid, which generic code resizes to the input's size)."""


@runtime_checkable
class VideoQualityMapModel(Protocol):
    """A video model's own quality maps, one per scored frame (GenzVQA); a video model without it
    gets the generic map of each frame through the video score (:func:`diqa_cli.maps.compute.video_detail_maps`)."""

    def video_quality_maps(
        self, frames: torch.Tensor, clip_features: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One video's chosen frames (F, 3, R, R) in [0, 1] and its clip features -> ((F,) raw
        frame scores and (F, h, w) maps, low = worse here)."""


@runtime_checkable
class ReleasedCheckpoint(Protocol):
    """Reads the released code's checkpoint layout (``diqa weights convert --method``)."""

    @classmethod
    def convert_released_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A released state dict -> this model's checkpoint names (unused keys dropped)."""


@runtime_checkable
class ReleasedFiles(Protocol):
    """The released code saves a head as several files (GenzIQA: the LoRA attention processors and
    the prompt learner; GenzVQA: those plus the modulator's): ``diqa weights convert`` takes them
    together, in any order, and refuses files that do not belong together."""

    @classmethod
    def convert_released_files(cls, states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The released files' state dicts -> one checkpoint in this model's names."""


@runtime_checkable
class BatchNormCalibration(Protocol):
    """Has BatchNorm layers whose running statistics can be set from example images (an untrained
    network's would give every image the same score)."""

    def set_batchnorm_statistics(self, pixels: torch.Tensor) -> None:
        """Set the running statistics from (N, 3, R, R) images in [0, 1]."""


@runtime_checkable
class InitFromHead(Protocol):
    """Training can start from another method's head (the spec's ``init_from`` names which)."""

    def load_init_state_dict(self, state: dict[str, torch.Tensor], method: str) -> None:
        """Load the parts of a ``method`` head this model shares with it; the rest stays as built."""


@runtime_checkable
class TinyAssets(Protocol):
    """Needs files besides the tiny backbone in the tiny bundle (a video model's clip encoder)."""

    @classmethod
    def write_tiny_assets(cls, directory: Path) -> None:
        """Write them into the bundle folder ``directory`` (where ``tiny_config`` expects them)."""


@runtime_checkable
class ImageNetInit(Protocol):
    """Can start training from ImageNet weights of its trunk (the released student recipe)."""

    def load_imagenet_weights(self, *, offline: bool = False) -> None:
        """Load the trunk's ImageNet weights through the weights manifest."""


# --- video models ------------------------------------------------------------------------------


@runtime_checkable
class ClipEncoder(Protocol):
    """A frozen network that reads short clips at the native frame rate (SlowFast for GenzVQA).
    Clips are ``clip_frames`` frames, short side resized to ``crop_size`` and centre-cropped,
    normalised with ``config["mean"]`` / ``config["std"]``."""

    ref: str  # what the user named (manifest name or file)
    identity: str | None  # SHA-256 of its weights
    clip_frames: int
    crop_size: int
    config: dict

    def extract_features(self, clips: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(N, 3, T, S, S) -> per clip features, each (N, D_k)."""


@runtime_checkable
class VideoQualityModel(Protocol):
    """A video method: frames are scored in batches, clips are read by a clip encoder, and the two
    are combined into one score per video. The video pipeline (:mod:`diqa_cli.pipelines.videos`)
    decodes frames and clips and calls only these.

    ``clip_encoder_column`` names the output column that records the clip encoder's weights."""

    clip_encoder_column: ClassVar[str]

    def load_clip_encoder(
        self, ref: str | None = None, *, relative_to: str | Path | None = None, offline: bool = False
    ) -> ClipEncoder:
        """The clip encoder this head reads (``ref`` replaces the head's own; a relative path in the
        head's config is taken from ``relative_to``, its checkpoint's folder), on the model's device,
        checked against what the head was trained with."""

    def frame_features(self, pixels: torch.Tensor) -> Any:
        """Frames (B, 3, R, R) in [0, 1] -> a tensor or nest of tensors with B first."""

    def video_score(self, frame_features: Any, clip_features: tuple[torch.Tensor, ...]) -> Any:
        """All frames' features (concatenated) and all clips' features (N, D_k) -> the video's
        result: ``.score`` (raw, 0-d, differentiable) and ``.frame_scores`` (F,), raw per frame."""
