"""Where scoring runs: ``local`` (this process) or ``ray`` (an actor pool on a Ray cluster).

Both engines run the same :class:`Scorer` (``scoring.load_scorer`` + ``pipelines.images.score_images``,
or ``pipelines.videos.score_videos`` for a video method); an engine only decides where. Each has

* ``settings()``: the :class:`~diqa_cli.store.ScoreSettings` its scores come from, known without
  building the model (the score store keys reuse on them);
* ``score(items)``: one row per input item (``imageio.InputItem`` or path), in input order;
* ``close()`` (also a context manager).

This module never imports torch or ray at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diqa_cli.errors import UsageError

__all__ = ["ENGINES", "LocalEngine", "Scorer", "ScorerOptions", "open_engine"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ScorerOptions:
    """What ``diqa score`` or ``diqa score-video`` was asked for: enough to build the scorer
    anywhere (it is pickled to Ray actors) and to run it. The video fields concern video methods
    only."""

    method: str | None = None
    backbone: str | None = None
    checkpoint: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    offline: bool = False
    seed: int | None = None
    batch_size: int | str = 8  # or "auto": fit the device's free memory (``diqa_cli.batching``)
    workers: int = 2
    max_pixels: int | None = None
    maps: str | None = None  # folder for quality maps (``--maps``); local engine only
    compile: bool = False  # torch.compile the model before scoring (``diqa_cli.compiling``)
    fps_sub: float | None = None
    max_frames: int | None = None
    max_clips: int = 16
    decoder: str = "auto"
    per_frame: bool = False
    clip_encoder: str | None = None  # ``--slowfast``: the clip encoder's weights

    @property
    def video(self) -> bool:
        """Whether the method (named, else the checkpoint's) scores videos."""
        from diqa_cli.methods import get_method

        if self.method is None and self.checkpoint is None:
            return False
        if self.method is None:
            from diqa_cli.checkpoint import read_sidecar

            return get_method(read_sidecar(self.checkpoint)["method"]).input_kind == "video"
        return get_method(self.method).input_kind == "video"

    def video_settings(self) -> dict:
        """What a video's score depends on besides the head: the frames and clips chosen, and the
        clip encoder when ``--slowfast`` replaces the head's own (a file by its SHA-256)."""
        if not self.video:
            return {}
        chosen = {"fps_sub": self.fps_sub, "max_frames": self.max_frames, "max_clips": self.max_clips}
        if self.clip_encoder is not None:
            import os

            from diqa_cli.files import file_sha256

            given = os.path.expanduser(self.clip_encoder)
            chosen["clip_encoder"] = file_sha256(given) if os.path.isfile(given) else self.clip_encoder
        return chosen

    def settings(self):
        """The :class:`~diqa_cli.store.ScoreSettings` of the scorer these options build, without
        building it (``scoring.scorer_settings``)."""
        from diqa_cli.scoring import scorer_settings

        return scorer_settings(
            self.method, backbone=self.backbone, checkpoint=self.checkpoint, device=self.device, dtype=self.dtype,
            offline=self.offline, seed=self.seed, video=self.video_settings(),
        )

    def load(self) -> Scorer:
        """The scorer, built (``scoring.load_scorer``; a video method's clip encoder too)."""
        return Scorer(self)


class Scorer:
    """A built scorer: ``model``, ``sidecar``, a video method's clip ``encoder``, the quality-map
    writer of ``--maps`` and the ``batch_size`` (``--batch-size auto`` resolved on the device that
    scores, a Ray actor's own GPU; with ``--compile`` the model is compiled for it);
    ``score(items)`` gives rows in input order."""

    def __init__(self, options: ScorerOptions):
        from diqa_cli.batching import resolve_batch_size
        from diqa_cli.scoring import load_scorer

        self.options = options
        self.model, self.sidecar = load_scorer(
            options.method, backbone=options.backbone, checkpoint=options.checkpoint, device=options.device,
            dtype=options.dtype, offline=options.offline, seed=options.seed,
        )
        self.batch_size = resolve_batch_size(options.batch_size, self.model)
        if options.compile:
            from diqa_cli.compiling import compile_model

            compile_model(self.model, batch_size=self.batch_size)
        self.encoder = None
        if self.model.spec.input_kind == "video":
            from pathlib import Path

            # A checkpoint's own relative clip-encoder path is relative to the checkpoint, not the shell.
            where = Path(options.checkpoint).parent if options.checkpoint is not None else None
            self.encoder = self.model.load_clip_encoder(options.clip_encoder, relative_to=where, offline=options.offline)
        self.maps = None
        if options.maps is not None:
            from diqa_cli.pipelines.maps import make_map_writer

            self.maps = make_map_writer(options.maps, self.model)

    def score(self, items, *, per_frame: bool | None = None):
        """Rows for ``items``, in input order. ``per_frame`` overrides the options' (a score store
        keeps every video's frame scores, whether or not they are printed)."""
        o = self.options
        normalisation = self.sidecar["score_normalisation"]
        if self.encoder is None:
            from diqa_cli.pipelines.images import score_images

            return score_images(items, self.model, batch_size=self.batch_size, workers=o.workers,
                                normalisation=normalisation, max_pixels=o.max_pixels, maps=self.maps)
        from diqa_cli.pipelines.videos import score_videos

        return score_videos(
            items, self.model, self.encoder, normalisation=normalisation, fps_sub=o.fps_sub, max_frames=o.max_frames,
            max_clips=o.max_clips, decoder=o.decoder, batch_size=self.batch_size,
            per_frame=o.per_frame if per_frame is None else per_frame, maps=self.maps,
        )

    def complete(self, row: dict) -> bool:
        """Finish a row this scorer did not score (reused from a score database): with ``--maps``,
        write its quality map. True when the row changed."""
        if self.maps is None or row.get("status") != "ok":
            return False
        if self.encoder is None:
            from diqa_cli.pipelines.maps import map_row

            return map_row(self.model, self.maps, row, max_pixels=self.options.max_pixels)
        # A video's maps come from its frames, which are decoded again: scoring it once more gives
        # the same score (scoring is deterministic) and writes them.
        fresh = next(iter(self.score([row["path"]], per_frame=True)))
        if fresh["status"] != "ok":
            return False
        row["map"] = fresh.get("map")
        if "per_frame" in row:
            row["per_frame"] = fresh["per_frame"]
        return True


class LocalEngine:
    """The scorer in this process. With ``lazy``, it is built when the first row must be
    scored (or a reused row completed): a score-store run that finds every input already scored
    loads no model at all."""

    def __init__(self, options: ScorerOptions, *, lazy: bool = False):
        self.options = options
        self._scorer = None if lazy else options.load()
        self._closed = False

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._scorer = self.options.load()
        return self._scorer

    def settings(self):
        return self.options.settings()

    def score(self, items):
        items = iter(items)
        first = next(items, _NOTHING)  # pulling plans the store's lookups; a model only if something is new
        if first is _NOTHING:
            return
        yield from self.scorer.score(_chain(first, items))

    def complete(self, row: dict) -> bool:
        if self.options.maps is None:
            return False
        return self.scorer.complete(row)

    def close(self) -> None:
        self._scorer = None
        self._closed = True

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NOTHING = object()


def _chain(first, rest):
    yield first
    yield from rest


def open_engine(name: str, options: ScorerOptions, *, ray_address: str | None = None, ray_actors: int | None = None,
                lazy: bool = False) -> Any:
    """The engine called ``name`` (``--engine``), ready to score. ``ray_address`` (else
    ``RAY_ADDRESS``, else a new local instance) and ``ray_actors`` only concern ``ray``; ``lazy``
    (a score-store run) builds the local scorer only when something needs scoring."""
    if name == "local":
        if ray_address is not None or ray_actors is not None:
            raise UsageError("--ray-address and --ray-actors need --engine ray")
        return LocalEngine(options, lazy=lazy)
    if name == "ray":
        if options.maps is not None:
            raise UsageError("--maps writes its files where diqa runs, so it needs --engine local (the default)")
        from diqa_cli.engines.ray_engine import RayEngine

        return RayEngine(options, address=ray_address, actors=ray_actors)
    raise UsageError(f"--engine {name!r} is not one of {', '.join(ENGINES)}")
