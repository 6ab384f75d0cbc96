"""Training, distillation and evaluation of quality heads on a labels CSV; SRCC / PLCC / KRCC.

A labels CSV has the columns ``path`` and ``mos`` and optionally ``split`` (``train`` / ``test`` /
anything else); relative paths are resolved against the CSV's folder. The paths are images, or
videos for a video method (GenzVQA, whose SlowFast features are computed once per video).

What diqa does the same for every method, and where that departs from the released code:

* MOS is mapped to [0, 1] with the training split's minimum and range (``offset``, ``scale``),
  recorded in the sidecar; reported scores are ``raw * scale + offset``, back on the MOS scale.
  DP-IQA's released code divides MOS by 100 by hand; GenzIQA's trains on raw MOS. An affine map
  does not change rankings, but it does change the loss scale the learning rate meets.
* One optimiser, AdamW, with per-method defaults from the released code (:data:`TRAINING_DEFAULTS`;
  AdamW with weight decay 0 is exactly the Adam DP-IQA uses). The learning rate is constant:
  DP-IQA's MultiStepLR milestones are per dataset, and a user can run again with ``--init``.
* Seeded: parameter initialisation, batch order and any noise a method draws come from ``seed``,
  recorded in the sidecar; on the CPU the same command gives the same head, tensor for tensor. On
  CUDA it does not quite: some backward kernels (bicubic upsampling's, among others) add with
  atomics in no fixed order (measured on an H200: weights 0.02 apart after 2 epochs of DP-IQA).
* On half precision (``--dtype fp16|bf16``) the trainable parameters are kept in float32 and the
  forward pass runs under autocast, with a gradient scaler for fp16, as DP-IQA's released training.
* No model selection on the test split (DP-IQA's released code keeps the epoch with the best test
  correlation); the head after the last epoch is saved.
* Images are decoded once and, when the set fits in :data:`PRELOAD_BYTES`, kept in memory as
  float16 at the model's resolution; larger sets are decoded batch by batch.
* Methods whose frozen features do not depend on trainable parameters expose
  ``extract_features(pixels)`` and ``head_forward(features)`` (LGDM): their features are computed
  once per image and the head is trained on them, which costs one feature pass per image instead
  of one per epoch.

Metrics: SRCC, PLCC and KRCC from :mod:`scipy.stats`; PLCC is computed on the scores as they
are, without the 4-parameter logistic fit some papers apply first, as DP-IQA's released
``metrics.py`` does.
"""

from __future__ import annotations

import csv
import datetime
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from diqa_cli.errors import UsageError

__all__ = [
    "LabelRow",
    "TrainingDefaults",
    "TRAINING_DEFAULTS",
    "read_labels",
    "select_split",
    "correlations",
    "train",
    "distill",
    "evaluate",
]

# Above this many bytes of float16 pixels a training set is decoded per batch instead of held.
PRELOAD_BYTES = 4 * 1024**3

Log = Callable[[str], None]


@dataclass(frozen=True)
class LabelRow:
    path: Path
    mos: float
    split: str | None


@dataclass(frozen=True)
class TrainingDefaults:
    """Optimiser settings a method trains with when the user names none."""

    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    grad_clip: float | None
    source: str  # where the numbers come from


TRAINING_DEFAULTS: dict[str, TrainingDefaults] = {
    "dpiqa": TrainingDefaults(1e-5, 0.0, 16, 30, None, "DP-IQA train_dpiqa.py / build.py: Adam 1e-5, batch 16, 30 epochs"),
    "dpiqa-student": TrainingDefaults(1e-4, 0.0, 24, 30, None, "DP-IQA train_student.py: Adam 1e-4, batch 24, 30 epochs"),
    "genziqa": TrainingDefaults(1e-4, 1e-2, 16, 10, 1.0, "GenzIQA: AdamW 1e-4, wd 1e-2, grad-clip 1.0, batch 16, 10 epochs"),
    "genzvqa": TrainingDefaults(1e-4, 1e-2, 16, 6, 1.0, "GenzVQA: AdamW 1e-4, wd 1e-2, grad-clip 1.0, batch 16, 6 epochs"),
    # No released code: diqa's choice for a small regressor on frozen hyperfeatures.
    "lgdm": TrainingDefaults(1e-3, 1e-4, 32, 50, 1.0, "diqa's choice (LGDM has no released code)"),
}
_FALLBACK_DEFAULTS = TrainingDefaults(1e-4, 0.0, 16, 10, None, "diqa's generic default")


