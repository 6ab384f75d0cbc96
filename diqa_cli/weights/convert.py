"""Converting released pickle checkpoints to safetensors, safely (``torch.load(weights_only=True)``),
with a provenance note beside the result. The only part of ``diqa_cli.weights`` that imports torch.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

from diqa_cli import __version__
from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.files import atomic_write, atomic_write_text, save_safetensors, sha256_file, tensors_sha256
from diqa_cli.weights.manifest import _key, entry
from diqa_cli.weights.cache import _lock_record, _note_path, _note_sha, _update_lock

__all__ = ["CONVERSION_FORMAT", "conversion_summary", "convert", "convert_entry"]

CONVERSION_FORMAT = "diqa-conversion/1"


_WRAPPER_KEYS = ("state_dict", "model_state", "model")


# The dtypes a backbone's VAE may run in; a converted head records its own VAE's hash in each.
_VAE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# The component name under which a released head keeps the frozen VAE it was trained with.
_OWN_VAE_PREFIX = "vae."


def convert(src: Path | str | Sequence[Path | str], dst: Path | str, *, method: str | None = None) -> Path:
    """Turn plain PyTorch state dicts (pickles) into one safetensors file plus a small JSON note.

    Each file is read with ``torch.load(weights_only=True)``: anything but tensors and plain
    containers is refused, never unpickled. Common wrappers (``state_dict``, ``model_state``,
    ``model``, a ``module.`` prefix from DataParallel) are unwrapped. ``method`` maps the released
    key names through that method's converter (``ReleasedCheckpoint`` for one file,
    ``ReleasedFiles`` for a head released as several files, given together in ``src``; files from
    different training steps, ``checkpoint-<step>`` in their paths, are refused).

    The note (and :func:`conversion_summary`) records what was dropped, counted per key prefix,
    and the SHA-256 of the head's own frozen VAE when the released file carries one (``vae.*``),
    so scoring can warn when the backbone's VAE is not the one the head was trained with.
    """
    import torch

    sources = [Path(src)] if isinstance(src, (str, Path)) else [Path(s) for s in src]
    if not sources:
        raise UsageError("name the file(s) to convert")
    _same_training_step(sources)
    dst = Path(dst)
    states, unwrapped, non_tensors = [], [], []
    for path in sources:
        state, wrappers = _unwrap(_load_pickle(path), path)
        tensors, dropped = _flatten_tensors(state, torch)
        if not tensors:
            raise WeightsError(f"{path}: holds no tensors to convert")
        states.append(tensors)
        unwrapped += wrappers
        non_tensors += dropped
    converted = _converted(states, method, sources)
    kept = {id(v) for v in converted.values()}
    dropped_keys = sorted(k for state in states for k, v in state.items() if id(v) not in kept)
    own_vae = [v for state in states for k, v in state.items() if k.startswith(_OWN_VAE_PREFIX) and id(v) not in kept]
    tensors = _standalone_tensors(converted)

    hashes = [sha256_file(path) for path in sources]
    metadata = {"source": ", ".join(p.name for p in sources), "source_sha256": hashes[0],
                "converted_by": f"diqa {__version__}"}
    vae_sha256 = None
    if own_vae:
        vae_sha256 = {name: tensors_sha256([v.to(getattr(torch, dtype)) for v in own_vae])
                      for name, dtype in _VAE_DTYPES.items()}
        metadata["vae_sha256"] = json.dumps(vae_sha256, sort_keys=True)
    atomic_write(dst, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))
    note = {
        "format": CONVERSION_FORMAT,
        "source": sources[0].name,
        "source_sha256": hashes[0],
        "sources": [{"file": p.name, "sha256": h} for p, h in zip(sources, hashes)],
        "sha256": sha256_file(dst),
        "method": method,
        "unwrapped": unwrapped,
        "tensors": len(tensors),
        "dropped_keys": non_tensors,
        "dropped_tensors": _count_by_prefix(dropped_keys, list(converted)),
        "vae_sha256": vae_sha256,
        "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "diqa_version": __version__,
    }
    atomic_write_text(_note_path(dst), json.dumps(note, indent=2) + "\n")
    return dst


def conversion_summary(dst: Path | str) -> str:
    """One line on what a conversion kept and dropped, from its note (for ``diqa weights convert``)."""
    note = json.loads(_note_path(Path(dst)).read_text(encoding="utf-8"))
    dropped = note.get("dropped_tensors") or {}
    parts = [f"{prefix}* ({count})" for prefix, count in dropped.items()]
    text = f"kept {note['tensors']} tensors; dropped {sum(dropped.values())}" + (f": {', '.join(parts)}" if parts else "")
    if note.get("dropped_keys"):
        text += f"; {len(note['dropped_keys'])} non-tensor values"
    if note.get("vae_sha256"):
        text += f"; recorded the head's own VAE (sha256 {note['vae_sha256']['fp32'][:12]})"
    return text


def _load_pickle(path: Path):
    import pickle

    import torch

    if not path.is_file():
        raise WeightsError(f"{path}: no such file to convert")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{path}: refused: it is not a plain state dict of tensors (torch.load with "
            f"weights_only=True rejected it: {first[:200]}); diqa never unpickles arbitrary objects"
        ) from None
    except (OSError, EOFError) as exc:
        raise WeightsError(f"{path}: cannot be read as a PyTorch file: {exc}") from None


def _converted(states: list[dict], method: str | None, sources: list[Path]) -> dict:
    """The state dicts in the method's checkpoint names (one file as it is without a method)."""
    if method is None:
        if len(states) > 1:
            raise UsageError("several files are converted together only for a method released as several; add --method")
        return dict(states[0])
    from diqa_cli.methods import get_method, load_model_class
    from diqa_cli.models.base import ReleasedCheckpoint, ReleasedFiles

    cls = load_model_class(get_method(method))
    if isinstance(cls, ReleasedFiles):
        return dict(cls.convert_released_files(states))
    if len(states) > 1:
        raise UsageError(f"method {method!r} is released as one file; convert {sources[0].name} and the others one at a time")
    if isinstance(cls, ReleasedCheckpoint):
        return dict(cls.convert_released_state_dict(states[0]))
    return dict(states[0])


