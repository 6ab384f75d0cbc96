"""Head checkpoints: a safetensors file of the trainable parts plus a JSON sidecar.

The sidecar (``head.json`` beside ``head.safetensors``) carries everything needed to rebuild the
model in one call (diffusers' config-travels-with-the-weights habit): the method, its constructor
config, the backbone it was trained on (ref and weight identity), resolution, timesteps, feature
layers, input convention, score normalisation, seed and diqa version. Pickle checkpoints are
refused: they can run code on load; ``diqa weights convert`` turns a released ``.pth`` into
safetensors.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diqa_cli.errors import DiqaWarning, UsageError, WeightsError
from diqa_cli.files import (
    atomic_write,
    atomic_write_text,
    read_safetensors,
    read_safetensors_metadata,
    refuse_pickle,
    save_safetensors,
)

__all__ = ["SIDECAR_FORMAT", "save_head", "read_sidecar", "load_head", "released_sidecar", "sidecar_path"]

SIDECAR_FORMAT = "diqa-head/1"
_SIDECAR_KEYS = (
    "format",
    "method",
    "config",
    "backbone",
    "resolution",
    "timesteps",
    "feature_layers",
    "input_convention",
    "score_normalisation",
    "seed",
    "diqa_version",
    "created",
)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(path).with_suffix(".json")


def _normalisation(normalisation: dict) -> dict[str, float]:
    try:
        offset, scale = float(normalisation["offset"]), float(normalisation["scale"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"normalisation must be {{'offset': float, 'scale': float}}, got {normalisation!r}") from exc
    if not (math.isfinite(offset) and math.isfinite(scale)) or scale == 0:
        raise ValueError(f"normalisation needs finite offset and non-zero finite scale, got {normalisation!r}")
    return {"offset": offset, "scale": scale}


def save_head(model, path: str | os.PathLike, *, normalisation: dict, extra: dict | None = None) -> Path:
    """Write ``path`` (safetensors of ``model.checkpoint_state_dict()``) and its JSON sidecar.

    ``normalisation`` maps raw scores to reported ones (``score = raw * scale + offset``);
    ``extra`` adds keys to the sidecar (training data, metrics…) but may not replace a core key.
    """
    import diqa_cli

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"head checkpoints are written as .safetensors, got {str(path)!r}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_SIDECAR_KEYS))
    if clash:
        raise ValueError(f"extra sidecar keys {clash} would replace core keys")
    spec = model.spec
    sidecar = {
        "format": SIDECAR_FORMAT,
        "method": model.method_name,
        "config": model.config,
        "backbone": _backbone_record(model.backbone),
        "resolution": model.resolution,
        "timesteps": list(spec.timesteps),
        "feature_layers": list(model.feature_layers()),
        "input_convention": spec.input_convention,
        "score_normalisation": _normalisation(normalisation),
        "seed": int(model.config.get("seed", 0)),
        "diqa_version": diqa_cli.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    text = json.dumps(sidecar, indent=2, sort_keys=False) + "\n"  # fails early if config isn't JSON
    state = {k: v.detach().contiguous().cpu() for k, v in model.checkpoint_state_dict().items()}
    metadata = {"format": "pt", "diqa_format": SIDECAR_FORMAT, "method": model.method_name}
    atomic_write(path, lambda tmp: save_safetensors(state, tmp, metadata=metadata))
    atomic_write_text(sidecar_path(path), text)
    return path


def _backbone_record(backbone) -> dict[str, Any]:
    """Ref and weight identity of the backbone a head was trained on; both None for methods that
    run without a diffusion backbone (the DP-IQA student)."""
    if backbone is None:
        return {"ref": None, "identity": None}
    return {"ref": _portable_ref(backbone.ref), "identity": backbone.identity}


def _portable_ref(ref: str) -> str:
    """A local backbone path is recorded absolute, so the head loads from any working directory;
    a weights-manifest name is kept as it is."""
    path = Path(ref)
    return str(path.absolute()) if path.exists() else str(ref)


def _refuse_pickle(path: Path) -> None:
    refuse_pickle(
        path, fix=f"convert it once with `diqa weights convert {path} --method METHOD` and pass the .safetensors file"
    )


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a head checkpoint (``path`` is the ``.safetensors`` file or the ``.json``)."""
    path = Path(path)
    _refuse_pickle(path)
    if path.suffix != ".json" and not path.is_file():
        raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    side = path if path.suffix == ".json" else sidecar_path(path)
    if not side.is_file():
        raise WeightsError(
            f"{path}: no sidecar {side.name} beside it; a diqa head is a .safetensors file plus the "
            f"JSON sidecar `diqa train` writes (method, config, backbone, normalisation); for a "
            f"converted released state dict, name its method (`diqa score --method NAME`)"
        )
    try:
        sidecar = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{side}: unreadable sidecar ({exc})") from exc
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        found = sidecar.get("format") if isinstance(sidecar, dict) else type(sidecar).__name__
        raise WeightsError(f"{side}: not a diqa head sidecar (format {found!r}, expected {SIDECAR_FORMAT!r})")
    missing = [k for k in _SIDECAR_KEYS if k not in sidecar]
    if missing:
        raise WeightsError(f"{side}: sidecar lacks {', '.join(missing)}")
    return sidecar


