"""File plumbing written once: atomic writes, SHA-256 of files, the refusal of pickle files,
and safetensors reading and writing.

* Atomic writes: a reader never sees half a file, and an interruption leaves the old one.
* SHA-256: :func:`sha256_file` reads the bytes; :func:`file_sha256` remembers the result in
  ``DIQA_HOME/file_hashes.json`` by path, size and modification time, so multi-GB weights are
  read once, not on every run.
* Pickle files (:data:`PICKLE_SUFFIXES`) can run code when loaded; diqa never loads them except
  through ``torch.load(weights_only=True)`` in ``diqa weights convert``.
* safetensors files are written with their metadata in sorted order: safetensors keeps metadata in
  a Rust HashMap and writes it in a per-process random order (safetensors issue #584), so two saves
  of the same tensors would otherwise differ byte for byte and in SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from diqa_cli.errors import WeightsError

__all__ = [
    "PICKLE_SUFFIXES",
    "atomic_write",
    "atomic_write_text",
    "file_sha256",
    "is_pickle",
    "read_safetensors",
    "read_safetensors_metadata",
    "refuse_pickle",
    "save_safetensors",
    "sha256_file",
    "tensors_sha256",
]

# Suffixes of pickle-based checkpoints (PyTorch, Lightning, pytorchvideo's model zoo, plain pickle).
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".pyth", ".bin", ".pkl"})
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike, write: Callable[[str], object],
                 keep: Callable[[str], bool] | None = None) -> Path | None:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder, then rename it over ``path``.
    With ``keep``, the written temporary file is renamed only if ``keep(tmp)`` says so; otherwise
    it is removed, nothing is written and None is returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if keep is not None and not keep(tmp):
            Path(tmp).unlink()
            return None
        # mkstemp (and safetensors itself) create files private to the user; the result gets the
        # permissions any other new file would (umask applied), so it can be shared.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- hashes


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """:func:`sha256_file`, remembered in ``DIQA_HOME/file_hashes.json`` by path, size and mtime."""
    from diqa_cli import home

    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = home.diqa_home() / "file_hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    cache[key] = sha256_file(path)
    atomic_write_text(cache_file, json.dumps(cache, indent=0, sort_keys=True))
    return cache[key]


def tensors_sha256(tensors) -> str:
    """SHA-256 identifying a set of tensors by their values, dtypes and shapes, not their names
    (the same VAE saved by two diffusers versions that name its layers differently hashes alike)."""
    import torch

    parts = []
    for tensor in tensors:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest = hashlib.sha256(f"{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
        parts.append(digest.hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()


# --------------------------------------------------------------------------- pickle and safetensors


def is_pickle(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def refuse_pickle(path: str | os.PathLike, *, fix: str | None = None) -> None:
    """Raise ``WeightsError`` for a pickle file, naming ``fix`` (default: convert it once)."""
    if is_pickle(path):
        fix = fix or f"convert it once with `diqa weights convert {path}` and pass the .safetensors file"
        raise WeightsError(
            f"{path}: pickle checkpoints ({Path(path).suffix}) are not loaded because they can run code; {fix}"
        )


def read_safetensors(path: str | os.PathLike) -> dict:
    """All tensors of a safetensors file; a file that is not one gives a one-line ``WeightsError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    refuse_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty when it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc


def save_safetensors(tensors: dict, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the metadata keys written in sorted order."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        _sort_metadata(path)


def _sort_metadata(path: str | os.PathLike) -> None:
    """Rewrite the header in place with sorted metadata keys. Same keys and values give a header
    of the same length, so the data offsets stay valid and no tensor byte moves."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) > length:  # cannot happen for a reordering; it would shift every offset
            raise AssertionError(f"{path}: re-serialised safetensors header grew")
        handle.seek(8)
        handle.write(text.ljust(length, b" "))
