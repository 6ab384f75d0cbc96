"""The Python API: :func:`create_metric` returns a :class:`Metric`, a callable ``nn.Module`` that
scores images (or videos) with the same defaults, weights and numbers as ``diqa score``.

```python
import diqa_cli

metric = diqa_cli.create_metric("dpiqa", checkpoint="heads/dpiqa.safetensors")
metric("photo.jpg")                    # tensor([score]), exactly what `diqa score photo.jpg` prints
metric(torch.rand(4, 3, 300, 200))     # (4,) scores; any size, resized in torch
loss = diqa_cli.create_metric("lgdm", checkpoint=..., as_loss=True)(images)  # minimise it
```

How a call is read:

* a tensor (B, 3, H, W) or (3, H, W) with values in [0, 1], any H and W: resized in torch to the
  method's square resolution with its released filter (``spec.resample``, antialiased), then
  scored; gradients reach the pixels. For a video method, a (T, 3, H, W) tensor of frames at the
  native rate with ``timestamps=`` (seconds), chosen and clipped as a file's frames would be;
* a path, a ``PIL.Image.Image``, or a list of them: decoded and resized exactly as the CLI does
  (no gradients), so the scores equal the CLI's. A path that cannot be scored raises
  :class:`~diqa_cli.errors.InputError` naming it; :meth:`Metric.score_files` gives error rows
  instead, as the CLI does.

Returned scores are the reported ones (the head's score normalisation applied), or the raw model
outputs with ``raw=True``. With ``as_loss=True`` a call returns one scalar to minimise: the mean
score, negated for methods where higher is better (``lower_better`` is False).

The library never prints: problems raise the :class:`~diqa_cli.errors.DiqaError` family, notices
are :class:`~diqa_cli.errors.DiqaWarning` warnings.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diqa_cli.errors import InputError, UsageError

__all__ = ["Metric", "create_metric"]


def create_metric(
    method: str | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    backbone: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    seed: int | None = None,
    as_loss: bool = False,
    clip_encoder: str | None = None,
) -> Metric:
    """A :class:`Metric` for ``method`` (a registry name or alias; default: the checkpoint's
    method, else the method ``diqa score`` uses by default), resolved as ``diqa score`` resolves
    it: ``checkpoint`` (a head ``.safetensors`` with its sidecar, or a bare converted state dict of
    ``method``), else the method's released weights through the weights manifest (downloaded unless
    ``offline``). ``backbone`` replaces the head's backbone; ``seed`` the recorded seed of methods
    that draw noise; ``clip_encoder`` the clip encoder of a video method (SlowFast for GenzVQA).
    """
    from diqa_cli.checkpoint import read_sidecar, sidecar_path
    from diqa_cli.home import offline_requested
    from diqa_cli.scoring import checkpoint_label, load_scorer
    from diqa_cli.methods import default_method, get_method
    from diqa_cli.models.base import VideoQualityModel

    checkpoint = os.fspath(checkpoint) if checkpoint is not None else None
    if method is None and checkpoint is not None and sidecar_path(checkpoint).is_file():
        method = read_sidecar(checkpoint)["method"]
    spec = get_method(method) if method else default_method("score")
    offline = offline_requested(offline)
    model, sidecar = load_scorer(
        spec.name, backbone=backbone, checkpoint=checkpoint, device=device, dtype=dtype, offline=offline, seed=seed
    )
    encoder = None
    if isinstance(model, VideoQualityModel):
        anchor = os.path.dirname(os.path.abspath(checkpoint)) if checkpoint is not None else None
        encoder = model.load_clip_encoder(clip_encoder, relative_to=anchor, offline=offline)
    elif clip_encoder is not None:
        raise UsageError(f"clip_encoder is for video methods; {spec.name!r} scores {spec.input_kind}s")
    return Metric(model, sidecar, as_loss=as_loss, clip_encoder=encoder, checkpoint=checkpoint_label(checkpoint, spec))


class Metric(nn.Module):
    """A loaded quality model with its score normalisation; see the module docstring.

    Attributes: ``spec`` (the :class:`~diqa_cli.methods.MethodSpec`), ``model`` (the
    :class:`~diqa_cli.models.base.QualityModel`), ``sidecar``, ``resolution``, ``resample``,
    ``lower_better``, ``score_range``, ``licence``, ``device``, ``dtype``, ``normalisation``,
    ``checkpoint`` (what rows name as the checkpoint), ``as_loss``, ``clip_encoder`` (video methods).
    The model is frozen (no parameter gradients); gradients still reach tensor inputs.
    """

    def __init__(self, model, sidecar: dict, *, as_loss: bool = False, clip_encoder=None, checkpoint: str | None = None):
        super().__init__()
        self.model = model.eval().freeze()
        self.clip_encoder = clip_encoder.eval().requires_grad_(False) if clip_encoder is not None else None
        self.sidecar = sidecar
        self.normalisation = {k: float(v) for k, v in sidecar["score_normalisation"].items()}
        self.as_loss = as_loss
        self.checkpoint = checkpoint

    # --- what it is ---------------------------------------------------------------------------
    @property
    def spec(self):
        return self.model.spec

    @property
    def resolution(self) -> int:
        return self.model.resolution

    @property
    def resample(self) -> str:
        return self.spec.resample

    @property
    def lower_better(self) -> bool:
        return self.spec.lower_better

    @property
    def score_range(self) -> str:
        return self.spec.score_range

    @property
    def licence(self) -> str:
        return self.spec.licence

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def is_video(self) -> bool:
        return self.clip_encoder is not None

    def extra_repr(self) -> str:
        return f"method={self.spec.name!r}, resolution={self.resolution}, checkpoint={self.checkpoint!r}"

    # --- scoring ------------------------------------------------------------------------------
    def forward(self, inputs, *, raw: bool = False, timestamps: Sequence[float] | None = None) -> torch.Tensor:
        """Scores of ``inputs`` (see the module docstring): (B,) reported scores, raw with
        ``raw=True``; with ``as_loss`` a scalar loss to minimise."""
        if isinstance(inputs, torch.Tensor):
            scores = self._video_tensor(inputs, timestamps, raw) if self.is_video else self._image_tensor(inputs, raw)
        else:
            if timestamps is not None:
                raise UsageError("timestamps go with a (T, 3, H, W) frame tensor, not with files")
            with torch.no_grad():
                scores = self._files(inputs, raw)
        if self.as_loss:
            return scores.mean() if self.lower_better else -scores.mean()
        return scores

    def quality_map(self, inputs, *, raw: bool = False):
        """Scores and quality maps of images: ``(scores (B,), maps)`` with each map at its input's
        size, low values meaning "worse here" (see :mod:`diqa_cli.maps`; the spec's
        ``map_description`` says how this method makes it). Maps are raw (the method's raw score
        units), not normalised; scores are reported ones unless ``raw``.

        ``inputs`` as for a call: a tensor (B, 3, H, W) or (3, H, W) in [0, 1] gives maps
        (B, H, W); a path or PIL image gives (1, H, W) at the decoded image's size (EXIF rotation
        applied, as ``diqa score --maps`` writes it); a list of paths or images gives a list of
        (H_i, W_i) maps. No gradients flow to the inputs."""
        from diqa_cli.maps.compute import quality_maps, resize_maps

        if self.is_video:
            raise UsageError(f"{self.spec.name} scores videos: write its frame maps with score_files(..., maps=DIR)")
        if isinstance(inputs, torch.Tensor):
            pixels = inputs[None] if inputs.ndim == 3 else inputs
            self._check_pixels(pixels)
            size = tuple(pixels.shape[-2:])
            scores, maps = quality_maps(self.model, self._model_input(pixels.detach()))
            maps = resize_maps(maps, size)
            return (scores.float() if raw else self.reported(scores.float())), maps.cpu()
        from PIL import Image

        single = isinstance(inputs, (str, os.PathLike, Image.Image))
        entries = [inputs] if single else list(inputs)
        if not entries:
            raise UsageError("nothing to map: an empty list")
        scores, maps = [], []
        for entry in entries:
            array, size = self._map_input(entry)
            score, grid = quality_maps(self.model, torch.from_numpy(array)[None].to(self.device, self.dtype))
            scores.append(float(score[0]))
            maps.append(resize_maps(grid, size)[0].cpu())
        scores = torch.tensor(scores, dtype=torch.float32)
        scores = scores if raw else self.reported(scores)
        return scores, (maps[0][None] if single else maps)

    def _map_input(self, entry):
        """A path or PIL image -> (the model's (3, R, R) input as ``diqa score`` makes it, the
        image's (H, W) after EXIF rotation)."""
        from PIL import Image, ImageOps

        from diqa_cli.imageio import load_image, pil_for_model, resize_for_model

        if isinstance(entry, Image.Image):
            width, height = ImageOps.exif_transpose(entry).size
            return pil_for_model(entry, self.resolution, resample=self.resample), (height, width)
        if isinstance(entry, (str, os.PathLike)):
            image = load_image(os.fspath(entry))
            return resize_for_model(image, self.resolution, resample=self.resample), image.shape[:2]
        raise UsageError(f"cannot map a {type(entry).__name__}: pass a tensor, a path or a PIL image")

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise UsageError(f"{self.spec.name}: expected an RGB tensor (B, 3, H, W) or (3, H, W), got {tuple(pixels.shape)}")
        if not pixels.is_floating_point():
            raise UsageError(f"{self.spec.name}: expected float pixels in [0, 1], got {pixels.dtype}")

    def _model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the model's (B, 3, R, R) on its device, resized in torch with
        the method's filter (antialiased) as a tensor call does."""
        size = self.resolution
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels.float(), size=(size, size), mode=self.resample, antialias=True, align_corners=False)
            pixels = pixels.clamp(0, 1)  # bicubic overshoots at sharp edges, as the file path clips
        return pixels.to(self.device, self.dtype)

    def reported(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw model outputs on the head's reported scale (``raw * scale + offset``)."""
        return raw * self.normalisation["scale"] + self.normalisation["offset"]

    def _image_tensor(self, pixels: torch.Tensor, raw: bool) -> torch.Tensor:
        if pixels.ndim == 3:
            pixels = pixels[None]
        self._check_pixels(pixels)
        out = self.model(self._model_input(pixels)).float()
        return out if raw else self.reported(out)

    def _video_tensor(self, frames: torch.Tensor, timestamps, raw: bool) -> torch.Tensor:
        from diqa_cli.pipelines.videos import score_frames

        if timestamps is None:
            raise UsageError(f"{self.spec.name}: scoring a frame tensor needs timestamps= (seconds, one per frame)")
        with torch.no_grad():
            row = score_frames(frames, timestamps, self.model, self.clip_encoder, normalisation=self.normalisation)
        return torch.tensor([row["raw_score" if raw else "score"]], dtype=torch.float32)

    def _files(self, inputs, raw: bool) -> torch.Tensor:
        from PIL import Image

        single = isinstance(inputs, (str, os.PathLike, Image.Image))
        entries = [inputs] if single else list(inputs)
        if not entries:
            raise UsageError("nothing to score: an empty list")
        scores: list[float | None] = [None] * len(entries)
        paths = [(i, os.fspath(e)) for i, e in enumerate(entries) if isinstance(e, (str, os.PathLike))]
        for i, entry in enumerate(entries):
            if isinstance(entry, Image.Image):
                if self.is_video:
                    raise UsageError(f"{self.spec.name} scores videos; pass video paths or a frame tensor")
                scores[i] = self._pil(entry, raw)
            elif not isinstance(entry, (str, os.PathLike)):
                raise UsageError(f"cannot score a {type(entry).__name__}: pass a tensor, a path or a PIL image")
        if paths:
            from diqa_cli.imageio import InputItem

            rows = self._rows([InputItem(path) for _, path in paths])
            for (i, path), row in zip(paths, rows):
                if row["status"] != "ok":
                    raise InputError(path, row["error"])
                scores[i] = row["raw_score" if raw else "score"]
        return torch.tensor(scores, dtype=torch.float32)

    def _pil(self, image, raw: bool) -> float:
        from diqa_cli.imageio import pil_for_model

        array = pil_for_model(image, self.resolution, resample=self.resample)
        out = self.model(torch.from_numpy(array)[None].to(self.device, self.dtype)).float()
        return float(out[0] if raw else self.reported(out)[0])

    # --- rows, as the CLI writes them -----------------------------------------------------------
    def score_files(
        self,
        paths: Iterable[str | os.PathLike],
        *,
        batch_size: int = 8,
        workers: int = 2,
        recursive: bool = False,
        max_pixels: int | None = None,
        fps_sub: float | None = None,
        max_frames: int | None = None,
        per_frame: bool = False,
        maps: str | os.PathLike | None = None,
    ) -> Iterator[dict[str, Any]]:
        """The rows ``diqa score`` (``diqa score-video`` for video methods) writes for ``paths``:
        files, folders (``recursive`` descends) and glob patterns, expanded and de-duplicated as on
        the command line; one row per input, error rows included, in order. ``maps`` (a folder)
        writes quality maps as ``--maps`` does, and ``ok`` rows name their overlay in ``map``."""
        from diqa_cli.imageio import expand_inputs

        video = {}
        if self.is_video:
            from diqa_cli.videoio import VIDEO_EXTENSIONS

            video = {"extensions": VIDEO_EXTENSIONS, "kind": "video"}
        items = expand_inputs([os.fspath(p) for p in paths], recursive=recursive, **video)
        writer = None
        if maps is not None:
            from diqa_cli.pipelines.maps import make_map_writer

            writer = make_map_writer(maps, self.model)
        return self._rows(items, batch_size=batch_size, workers=workers, max_pixels=max_pixels, fps_sub=fps_sub,
                          max_frames=max_frames, per_frame=per_frame, maps=writer)

    def _rows(self, items, *, batch_size: int = 8, workers: int = 2, max_pixels: int | None = None,
              fps_sub: float | None = None, max_frames: int | None = None, per_frame: bool = False, maps=None):
        context = {"checkpoint": self.checkpoint}
        if self.is_video:
            from diqa_cli.pipelines.videos import score_videos

            rows = score_videos(items, self.model, self.clip_encoder, normalisation=self.normalisation,
                                fps_sub=fps_sub, max_frames=max_frames, batch_size=batch_size, per_frame=per_frame,
                                maps=maps)
        else:
            from diqa_cli.pipelines.images import score_images

            rows = score_images(items, self.model, batch_size=batch_size, workers=workers,
                                normalisation=self.normalisation, max_pixels=max_pixels, maps=maps)
        for row in rows:
            yield {**row, **context}
