"""Scoring on a Ray cluster: Ray Data's ``map_batches`` over an actor pool, one model per actor.

Each actor builds the scorer once (``ScorerOptions.load``: ``scoring.load_scorer``, and a video
method's clip encoder) and runs it on its batches (``pipelines.images.score_images`` or
``pipelines.videos.score_videos``), so scores, error rows and their reasons are exactly the
single-process ones. Actors get one GPU each when the cluster has GPUs (``num_gpus=1``), else
they are CPU actors sharing the cluster's CPUs. Image paths must be readable at the same path on
every node (shared storage); only paths travel, never pixels.

Ray is optional (``pip install 'diqa-cli[ray]'``) and imported only when this engine is used.
Worker output is not forwarded to the driver (``log_to_driver=False``), so nothing a worker
prints can reach diqa's stdout.

Python use::

    import ray
    from diqa_cli.engines import ScorerOptions
    from diqa_cli.engines.ray_engine import score_dataset

    ds = ray.data.from_items([{"path": p} for p in paths])
    rows = score_dataset(ds, ScorerOptions(method="dpiqa"))  # a lazy Dataset
    rows.write_parquet("scores/")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from diqa_cli.errors import DiqaError, UsageError

__all__ = ["INSTALL_HINT", "RayEngine", "connect", "import_ray", "score_dataset", "ROW_COLUMNS", "VIDEO_COLUMNS"]

INSTALL_HINT = "pip install 'diqa-cli[ray]'"
# Ray decides at import which address its servers listen on. With this switched off (what Ray
# does on macOS and Windows) that is the loopback address, so a local instance started by diqa
# cannot be reached from the network.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
ROW_COLUMNS = ("path", "score", "raw_score", "status", "error", "method", "backbone", "seconds")
# A video row's own columns (``score_videos``); its per-frame list travels as JSON text.
VIDEO_COLUMNS = ("frames_sampled", "frames_decoded", "frames_lost", "decoder", "duration", "clips", "per_frame")
_COLUMN_TYPES = {
    "score": "float64", "raw_score": "float64", "seconds": "float64", "duration": "float64",
    "frames_sampled": "int64", "frames_decoded": "int64", "frames_lost": "int64", "clips": "int64",
}
_INPUT_ERROR = "input_error"  # a reason known before decoding (e.g. a glob matching nothing)


def import_ray():
    """The ``ray`` module with Ray Data, or a usage error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the extra installs it; plain `ray` lacks it
    except ImportError as exc:
        raise UsageError(
            f"--engine ray needs Ray Data, which is not installed here ({exc}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; True when a new local instance was started (then
    ``ray.shutdown()`` stops it).

    * Ray already initialised in this process: used as it is.
    * ``address``, else ``RAY_ADDRESS``: that cluster (``auto`` for the one ``ray start`` runs
      on this machine, ``ray://head:10001`` for Ray Client).
    * Otherwise a new instance on this machine with ``num_cpus`` CPUs (default: all), listening
      on 127.0.0.1 only, without the dashboard.
    """
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None and "ray" not in sys.modules:
        os.environ.setdefault(_LOCAL_ONLY_ENV, "0")
    ray = import_ray()
    if ray.is_initialized():
        return False
    _drop_token_notice()
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if target is not None:
            ray.init(address=target, **quiet)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **quiet)
    except ConnectionError as exc:
        raise DiqaError(
            f"cannot reach the Ray cluster at {target!r}: {exc}; check --ray-address / RAY_ADDRESS"
        ) from None
    return True


def _drop_token_notice() -> None:
    """Ray 2.5x logs a WARNING on every start that token authentication is *on* (the safe
    default); it tells a diqa user nothing, so it is dropped. The warning Ray gives when
    authentication is *off* still shows. (Ray Data's own "constructor arguments in the object
    store" line from core_worker.cc is C++ logging, out of reach here: ray-project/ray#57733.)"""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _TokenNoticeFilter) for f in logger.filters):
        logger.addFilter(_TokenNoticeFilter())


