"""Training sets for ``diqa train`` / ``distill``: label rows turned into model inputs.

Every set has ``rows`` (the label rows it kept), ``failed`` ({path: reason} of inputs that could
not be read, each reported once and left out), ``len()`` and ``batch(indices) -> (inputs, kept
indices)``, the interface of the training loop.

* :class:`ImageSet`: images decoded and resized exactly as scoring does, held in memory as
  float16 when they fit in :data:`PRELOAD_BYTES`, else decoded per batch.
* :class:`FeatureSet`: frozen features of a :class:`~diqa_cli.models.base.CachedFeatures` model,
  computed once per image.
* :class:`VideoSet`: videos for a :class:`~diqa_cli.models.base.VideoQualityModel`; clip-encoder
  features computed once per video, frames decoded again for each batch (memory stays bounded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diqa_cli.errors import InputError
from diqa_cli.pipelines.rows import tree_cat, tree_map

__all__ = ["PRELOAD_BYTES", "FeatureSet", "ImageSet", "Log", "VideoBatch", "VideoSet", "quiet"]

# Above this many bytes of float16 pixels a training set is decoded per batch instead of held.
PRELOAD_BYTES = 4 * 1024**3

# A training log: one line for a person at a time (the CLI prints them on stderr).
Log = Callable[[str], None]


def quiet(_: str) -> None:
    """The log that says nothing (the library's default)."""
    return None


class ImageSet:
    """The images of some label rows at one resolution and resize filter."""

    def __init__(self, rows: list, resolution: int, *, resample: str, workers: int = 2, log: Log = quiet):
        self.resolution = resolution
        self.resample = resample
        self.workers = max(1, workers)
        self.log = log
        self.failed: dict[Path, str] = {}
        if len(rows) * 3 * resolution * resolution * 2 <= PRELOAD_BYTES:
            pixels = self._decode(rows)
            self.rows = [r for r in rows if r.path not in self.failed]
            self.pixels = [pixels[r.path].half() for r in self.rows]
        else:
            self.rows = list(rows)
            self.pixels = None

    def _decode(self, rows: list) -> dict:
        """Decode and resize as the scoring pipeline does (same reader, same resize)."""
        import torch

        from diqa_cli.imageio import InputItem, iter_images

        decoded = {}
        by_text = {str(r.path): r.path for r in rows}
        items = [InputItem(text) for text in by_text]
        for item, array, reason in iter_images(
            items, self.resolution, workers=self.workers, prefetch=4 * self.workers, resample=self.resample
        ):
            path = by_text[item.path]
            if array is None:
                if path not in self.failed:
                    self.failed[path] = reason
                    self.log(f"diqa: skipping {path}: {reason}")
            else:
                decoded[path] = torch.from_numpy(array)
        return decoded

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices):
        """(pixels float32 (b, 3, R, R), indices of the rows that decoded)."""
        import torch

        if self.pixels is not None:
            return torch.stack([self.pixels[i] for i in indices]).float(), list(indices)
        chosen = [self.rows[i] for i in indices]
        decoded = self._decode(chosen)
        kept = [i for i, r in zip(indices, chosen) if r.path in decoded]
        if not kept:
            return None, []
        return torch.stack([decoded[self.rows[i].path] for i in kept]).float(), kept


class FeatureSet:
    """Frozen features of every readable image of ``images``, computed once with
    ``model.extract_features`` (a :class:`~diqa_cli.models.base.CachedFeatures` model)."""

    def __init__(self, model, images: ImageSet, batch_size: int, log: Log = quiet):
        model.eval()
        features, self.rows = [], []
        for start in range(0, len(images), batch_size):
            pixels, kept = images.batch(list(range(start, min(start + batch_size, len(images)))))
            if not kept:
                continue
            # No autocast here: the method runs its frozen features in its own precision.
            extracted = model.extract_features(pixels.to(model.device, model.dtype))
            features.append(tree_map(lambda t: t.detach().float(), extracted))
            self.rows.extend(images.rows[i] for i in kept)
        self.features = tree_cat(features)
        self.failed = images.failed
        log(f"diqa: features computed once for {len(self.rows)} images")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices):
        import torch

        index = torch.tensor(indices)
        return tree_map(lambda t: t.index_select(0, index.to(t.device)), self.features), list(indices)


@dataclass
class VideoBatch:
    """A training batch of videos: per video its frames (F_i, 3, R, R) and its clip-encoder
    features (a tuple of (N_i, D_k)); videos differ in length."""

    frames: list
    clip_features: list

    def to(self, device=None, dtype=None) -> VideoBatch:
        """Frames to ``device`` / ``dtype``; features to ``device`` (kept float32)."""
        return VideoBatch(
            [f.to(device=device, dtype=dtype) for f in self.frames],
            [tuple(t.to(device=device) for t in features) for features in self.clip_features],
        )

    def __len__(self) -> int:
        return len(self.frames)


class VideoSet:
    """Label rows of videos for a video model and its clip ``encoder``; the encoder's features are
    computed once per video, frames (the spec's ``training_frames_per_video`` by default) are decoded
    again for each batch."""

    def __init__(self, rows: list, model, encoder, *, fps_sub: float | None = None, max_frames: int | None = None,
                 max_clips: int = 16, decoder: str = "auto", log: Log = quiet):
        from diqa_cli.pipelines.videos import default_frames, load_video_input

        self._load = load_video_input
        self.model, self.encoder, self.log = model, encoder, log
        if fps_sub is None and max_frames is None:
            max_frames = default_frames(model, training=True)
        self.options = {"fps_sub": fps_sub, "max_frames": max_frames, "max_clips": max_clips, "decoder": decoder}
        self.failed: dict = {}
        self.rows, self.features = [], []
        for row in rows:
            try:
                video = load_video_input(str(row.path), model, encoder, **self.options)
            except InputError as exc:
                self.failed[row.path] = exc.reason
                log(f"diqa: skipping {row.path}: {exc.reason}")
                continue
            self.rows.append(row)
            self.features.append(video.clip_features)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices) -> tuple[VideoBatch | None, list[int]]:
        frames, features, kept = [], [], []
        for i in indices:
            try:  # frames only: the clip features were computed once, above
                video = self._load(str(self.rows[i].path), self.model, None, **self.options)
            except InputError as exc:
                self.log(f"diqa: skipping {self.rows[i].path} in this batch: {exc.reason}")
                continue
            frames.append(video.frames)
            features.append(self.features[i])
            kept.append(i)
        return (VideoBatch(frames, features) if kept else None), kept