def load_head(
    path: str | os.PathLike,
    *,
    backbone=None,
    device: str = "auto",
    dtype: str = "auto",
    offline: bool = False,
    backbone_ref: str | None = None,
    config_overrides: dict | None = None,
    sidecar: dict | None = None,
):
    """Rebuild a head from its checkpoint and sidecar; returns ``(model, sidecar)``.

    The backbone is ``backbone`` if given, else ``backbone_ref`` (``--backbone``), else the one
    the sidecar names. A backbone whose weight identity differs from the sidecar's is used with a
    ``DiqaWarning``: the head will run, but its scores are not the trained ones.
    ``config_overrides`` replaces config entries (``--seed``). ``sidecar`` stands in for a
    missing one (released weights, see :func:`released_sidecar`).
    """
    from diqa_cli.methods import get_method, load_model_class

    path = Path(path)
    if sidecar is None:
        sidecar = read_sidecar(path)
    else:
        _refuse_pickle(path)
        if not path.is_file():
            raise WeightsError(f"checkpoint {str(path)!r} does not exist")
    try:
        spec = get_method(sidecar["method"])
    except UsageError as exc:
        raise WeightsError(f"{path}: written for a method this diqa does not have: {exc}") from exc

    if backbone is None and spec.needs_backbone:
        from diqa_cli.backbone import load_backbone

        ref = backbone_ref or sidecar["backbone"]["ref"]
        backbone = load_backbone(ref, device=device, dtype=dtype, offline=offline)
    trained_on = sidecar["backbone"].get("identity")
    if backbone is not None and trained_on and backbone.identity != trained_on:
        warnings.warn(
            f"{path.name} was trained on backbone {sidecar['backbone']['ref']!r} "
            f"(identity {trained_on[:12]}), but {backbone.ref!r} has identity {backbone.identity[:12]}; "
            f"unless these are the same weights in another layout, scores will differ from the trained head's",
            DiqaWarning,
            stacklevel=2,
        )

    own_vae = read_safetensors_metadata(path).get("vae_sha256")
    if own_vae and backbone is not None:
        _warn_if_another_vae(path, backbone, json.loads(own_vae))

    from diqa_cli.models.base import weights_from_checkpoint

    config = {**sidecar["config"], **(config_overrides or {})}
    with weights_from_checkpoint():
        model = load_model_class(spec)(backbone, **config)
    state = read_safetensors(path)
    model.load_checkpoint_state_dict(state)
    if backbone is not None:
        model.to(backbone.device)
    else:  # a backbone-free model (the DP-IQA student) takes --device/--dtype itself
        from diqa_cli.backbone import resolve_device, resolve_dtype

        target = resolve_device(device)
        model.to(target, resolve_dtype(dtype, target))
    model.eval()
    return model, sidecar


def _warn_if_another_vae(path: Path, backbone, recorded: dict[str, str]) -> None:
    """A converted released head records the VAE it was trained with (``diqa weights convert``);
    a backbone with another VAE still runs, but its latents are not the ones the head learned on."""
    from diqa_cli.files import tensors_sha256

    from diqa_cli.backbone import dtype_name

    expected = recorded.get(dtype_name(backbone.dtype))
    if expected and tensors_sha256(backbone.vae.state_dict().values()) != expected:
        warnings.warn(
            f"{path.name} was trained with another VAE than backbone {backbone.ref!r}'s (recorded sha256 "
            f"{expected[:12]}); scores will differ from the released head's",
            DiqaWarning,
            stacklevel=3,
        )


def released_sidecar(spec, weights_name: str) -> dict[str, Any]:
    """The sidecar of a bare state dict in a method's released layout (published weights come
    without one): the class's default config (the released architecture), the method's default
    backbone with no identity to check, and the spec's ``released_normalisation``.
    ``weights_name`` (manifest entry or file name) is recorded."""
    import diqa_cli

    return {
        "format": SIDECAR_FORMAT,
        "method": spec.name,
        "config": {},
        "backbone": {"ref": spec.default_backbone, "identity": None},
        "resolution": spec.resolution,
        "timesteps": list(spec.timesteps),
        "feature_layers": list(spec.feature_layers),
        "input_convention": spec.input_convention,
        "score_normalisation": spec.released_normalisation.to_dict(),
        "seed": 0,
        "diqa_version": diqa_cli.__version__,
        "created": None,
        "weights": weights_name,
    }
