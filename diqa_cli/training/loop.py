"""The training loop: one optimiser, seeded batches, per-method defaults from the spec.

See :mod:`diqa_cli.training` for what diqa does the same for every method.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from diqa_cli.errors import UsageError
from diqa_cli.methods import TrainingDefaults
from diqa_cli.pipelines.datasets import Log, quiet
from diqa_cli.training.labels import (
    default_split,
    labels_layout,
    mos_normalisation,
    normalised_targets,
    read_labels,
    select_split,
)

__all__ = ["IMAGENET", "Optimiser", "build_model", "fit", "rng_devices", "settings_for", "train", "training_record"]

# ``init_checkpoint="imagenet"``: start an ImageNetInit model's trunk from ImageNet weights.
IMAGENET = "imagenet"

# Per-batch progress inside an epoch (shown with `diqa -v`); epochs themselves go to ``log``.
_progress = logging.getLogger("diqa")


def build_model(method: str, backbone, config: dict | str | None, seed: int):
    """The model of ``method`` on ``backbone``, parameters initialised from ``seed``."""
    import torch

    from diqa_cli.methods import get_method, load_model_class

    cls = load_model_class(get_method(method))
    if config == "tiny":
        config = cls.tiny_config()
    with torch.random.fork_rng(devices=rng_devices(backbone.device) if backbone is not None else []):
        torch.manual_seed(seed)
        return cls(backbone, **dict(config or {}))


def rng_devices(device) -> list[int]:
    """The CUDA devices whose generators ``torch.random.fork_rng`` must save for ``device``."""
    return [device.index or 0] if device.type == "cuda" else []


def settings_for(spec, *, epochs, batch_size, lr, weight_decay, grad_clip) -> TrainingDefaults:
    """The spec's training defaults with what the user named instead."""
    base = spec.training
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


class Optimiser:
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


def fit(model, data, normalisation, settings: TrainingDefaults, seed: int, optimiser, loss_of, log,
        after_epoch: Callable[[int], str] | None = None) -> list[float]:
    """Epochs of mini-batches in a seeded order; ``loss_of(inputs, kept, targets)`` gives one
    batch's loss. ``data`` has ``rows`` and ``batch(indices) -> (inputs, kept indices)``.
    ``after_epoch(epoch)`` may add to the epoch's log line (held-out SRCC). Returns the mean loss
    of each epoch."""
    import torch

    order_generator = torch.Generator().manual_seed(seed)
    device = model.device
    model.train()
    losses = []
    for epoch in range(settings.epochs):
        total, count = 0.0, 0
        order = torch.randperm(len(data), generator=order_generator).tolist()
        batches = range(0, len(order), settings.batch_size)
        for number, start in enumerate(batches, start=1):
            inputs, kept = data.batch(order[start : start + settings.batch_size])
            if not kept:
                continue
            targets = normalised_targets(data.rows, kept, normalisation, device)
            with optimiser.autocast():
                loss = loss_of(inputs, kept, targets)
            optimiser.step(loss)
            total += float(loss.detach()) * len(kept)
            count += len(kept)
            _progress.debug("epoch %d/%d, batch %d/%d, loss %.5f", epoch + 1, settings.epochs, number, len(batches),
                            float(loss.detach()))
        losses.append(total / max(count, 1))
        extra = after_epoch(epoch) if after_epoch is not None else ""
        log(f"diqa: epoch {epoch + 1}/{settings.epochs} loss {losses[-1]:.5f}{extra}")
    model.eval()
    return losses


