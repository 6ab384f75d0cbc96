"""The contract every method's torch implementation follows.

A :class:`QualityModel` binds a method's trainable parts to a loaded
:class:`diqa_cli.backbone.Backbone`. Every model takes the same input, a batch of RGB images
resized to the method's square resolution with values in [0, 1], shape (B, 3, R, R), and turns
it into its own convention (released-code input range, VAE latents…) inside ``forward``. This
one input convention is what lets the scoring pipeline, training and enhancement share models.

Constructor keyword arguments are the model's *config*: they are JSON-serialisable, saved in the
checkpoint sidecar and passed back on load, so one call rebuilds the model (diffusers'
``register_to_config`` habit).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from diqa_cli.methods import MethodSpec, get_method


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
        """Names (as in ``state_dict``) of the parameters training updates and checkpoints hold."""
        return [name for name, p in self.named_parameters() if p.requires_grad]

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a head checkpoint holds: the trainable parameters and the buffers they need."""
        keep = set(self.trainable_parameter_names())
        state = self.state_dict()
        return {k: v.detach().contiguous() for k, v in state.items() if k in keep}

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint strictly: every expected key present, no unexpected key."""
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
        self.load_state_dict(state, strict=False)

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
