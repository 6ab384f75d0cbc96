"""Distillation of a teacher head into its student method (DP-IQA's ``train_student.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diqa_cli.errors import UsageError
from diqa_cli.pipelines.datasets import Log, quiet
from diqa_cli.training.labels import default_split, mos_normalisation, read_labels, select_split
from diqa_cli.training.loop import Optimiser, build_model, fit, rng_devices, settings_for, training_record

__all__ = ["distill"]



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
    """Distil a teacher head into its student method (the spec whose ``teacher`` names the
    teacher's method; DP-IQA's EfficientNet student), as DP-IQA's ``train_student.py``:
    loss = MSE(student score, MOS) + MSE(student feature map, teacher feature map). Teacher and
    student are both :class:`~diqa_cli.models.base.FeatureMapModel`.

    The teacher's maps are computed once per image (the teacher is frozen), not once per epoch.
    MOS is normalised with the training split's offset and scale like :func:`train`.
    """
    import torch

    from diqa_cli.checkpoint import load_head, save_head
    from diqa_cli.methods import list_methods
    from diqa_cli.models.base import FeatureMapModel
    from diqa_cli.pipelines.datasets import ImageSet

    log = log or quiet
    teacher, teacher_sidecar = load_head(teacher_checkpoint, device=device, dtype=dtype, offline=offline)
    teacher_method = teacher_sidecar.get("method")
    students = [s for s in list_methods() if s.teacher == teacher_method]
    if not students or not isinstance(teacher, FeatureMapModel):
        teachers = sorted({s.teacher for s in list_methods() if s.teacher})
        raise UsageError(
            f"--teacher {teacher_checkpoint} is a {teacher_method!r} head; distillation needs the head of a "
            f"teacher method ({', '.join(teachers) or 'none is registered'})"
        )
    student_spec = students[0]
    teacher.eval()
    rows = read_labels(labels_csv)
    split = default_split(rows, "train")
    train_rows = select_split(rows, split, source=labels_csv)
    normalisation = mos_normalisation(train_rows, labels_csv)
    settings = settings_for(
        student_spec, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, grad_clip=None
    )
    bb = teacher.backbone
    student = build_model(student_spec.name, bb, config, seed)
    if not isinstance(student, FeatureMapModel):
        raise UsageError(f"method {student_spec.name!r} names a teacher but gives no feature map to distil into")

    teacher_images = ImageSet(train_rows, teacher.resolution, resample=teacher.spec.resample, workers=workers, log=log)
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

    images = ImageSet(readable, student.resolution, resample=student_spec.resample, workers=workers, log=log)
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

    with torch.random.fork_rng(devices=rng_devices(bb.device)):
        torch.manual_seed(seed)
        optimiser = Optimiser(student, settings)
        losses = fit(student, images, normalisation, settings, seed, optimiser, loss_of, log)

    record = training_record(
        student.method_name, labels_csv, settings, seed, normalisation, len(images), n_failed, split, losses
    )
    record["distilled_from"] = {"checkpoint": str(teacher_checkpoint), "method": teacher_method}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head(student, out, normalisation=normalisation, extra={"training": record})
    log(f"diqa: saved {out} (sidecar {out.with_suffix('.json')})")
    return record