def training_record(method, labels_csv, settings, seed, normalisation, n_train, n_failed, split, losses):
    return {
        "method": method,
        "labels": str(Path(labels_csv)),
        "labels_layout": labels_layout(labels_csv),
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
    clip_encoder: str | None = None,
    offline: bool = False,
    workers: int = 2,
    eval_every: int = 1,
    keep_last: bool = False,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train a head for ``method`` on the ``train`` split (every row when there is no split column)
    and save it with :func:`diqa_cli.checkpoint.save_head`. Returns the training record that the
    sidecar also holds under ``training``.

    Held-out rows (split ``val``, else ``test``) are scored every ``eval_every`` epochs (0: never)
    and their SRCC logged with the epoch. With a ``val`` split the head of the best epoch is the one
    saved, unless ``keep_last``; a ``test`` split is only reported, never selected on (selecting on
    it would make its SRCC an optimistic estimate; DP-IQA's released code does select on test).

    ``config`` is the model's constructor config (a dict, or ``"tiny"`` for ``Cls.tiny_config()``);
    ``init_checkpoint`` continues from a saved head of the same method (its config wins), or starts
    from a head of a method the spec's ``init_from`` names (GenzVQA from GenzIQA: prompts and LoRA,
    the modulator fresh, the released way to train it); ``"imagenet"`` (:data:`IMAGENET`) starts a
    model that implements :class:`~diqa_cli.models.base.ImageNetInit` (the DP-IQA student) from its
    trunk's ImageNet weights in the weights manifest. ``backbone`` replaces the init checkpoint's
    backbone when both are given. ``clip_encoder`` (video methods: SlowFast for GenzVQA) names the
    clip encoder's weights; default the config's, a relative path taken from the init checkpoint's
    folder. :class:`~diqa_cli.models.base.CachedFeatures` models train on features computed once.
    """
    import torch

    from diqa_cli.checkpoint import save_head
    from diqa_cli.methods import get_method
    from diqa_cli.models.base import CachedFeatures, VideoQualityModel
    from diqa_cli.pipelines.datasets import FeatureSet, ImageSet, VideoSet

    log = log or quiet
    spec = get_method(method)
    imagenet = isinstance(init_checkpoint, str) and init_checkpoint == IMAGENET  # a file so named: "./imagenet"
    if imagenet:
        _check_imagenet_init(spec)
        init_checkpoint = None
    rows = read_labels(labels_csv)
    split = default_split(rows, "train")
    train_rows = select_split(rows, split, source=labels_csv)
    normalisation = mos_normalisation(train_rows, labels_csv)
    settings = settings_for(spec, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)
    model = _initial_model(spec, backbone, config, seed, init_checkpoint, device, dtype, offline)
    if imagenet:
        model.load_imagenet_weights(offline=offline)
    start = IMAGENET if imagenet else "random" if init_checkpoint is None else str(init_checkpoint)
    device = model.device

    if isinstance(model, VideoQualityModel):
        # Frames decoded per batch, clip-encoder features once per video.
        anchor = Path(init_checkpoint).parent if init_checkpoint is not None else None
        encoder = model.load_clip_encoder(clip_encoder, relative_to=anchor, offline=offline)
        model.adopt_clip_encoder(encoder)
        data = VideoSet(train_rows, model, encoder, log=log)
    else:
        data = ImageSet(train_rows, model.resolution, resample=spec.resample, workers=workers, log=log)
    if len(data) < 2:
        raise UsageError(f"{labels_csv}: fewer than 2 readable training {spec.input_kind}s; nothing to train on")
    log(
        f"diqa: training {spec.name} on {len(data)} {spec.input_kind}s ({len(data.failed)} unreadable), "
        f"{settings.epochs} epochs, batch {settings.batch_size}, lr {settings.lr:g}, seed {seed}, start {start}"
    )
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        optimiser = Optimiser(model, settings)
        if isinstance(model, CachedFeatures):
            data = FeatureSet(model, data, settings.batch_size, log)

            def loss_of(features, kept, targets):
                return torch.nn.functional.mse_loss(model.head_forward(features).float(), targets)

        else:
            noise = torch.Generator(device=device).manual_seed(seed)
            input_dtype = model.dtype

            def loss_of(inputs, kept, targets):  # a pixel tensor, or a VideoBatch for video methods
                return model.training_loss(inputs.to(device, input_dtype), targets, noise)

        holdout = _Holdout.of(rows, data, model, spec, eval_every=eval_every, keep_last=keep_last,
                              batch_size=settings.batch_size, workers=workers, log=log, source=labels_csv)
        losses = fit(model, data, normalisation, settings, seed, optimiser, loss_of, log,
                     after_epoch=holdout.after_epoch if holdout else None)
        if holdout:
            holdout.restore_best()

    record = training_record(
        spec.name, labels_csv, settings, seed, normalisation, len(data), len(data.failed), split, losses
    )
    record["init"] = start
    if holdout:
        record["holdout"] = holdout.record()
    if init_checkpoint is not None:
        record["init_checkpoint"] = str(init_checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(model, out, normalisation=normalisation, extra={"training": record})
    log(f"diqa: saved {out} (sidecar {out.with_suffix('.json')})")
    return record


class _Holdout:
    """Held-out rows scored after epochs: their SRCC for the log, and the best epoch's head kept
    when they are a validation split."""

    def __init__(self, split, data, model, *, eval_every, select, batch_size):
        self.split, self.data, self.model = split, data, model
        self.eval_every, self.select, self.batch_size = eval_every, select, batch_size
        self.srcc: list[float | None] = []
        self.best_epoch: int | None = None
        self.best_state = None

    @classmethod
    def of(cls, rows, train_data, model, spec, *, eval_every, keep_last, batch_size, workers, log, source):
        """The held-out set of ``rows`` built like the training data, or None when there is none."""
        from diqa_cli.models.base import CachedFeatures, VideoQualityModel
        from diqa_cli.pipelines.datasets import FeatureSet, ImageSet, VideoSet

        present = {r.split for r in rows}
        split = "val" if "val" in present else "test" if "test" in present else None
        if split is None or eval_every < 1:
            return None
        chosen = select_split(rows, split, source=source)
        if isinstance(model, VideoQualityModel):
            data = VideoSet(chosen, model, train_data.encoder, log=log)
        else:
            data = ImageSet(chosen, model.resolution, resample=spec.resample, workers=workers, log=log)
            if isinstance(model, CachedFeatures):
                data = FeatureSet(model, data, batch_size, log)
        if len(data) < 2:
            return None
        return cls(split, data, model, eval_every=eval_every, select=split == "val" and not keep_last,
                   batch_size=batch_size)

    def predictions(self) -> list[float]:
        """Raw scores of the held-out set (SRCC needs no normalisation)."""
        import torch

        from diqa_cli.models.base import VideoQualityModel
        from diqa_cli.pipelines.datasets import FeatureSet

        model, out = self.model, []
        for start in range(0, len(self.data), self.batch_size):
            inputs, kept = self.data.batch(list(range(start, min(start + self.batch_size, len(self.data)))))
            if not kept:
                continue
            if isinstance(self.data, FeatureSet):
                scores = model.head_forward(inputs)
            elif isinstance(model, VideoQualityModel):
                batch = inputs.to(model.device, model.dtype)
                scores = torch.stack([model.video_score(model.frame_features(frames), features).score
                                      for frames, features in zip(batch.frames, batch.clip_features)])
            else:
                scores = model(inputs.to(model.device, model.dtype))
            out.extend(float(s) for s in scores.float().cpu())
        return out

    def after_epoch(self, epoch: int) -> str:
        import torch

        from diqa_cli.training.evaluate import correlations

        if (epoch + 1) % self.eval_every:
            self.srcc.append(None)
            return ""
        self.model.eval()
        with torch.no_grad():
            srcc = correlations(self.predictions(), [r.mos for r in self.data.rows])["srcc"]
        self.model.train()
        self.srcc.append(srcc)
        if self.select and srcc == srcc and (self.best_epoch is None or srcc > self.srcc[self.best_epoch]):
            self.best_epoch = epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.checkpoint_state_dict().items()}
        return f", held-out ({self.split}) SRCC {srcc:.4f}"

    def restore_best(self) -> None:
        if self.best_state is not None:
            self.model.load_checkpoint_state_dict(self.best_state)

    def record(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "n": len(self.data),
            "srcc_per_epoch": self.srcc,
            "kept": f"epoch {self.best_epoch + 1} (best {self.split} SRCC)" if self.best_state is not None else "last epoch",
        }


def _check_imagenet_init(spec) -> None:
    """``--init imagenet`` only for a method whose model can load ImageNet weights."""
    from diqa_cli.methods import list_methods, load_model_class
    from diqa_cli.models.base import ImageNetInit

    if issubclass(load_model_class(spec), ImageNetInit):
        return
    able = []
    for other in list_methods():
        try:
            if issubclass(load_model_class(other), ImageNetInit):
                able.append(other.name)
        except Exception:  # a method whose model cannot be imported here cannot start from ImageNet either
            continue
    raise UsageError(
        f"--init imagenet: method {spec.name!r} has no ImageNet start (methods that have one: "
        f"{', '.join(able) or 'none'}); leave --init out to start from random initialisation, or give a head checkpoint"
    )


def _initial_model(spec, backbone, config, seed, init_checkpoint, device, dtype, offline):
    """A fresh model, or one that starts from ``init_checkpoint``."""
    from diqa_cli.checkpoint import load_head, read_sidecar

    if init_checkpoint is None:
        from diqa_cli.backbone import load_backbone, resolve_device, resolve_dtype

        if backbone is None and not spec.needs_backbone:
            # A backbone-free model (a CNN student) trained on MOS directly: no diffusion weights to load.
            model = build_model(spec.name, None, config, seed)
            target = resolve_device(device)
            return model.to(target, resolve_dtype(dtype, target))
        bb = load_backbone(backbone or spec.default_backbone, device=device, dtype=dtype, offline=offline)
        return build_model(spec.name, bb, config, seed)
    trained = read_sidecar(init_checkpoint).get("method")
    if trained == spec.name:
        return load_head(init_checkpoint, device=device, dtype=dtype, offline=offline, backbone_ref=backbone)[0]
    if trained not in spec.init_from:
        raise UsageError(f"--init {init_checkpoint} is a {trained!r} head; it cannot start {spec.name!r} training")
    from diqa_cli.files import read_safetensors
    from diqa_cli.models.base import InitFromHead

    source, _ = load_head(init_checkpoint, device=device, dtype=dtype, offline=offline, backbone_ref=backbone)
    model = build_model(spec.name, source.backbone, config, seed)
    if not isinstance(model, InitFromHead):
        raise UsageError(f"method {spec.name!r} declares init_from {spec.init_from} but cannot load another head")
    model.load_init_state_dict(read_safetensors(init_checkpoint), trained)
    return model