class _TokenNoticeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def _pool_shape(ray, options, actors: int | None) -> tuple[Any, int, dict[str, float]]:
    """``(options with the actors' device, actor count, resources per actor)``.

    GPU actors when the cluster has GPUs and ``--device`` is auto or cuda: one per GPU by
    default. Otherwise CPU actors, by default one per 4 CPUs, the CPUs shared out among them
    (a torch CPU model uses several threads; one actor per CPU would hold that many model
    copies in memory).
    """
    device = options.device.strip().lower()
    if device.startswith("cuda:"):
        raise UsageError(f"--device {options.device}: with --engine ray each actor gets its own GPU; use --device cuda or auto")
    if device not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--device {options.device} is not available with --engine ray; use auto, cuda or cpu")
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device == "cuda" and gpus == 0:
        raise UsageError("--device cuda: the Ray cluster has no GPUs; use --device cpu or auto")
    if actors is not None and actors < 1:
        raise UsageError(f"--ray-actors must be at least 1, got {actors}")
    if gpus and device != "cpu":
        return dataclasses.replace(options, device="cuda"), actors or gpus, {"num_gpus": 1, "num_cpus": 1}
    count = actors or max(1, cpus // 4)
    return dataclasses.replace(options, device="cpu"), count, {"num_cpus": max(1, cpus // count)}


class _ScoringActor:
    """One model per actor; each call scores one batch of paths with ``score_images``."""

    def __init__(self, options, path_column: str):
        self.options = options
        self.path_column = path_column
        self.scorer = options.load()
        self.columns = (*ROW_COLUMNS, *VIDEO_COLUMNS, self.scorer.model.clip_encoder_column) if options.video else ROW_COLUMNS

    def __call__(self, batch):
        import pyarrow as pa

        from diqa_cli.imageio import InputItem

        if self.path_column not in batch.column_names:
            raise UsageError(
                f"the dataset has no {self.path_column!r} column (it has {', '.join(batch.column_names)}); "
                f"build it as ray.data.from_items([{{'path': p}} for p in paths]) or pass path_column="
            )
        paths = [str(p) for p in batch.column(self.path_column).to_pylist()]
        known = batch.column(_INPUT_ERROR).to_pylist() if _INPUT_ERROR in batch.column_names else [None] * len(paths)
        items = [InputItem(path, error or None) for path, error in zip(paths, known, strict=True)]
        rows = list(self.scorer.score(items))
        for row in rows:
            if row.get("per_frame") is not None:
                row["per_frame"] = json.dumps(row["per_frame"])
        return pa.table({
            c: pa.array([row.get(c) for row in rows], type=getattr(pa, _COLUMN_TYPES.get(c, "string"))())
            for c in self.columns
        })


def score_dataset(ds, options, *, actors: int | None = None, path_column: str = "path", rows_per_call: int | None = None):
    """Score a Ray Dataset of image or video paths (column ``path_column``); returns a lazy Dataset
    with the columns of :data:`ROW_COLUMNS` (a video method's: and :data:`VIDEO_COLUMNS`, per-frame
    scores as JSON text, and the clip encoder's), one row per input (error rows included).

    ``options`` is a :class:`~diqa_cli.engines.ScorerOptions`. Ray is initialised with
    :func:`connect` if it is not already. Rows come in the input's order only when the
    dataset's ``DataContext.execution_options.preserve_order`` is set.
    """
    ray = import_ray()
    connect()
    options, count, resources = _pool_shape(ray, options, actors)
    return ds.map_batches(
        _ScoringActor,
        fn_constructor_kwargs={"options": options, "path_column": path_column},
        # With --batch-size auto each actor sizes its own batches; 64 paths per call then.
        batch_size=rows_per_call or (max(4 * options.batch_size, 16) if isinstance(options.batch_size, int) else 64),
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=count),
        **resources,
    )


def _probe(options):
    """The settings an actor's scorer has (it runs where an actor would, with its resources: the
    device there decides the dtype)."""
    return options.settings()


class RayEngine:
    """``--engine ray``: the ``diqa_cli.engines`` interface over :func:`score_dataset`.

    ``actors`` and ``resources`` (per actor) tell the pool's shape once connected.
    """

    def __init__(self, options, *, address: str | None = None, actors: int | None = None, num_cpus: int | None = None):
        self._started = connect(address, num_cpus=num_cpus)
        ray = import_ray()
        try:
            self.options, self.actors, self.resources = _pool_shape(ray, options, actors)
        except BaseException:
            self.close()
            raise
        self._settings = None

    def settings(self):
        """Loaded once in a short-lived task with an actor's resources: the driver may have no
        GPU, and the actors' device decides the dtype. ``max_calls=1`` ends the worker after,
        so its GPU memory goes back before the actors start."""
        if self._settings is None:
            ray = import_ray()
            probe = ray.remote(max_calls=1, **self.resources)(_probe)
            self._settings = _unwrap(ray, lambda: ray.get(probe.remote(self.options)))
        return self._settings

    def score(self, items: Iterable) -> Iterator[dict]:
        """Rows for ``items``, in input order, as the actors finish them."""
        ray = import_ray()
        from ray.data import DataContext

        from diqa_cli.imageio import InputItem

        records = []
        for item in items:
            item = item if isinstance(item, InputItem) else InputItem(str(item))
            records.append({"path": str(item.path), _INPUT_ERROR: item.error})
        if not records:
            return
        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # rows in input order, as `local` gives
        context.enable_progress_bars = False  # diqa's own bar is on stderr
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # no per-run INFO lines
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
        ds = ray.data.from_items(records)
        rows = score_dataset(ds, self.options, actors=self.actors)
        batches = iter(rows.iter_batches(batch_size=None, batch_format="pyarrow"))
        while True:
            batch = _unwrap(ray, lambda: next(batches, None))
            if batch is None:
                return
            for row in batch.to_pylist():
                if isinstance(row.get("per_frame"), str):
                    row["per_frame"] = json.loads(row["per_frame"])
                elif "per_frame" in row and not self.options.per_frame:
                    del row["per_frame"]
                yield row

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unwrap(ray, call):
    """Run ``call``; a diqa error raised inside a Ray task or actor comes out as itself (one
    line, its exit code), any other failure of Ray's as a one-line fatal error."""
    try:
        return call()
    except Exception as exc:
        from_ray = isinstance(exc, ray.exceptions.RayError) or type(exc).__module__.startswith("ray.")
        cause: BaseException | None = exc
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            # Ray re-raises a task's exception as a subclass of both RayTaskError and the
            # original class, whose message holds the remote traceback; ``.cause`` is the original.
            if isinstance(cause, DiqaError) and not isinstance(cause, ray.exceptions.RayError):
                raise cause from None
            cause = getattr(cause, "cause", None) or cause.__cause__
        if not from_ray:
            raise
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        raise DiqaError(f"Ray scoring failed: {lines[-1] if lines else type(exc).__name__}") from None
