"""Converting released pickle checkpoints to safetensors, safely (``torch.load(weights_only=True)``),
with a provenance note beside the result. The only part of ``diqa_cli.weights`` that imports torch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from diqa_cli import __version__
from diqa_cli.errors import UsageError, WeightsError
from diqa_cli.files import atomic_write, atomic_write_text, save_safetensors, sha256_file
from diqa_cli.weights.manifest import _key, entry
from diqa_cli.weights.cache import _lock_record, _note_path, _note_sha, _update_lock

__all__ = ["CONVERSION_FORMAT", "convert", "convert_entry"]

CONVERSION_FORMAT = "diqa-conversion/1"


_WRAPPER_KEYS = ("state_dict", "model_state", "model")


def convert(src: Path | str, dst: Path | str, *, method: str | None = None) -> Path:
    """Turn a plain PyTorch state dict (pickle) into safetensors plus a small JSON note.

    The file is read with ``torch.load(weights_only=True)``: anything but tensors and plain
    containers is refused, never unpickled. Common wrappers (``state_dict``, ``model_state``,
    ``model``, a ``module.`` prefix from DataParallel) are unwrapped; ``method`` maps the released
    key names through that method's ``convert_released_state_dict`` when its class has one.
    """
    import pickle

    import torch

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise WeightsError(f"{src}: no such file to convert")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(
            f"{src}: refused: it is not a plain state dict of tensors (torch.load with "
            f"weights_only=True rejected it: {first[:200]}); diqa never unpickles arbitrary objects"
        ) from None
    except (OSError, EOFError) as exc:
        raise WeightsError(f"{src}: cannot be read as a PyTorch file: {exc}") from None
    state, unwrapped = _unwrap(obj, src)
    tensors, dropped = _flatten_tensors(state, torch)
    if not tensors:
        raise WeightsError(f"{src}: holds no tensors to convert")
    if method is not None:
        from diqa_cli.methods import get_method, load_model_class
        from diqa_cli.models.base import ReleasedCheckpoint

        cls = load_model_class(get_method(method))
        if isinstance(cls, ReleasedCheckpoint):
            tensors = dict(cls.convert_released_state_dict(tensors))
    tensors = _standalone_tensors(tensors)

    source_sha = sha256_file(src)
    metadata = {"source": src.name, "source_sha256": source_sha, "converted_by": f"diqa {__version__}"}
    atomic_write(dst, lambda tmp: save_safetensors(tensors, tmp, metadata=metadata))
    out_sha = sha256_file(dst)
    note = {
        "format": CONVERSION_FORMAT,
        "source": src.name,
        "source_sha256": source_sha,
        "sha256": out_sha,
        "method": method,
        "unwrapped": unwrapped,
        "tensors": len(tensors),
        "dropped_keys": dropped,
        "converted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "diqa_version": __version__,
    }
    atomic_write_text(_note_path(dst), json.dumps(note, indent=2) + "\n")
    return dst


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