# --- labels ----------------------------------------------------------------------------------


def read_labels(csv_path: str | Path) -> list[LabelRow]:
    """Rows of a labels CSV (``path``, ``mos``, optional ``split``), paths resolved against its folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"labels file {csv_path} does not exist (expected a CSV with columns path,mos[,split])")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "mos") if c not in columns]
        if missing:
            found = ", ".join(columns) if columns else "none"
            raise UsageError(
                f"{csv_path}: missing column(s) {', '.join(missing)} (found: {found}); "
                "a labels CSV needs a header with path and mos, and may have split"
            )
        reader.fieldnames = columns
        has_split = "split" in columns
        rows = []
        for line, record in enumerate(reader, start=2):
            path_text = (record.get("path") or "").strip()
            mos_text = (record.get("mos") or "").strip()
            if not path_text:
                raise UsageError(f"{csv_path}, line {line}: empty path")
            try:
                mos = float(mos_text)
            except ValueError:
                raise UsageError(f"{csv_path}, line {line}: mos {mos_text!r} is not a number") from None
            if not math.isfinite(mos):
                raise UsageError(f"{csv_path}, line {line}: mos {mos_text!r} is not a finite number")
            path = Path(path_text).expanduser()
            if not path.is_absolute():
                path = csv_path.parent / path
            split = (record.get("split") or "").strip() or None if has_split else None
            rows.append(LabelRow(path, mos, split))
    if not rows:
        raise UsageError(f"{csv_path}: no rows under the header")
    return rows


def select_split(rows: list[LabelRow], split: str | None, *, source: str | Path = "labels") -> list[LabelRow]:
    """Rows of one split; ``None`` or ``"all"`` keeps every row."""
    if split in (None, "all"):
        return list(rows)
    chosen = [r for r in rows if r.split == split]
    if not chosen:
        present = sorted({r.split for r in rows if r.split})
        have = ", ".join(present) if present else "no split column"
        raise UsageError(f"{source}: no rows in split {split!r} (present: {have}); use --split all for every row")
    return chosen


def _default_split(rows: list[LabelRow], wanted: str) -> str | None:
    return wanted if any(r.split for r in rows) else None


# --- metrics ---------------------------------------------------------------------------------


def correlations(predicted, target) -> dict[str, float]:
    """SRCC, PLCC (no logistic fit) and KRCC between predictions and labels."""
    import numpy as np
    from scipy import stats

    predicted = np.asarray(predicted, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if len(predicted) < 2 or np.ptp(predicted) == 0 or np.ptp(target) == 0:
        # Correlation is undefined for fewer than two points or a constant side.
        return {"srcc": float("nan"), "plcc": float("nan"), "krcc": float("nan")}
    return {
        "srcc": float(stats.spearmanr(predicted, target)[0]),
        "plcc": float(stats.pearsonr(predicted, target)[0]),
        "krcc": float(stats.kendalltau(predicted, target)[0]),
    }


# --- images ----------------------------------------------------------------------------------


class _ImageSet:
    """The images of some label rows at one resolution: held in memory as float16 when they fit,
    else decoded per batch. Inputs that cannot be decoded are reported once and left out."""

    def __init__(self, rows: list[LabelRow], resolution: int, *, workers: int, log: Log):
        self.resolution = resolution
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

    def _decode(self, rows: list[LabelRow]) -> dict:
        """Decode and resize as the scoring pipeline does (same reader, same resize)."""
        import torch

        from diqa_cli.imageio import InputItem, iter_images

        decoded = {}
        by_text = {str(r.path): r.path for r in rows}
        items = [InputItem(text) for text in by_text]
        for item, array, reason in iter_images(items, self.resolution, workers=self.workers, prefetch=4 * self.workers):
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


# --- training --------------------------------------------------------------------------------


def _quiet(_: str) -> None:
    return None


def _build(method: str, backbone, config: dict | str | None, seed: int):
    """The model of ``method`` on ``backbone``, parameters initialised from ``seed``."""
    import torch

    from diqa_cli.methods import get_method, load_model_class

    cls = load_model_class(get_method(method))
    if config == "tiny":
        config = cls.tiny_config()
    with torch.random.fork_rng(devices=_rng_devices(backbone.device) if backbone is not None else []):
        torch.manual_seed(seed)
        return cls(backbone, **dict(config or {}))


def _rng_devices(device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def _normalisation(rows: list[LabelRow], source) -> dict[str, float]:
    values = [r.mos for r in rows]
    low, high = min(values), max(values)
    if high == low:
        raise UsageError(f"{source}: every training MOS is {low}; training needs labels that differ")
    return {"offset": low, "scale": high - low}


def _settings(method: str, *, epochs, batch_size, lr, weight_decay, grad_clip) -> TrainingDefaults:
    base = TRAINING_DEFAULTS.get(method, _FALLBACK_DEFAULTS)
    chosen = TrainingDefaults(
        lr=base.lr if lr is None else float(lr),
        weight_decay=base.weight_decay if weight_decay is None else float(weight_decay),
        batch_size=base.batch_size if batch_size is None else int(batch_size),
        epochs=base.epochs if epochs is None else int(epochs),
        grad_clip=base.grad_clip if grad_clip is None else (float(grad_clip) or None),
        source=base.source,
    )
    if chosen.epochs < 1 or chosen.batch_size < 1 or not chosen.lr > 0:
        raise UsageError(
            f"epochs and batch size must be at least 1 and lr positive (got epochs={chosen.epochs}, "
            f"batch size={chosen.batch_size}, lr={chosen.lr})"
        )
    return chosen


class _Optimiser:
    """AdamW over the named trainable parameters (kept in float32), with autocast and a gradient
    scaler when the backbone runs in half precision."""

    def __init__(self, model, settings: TrainingDefaults):
        import torch

        device, dtype = model.device, model.dtype  # before trainable parameters become float32
        names = set(model.trainable_parameter_names())
        self.params = []
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)  # no gradients computed for what stays frozen
            if name in names:
                if p.dtype != torch.float32:
                    p.data = p.data.float()
                self.params.append(p)
        if not self.params:
            raise UsageError(f"method {model.method_name!r} has no trainable parameters")
        self.optimiser = torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.grad_clip = settings.grad_clip
        self.autocast_dtype = dtype if dtype in (torch.float16, torch.bfloat16) else None
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def autocast(self):
        import contextlib

        import torch

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def step(self, loss) -> None:
        import torch

        self.optimiser.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimiser)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimiser)
            self.scaler.update()
        else:
            self.optimiser.step()


def _fit(model, data, normalisation, settings: TrainingDefaults, seed: int, optimiser, loss_of, log) -> list[float]:
    """Epochs of mini-batches in a seeded order; ``loss_of(inputs, kept, targets)`` gives one
    batch's loss. ``data`` has ``rows`` and ``batch(indices) -> (inputs, kept indices)``.
    Returns the mean loss of each epoch."""
    import torch

    order_generator = torch.Generator().manual_seed(seed)
    device = model.device
    model.train()
    losses = []
    for epoch in range(settings.epochs):
        total, count = 0.0, 0
        order = torch.randperm(len(data), generator=order_generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            inputs, kept = data.batch(order[start : start + settings.batch_size])
            if not kept:
                continue
            targets = _targets(data.rows, kept, normalisation, device)
            with optimiser.autocast():
                loss = loss_of(inputs, kept, targets)
            optimiser.step(loss)
            total += float(loss.detach()) * len(kept)
            count += len(kept)
        losses.append(total / max(count, 1))
        log(f"diqa: epoch {epoch + 1}/{settings.epochs} loss {losses[-1]:.5f}")
    model.eval()
    return losses


def _targets(rows: list[LabelRow], indices, normalisation, device):
    import torch

    values = [(rows[i].mos - normalisation["offset"]) / normalisation["scale"] for i in indices]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _training_record(method, labels_csv, settings, seed, normalisation, n_train, n_failed, split, losses):
    return {
        "method": method,
        "labels": str(Path(labels_csv)),
        "split": split or "all",
        "n_train": n_train,
        "n_failed": n_failed,
        "optimizer": "AdamW",
        "seed": seed,
        "final_loss": losses[-1] if losses else None,
        **{k: v for k, v in asdict(settings).items() if k != "source"},
        "defaults_from": settings.source,
        "normalised_mos": normalisation,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def train(
    method: str,
    labels_csv: str | Path,
    *,
    backbone: str | None = None,
    out: str | Path,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    grad_clip: float | None = None,
    seed: int = 0,
    config: dict | str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    init_checkpoint: str | Path | None = None,
    slowfast: str | None = None,
    offline: bool = False,
    workers: int = 2,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train a head for ``method`` on the ``train`` split (every row when there is no split column)
    and save it with :func:`diqa_cli.checkpoint.save_head`. Returns the training record that the
    sidecar also holds under ``training``.

    ``config`` is the model's constructor config (a dict, or ``"tiny"`` for ``Cls.tiny_config()``);
    ``init_checkpoint`` continues from a saved head of the same method (its config wins), or, for
    GenzVQA, starts from a GenzIQA head (prompts and LoRA; the modulator starts fresh), the released
    way to train it. ``backbone`` replaces the init checkpoint's backbone when both are given.
    ``slowfast`` (video methods) names the SlowFast weights; default the config's, a relative path
    taken from the init checkpoint's folder.
    Methods exposing ``extract_features`` / ``head_forward`` train on features computed once.
    """
    import torch

    from diqa_cli.checkpoint import save_head
    from diqa_cli.methods import get_method

    log = log or _quiet
    spec = get_method(method)
    rows = read_labels(labels_csv)
    split = _default_split(rows, "train")
    train_rows = select_split(rows, split, source=labels_csv)
    normalisation = _normalisation(train_rows, labels_csv)
    settings = _settings(spec.name, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
    model = _initial_model(spec, backbone, config, seed, init_checkpoint, device, dtype, offline)
    device = model.device

    if spec.input_kind == "video":
        # GenzVQA, the one video method: frames decoded per batch, SlowFast features once per video.
        from diqa_cli.models.genzvqa import VideoTrainingSet

        anchor = Path(init_checkpoint).parent if init_checkpoint is not None else None
        extractor = _load_slowfast(model, slowfast, anchor, offline)
        data = VideoTrainingSet(train_rows, model, extractor, log=log)
    else:
        data = _ImageSet(train_rows, model.resolution, workers=workers, log=log)
    if len(data) < 2:
        raise UsageError(f"{labels_csv}: fewer than 2 readable training {spec.input_kind}s; nothing to train on")
    log(
        f"diqa: training {spec.name} on {len(data)} {spec.input_kind}s ({len(data.failed)} unreadable), "
        f"{settings.epochs} epochs, batch {settings.batch_size}, lr {settings.lr:g}, seed {seed}"
    )
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        optimiser = _Optimiser(model, settings)
        if hasattr(model, "extract_features") and hasattr(model, "head_forward"):
            data = _FeatureSet(model, data, settings.batch_size, log)

            def loss_of(features, kept, targets):
                return torch.nn.functional.mse_loss(model.head_forward(features).float(), targets)

        else:
            noise = torch.Generator(device=device).manual_seed(seed)
            input_dtype = model.dtype

            def loss_of(inputs, kept, targets):  # a pixel tensor, or a VideoBatch for video methods
                return model.training_loss(inputs.to(device, input_dtype), targets, noise)

        losses = _fit(model, data, normalisation, settings, seed, optimiser, loss_of, log)

    record = _training_record(
        spec.name, labels_csv, settings, seed, normalisation, len(data), len(data.failed), split, losses
    )
    if init_checkpoint is not None:
        record["init_checkpoint"] = str(init_checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(model, out, normalisation=normalisation, extra={"training": record})
    log(f"diqa: saved {out} (sidecar {out.with_suffix('.json')})")
    return record


def _initial_model(spec, backbone, config, seed, init_checkpoint, device, dtype, offline):
    """A fresh model, or one that starts from ``init_checkpoint``."""
    from diqa_cli.checkpoint import load_head, read_sidecar

    if init_checkpoint is None:
        from diqa_cli.backbone import load_backbone, resolve_device, resolve_dtype

        if backbone is None and not spec.extra.get("needs_backbone", True):
            # The DP-IQA student trained on MOS directly: no diffusion weights to load.
            model = _build(spec.name, None, config, seed)
            target = resolve_device(device)
            return model.to(target, resolve_dtype(dtype, target))
        bb = load_backbone(backbone or spec.default_backbone, device=device, dtype=dtype, offline=offline)
        return _build(spec.name, bb, config, seed)
    trained = read_sidecar(init_checkpoint).get("method")
    if trained == spec.name:
        return load_head(init_checkpoint, device=device, dtype=dtype, offline=offline, backbone_ref=backbone)[0]
    from diqa_cli.methods import load_model_class

    cls = load_model_class(spec)
    if not (hasattr(cls, "load_image_checkpoint") and trained == "genziqa"):
        raise UsageError(f"--init {init_checkpoint} is a {trained!r} head; it cannot start {spec.name!r} training")
    from safetensors.torch import load_file

    image_head, _ = load_head(init_checkpoint, device=device, dtype=dtype, offline=offline, backbone_ref=backbone)
    model = _build(spec.name, image_head.backbone, config, seed)
    model.load_image_checkpoint(load_file(str(init_checkpoint)))
    return model


def _load_slowfast(model, ref, anchor, offline):
    import torch

    from diqa_cli.models.slowfast import load_slowfast

    bb = model.backbone
    return load_slowfast(
        ref or model.config["slowfast"],
        device=bb.device,
        # SlowFast is cheap beside the U-Net: half precision only where the U-Net runs in it on a GPU.
        dtype=bb.dtype if bb.device.type == "cuda" else torch.float32,
        offline=offline,
        relative_to=anchor if ref is None else None,
    )


class _FeatureSet:
    """Frozen features of every readable training image, computed once (methods exposing
    ``extract_features``), with the ``rows`` / ``batch`` interface :func:`_fit` reads."""

    def __init__(self, model, images: _ImageSet, batch_size: int, log: Log):
        bb = model.backbone
        model.eval()
        features, self.rows = [], []
        for start in range(0, len(images), batch_size):
            pixels, kept = images.batch(list(range(start, min(start + batch_size, len(images)))))
            if not kept:
                continue
            # No autocast here: the method runs its frozen features in its own precision.
            features.append(_tree_map(lambda t: t.detach().float(), model.extract_features(pixels.to(bb.device, bb.dtype))))
            self.rows.extend(images.rows[i] for i in kept)
        self.features = _tree_cat(features)
        self.failed = images.failed
        log(f"diqa: features computed once for {len(self.rows)} images")

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, indices):
        import torch

        index = torch.tensor(indices)
        return _tree_map(lambda t: t.index_select(0, index.to(t.device)), self.features), list(indices)


def _tree_map(fn, tree):
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return fn(tree)


def _tree_cat(trees: list):
    import torch

    first = trees[0]
    if isinstance(first, dict):
        return {k: _tree_cat([t[k] for t in trees]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_tree_cat([t[i] for t in trees]) for i in range(len(first)))
    return torch.cat(trees)


# --- distillation ----------------------------------------------------------------------------


def distill(
    teacher_checkpoint: str | Path,
    labels_csv: str | Path,
    *,
    out: str | Path,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    seed: int = 0,
    config: dict | str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    workers: int = 2,
    log: Log | None = None,
) -> dict[str, Any]:
    """Distil a DP-IQA teacher head into the EfficientNet student, as DP-IQA's ``train_student.py``:
    loss = MSE(student score, MOS) + MSE(student feature map, teacher feature map).

    The teacher's maps are computed once per image (the teacher is frozen), not once per epoch.
    MOS is normalised with the training split's offset and scale like :func:`train`.
    """
    import torch

    from diqa_cli.checkpoint import load_head, save_head

    log = log or _quiet
    teacher, teacher_sidecar = load_head(teacher_checkpoint, device=device, dtype=dtype, offline=offline)
    if teacher_sidecar.get("method") != "dpiqa" or not hasattr(teacher, "forward_with_map"):
        raise UsageError(
            f"--teacher {teacher_checkpoint} is a {teacher_sidecar.get('method')!r} head; "
            "distillation needs a DP-IQA teacher (method 'dpiqa')"
        )
    teacher.eval()
    rows = read_labels(labels_csv)
    split = _default_split(rows, "train")
    train_rows = select_split(rows, split, source=labels_csv)
    normalisation = _normalisation(train_rows, labels_csv)
    settings = _settings(
        "dpiqa-student", epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=None
    )
    bb = teacher.backbone
    student = _build("dpiqa-student", bb, config, seed)

    teacher_images = _ImageSet(train_rows, teacher.resolution, workers=workers, log=log)
    maps, readable = [], []
    for start in range(0, len(teacher_images), settings.batch_size):
        positions = list(range(start, min(start + settings.batch_size, len(teacher_images))))
        pixels, kept = teacher_images.batch(positions)
        if not kept:
            continue
        with torch.no_grad():
            _, feature_map = teacher.forward_with_map(pixels.to(bb.device, bb.dtype))
        maps.append(feature_map.float().cpu())
        readable.extend(teacher_images.rows[i] for i in kept)
    teacher_maps = torch.cat(maps)
    n_failed = len(teacher_images.failed)
    del teacher_images
    log(f"diqa: teacher maps computed once for {len(readable)} images")

    images = _ImageSet(readable, student.resolution, workers=workers, log=log)
    if len(images) != len(readable):  # the teacher maps are matched to the images by position
        raise UsageError(f"{labels_csv}: images changed on disk while distilling (read for the teacher, not for the student)")
    if len(images) < 2:
        raise UsageError(f"{labels_csv}: fewer than 2 readable training images; nothing to distil on")
    log(
        f"diqa: distilling {teacher_checkpoint} into {student.method_name} on {len(images)} images, "
        f"{settings.epochs} epochs, batch {settings.batch_size}, lr {settings.lr:g}, seed {seed}"
    )

    def loss_of(pixels, kept, targets):
        scores, student_maps = student.forward_with_map(pixels.to(bb.device, bb.dtype))
        matched = torch.nn.functional.mse_loss(student_maps.float(), teacher_maps[kept].to(bb.device))
        return torch.nn.functional.mse_loss(scores.float(), targets) + matched

    with torch.random.fork_rng(devices=_rng_devices(bb.device)):
        torch.manual_seed(seed)
        optimiser = _Optimiser(student, settings)
        losses = _fit(student, images, normalisation, settings, seed, optimiser, loss_of, log)

    record = _training_record(
        student.method_name, labels_csv, settings, seed, normalisation, len(images), n_failed, split, losses
    )
    record["distilled_from"] = {"checkpoint": str(teacher_checkpoint), "method": "dpiqa"}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(student, out, normalisation=normalisation, extra={"training": record})
    log(f"diqa: saved {out} (sidecar {out.with_suffix('.json')})")
    return record


# --- evaluation ------------------------------------------------------------------------------


def evaluate(
    checkpoint: str | Path,
    labels_csv: str | Path,
    *,
    split: str | None = None,
    backbone: str | None = None,
    slowfast: str | None = None,
    batch_size: int = 8,
    workers: int = 2,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    log: Log | None = None,
) -> dict[str, Any]:
    """Score the rows of ``split`` (default: ``test`` when the CSV has a split column, else every
    row) with the normal scoring pipeline (``diqa score``'s, or ``diqa score-video``'s for video
    methods) and correlate the reported scores with the MOS.

    Returns ``srcc``, ``plcc`` (no logistic fit), ``krcc``, ``n`` (inputs scored) and ``n_failed``.
    """
    from diqa_cli.checkpoint import load_head
    from diqa_cli.imageio import InputItem

    log = log or _quiet
    rows = read_labels(labels_csv)
    if split is None:
        split = _default_split(rows, "test")
    chosen = select_split(rows, split, source=labels_csv)
    model, sidecar = load_head(checkpoint, device=device, dtype=dtype, offline=offline, backbone_ref=backbone)
    model.eval()
    items = [InputItem(str(r.path)) for r in chosen]
    normalisation = sidecar["score_normalisation"]
    if model.spec.input_kind == "video":
        from diqa_cli.models.genzvqa import score_videos

        extractor = _load_slowfast(model, slowfast, Path(checkpoint).parent, offline)
        model.check_slowfast(extractor)
        scored = score_videos(items, model, extractor, normalisation=normalisation, batch_size=batch_size)
    else:
        from diqa_cli.scoring import score_images

        scored = score_images(items, model, batch_size=batch_size, workers=workers, normalisation=normalisation)
    mos_by_path = {str(r.path): r.mos for r in chosen}
    predicted, target, failed = [], [], 0
    for row in scored:
        if row.get("status") == "ok" and row.get("score") is not None:
            predicted.append(row["score"])
            target.append(mos_by_path[row["path"]])
        else:
            failed += 1
            log(f"diqa: {row.get('path')}: {row.get('error')}")
    metrics = correlations(predicted, target)
    return {
        **metrics,
        "n": len(predicted),
        "n_failed": failed,
        "split": split or "all",
        "method": sidecar.get("method"),
        "checkpoint": str(checkpoint),
        "plcc_fit": "none",
    }
