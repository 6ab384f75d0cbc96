"""Computing quality maps (torch). See :mod:`diqa_cli.maps` for the convention (low = worse here,
raw score units, input size).

* :func:`quality_maps` is what generic code calls: the model's own map where it implements
  :class:`~diqa_cli.models.base.QualityMapModel`, else :func:`detail_map`; negated for methods
  whose lower scores are better, so that low always means worse.
* :func:`contribution_map` is the building block of the derived maps: gradient × activation of a
  feature map through the part of the model that turns it into the score.
* :func:`detail_map` is the generic map, for any model whose score is differentiable with respect
  to its input (the model contract asks for that).
* :func:`blur_occlusion_map` is the detail map measured instead of linearised: the score drop when
  each region's detail is blurred away, one extra scoring per region (for models whose gradient
  with respect to the input does not say where the damage is).
* :func:`resize_maps` brings a map from the model's grid to the input's size.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "blur_occlusion_map",
    "contribution_map",
    "detail_map",
    "gaussian_blur",
    "quality_maps",
    "resize_maps",
    "video_detail_maps",
    "video_quality_maps",
]


@contextlib.contextmanager
def _autograd_allowed():
    """Gradients on, outside any inference mode (maps need a backward pass even when scoring)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def contribution_map(features: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-location contribution of ``features`` (B, C, h, w) to ``head(features)`` (B,): gradient ×
    activation summed over channels, times h·w, so the map's mean over positions is the first-order
    contribution Σ f·∂s/∂f (for a ReLU head, exactly the score minus the head's effective bias on
    its current linear piece). (B, h, w) float32."""
    with _autograd_allowed():
        f = features.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(head(f).sum(), f)
    area = f.shape[-2] * f.shape[-1]
    return (f.detach().float() * grad.float()).sum(dim=1) * area


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflected borders (the padding is capped at the
    image's size, so tiny images blur too)."""
    if sigma <= 0:
        return x
    kernel = _gaussian_kernel(sigma, x.device, x.dtype)
    radius = kernel.numel() // 2
    channels = x.shape[1]
    out = x
    for dim, shape in ((3, (1, -1)), (2, (-1, 1))):
        pad = min(radius, out.shape[dim] - 1)
        k = kernel[radius - pad : radius + pad + 1] if pad < radius else kernel
        k = (k / k.sum()).view(1, 1, *shape).expand(channels, 1, -1, -1)
        padding = (pad, pad, 0, 0) if dim == 3 else (0, 0, pad, pad)
        out = F.conv2d(F.pad(out, padding, mode="reflect") if pad else out, k, groups=channels)
    return out


def _detail_scales(pixels: torch.Tensor) -> tuple[float, float]:
    """Blur sigma defining "detail", and the smoothing sigma of the map: 1/64 and 1/32 of the
    model's side (8 and 16 px at 512 px), at least 1 and 2 px."""
    side = max(pixels.shape[-2:])
    return max(1.0, side / 64), max(2.0, side / 32)


def _detail_from_gradient(pixels: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    detail_sigma, smooth_sigma = _detail_scales(pixels)
    x = pixels.detach().float()
    detail = x - gaussian_blur(x, detail_sigma)
    area = x.shape[-2] * x.shape[-1]
    signed = (grad.float() * detail).sum(dim=1, keepdim=True)
    return gaussian_blur(signed, smooth_sigma)[:, 0] * area


def detail_map(model, pixels: torch.Tensor, steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic quality map of any model: ``((B,) raw scores, (B, R, R) map)``; ``model`` is any
    callable from (B, 3, R, R) pixels to (B,) scores.

    map = smooth( Σ_colour ∂score/∂x · (x − blur(x)) ) · R²: the gradient of the score times the
    image's fine detail. Its mean over the image is, to first order, score(x) − score(blur(x)):
    how much the score would drop if the detail were blurred away. Where detail helps the score
    (sharp, clean texture) the map is high; where the detail is damage the score penalises
    (noise, blocking) it is negative; where there is no detail left (blur) it is near zero, below
    the sharp parts. Blur sigma 1/64 of the side, smoothing sigma 1/32 (at least 1 and 2 px).

    With ``steps`` > 1 the gradient is instead averaged over the midpoints of ``steps`` equal
    segments of the straight path from blur(x) to x (integrated gradients with the blurred image as
    the baseline), so the mean is score(x) − score(blur(x)) up to that midpoint sum rather than to
    first order: for scores whose gradient swings from point to point. ``steps`` backward passes
    and one plain scoring."""
    x = pixels.detach()
    if steps == 1:
        points = [1.0]
    else:
        points = [(k + 0.5) / steps for k in range(steps)]
        with torch.no_grad():
            scores = model(x).detach()
    detail = x - gaussian_blur(x.float(), _detail_scales(x)[0]).to(x.dtype)
    total = None
    with _autograd_allowed():
        for alpha in points:
            point = (x - (1 - alpha) * detail).requires_grad_(True)
            value = model(point)
            (grad,) = torch.autograd.grad(value.sum(), point)
            if steps == 1:
                scores = value.detach()
            total = grad if total is None else total + grad
    return scores, _detail_from_gradient(pixels, total / steps)


def blur_occlusion_map(score: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, grid: int = 4):
    """``((B,) scores, (B, grid, grid) map)``: cell (i, j) is score(x) − score(x with that cell of a
    grid × grid partition blurred), the blur being :func:`detail_map`'s (sigma 1/64 of the side).
    What :func:`detail_map` estimates to first order, measured: high where the detail helps the
    score, negative where blurring it away would raise the score (noise, blocking), near zero where
    there is no detail left (blur). No gradients, grid² + 1 scorings of the batch; the callers'
    bilinear resize puts each cell's value at its centre."""
    height, width = pixels.shape[-2:]
    if min(height, width) < grid:
        raise ValueError(f"a {grid} x {grid} occlusion grid needs at least {grid} pixels a side, got {height} x {width}")
    blurred = gaussian_blur(pixels.float(), _detail_scales(pixels)[0]).to(pixels.dtype)
    rows = torch.linspace(0, height, grid + 1).round().long().tolist()
    cols = torch.linspace(0, width, grid + 1).round().long().tolist()
    with torch.no_grad():
        scores = score(pixels)
        drops = scores.new_empty(pixels.shape[0], grid, grid, dtype=torch.float32)
        for i in range(grid):
            for j in range(grid):
                occluded = pixels.clone()
                window = (..., slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1]))
                occluded[window] = blurred[window]
                drops[:, i, j] = (scores - score(occluded)).float()
    return scores, drops


def quality_maps(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((B,) raw scores, (B, h, w) float32 maps)`` of (B, 3, R, R) pixels in [0, 1] on the model's
    grid: the model's own map (a :class:`~diqa_cli.models.base.QualityMapModel`) or the generic
    :func:`detail_map`; negated for a method whose lower scores are better (low = worse here)."""
    from diqa_cli.models.base import QualityMapModel

    if isinstance(model, QualityMapModel):
        scores, maps = model.quality_map(pixels)
    else:
        scores, maps = detail_map(model, pixels)
    maps = maps.detach().float()
    if maps.ndim != 3 or maps.shape[0] != pixels.shape[0]:
        raise RuntimeError(f"{model.method_name}: quality map of shape {tuple(maps.shape)} for a batch of {pixels.shape[0]}")
    if model.spec.lower_better:
        maps = -maps
    return scores.detach(), maps


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) maps -> (B, H, W), bilinear (values, not their sum, carry over: raw units stay)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def video_detail_maps(model, frames: torch.Tensor, clip_features) -> tuple[torch.Tensor, torch.Tensor]:
    """The generic map of each chosen frame of a video: :func:`detail_map` with the gradient of the
    video's score (not of the frame's own) with respect to that frame. ``((F,) raw frame scores,
    (F, R, R) maps)``."""
    with _autograd_allowed():
        x = frames.detach().clone().requires_grad_(True)
        result = model.video_score(model.frame_features(x), clip_features)
        (grad,) = torch.autograd.grad(result.score, x)
    return result.frame_scores.detach(), _detail_from_gradient(frames, grad)


def video_quality_maps(model, frames: torch.Tensor, clip_features) -> tuple[torch.Tensor, torch.Tensor]:
    """A video model's maps of its chosen frames: its own (a
    :class:`~diqa_cli.models.base.VideoQualityMapModel`) or :func:`video_detail_maps`; negated for a
    method whose lower scores are better. ``((F,) raw frame scores, (F, h, w) float32 maps)``."""
    from diqa_cli.models.base import VideoQualityMapModel

    if isinstance(model, VideoQualityMapModel):
        scores, maps = model.video_quality_maps(frames, clip_features)
    else:
        scores, maps = video_detail_maps(model, frames, clip_features)
    maps = maps.detach().float()
    if model.spec.lower_better:
        maps = -maps
    return scores.detach(), maps
