"""SlowFast R50 8x8 (Kinetics-400), GenzVQA's frozen temporal feature extractor.

The network is pytorchvideo's own (``pytorchvideo.models.slowfast.create_slowfast``, the builder
behind ``pytorchvideo.models.hub.slowfast_r50``), built from a small JSON-able config, so its
state-dict names are the model zoo's: ``SLOWFAST_8x8_R50.pyth`` (state dict under
``model_state``), converted once by ``diqa weights convert slowfast-r50-k400``, loads unchanged
with strict key checking. Only the model code of pytorchvideo 0.1.5 is used; its transforms
(which break on current torchvision) are not imported.

Features, as the VQA literature takes them (SimpleVQA's extractor, which GenzVQA's 2048-d slow
and 256-d fast features match; GenzVQA's own extraction code was not released): a clip of
``clip_frames`` (32) frames at the native rate, normalised with the Kinetics mean and std at
``crop_size`` (224) px, feeds the fast pathway whole and the slow pathway every ``alpha``-th
(4th) frame (8 frames); the five stages run (stem and res2 to res5, with the fast-to-slow
fusions) and each pathway's output is averaged over time and space: slow 2048-d, fast 256-d for
R50 (``width`` x 32 and ``width`` x 32 / ``channel_ratio``). The classification head is kept so
the released checkpoint loads strictly, but is never run. Global averaging equals the released
``AvgPool3d((8, 7, 7))`` / ``((32, 7, 7))`` head pools at the native 32-frame 224-px input.

A config's ``depth`` is one of pytorchvideo's ResNet depths (50, 101, 152); ``width`` (the slow
stem's channels, 64 for R50) scales every stage, so the tiny extractor (width 8, 32 px, 8-frame
clips) has the real network's structure and key names at a fraction of its cost.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diqa_cli.errors import UsageError, WeightsError

__all__ = [
    "SLOWFAST_MANIFEST_NAME",
    "SLOWFAST_R50_CONFIG",
    "SlowFastFeatures",
    "load_slowfast",
    "slowfast_config",
    "tiny_slowfast_config",
    "write_tiny_slowfast",
]

SLOWFAST_MANIFEST_NAME = "slowfast-r50-k400"

# The model zoo's SLOWFAST_8x8_R50 (pytorchvideo.models.hub.slowfast_r50) and its input.
SLOWFAST_R50_CONFIG: dict[str, Any] = {
    "depth": 50,
    "width": 64,
    "channel_ratio": 8,  # fast pathway channels = slow / channel_ratio (beta inverse)
    "fusion_ratio": 2,  # fast-to-slow lateral connection channels = fast channels x fusion_ratio
    "fusion_kernel": 7,  # temporal kernel of the lateral connection (slowfast_r50 passes 7)
    "alpha": 4,  # fast frames per slow frame
    "num_classes": 400,
    "clip_frames": 32,
    "crop_size": 224,
    "mean": [0.45, 0.45, 0.45],
    "std": [0.225, 0.225, 0.225],
}

# Configs that go with manifest entries (the entry's file holds weights only).
_MANIFEST_CONFIGS = {SLOWFAST_MANIFEST_NAME: SLOWFAST_R50_CONFIG}


def slowfast_config(**overrides: Any) -> dict[str, Any]:
    """The R50 config with ``overrides``; unknown keys are refused."""
    unknown = sorted(set(overrides) - set(SLOWFAST_R50_CONFIG))
    if unknown:
        raise UsageError(f"unknown SlowFast config keys {unknown}; known: {', '.join(SLOWFAST_R50_CONFIG)}")
    config = {**SLOWFAST_R50_CONFIG, **overrides}
    if config["depth"] not in (50, 101, 152):
        raise UsageError(f"SlowFast depth must be 50, 101 or 152 (pytorchvideo's ResNets), got {config['depth']}")
    if config["width"] % config["channel_ratio"] or config["clip_frames"] % config["alpha"]:
        raise UsageError("SlowFast width must divide by channel_ratio, and clip_frames by alpha")
    return config


def tiny_slowfast_config() -> dict[str, Any]:
    """A SlowFast with R50's structure and key names at width 8, 32 px and 8-frame clips: slow
    features 256-d, fast 32-d."""
    return slowfast_config(width=8, num_classes=10, clip_frames=8, crop_size=32)


def _build_network(config: dict[str, Any]) -> nn.Module:
    # fvcore (imported by pytorchvideo's model package) calls the deprecated torch.jit.script at
    # import; the warning says nothing about diqa's use, so it is not shown to users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from pytorchvideo.models.slowfast import create_slowfast

    return create_slowfast(
        model_depth=config["depth"],
        stem_dim_outs=(config["width"], config["width"] // config["channel_ratio"]),
        slowfast_channel_reduction_ratio=(config["channel_ratio"],),
        slowfast_conv_channel_fusion_ratio=config["fusion_ratio"],
        slowfast_fusion_conv_kernel_size=(config["fusion_kernel"], 1, 1),
        slowfast_fusion_conv_stride=(config["alpha"], 1, 1),
        model_num_class=config["num_classes"],
        # Parameter-free, so the state dict is the zoo's; adaptive so smaller inputs work too.
        head_pool=nn.AdaptiveAvgPool3d,
        head_output_size=(1, 1, 1),
    )


class SlowFastFeatures(nn.Module):
    """A frozen SlowFast whose :meth:`extract_features` gives the pooled slow and fast pathway
    outputs of normalised clips. ``net`` is pytorchvideo's network; its state dict (without the
    ``net.`` prefix) is the model zoo's. ``ref`` and ``identity`` name the weights loaded."""

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = slowfast_config(**(config or {}))
        self.net = _build_network(self.config)
        self.net.requires_grad_(False)
        self.eval()
        self.ref: str | None = None
        self.identity: str | None = None

    def train(self, mode: bool = True) -> SlowFastFeatures:
        # Frozen: batch norm always uses its running statistics.
        return super().train(False)

    @property
    def feature_dims(self) -> tuple[int, int]:
        """(slow, fast) feature widths: 2048 and 256 for R50."""
        slow = self.config["width"] * 32
        return slow, slow // self.config["channel_ratio"]

    @property
    def clip_frames(self) -> int:
        return int(self.config["clip_frames"])

    @property
    def crop_size(self) -> int:
        return int(self.config["crop_size"])

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load the zoo's state dict strictly: every key present, none extra, shapes equal."""
        expected = self.net.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            parts = [
                f"{label} {keys[:4]}{' …' if len(keys) > 4 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                if keys
            ]
            raise WeightsError(f"{source}: not SlowFast weights for this config ({'; '.join(parts)})")
        self.net.load_state_dict(state, strict=True)

    def pathways(self, clips: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, T, S, S) -> [slow (B, 3, T/alpha, S, S), fast (B, 3, T, S, S)]: the slow
        pathway takes T/alpha frames evenly from the clip (pytorchvideo's PackPathway)."""
        frames = clips.shape[2]
        index = torch.linspace(0, frames - 1, max(1, frames // self.config["alpha"]), device=clips.device).long()
        return [clips.index_select(2, index), clips]

    @torch.no_grad()
    def extract_features(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised clips (B, 3, T, S, S) -> (slow (B, D_slow), fast (B, D_fast)), float32."""
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"clips must be (B, 3, T, H, W), got {tuple(clips.shape)}")
        param = next(self.net.parameters())
        x = self.pathways(clips.to(param.device, param.dtype))
        for stage in self.net.blocks[:5]:  # stem, res2..res5 with their fusions; not the head
            x = stage(x)
        slow, fast = x
        return slow.float().mean(dim=(2, 3, 4)), fast.float().mean(dim=(2, 3, 4))


def _config_beside(path: Path) -> dict[str, Any] | None:
    """``<name>.json`` beside a weights file: the config of a non-R50 SlowFast (the tiny one)."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{side}: unreadable SlowFast config ({exc})") from None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(config, dict):
        raise WeightsError(f"{side}: a SlowFast config file holds {{\"config\": {{...}}}}")
    return config


def load_slowfast(
    ref: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    offline: bool = False,
    relative_to: str | Path | None = None,
) -> SlowFastFeatures:
    """A frozen :class:`SlowFastFeatures` from ``ref``: the manifest name ``slowfast-r50-k400``
    (its converted safetensors in the weights cache; fetched unless offline) or a ``.safetensors``
    file with the zoo's key names, its config from ``<file>.json`` beside it when present, else
    R50's. A relative path is taken from ``relative_to`` (a checkpoint's folder) when given."""
    from diqa_cli.files import file_sha256, read_safetensors, refuse_pickle

    if ref in _MANIFEST_CONFIGS:
        from diqa_cli.weights import resolve

        path = Path(resolve(ref, offline=offline))
        config = _MANIFEST_CONFIGS[ref]
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = Path(relative_to) / path
        refuse_pickle(path)
        if not path.is_file():
            raise WeightsError(
                f"SlowFast weights {str(path)!r} do not exist; pass --slowfast {SLOWFAST_MANIFEST_NAME} "
                f"(then `diqa weights pull {SLOWFAST_MANIFEST_NAME} --allow-pickle` and "
                f"`diqa weights convert {SLOWFAST_MANIFEST_NAME}`) or a converted .safetensors file"
            )
        config = _config_beside(path) or SLOWFAST_R50_CONFIG
    model = SlowFastFeatures(config)
    state = read_safetensors(path)
    model.load_weights(state, str(path))
    model.ref = ref if ref in _MANIFEST_CONFIGS else str(path)
    model.identity = file_sha256(path)
    return model.to(device=torch.device(device), dtype=dtype)


def write_tiny_slowfast(directory, *, seed: int = 5) -> Path:
    """Write ``directory/slowfast.safetensors`` (random weights from ``seed``, the zoo's key
    names) and ``directory/slowfast.json`` (its config); returns the safetensors path."""
    from diqa_cli.files import save_safetensors

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SlowFastFeatures(tiny_slowfast_config())
        # Batch-norm statistics as a trained network has them, not the identity a fresh one starts
        # with, so a tiny network's features depend on every tensor that is loaded.
        for name, buffer in model.net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    path = root / "slowfast.safetensors"
    state = {k: v.contiguous() for k, v in model.net.state_dict().items()}
    save_safetensors(state, path, metadata={"format": "pt", "about": "tiny random SlowFast (diqa tests)"})
    config_text = json.dumps({"format": "diqa-slowfast/1", "config": model.config}, indent=2) + "\n"
    path.with_suffix(".json").write_text(config_text, encoding="utf-8")
    return path
