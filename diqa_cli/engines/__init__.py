"""Where scoring runs: ``local`` (this process) or ``ray`` (an actor pool on a Ray cluster).

Both engines run the same scorer, ``scoring.load_scorer`` + ``pipelines.images.score_images``; an engine
only decides where. Each has

* ``settings()``: the :class:`~diqa_cli.store.ScoreSettings` its scores come from (the score
  store keys reuse on them);
* ``score(items)``: one row per input item (``imageio.InputItem`` or path), in input order;
* ``close()`` (also a context manager).

This module never imports torch or ray at import time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diqa_cli.errors import UsageError

__all__ = ["ENGINES", "LocalEngine", "ScorerOptions", "open_engine"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class ScorerOptions:
    """What ``diqa score`` was asked for: enough to build the scorer anywhere (it is pickled to
    Ray actors) and to run it."""

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

    def load(self):
        """``(model, sidecar)`` as ``scoring.load_scorer`` builds them, weights channels-last
        (``scoring.to_channels_last``: faster convolutions, same scores)."""
        from diqa_cli.scoring import load_scorer, to_channels_last

        model, sidecar = load_scorer(
            self.method,
            backbone=self.backbone,
            checkpoint=self.checkpoint,
            device=self.device,
            dtype=self.dtype,
            offline=self.offline,
            seed=self.seed,
        )
        to_channels_last(model)
        return model, sidecar

    def settings(self, model, sidecar):
        from diqa_cli.store import checkpoint_file, settings_for

        return settings_for(model, sidecar, checkpoint_file(self.checkpoint, model.method_name))

    def score(self, items, model, sidecar):
        """Rows for ``items`` from a loaded scorer, in input order. ``auto`` batch size and
        compilation are resolved here, on the device that scores (a Ray actor's own GPU)."""
        from diqa_cli.batching import resolve_batch_size
        from diqa_cli.pipelines.images import score_images

        batch_size = resolve_batch_size(self.batch_size, model)
        if self.compile:
            from diqa_cli.compiling import compile_model

            compile_model(model, batch_size=batch_size)
        return score_images(
            items,
            model,
            batch_size=batch_size,
            workers=self.workers,
            normalisation=sidecar["score_normalisation"],
            max_pixels=self.max_pixels,
            maps=self.map_writer(model),
        )

    def map_writer(self, model):
        """The quality-map writer of ``--maps``, or None."""
        if self.maps is None:
            return None
        from diqa_cli.pipelines.maps import make_map_writer

        return make_map_writer(self.maps, model)


class LocalEngine:
    """The model loaded once in this process."""

    def __init__(self, options: ScorerOptions):
        self.options = options
        self.model, self.sidecar = options.load()
        self._maps = options.map_writer(self.model)

    def settings(self):
        return self.options.settings(self.model, self.sidecar)

    def score(self, items):
        return self.options.score(items, self.model, self.sidecar)

    def complete(self, row: dict) -> bool:
        """Finish a row this engine did not score (reused from a score database): with ``maps``,
        write its quality map. True when the row changed."""
        if self._maps is None:
            return False
        from diqa_cli.pipelines.maps import map_row

        return map_row(self.model, self._maps, row, max_pixels=self.options.max_pixels)

    def close(self) -> None:
        self.model = None

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_engine(name: str, options: ScorerOptions, *, ray_address: str | None = None, ray_actors: int | None = None) -> Any:
    """The engine called ``name`` (``--engine``), ready to score. ``ray_address`` (else
    ``RAY_ADDRESS``, else a new local instance) and ``ray_actors`` only concern ``ray``."""
    if name == "local":
        if ray_address is not None or ray_actors is not None:
            raise UsageError("--ray-address and --ray-actors need --engine ray")
        return LocalEngine(options)
    if name == "ray":
        if options.maps is not None:
            raise UsageError("--maps writes its files where diqa runs, so it needs --engine local (the default)")
        from diqa_cli.engines.ray_engine import RayEngine

        return RayEngine(options, address=ray_address, actors=ray_actors)
    raise UsageError(f"--engine {name!r} is not one of {', '.join(ENGINES)}")
