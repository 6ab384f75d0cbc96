"""The weights manifest: what each entry is, where its files come from, and where they live.

``weights_manifest.json`` (shipped as ``diqa_cli/data/weights_manifest.json``; ``DIQA_MANIFEST``
points at another one) names every file diqa downloads with its source, revision, SHA-256 and
licence. Files land in ``<DIQA_HOME>/weights/<entry>/<relative path>``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from diqa_cli import home
from diqa_cli.errors import UsageError, WeightsError

__all__ = [
    "MANIFEST_FORMAT",
    "KINDS",
    "FORMATS",
    "WeightFile",
    "Entry",
    "manifest_path",
    "load_manifest",
    "list_entries",
    "entry",
    "cache_dir",
    "human_size",
]

MANIFEST_FORMAT = "diqa-weights-manifest/1"


KINDS = (
    "diffusers-backbone",
    "text-encoder",
    "head",
    "torchvision-backbone",
    "video-backbone",
    "perceptual",
)


FORMATS = ("safetensors", "pickle", "json", "txt")


_SCHEMES = ("hf://", "https://", "http://", "pkg://")


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class WeightFile:
    """One file of an entry. ``path`` is relative to the entry's folder in the cache."""

    path: str
    format: str
    sha256: str | None  # hex; None when it cannot be known offline (then trust on first use)
    sha256_note: str = ""  # why the hash is missing, or where a recorded hash comes from
    sha256_prefix: str | None = None  # leading hex digits published in the file name (torchvision)
    size: int | None = None
    url: str | None = None  # explicit URL; overrides the one derived from the entry's source
    hub_path: str | None = None  # path inside the hub repository when it differs from ``path``

    @property
    def is_pickle(self) -> bool:
        return self.format == "pickle"

    @property
    def converted_path(self) -> str:
        """Where ``diqa weights convert NAME`` writes the safetensors copy of a pickle file."""
        return str(Path(self.path).with_suffix(".safetensors"))


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    description: str
    licence: str
    source: str  # hf://<repo>, https://…, or pkg://<python package>/<folder>
    files: tuple[WeightFile, ...]
    revision: str | None = None
    revision_note: str = ""
    non_commercial: bool = False
    method: str | None = None  # method whose converter maps the released keys (convert NAME)
    notes: str = ""

    @property
    def single_file(self) -> bool:
        return len(self.files) == 1

    @property
    def local_dir(self) -> Path:
        return cache_dir() / self.name

    @property
    def known_size(self) -> tuple[int, bool]:
        """(sum of the known file sizes, whether every size is known)."""
        sizes = [f.size for f in self.files]
        return sum(s for s in sizes if s), all(s is not None for s in sizes)


def manifest_path() -> Path:
    """The manifest in use: ``$DIQA_MANIFEST`` if set, else the one shipped with diqa."""
    override = os.environ.get("DIQA_MANIFEST")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[1] / "data" / "weights_manifest.json"


_manifest_cache: dict[tuple[str, int], dict[str, Entry]] = {}


def load_manifest(path: Path | None = None) -> dict[str, Entry]:
    """Parse and check the manifest; a malformed one is a WeightsError naming the problem."""
    path = Path(path) if path is not None else manifest_path()
    try:
        stamp = (str(path), path.stat().st_mtime_ns)
    except OSError as exc:
        raise WeightsError(f"weights manifest {path} cannot be read: {exc.strerror}") from None
    if stamp in _manifest_cache:
        return _manifest_cache[stamp]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"weights manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise WeightsError(f"weights manifest {path}: 'format' must be {MANIFEST_FORMAT!r}")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, dict) or not raw_entries:
        raise WeightsError(f"weights manifest {path}: 'entries' must be a non-empty object")
    entries = {key: _parse_entry(path, key, value) for key, value in raw_entries.items()}
    _manifest_cache[stamp] = entries
    return entries


