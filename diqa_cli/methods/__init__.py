"""The method registry, in the manner of timm's model registry.

Each method is one module in this package that calls :func:`register_method` with a frozen
:class:`MethodSpec`. The spec is the method's contract (backbone, resolution, input convention,
timesteps, score direction and range, paper, licence); the heavy implementation lives in
``diqa_cli.models`` and is imported only when a model is built, so listing methods never
imports torch. Third-party packages add methods through the ``diqa.methods`` entry-point group.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import asdict, dataclass, field

from diqa_cli.errors import UsageError

__all__ = ["MethodSpec", "register_method", "get_method", "list_methods", "load_model_class"]

# Modules of the built-in methods, imported on first use of the registry.
_BUILTIN_MODULES = ("dpiqa", "dpiqa_student", "genziqa", "lgdm", "genzvqa")


@dataclass(frozen=True)
class MethodSpec:
    """Everything fixed about a method; nothing per-method lives in the CLI."""

    name: str
    summary: str
    paper: str
    model: str  # "module:Class" of the torch implementation (a diqa_cli.models.base.QualityModel)
    default_backbone: str  # a weights-manifest name
    input_kind: str = "image"  # "image" or "video"
    resolution: int = 512  # square side the released code resizes to (aspect ratio ignored)
    resample: str = "bicubic"  # filter of the released code's resize ("bicubic" or "bilinear")
    input_convention: str = "[0,1]"  # what the released code feeds the VAE
    timesteps: tuple[int, ...] = ()
    score_direction: str = "higher is better"
    score_range: str = "unbounded; trained on MOS scaled to [0,1]"
    checkpoint_layout: str = ""  # what a head checkpoint holds
    licence: str = "Apache-2.0 (diqa code); no released weights"
    released_weights: tuple[str, ...] = ()  # weights-manifest names of published checkpoints
    aliases: tuple[str, ...] = ()
    deviations: tuple[str, ...] = ()  # where diqa departs from the released code, one line each
    reconstruction: bool = False  # True when no code was released and diqa rebuilds from the paper
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["timesteps"] = list(self.timesteps)
        return data


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register_method(spec: MethodSpec) -> MethodSpec:
    for key in (spec.name, *spec.aliases):
        owner = _ALIASES.get(key) or (key if key in _REGISTRY else None)
        if owner is not None and owner != spec.name:
            raise ValueError(f"method name {key!r} is already registered by {owner!r}")
    _REGISTRY[spec.name] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.name
    return spec


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in _BUILTIN_MODULES:
        importlib.import_module(f"diqa_cli.methods.{name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="diqa.methods"):
        ep.load()


def list_methods(kind: str | None = None) -> list[MethodSpec]:
    _load_all()
    specs = sorted(_REGISTRY.values(), key=lambda s: s.name)
    return [s for s in specs if kind is None or s.input_kind == kind]


def get_method(name: str) -> MethodSpec:
    _load_all()
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    known = sorted([*_REGISTRY, *_ALIASES])
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(f"unknown method {name!r}{hint} (known: {', '.join(sorted(_REGISTRY))})")


def load_model_class(spec: MethodSpec):
    """Import the torch implementation of a method (this is where torch gets imported)."""
    module_name, _, attr = spec.model.partition(":")
    return getattr(importlib.import_module(module_name), attr)
