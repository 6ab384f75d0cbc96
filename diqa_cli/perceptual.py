"""Differentiable full-reference perceptual distances: LPIPS and DISTS.

Both take two batches of RGB images in [0, 1] (diqa's one pixel convention), shape (B, 3, H, W),
and return one distance per image, shape (B,): 0 for identical images, larger for images that
look more different, differentiable with respect to both inputs. Both are frozen and stay in
eval mode whatever their parent module does, so they are deterministic inside training loops
(LPIPS' linear layers carry dropout that ``train()`` would otherwise switch on).

Weights never come from a silent download (torchvision's and torch.hub's default loaders are
not used):

* the ImageNet backbones (AlexNet, VGG16) come from the weights manifest into the diqa cache
  (``alexnet-imagenet``, ``vgg16-imagenet``); the manifest lists their torchvision files as
  pickles, which diqa loads only from their converted safetensors copies
  (``diqa weights pull NAME --allow-pickle`` then ``diqa weights convert NAME``);
* LPIPS' linear calibration layers are the ones the ``lpips`` package ships and loads itself
  from its own install folder (a local file, no network);
* DISTS' alpha/beta weights come from the manifest entry :data:`DISTS_WEIGHTS_ENTRY`.

``backbone_weights=None`` builds every network with random weights drawn from
:data:`RANDOM_INIT_SEED` instead (LPIPS keeps its shipped linear layers). Only tests and the tiny
bundle use that; such distances still grow with distortion but are not perceptual metrics.

DISTS is implemented here rather than taken from a package: ``piq`` computes it differentiably
but fetches its VGG16 and alpha/beta weights with torch.hub inside the constructor, with no way
to hand it local files, and the authors' ``DISTS_pytorch`` package does the same for VGG16. The
formula and parameter layout (``alpha``/``beta`` of shape (1, 1475, 1, 1)) follow Ding et al.,
"Image Quality Assessment: Unifying Structure and Texture Similarity" (TPAMI 2020), so the
authors' released alpha/beta load unchanged. Departure: no resizing inside the metric (the
authors' demo resizes the shorter side to 256 before calling it); callers pass what they have.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from diqa_cli.errors import UsageError, WeightsError

__all__ = [
    "IMAGENET",
    "RANDOM_INIT_SEED",
    "DISTS_WEIGHTS_ENTRY",
    "PERCEPTUAL_DISTANCES",
    "LPIPSDistance",
    "DISTS",
    "perceptual_distance",
    "load_imagenet_backbone",
]

IMAGENET = "imagenet"
RANDOM_INIT_SEED = 0
DISTS_WEIGHTS_ENTRY = "dists"
# Manifest entry of each torchvision backbone.
_BACKBONE_ENTRIES = {"alex": "alexnet-imagenet", "vgg": "vgg16-imagenet"}
# Names accepted by :func:`perceptual_distance` (and LGDM's ``perceptual`` config).
PERCEPTUAL_DISTANCES = ("lpips-alex", "lpips-vgg", "dists")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# DISTS' feature stages: the input itself, then VGG16 after relu1_2 … relu5_3.
_DISTS_CHANNELS = (3, 64, 128, 256, 512, 512)
# VGG16 ``features`` indices that end each DISTS stage, and the max-pool indices replaced by L2 pooling.
_VGG_STAGE_ENDS = (3, 8, 15, 22, 29)
_VGG_POOLS = (4, 9, 16, 23)
# DISTS' stabilising constants (the paper's c1 = c2).
_DISTS_EPS = 1e-6


def _check_weights_choice(backbone_weights) -> None:
    if backbone_weights not in (IMAGENET, None):
        raise UsageError(
            f"backbone_weights must be {IMAGENET!r} (from the weights manifest) or None (random, for "
            f"tests only); got {backbone_weights!r}"
        )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a pickle with the safe loader (only reached
    when the caller resolved with ``allow_pickle``)."""
    if path.suffix == ".safetensors":
        from diqa_cli.files import read_safetensors

        return read_safetensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_imagenet_backbone(net: str, *, offline: bool = False, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The ``features.*`` tensors of torchvision's ImageNet AlexNet (``net='alex'``) or VGG16
    (``'vgg'``), in torchvision's key layout, from the diqa weights cache."""
    from diqa_cli import weights

    name = _BACKBONE_ENTRIES[net]
    path = weights.resolve(name, offline=offline, allow_pickle=allow_pickle)
    state = {k: v for k, v in _load_tensors(Path(path)).items() if k.startswith("features.")}
    if not state:
        raise WeightsError(f"{name}: {path} holds no features.* tensors; is it torchvision's {net} file?")
    return state


@contextlib.contextmanager
def _seeded(seed: int):
    """Random initialisation from a fixed seed without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _FrozenEval(nn.Module):
    """Frozen, and in eval mode whatever ``train()`` its parent calls."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)

    def _own_dtype(self, *images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Inputs cast to the networks' dtype (float32 unless the module was converted)."""
        dtype = next(self.parameters()).dtype
        return tuple(image.to(dtype) for image in images)


class LPIPSDistance(_FrozenEval):
    """LPIPS v0.1 (Zhang et al., CVPR 2018) through the ``lpips`` package: ``net`` is ``'alex'``
    (the metric the authors recommend) or ``'vgg'`` (closer to a classic perceptual loss)."""

    def __init__(self, net: str = "alex", *, backbone_weights: str | None = IMAGENET, offline: bool = False,
                 allow_pickle: bool = False):
        super().__init__()
        if net not in _BACKBONE_ENTRIES:
            raise UsageError(f"LPIPS net must be one of {', '.join(_BACKBONE_ENTRIES)}; got {net!r}")
        _check_weights_choice(backbone_weights)
        import lpips

        # Resolve first, so missing weights fail before the (slow) network build.
        state = load_imagenet_backbone(net, offline=offline, allow_pickle=allow_pickle) if backbone_weights else None
        # pnet_rand=True: lpips builds torchvision's architecture without fetching ImageNet weights
        # (its own path would download them); the shipped linear layers load from the package.
        with _seeded(RANDOM_INIT_SEED), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if state is not None:
            self._load_trunk(state)
        self.net = net
        self.backbone_weights = backbone_weights
        self._freeze()

    def _load_trunk(self, state: dict[str, torch.Tensor]) -> None:
        # lpips splits torchvision's ``features`` into slices but keeps each layer's index:
        # ``slice2.3.weight`` is torchvision's ``features.3.weight``.
        trunk = self.lpips.net
        wanted = {}
        for key in trunk.state_dict():
            _, index, param = key.split(".", 2)
            source = f"features.{index}.{param}"
            if source not in state:
                raise WeightsError(f"LPIPS-{self.net}: the ImageNet weights lack {source}")
            wanted[key] = state[source]
        trunk.load_state_dict(wanted, strict=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self._own_dtype(x, y)
        return self.lpips(x, y, normalize=True).reshape(x.shape[0])


class _L2Pool(nn.Module):
    """DISTS' replacement for VGG's max pooling: sqrt of a Hann-weighted local mean of squares,
    stride 2 (anti-aliased, so small shifts barely change the features)."""

    def __init__(self, channels: int):
        super().__init__()
        window = torch.hann_window(5, periodic=False)[1:-1]  # (0.5, 1, 0.5)
        kernel = window[:, None] * window[None, :]
        self.register_buffer("filter", (kernel / kernel.sum()).expand(channels, 1, 3, 3).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.conv2d(x.square(), self.filter, stride=2, padding=1, groups=x.shape[1])
        return (pooled + 1e-12).sqrt()


class DISTS(_FrozenEval):
    """DISTS (Ding et al., TPAMI 2020) as a distance: 1 - similarity, 0 for identical images.

    Per feature map (the input image and VGG16's five stages with L2 pooling), the channel means
    give a texture term (2·μx·μy + c)/(μx² + μy² + c) weighted by ``alpha`` and the channel
    covariances a structure term (2·σxy + c)/(σx² + σy² + c) weighted by ``beta``; alpha and beta
    are normalised to sum to one together.
    """

    def __init__(self, *, backbone_weights: str | None = IMAGENET, offline: bool = False, allow_pickle: bool = False):
        super().__init__()
        _check_weights_choice(backbone_weights)
        from torchvision.models.vgg import cfgs, make_layers

        if backbone_weights:
            vgg_state = load_imagenet_backbone("vgg", offline=offline, allow_pickle=allow_pickle)
            alpha_beta = self._load_alpha_beta(offline=offline, allow_pickle=allow_pickle)
        with _seeded(RANDOM_INIT_SEED):
            features = make_layers(cfgs["D"])  # torchvision's VGG16 ``features``, same indices
            total = sum(_DISTS_CHANNELS)
            # The authors' initialisation, used as is only for random (test) networks.
            self.alpha = nn.Parameter(torch.randn(1, total, 1, 1) * 0.01 + 0.1)
            self.beta = nn.Parameter(torch.randn(1, total, 1, 1) * 0.01 + 0.1)
        if backbone_weights:
            features.load_state_dict({k[len("features."):]: v for k, v in vgg_state.items()}, strict=True)
            with torch.no_grad():
                self.alpha.copy_(alpha_beta["alpha"].reshape(self.alpha.shape))
                self.beta.copy_(alpha_beta["beta"].reshape(self.beta.shape))
        for pool in _VGG_POOLS:
            features[pool] = _L2Pool(features[pool - 2].out_channels)
        starts = (0, *(end + 1 for end in _VGG_STAGE_ENDS[:-1]))
        self.stages = nn.ModuleList(features[a : b + 1] for a, b in zip(starts, _VGG_STAGE_ENDS))
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.backbone_weights = backbone_weights
        self._freeze()

    @staticmethod
    def _load_alpha_beta(*, offline: bool, allow_pickle: bool) -> dict[str, torch.Tensor]:
        from diqa_cli import weights

        path = Path(weights.resolve(DISTS_WEIGHTS_ENTRY, offline=offline, allow_pickle=allow_pickle))
        state = _load_tensors(path)
        total = sum(_DISTS_CHANNELS)
        for key in ("alpha", "beta"):
            if key not in state or state[key].numel() != total:
                raise WeightsError(f"{DISTS_WEIGHTS_ENTRY}: {path} has no {key} of {total} values")
        return state

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.mean) / self.std
        feats = [x]
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self._own_dtype(x, y)
        weight_sum = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / weight_sum, _DISTS_CHANNELS, dim=1)
        betas = torch.split(self.beta / weight_sum, _DISTS_CHANNELS, dim=1)
        similarity = x.new_zeros(x.shape[0])
        for fx, fy, alpha, beta in zip(self._features(x), self._features(y), alphas, betas):
            mx, my = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            vx = (fx - mx).square().mean((2, 3), keepdim=True)
            vy = (fy - my).square().mean((2, 3), keepdim=True)
            cov = ((fx - mx) * (fy - my)).mean((2, 3), keepdim=True)
            texture = (2 * mx * my + _DISTS_EPS) / (mx.square() + my.square() + _DISTS_EPS)
            structure = (2 * cov + _DISTS_EPS) / (vx + vy + _DISTS_EPS)
            similarity = similarity + (alpha * texture + beta * structure).sum((1, 2, 3))
        return 1 - similarity


def perceptual_distance(name: str, *, backbone_weights: str | None = IMAGENET, offline: bool = False,
                        allow_pickle: bool = False) -> nn.Module:
    """Build one of :data:`PERCEPTUAL_DISTANCES` by name."""
    if name == "dists":
        return DISTS(backbone_weights=backbone_weights, offline=offline, allow_pickle=allow_pickle)
    if name in ("lpips-alex", "lpips-vgg"):
        return LPIPSDistance(name.split("-")[1], backbone_weights=backbone_weights, offline=offline,
                             allow_pickle=allow_pickle)
    raise UsageError(f"unknown perceptual distance {name!r}; choose from {', '.join(PERCEPTUAL_DISTANCES)}")