def _parse_entry(path: Path, key: str, raw: object) -> Entry:
    def bad(reason: str) -> WeightsError:
        return WeightsError(f"weights manifest {path}: entry {key!r}: {reason}")

    if not isinstance(raw, dict):
        raise bad("must be an object")
    if raw.get("name") != key:
        raise bad(f"'name' must repeat the key ({raw.get('name')!r})")
    for required in ("kind", "description", "licence", "source"):
        if not isinstance(raw.get(required), str) or not raw[required].strip():
            raise bad(f"'{required}' is required")
    if raw["kind"] not in KINDS:
        raise bad(f"kind {raw['kind']!r} is not one of {', '.join(KINDS)}")
    source = raw["source"]
    if not source.startswith(_SCHEMES):
        raise bad(f"source {source!r} must start with one of {', '.join(_SCHEMES)}")
    if source.startswith("hf://") and not raw.get("revision"):
        raise bad("a hf:// source needs a 'revision'")
    raw_files = raw.get("files")
    if not isinstance(raw_files, list) or not raw_files:
        raise bad("'files' must be a non-empty list")
    files = []
    for item in raw_files:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise bad("every file needs a 'path'")
        rel = item["path"]
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise bad(f"file path {rel!r} must be relative and stay inside the entry folder")
        fmt = item.get("format")
        if fmt not in FORMATS:
            raise bad(f"{rel}: format {fmt!r} is not one of {', '.join(FORMATS)}")
        digest = item.get("sha256")
        if digest is not None and not (isinstance(digest, str) and _HEX64.match(digest)):
            raise bad(f"{rel}: sha256 must be 64 lower-case hex digits or null")
        note = item.get("sha256_note", "")
        if digest is None and not note:
            raise bad(f"{rel}: a null sha256 needs a 'sha256_note' saying why")
        prefix = item.get("sha256_prefix")
        if prefix is not None and not re.fullmatch(r"[0-9a-f]{4,63}", str(prefix)):
            raise bad(f"{rel}: sha256_prefix must be hex digits")
        url = item.get("url")
        if url is not None and not str(url).startswith(_SCHEMES[1:]):
            raise bad(f"{rel}: url {url!r} must start with https://, http:// or pkg://")
        files.append(
            WeightFile(
                path=rel,
                format=fmt,
                sha256=digest,
                sha256_note=note,
                sha256_prefix=prefix,
                size=item.get("size"),
                url=url,
                hub_path=item.get("hub_path"),
            )
        )
    return Entry(
        name=key,
        kind=raw["kind"],
        description=raw["description"],
        licence=raw["licence"],
        source=source,
        files=tuple(files),
        revision=raw.get("revision"),
        revision_note=raw.get("revision_note", ""),
        non_commercial=bool(raw.get("non_commercial", False)),
        method=raw.get("method"),
        notes=raw.get("notes", ""),
    )


def list_entries() -> list[Entry]:
    return sorted(load_manifest().values(), key=lambda e: e.name)


def entry(name: str) -> Entry:
    entries = load_manifest()
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, list(entries), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UsageError(
        f"unknown weights entry {name!r}{hint} (known: {', '.join(sorted(entries))}; "
        "see `diqa weights list`)"
    )


def cache_dir() -> Path:
    """The one weights cache: ``<DIQA_HOME>/weights``."""
    return home.subdir("weights")


def _file_origin(e: Entry, f: WeightFile) -> str:
    """Human-readable URL a file comes from (also where to get it by hand)."""
    if f.url:
        return f.url
    if e.source.startswith("hf://"):
        repo = e.source[len("hf://") :]
        return f"https://huggingface.co/{repo}/resolve/{e.revision}/{f.hub_path or f.path}"
    return e.source.rstrip("/") + "/" + (f.hub_path or f.path)


def _key(e: Entry, rel: str) -> str:
    return f"{e.name}/{rel}"


def _selected(e: Entry, parts: Iterable[str] | None) -> list[WeightFile]:
    if parts is None:
        return list(e.files)
    wanted = [p.strip("/") for p in parts]
    chosen = [
        f for f in e.files if any(f.path == p or f.path.startswith(p + "/") for p in wanted)
    ]
    covered = {p for p in wanted for f in chosen if f.path == p or f.path.startswith(p + "/")}
    unknown = [p for p in wanted if p not in covered]
    if unknown:
        raise UsageError(f"weights entry {e.name!r} has no part {unknown[0]!r}")
    return chosen


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
