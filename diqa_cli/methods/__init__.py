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
import pkgutil
from dataclasses import asdict, dataclass, field

from diqa_cli.errors import UsageError

__all__ = [
    "COMMANDS",
    "GENERIC_QUALITY_MAP",
    "MethodSpec",
    "ScoreNormalisation",
    "BACKBONE_CORE",
    "TrainingDefaults",
    "WeightsPart",
    "default_method",
    "get_method",
    "list_methods",
    "load_model_class",
    "register_method",
]

# The commands a method can be the default of (``MethodSpec.default_for``).
COMMANDS = ("score", "score-video", "enhance")

# How the quality map of a method without its own (``MethodSpec.quality_map`` empty, and a model
# that is not a ``models.base.QualityMapModel``) is made: ``diqa_cli.maps.compute.detail_map``.
GENERIC_QUALITY_MAP = (
    "generic: gradient of the score times the image's fine detail (the image minus a blurred copy), "
    "summed over colour, smoothed; first-order score change if the detail there were blurred away"
)


@dataclass(frozen=True)
class TrainingDefaults:
    """Optimiser settings a method trains with when the user names none (``diqa train``)."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    epochs: int = 10
    grad_clip: float | None = None
    source: str = "diqa's generic default"  # where the numbers come from


@dataclass(frozen=True)
class WeightsPart:
    """Weights a method needs: a manifest entry, only the ``parts`` (folders or files of the
    entry) it reads, and what they are for (``diqa weights pull --for`` lists it)."""

    entry: str
    parts: tuple[str, ...] | None = None
    purpose: str = ""
    role: str = "other"  # "head" (not needed with --checkpoint), "backbone" (not with --backbone), "other"


# The parts of a diffusers Stable Diffusion folder every backbone load reads; methods that encode
# prompts with the backbone's own text encoder add "text_encoder" and "tokenizer".
BACKBONE_CORE = ("unet", "vae", "scheduler", "model_index.json")


@dataclass(frozen=True)
class ScoreNormalisation:
    """Reported score = raw * scale + offset (what a head's sidecar records)."""

    offset: float = 0.0
    scale: float = 1.0

    def to_dict(self) -> dict[str, float]:
        return {"offset": float(self.offset), "scale": float(self.scale)}


@dataclass(frozen=True)
class MethodSpec:
    """Everything fixed about a method; nothing per-method lives in the CLI or in generic code.

    Behaviour generic code acts on is a typed field here (``needs_backbone``, ``draws_noise``,
    ``released_normalisation``, ``training``, ``teacher``, ``init_from``, ``default_for``,
    ``frames_per_video``…); ``extra`` only holds descriptive facts for ``diqa methods`` and no code
    branches on it.
    """

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
    lower_better: bool = False  # score direction: False = higher is better
    score_range: str = "unbounded; trained on MOS scaled to [0,1]"
    checkpoint_layout: str = ""  # what a head checkpoint holds
    licence: str = "Apache-2.0 (diqa code); no released weights"
    released_weights: tuple[str, ...] = ()  # weights-manifest names of published checkpoints
    aliases: tuple[str, ...] = ()
    deviations: tuple[str, ...] = ()  # where diqa departs from the released code, one line each
    reconstruction: bool = False  # True when no code was released and diqa rebuilds from the paper
    needs_backbone: bool = True  # False: the model runs without diffusion weights (a CNN student)
    draws_noise: bool = False  # True: scores depend on a seeded noise draw (``--seed`` means something)
    # How a released, sidecar-less state dict's raw output maps to the reported score.
    released_normalisation: ScoreNormalisation = ScoreNormalisation()
    feature_layers: tuple[str, ...] = ()  # backbone layers read with the released configuration
    training: TrainingDefaults = TrainingDefaults()
    teacher: str | None = None  # the method this one is distilled from (``diqa distill``)
    init_from: tuple[str, ...] = ()  # other methods whose heads can start this one's training
    default_for: tuple[str, ...] = ()  # commands (``COMMANDS``) that use this method when none is named
    weights: tuple[WeightsPart, ...] = ()  # what scoring with the released setup reads (`weights pull --for`)
    frames_per_video: int | None = None  # video methods: frames scored per video by default
    training_frames_per_video: int | None = None  # video methods: frames per video in training
    # How the model's own quality map is made, one line (its model implements
    # ``models.base.QualityMapModel`` / ``VideoQualityMapModel``); empty: the generic map.
    quality_map: str = ""
    extra: dict = field(default_factory=dict)  # descriptive only (shown by ``diqa methods``)

    @property
    def score_direction(self) -> str:
        return "lower is better" if self.lower_better else "higher is better"

    @property
    def map_description(self) -> str:
        """How ``diqa score --maps`` makes this method's quality map (its own, else the generic one)."""
        return self.quality_map or GENERIC_QUALITY_MAP

    def to_dict(self) -> dict:
        data = asdict(self)
        data["timesteps"] = list(self.timesteps)
        data["score_direction"] = self.score_direction
        data["quality_map"] = self.map_description
        return data


_REGISTRY: dict[str, MethodSpec] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a method module calls this once, at import)."""
    for command in spec.default_for:
        if command not in COMMANDS:
            raise ValueError(f"method {spec.name!r}: default_for names {command!r}, not one of {', '.join(COMMANDS)}")
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
    # Every module of this package is a built-in method: adding one is adding its file.
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{module.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="diqa.methods"):
        ep.load()


def list_methods(kind: str | None = None) -> list[MethodSpec]:
    _load_all()
    specs = sorted(_REGISTRY.values(), key=lambda s: s.name)
    return [s for s in specs if kind is None or s.input_kind == kind]


def get_method(name: str, *, kind: str | None = None) -> MethodSpec:
    """The spec registered as ``name`` or one of its aliases, in any letter case. An unknown name
    is a usage error with a did-you-mean among the methods of ``kind`` ("image", "video"; all when
    None), the same in every command; a method of another kind is refused naming the right command."""
    _load_all()
    wanted = name.strip().lower()
    names = {key.lower(): key for key in [*_REGISTRY, *_ALIASES]}
    key = names.get(wanted)
    if key is not None:
        spec = _REGISTRY[_ALIASES.get(key, key)]
        if kind is not None and spec.input_kind != kind:
            command = "score-video" if spec.input_kind == "video" else "score"
            raise UsageError(f"method {spec.name!r} scores {spec.input_kind}s; use it with `diqa {command}`")
        return spec
    candidates = sorted(
        k for k, v in names.items() if kind is None or _REGISTRY[_ALIASES.get(v, v)].input_kind == kind
    )
    close = difflib.get_close_matches(wanted, candidates, n=1)
    hint = f"; did you mean {names[close[0]]!r}?" if close else ""
    known = sorted(s.name for s in _REGISTRY.values() if kind is None or s.input_kind == kind)
    what = f"{kind} methods" if kind else "known"
    raise UsageError(f"unknown method {name!r}{hint} ({what}: {', '.join(known)})")


def default_method(command: str) -> MethodSpec:
    """The method ``command`` uses when none is named (the spec whose ``default_for`` names it)."""
    _load_all()
    for spec in sorted(_REGISTRY.values(), key=lambda s: s.name):
        if command in spec.default_for:
            return spec
    raise UsageError(f"no method is the default for `diqa {command}`; name one with --method")


def load_model_class(spec: MethodSpec):
    """Import the torch implementation of a method (this is where torch gets imported)."""
    module_name, _, attr = spec.model.partition(":")
    return getattr(importlib.import_module(module_name), attr)