_STEP = re.compile(r"checkpoint-(\d+)")


def _same_training_step(sources: list[Path]) -> None:
    """Files saved at different steps of one training run (``…-checkpoint-<step>/…``) do not
    belong together."""
    steps = {}
    for path in sources:
        found = _STEP.findall(str(path))
        if found:
            steps[path] = found[-1]
    if len(set(steps.values())) > 1:
        listed = ", ".join(f"{p.name} (step {s})" for p, s in steps.items())
        raise UsageError(f"these files come from different training steps: {listed}; convert files of one step")


def _count_by_prefix(dropped: list[str], kept: list[str]) -> dict[str, int]:
    """Dropped keys counted by the shortest dotted prefix that no kept key shares
    (``vae.``, ``QFD.bnc1.``…)."""
    counts: dict[str, int] = {}
    for key in dropped:
        parts = key.split(".")
        prefix = key
        for n in range(1, len(parts)):
            candidate = ".".join(parts[:n]) + "."
            if not any(k.startswith(candidate) for k in kept):
                prefix = candidate
                break
        counts[prefix] = counts.get(prefix, 0) + 1
    return dict(sorted(counts.items()))


def _unwrap(obj: object, src: Path) -> tuple[dict, list[str]]:
    unwrapped: list[str] = []
    while isinstance(obj, dict):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        unwrapped.append(inner)
        obj = obj[inner]
    if not isinstance(obj, dict):
        raise WeightsError(f"{src}: holds a {type(obj).__name__}, not a state dict")
    keys = [k for k in obj if isinstance(k, str)]
    if keys and all(k.startswith("module.") for k in keys):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
        unwrapped.append("module.")
    return obj, unwrapped


def _flatten_tensors(state: dict, torch) -> tuple[dict, list[str]]:
    """Tensors keyed by dotted name; other values (epoch counters, optimiser steps) are dropped."""
    tensors: dict = {}
    dropped: list[str] = []

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            dropped.append(prefix)

    walk("", state)
    return tensors, dropped


def _standalone_tensors(tensors: dict) -> dict:
    """Contiguous tensors that share no storage (safetensors refuses aliased tensors)."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else None
        if ptr is not None and ptr in seen:
            tensor = tensor.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = tensor.contiguous()
    return out


def convert_entry(name: str, *, method: str | None = None, dst: Path | None = None) -> list[Path]:
    """Convert the cached pickle files of a manifest entry into their safetensors copies."""
    e = entry(name)
    pickles = [f for f in e.files if f.is_pickle]
    if not pickles:
        raise UsageError(f"weights entry {name!r} has no pickle files to convert")
    if dst is not None and len(pickles) > 1:
        raise UsageError(f"weights entry {name!r} has {len(pickles)} pickle files; give no DST")
    written = []
    updates: dict[str, dict | None] = {}
    for f in pickles:
        raw = e.local_dir / f.path
        if not raw.is_file():
            raise WeightsError(
                f"{e.name}: {f.path} is not in the weights cache; run "
                f"`diqa weights pull {e.name} --allow-pickle` first"
            )
        target = dst or (e.local_dir / f.converted_path)
        out = convert(raw, target, method=method or e.method)
        if dst is None:
            digest = _note_sha(out) or sha256_file(out)
            updates[_key(e, f.converted_path)] = _lock_record(
                out, digest, pinned=False, origin=f"converted from {f.path}"
            )
        written.append(out)
    if updates:
        _update_lock(updates)
    return written
