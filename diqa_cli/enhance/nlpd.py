"""NLPD, the normalized Laplacian pyramid distance, differentiable in torch.

Laparra, Ballé, Berardino, Simoncelli, "Perceptual image quality assessment using a normalized
Laplacian pyramid", Human Vision and Electronic Imaging (IS&T Electronic Imaging) 2016.

Each image is split into a Laplacian pyramid (Burt & Adelson's 5-tap kernel
[0.05, 0.25, 0.4, 0.25, 0.05], downsampling by 2); every band is divided by a local estimate of
its amplitude, ``σ_k + P_k ∗ |band|``, with a 3x3 neighbour filter P_k and a constant σ_k per
level. The distance is the root-mean-square difference of the normalised bands, averaged over
the levels. The P_k and σ_k are the values the authors fitted and published with their MATLAB
code (``NLP_dist.m``, Laboratory for Computational Vision, NYU), for images in [0, 1].

Why here and not from a package: on PyPI, ``pyiqa`` has a differentiable NLPD but pulls in some
thirty dependencies (accelerate, datasets, bitsandbytes, opencv, timm…); ``IQA_pytorch`` has
one but has been unmaintained since 2020 and builds VGG networks on import paths; ``piq``,
``piqa`` and ``torchmetrics`` have none.

Departures from the authors' code, each small: edges are mirrored without repeating the edge
sample (torch's ``reflect``; MATLAB's ``symmetric`` repeats it), colour images are measured per
RGB channel and averaged (the authors' code takes one grey channel; ``luminance=True`` measures
BT.601 luma instead), and small images use fewer levels (at most 6, while the coarsest level that
is filtered keeps at least 3 pixels a side).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["NLPD", "nlpd"]

_BINOMIAL = (0.05, 0.25, 0.4, 0.25, 0.05)
# Published per-level normalisation: the 3x3 neighbour weights (N, W, E, S; the centre and
# corners are 0) and the constants σ, finest level first; the last entry is the low-pass residual.
_NEIGHBOURS = (
    (0.1011, 0.1493, 0.1460, 0.1015),
    (0.0757, 0.1986, 0.1846, 0.0837),
    (0.0477, 0.2138, 0.2243, 0.0467),
    (0.0, 0.2503, 0.2616, 0.0),
    (0.0, 0.2598, 0.2552, 0.0),
    (0.0, 0.2215, 0.0717, 0.0),
)
_SIGMAS = (0.0248, 0.0185, 0.0179, 0.0191, 0.0220, 0.2782)
MAX_LEVELS = len(_SIGMAS)
_LUMA = (0.299, 0.587, 0.114)


def _neighbour_kernel(north: float, west: float, east: float, south: float) -> torch.Tensor:
    # Written as MATLAB's conv2 applies it (the kernel flipped), so torch's correlation matches.
    return torch.tensor([[0.0, south, 0.0], [east, 0.0, west], [0.0, north, 0.0]])


class NLPD(nn.Module):
    """``NLPD()(x, y)`` for (B, C, H, W) images in [0, 1] -> (B,) distances, 0 when x == y.

    ``levels`` caps the pyramid depth (default 6, the authors'); it is lowered automatically for
    small images. ``luminance`` measures BT.601 luma instead of each RGB channel.
    """

    def __init__(self, levels: int = MAX_LEVELS, *, luminance: bool = False):
        super().__init__()
        if not 1 <= levels <= MAX_LEVELS:
            raise ValueError(f"NLPD levels must be between 1 and {MAX_LEVELS}, got {levels}")
        self.levels = levels
        self.luminance = luminance
        taps = torch.tensor(_BINOMIAL)
        self.register_buffer("blur", (taps[:, None] * taps[None, :])[None, None], persistent=False)
        self.register_buffer("norm", torch.stack([_neighbour_kernel(*n) for n in _NEIGHBOURS])[:, None, None],
                             persistent=False)
        self.register_buffer("sigma", torch.tensor(_SIGMAS), persistent=False)

    def _levels_for(self, height: int, width: int) -> int:
        levels, side = 1, min(height, width)
        while levels < self.levels and side >= 3:  # a level is blurred (5 taps, mirrored) before it halves
            side = (side + 1) // 2
            levels += 1
        return levels

    def _filter(self, image: torch.Tensor, kernel: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
        return F.conv2d(F.pad(image, (pad,) * 4, mode=mode), kernel.to(image.dtype))

    def _normalised_pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        bands = []
        current = image
        levels = self._levels_for(*image.shape[-2:])
        for level in range(levels):
            last = level == levels - 1
            if not last:
                low = self._filter(current, self.blur, 2, "reflect")[..., ::2, ::2]
                # Zero-insertion upsampling then the same kernel (x4 for the inserted zeros);
                # mirroring keeps the zeros' positions, so edges interpolate like the interior.
                up = current.new_zeros(current.shape)
                up[..., ::2, ::2] = 4 * low
                band = current - self._filter(up, self.blur, 2, "reflect")
            else:
                low, band = None, current
            # The low-pass residual always takes the residual's constants, however few levels.
            k = MAX_LEVELS - 1 if last else level
            amplitude = self._filter(band.abs(), self.norm[k], 1, "constant")
            bands.append(band / (self.sigma[k].to(band.dtype) + amplitude))
            current = low
        return bands

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4:
            raise ValueError(f"NLPD needs two (B, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if self.luminance and x.shape[1] == 3:
            luma = x.new_tensor(_LUMA).view(1, 3, 1, 1)
            x, y = (x * luma).sum(1, keepdim=True), (y * luma).sum(1, keepdim=True)
        batch, channels = x.shape[:2]
        # Channels are measured independently: fold them into the batch.
        x = x.reshape(batch * channels, 1, *x.shape[2:])
        y = y.reshape(batch * channels, 1, *y.shape[2:])
        per_level = []
        for bx, by in zip(self._normalised_pyramid(x), self._normalised_pyramid(y)):
            mean_square = (bx - by).square().mean(dim=(1, 2, 3))
            # sqrt has an infinite slope at 0; identical bands get distance 0 and gradient 0.
            per_level.append(torch.where(mean_square > 0, mean_square.clamp_min(1e-30).sqrt(), 0.0))
        distance = torch.stack(per_level, dim=1).mean(dim=1)
        return distance.reshape(batch, channels).mean(dim=1)


def nlpd(x: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
    """Functional form of :class:`NLPD`."""
    return NLPD(**options).to(x.device)(x, y)
