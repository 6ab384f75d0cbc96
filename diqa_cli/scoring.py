"""Loading a method's scorer with the defaults ``diqa score`` applies: which checkpoint, which
sidecar, which seed. One place for "the default checkpoint of a method".

Torch is imported only when a model is built.
"""

from __future__ import annotations

from pathlib import Path

from diqa_cli.errors import UsageError, WeightsError

__all__ = ["default_weights_name", "default_checkpoint", "checkpoint_label", "load_scorer", "resolve_head", "scorer_settings"]


def default_weights_name(spec) -> str:
    """The weights-manifest name of ``spec``'s default head: its first released weights."""
    if not spec.released_weights:
        kind = "score-video" if spec.input_kind == "video" else "score"
        raise WeightsError(
            f"method {spec.name!r} has no published head: train one with `diqa train -m {spec.name} --data "
            f"labels.csv --out {spec.name}.safetensors`, then `diqa {kind} … -c {spec.name}.safetensors`"
        )
    return spec.released_weights[0]


def default_checkpoint(spec, *, offline: bool = False, download: bool = True) -> Path:
    """The file of ``spec``'s default head in the weights cache (fetched unless ``offline`` or
    not ``download``)."""
    from diqa_cli.weights import resolve

    return Path(resolve(default_weights_name(spec), offline=offline, download=download))


def checkpoint_label(checkpoint, spec) -> str:
    """What output rows name as the checkpoint: the file given, else the released weights' name."""
    return str(checkpoint) if checkpoint is not None else default_weights_name(spec)


def resolve_head(method: str | None, *, checkpoint: str | None = None, backbone: str | None = None,
                 offline: bool = False):
    """Which head a scorer loads, as ``diqa score`` decides: ``(spec, checkpoint file, sidecar)``.

    With ``checkpoint``, the head it holds (its sidecar names the method; a different ``method``
    is a usage error; without a sidecar, ``method``'s released configuration is assumed). Without,
    the method's first released weights from the registry, fetched through the weights manifest (a
    bare state dict gets :func:`checkpoint.released_sidecar`). Nothing is built: this reads files.
    """
    from diqa_cli.checkpoint import read_sidecar, released_sidecar, sidecar_path
    from diqa_cli.methods import get_method

    spec = get_method(method) if method else None
    if checkpoint is None:
        if spec is None:
            raise UsageError("name a method (--method) or a head checkpoint (--checkpoint)")
        default_weights_name(spec)  # a method without a published head says so first
        from diqa_cli.weights.setup import require_for

        require_for(spec, with_backbone=backbone is None)  # every missing piece in one message
        checkpoint = str(default_checkpoint(spec, offline=offline))
        if not sidecar_path(checkpoint).is_file():  # as published: a bare state dict
            return spec, checkpoint, released_sidecar(spec, default_weights_name(spec))
        return spec, checkpoint, read_sidecar(checkpoint)
    if spec is not None and not sidecar_path(checkpoint).is_file():
        # A bare state dict, e.g. released weights after `diqa weights convert`: the named
        # method's released configuration describes it.
        if not Path(checkpoint).is_file():
            raise WeightsError(f"checkpoint {str(checkpoint)!r} does not exist")
        return spec, str(checkpoint), released_sidecar(spec, Path(checkpoint).name)
    sidecar = read_sidecar(checkpoint)
    trained = get_method(sidecar["method"])
    if spec is not None and spec.name != trained.name:
        raise UsageError(
            f"--method {spec.name!r} does not match checkpoint {checkpoint!r}, a {trained.name!r} head; "
            f"drop --method or pass a {spec.name} checkpoint"
        )
    return trained, str(checkpoint), sidecar


def _config_overrides(spec, seed: int | None) -> dict:
    return {"seed": seed} if seed is not None and spec.draws_noise else {}


def load_scorer(
    method: str | None,
    *,
    backbone: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    seed: int | None = None,
    keep_backbone_unet: bool = False,
):
    """Build the model that scores: ``(model, sidecar)``, for the head :func:`resolve_head` picks.

    ``backbone`` replaces the sidecar's backbone; ``seed`` replaces the recorded seed of methods
    that draw noise (``spec.draws_noise``). A head that runs its own U-Net
    (``model.uses_backbone_unet()`` False) frees the backbone's, unless ``keep_backbone_unet``
    (enhancement runs the diffusion process on it).
    """
    from diqa_cli.checkpoint import load_head

    spec, checkpoint, sidecar = resolve_head(method, checkpoint=checkpoint, backbone=backbone, offline=offline)
    model, sidecar = load_head(
        checkpoint,
        device=device,
        dtype=dtype,
        offline=offline,
        backbone_ref=backbone,
        config_overrides=_config_overrides(spec, seed) or None,
        sidecar=sidecar,
    )
    if model.backbone is not None and not model.uses_backbone_unet() and not keep_backbone_unet:
        model.backbone.release_unet()
    return model, sidecar


def scorer_settings(
    method: str | None,
    *,
    backbone: str | None = None,
    checkpoint: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    seed: int | None = None,
    video: dict | None = None,
):
    """The :class:`~diqa_cli.store.ScoreSettings` of the scorer :func:`load_scorer` would build
    from the same arguments, without building it: the score store looks results up first and loads
    a model only for what is new. Reads the sidecar, hashes the weight files (each once per size
    and mtime) and reads the backbone's config; ``tests/test_contract.py`` holds these equal to a
    loaded model's. ``video`` (frame choice and clip encoder of video scoring) is part of them."""
    import diqa_cli
    from diqa_cli.backbone import describe_backbone, dtype_name, resolve_device, resolve_dtype
    from diqa_cli.files import file_sha256
    from diqa_cli.store import ScoreSettings

    spec, checkpoint, sidecar = resolve_head(method, checkpoint=checkpoint, backbone=backbone, offline=offline)
    config = {**sidecar["config"], **_config_overrides(spec, seed)}
    identity = ref = ""
    resolution = config.get("resolution") or sidecar["resolution"]
    if spec.needs_backbone:
        described = describe_backbone(backbone or sidecar["backbone"]["ref"], offline=offline)
        identity, ref = described.identity, described.ref
        resolution = config.get("resolution") or described.resolution
    return ScoreSettings(
        method=spec.name,
        checkpoint_sha256=file_sha256(checkpoint),
        backbone_identity=identity,
        seed=int(config.get("seed", sidecar.get("seed", 0))),
        resolution=int(resolution),
        dtype=dtype_name(resolve_dtype(dtype, resolve_device(device))),
        diqa_version=diqa_cli.__version__,
        head={"score_normalisation": sidecar["score_normalisation"], "config": config},
        video=dict(video or {}),
        backbone_ref=ref,
    )
