"""Weights: the manifest, one cache, pull / resolve / verify with SHA-256, offline mode, convert.

Every file diqa downloads is named in ``weights_manifest.json`` (shipped as
``diqa_cli/data/weights_manifest.json``; ``DIQA_MANIFEST`` points at another one) with its source,
revision, SHA-256 and licence. Files land in ``<DIQA_HOME>/weights/<entry>/<relative path>``, so a
``diffusers-backbone`` entry is a plain local diffusers folder.

Integrity: a download goes to a temporary name in its final directory, is hashed, and is renamed
into place only when the hash matches the manifest. Where the manifest cannot know a hash (files
behind Google Drive, or hub files whose hash was not published), the first download records it in
``<cache>/weights.lock.json`` (trust on first use) and later checks compare against that record.

This module never imports torch at import time: ``diqa weights list`` must start fast. Only
:func:`convert` imports torch, and it reads pickles with ``weights_only=True``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from diqa_cli import __version__, home
from diqa_cli.errors import UsageError, WeightsError

__all__ = [
    "Entry",
    "WeightFile",
    "VerifyResult",
    "manifest_path",
    "load_manifest",
    "list_entries",
    "entry",
    "cache_dir",
    "entry_status",
    "resolve",
    "pull",
    "verify",
    "convert",
    "convert_entry",
    "sha256_file",
    "human_size",
]

MANIFEST_FORMAT = "diqa-weights-manifest/1"
LOCK_FORMAT = "diqa-weights-lock/1"
CONVERSION_FORMAT = "diqa-conversion/1"
LOCK_NAME = "weights.lock.json"
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
_CHUNK = 1 << 20

# progress(label, bytes_done, bytes_total_or_None)
ProgressFn = Callable[[str, int, "int | None"], None]


# ----------------------------------------------------------------------------------- manifest


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
    return Path(__file__).resolve().parent / "data" / "weights_manifest.json"


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


# -------------------------------------------------------------------------------- cache, lock


def cache_dir() -> Path:
    """The one weights cache: ``<DIQA_HOME>/weights``."""
    return home.subdir("weights")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _lock_path() -> Path:
    return cache_dir() / LOCK_NAME


def _read_lock() -> dict:
    try:
        data = json.loads(_lock_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _update_lock(updates: dict[str, dict | None]) -> None:
    """Merge records into the lock file; the file lock keeps two diqa processes from racing."""
    from filelock import FileLock

    lock_file = _lock_path()
    with FileLock(str(lock_file) + ".lock"):
        records = _read_lock()
        for key, value in updates.items():
            if value is None:
                records.pop(key, None)
            else:
                records[key] = value
        payload = {"format": LOCK_FORMAT, "files": dict(sorted(records.items()))}
        _atomic_write_text(lock_file, json.dumps(payload, indent=2) + "\n")


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _lock_record(path: Path, digest: str, *, pinned: bool, origin: str) -> dict:
    st = path.stat()
    return {
        "sha256": digest,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "pinned": pinned,
        "origin": origin,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@dataclass
class _Check:
    status: str  # ok | ok-unpinned | recorded | mismatch
    expected: str | None
    actual: str | None
    lock_update: dict | None = None


def _verify_cached(
    e: Entry, f: WeightFile, rel: str, path: Path, pinned: str | None, prefix: str | None, lock: dict, updates: dict
) -> None:
    """Check ``path`` (``rel`` in entry ``e``, from manifest file ``f``) through the lock: a
    mismatch is an error saying how to download it again; a new lock record goes into ``updates``."""
    check = _check_file(
        _key(e, rel), path, pinned=pinned, prefix=prefix, lock=lock, rehash=False, origin=_file_origin(e, f)
    )
    if check.status == "mismatch":
        raise WeightsError(
            f"{e.name}: cached {rel} does not match its recorded SHA-256 (expected {check.expected}, "
            f"got {check.actual}); run `diqa weights pull {e.name} --force` to download it again"
        )
    if check.lock_update:
        updates[_key(e, rel)] = check.lock_update


def _check_file(
    key: str,
    path: Path,
    *,
    pinned: str | None,
    prefix: str | None,
    lock: dict,
    rehash: bool,
    origin: str,
) -> _Check:
    """Compare a cached file with its pinned hash, else with its lock record, else record it.

    Without ``rehash`` a lock record whose size and mtime still match the file stands in for
    hashing it again (hashing a 3.4 GB U-Net on every start would cost seconds).
    """
    record = lock.get(key)
    st = path.stat()
    if (
        not rehash
        and record
        and record.get("size") == st.st_size
        and record.get("mtime_ns") == st.st_mtime_ns
        and (pinned is None or record.get("sha256") == pinned)
    ):
        recorded = record["sha256"]
        return _Check("ok" if pinned else "ok-unpinned", pinned or recorded, recorded)
    actual = sha256_file(path)
    if pinned is not None:
        expected = pinned
    elif record and record.get("sha256"):
        expected = record["sha256"]
    else:
        expected = None
    if expected is not None and actual != expected:
        return _Check("mismatch", expected, actual)
    if prefix and not actual.startswith(prefix):
        return _Check("mismatch", f"{prefix}…", actual)
    status = "ok" if pinned else ("ok-unpinned" if expected else "recorded")
    update = _lock_record(path, actual, pinned=pinned is not None, origin=origin)
    return _Check(status, expected or actual, actual, lock_update=update)


# ----------------------------------------------------------------------------- sources, URLs


def _file_origin(e: Entry, f: WeightFile) -> str:
    """Human-readable URL a file comes from (also where to get it by hand)."""
    if f.url:
        return f.url
    if e.source.startswith("hf://"):
        repo = e.source[len("hf://") :]
        return f"https://huggingface.co/{repo}/resolve/{e.revision}/{f.hub_path or f.path}"
    return e.source.rstrip("/") + "/" + (f.hub_path or f.path)


def _transport(e: Entry, f: WeightFile) -> str:
    if f.url:
        return "pkg" if f.url.startswith("pkg://") else "url"
    if e.source.startswith("hf://"):
        return "hf"
    return "pkg" if e.source.startswith("pkg://") else "url"


def _missing_message(e: Entry, f: WeightFile, *, offline: bool) -> str:
    where = e.local_dir / f.path
    reason = "offline mode is on (--offline, HF_HUB_OFFLINE or DIQA_OFFLINE)" if offline else ""
    lead = f"{e.name}: {f.path} is not in the weights cache"
    fix = f"run `diqa weights pull {e.name}`{' with network access' if offline else ''}"
    tail = f", or download {_file_origin(e, f)} by hand to {where}"
    return f"{lead}{'; ' + reason if reason else ''}; {fix}{tail}"


def _pickle_message(e: Entry, f: WeightFile) -> str:
    return (
        f"{e.name}: {f.path} is a pickle file, refused by default because unpickling can run code; "
        f"run `diqa weights pull {e.name} --allow-pickle`, then `diqa weights convert {e.name}` "
        "to turn it into safetensors"
    )


# ----------------------------------------------------------------------------------- pull


def pull(
    name: str,
    *,
    offline: bool = False,
    force: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn | None = None,
    parts: Iterable[str] | None = None,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Download the files of an entry that are not cached yet; return what :func:`resolve` returns.

    ``parts`` limits the work to files under the given folders or names (e.g. ``["unet", "vae"]``).
    ``notify`` receives one-line notes for people (a hash recorded on first use).
    """
    e = entry(name)
    offline = home.offline_requested(offline)
    lock = _read_lock()
    updates: dict[str, dict | None] = {}
    try:
        for f in _selected(e, parts):
            final = e.local_dir / f.path
            if not force:
                if f.is_pickle and (e.local_dir / f.converted_path).is_file():
                    continue  # the safetensors copy is what gets used
                if final.is_file():
                    _verify_cached(e, f, f.path, final, f.sha256, f.sha256_prefix, lock, updates)
                    continue
            if f.is_pickle and not allow_pickle:
                raise WeightsError(_pickle_message(e, f))
            transport = _transport(e, f)
            if offline and transport != "pkg":
                raise WeightsError(_missing_message(e, f, offline=True))
            # a forced re-download must not be judged against the record it replaces
            previous = None if force else lock.get(_key(e, f.path), {}).get("sha256")
            digest = _fetch(e, f, final, transport, previous, progress)
            updates[_key(e, f.path)] = _lock_record(
                final, digest, pinned=f.sha256 is not None, origin=_file_origin(e, f)
            )
            if f.sha256 is None and notify is not None:
                notify(
                    f"{e.name}: {f.path}: SHA-256 {digest} recorded on first download "
                    f"(not pinned upstream: {f.sha256_note})"
                )
    finally:
        if updates:
            _update_lock(updates)
    return _entry_result(e, allow_pickle=allow_pickle, parts=parts)


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


def _fetch(
    e: Entry,
    f: WeightFile,
    final: Path,
    transport: str,
    previous: str | None,
    progress: ProgressFn | None,
) -> str:
    """Fetch one file to a temporary name beside ``final``, check it, rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    label = f"{e.name}/{f.path}"
    if transport == "hf":
        tmp = _fetch_hf(e, f, final, progress)
    else:
        fd, tmp_name = tempfile.mkstemp(
            dir=final.parent, prefix=f".{final.name}.", suffix=".partial"
        )
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            if transport == "pkg":
                _copy_from_package(f.url or e.source.rstrip("/") + "/" + f.path, tmp)
            else:
                _download_url(_file_origin(e, f), tmp, f, label, progress)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    try:
        actual = sha256_file(tmp)
        expected = f.sha256 or previous
        problem = None
        if expected is not None and actual != expected:
            problem = f"expected {expected}, got {actual}"
        elif f.sha256_prefix and not actual.startswith(f.sha256_prefix):
            problem = f"expected a hash starting {f.sha256_prefix} (file name), got {actual}"
        if problem:
            raise WeightsError(
                f"{label}: SHA-256 mismatch for the file from {_file_origin(e, f)}: {problem}; "
                "the download was deleted and nothing was cached"
            )
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return actual


def _download_url(
    url: str, dest: Path, f: WeightFile, label: str, progress: ProgressFn | None
) -> None:
    """Stream ``url`` into ``dest`` in chunks (urllib honours HTTP(S)_PROXY in the environment)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"diqa/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            content_type = response.headers.get("Content-Type", "")
            if "text/html" in content_type and f.format not in ("json", "txt"):
                # Google Drive answers with a web page when its quota is exhausted or a
                # confirmation is needed; that page must never be cached as weights.
                raise WeightsError(
                    f"{label}: {url} answered with a web page instead of the file "
                    "(download quota or a login page?); download it by hand with a browser"
                )
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else f.size
            done = 0
            with open(dest, "wb") as out:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(label, done, total)
    except urllib.error.HTTPError as exc:
        raise WeightsError(
            f"{label}: download from {url} failed: HTTP {exc.code} {exc.reason}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(f"{label}: download from {url} failed: {reason}") from None


def _copy_from_package(url: str, dest: Path) -> None:
    """``pkg://<package>/<path>``: a file shipped inside an installed Python package.

    The package is located without importing it (lpips, for one, imports torch on import).
    """
    import importlib.util

    package, _, rel = url[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"{url}: the Python package {package!r} is not installed; `pip install {package}`"
        )
    source = Path(list(spec.submodule_search_locations)[0]) / rel
    if not source.is_file():
        raise WeightsError(f"{url}: {source} does not exist in the installed {package!r} package")
    shutil.copyfile(source, dest)


def _fetch_hf(e: Entry, f: WeightFile, final: Path, progress: ProgressFn | None) -> Path:
    """Download through huggingface_hub (tokens, proxies, HF_ENDPOINT, Xet) into a staging folder
    inside the entry's folder, so the rename into the diqa cache stays on one file system."""
    import huggingface_hub
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from huggingface_hub.utils import enable_progress_bars

    repo = e.source[len("hf://") :]
    staging = e.local_dir / f".diqa-staging-{os.getpid()}"
    quiet = progress is None and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        staged = huggingface_hub.hf_hub_download(
            repo,
            f.hub_path or f.path,
            revision=e.revision,
            local_dir=staging,
            library_name="diqa",
            library_version=__version__,
        )
        tmp = final.parent / f".{final.name}.{os.getpid()}.partial"
        os.replace(staged, tmp)
        return tmp
    except Exception as exc:  # huggingface_hub raises many types; one line for the user
        raise WeightsError(
            f"{e.name}/{f.path}: download from hf://{repo}@{e.revision} failed: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    finally:
        if quiet:
            enable_progress_bars()
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------- resolve


def resolve(
    name: str,
    *,
    offline: bool = False,
    allow_pickle: bool = False,
    parts: Iterable[str] | None = None,
    download: bool = True,
) -> Path:
    """Local path of an entry: its folder (several files) or its file (one file).

    Missing files are downloaded unless offline (``offline`` or HF_HUB_OFFLINE / DIQA_OFFLINE) or
    ``download`` is False; then a WeightsError names the missing file and the fix. A pickle file
    resolves to its converted ``.safetensors`` copy when one exists, to itself only with
    ``allow_pickle``. ``parts`` limits the entry to some folders or files (e.g. ``["unet"]``).
    """
    e = entry(name)
    offline = home.offline_requested(offline)
    missing = [f for f in _selected(e, parts) if _present(e, f, allow_pickle) is None]
    if missing:
        if offline or not download:
            raise WeightsError(_missing_message(e, missing[0], offline=offline))
        return pull(name, allow_pickle=allow_pickle, parts=parts)
    return _entry_result(e, allow_pickle=allow_pickle, parts=parts)


def _present(e: Entry, f: WeightFile, allow_pickle: bool) -> Path | None:
    """The cached file to use for ``f`` (the converted copy first), or None."""
    if f.is_pickle:
        converted = e.local_dir / f.converted_path
        if converted.is_file():
            return converted
        raw = e.local_dir / f.path
        if raw.is_file():
            if not allow_pickle:
                raise WeightsError(
                    f"{e.name}: {f.path} is cached but is a pickle file; run "
                    f"`diqa weights convert {e.name}` to make the safetensors copy diqa loads"
                )
            return raw
        return None
    path = e.local_dir / f.path
    return path if path.is_file() else None


def _entry_result(e: Entry, *, allow_pickle: bool, parts: Iterable[str] | None) -> Path:
    """Check the cached files (cheaply, through the lock) and return the entry's path."""
    lock = _read_lock()
    updates: dict[str, dict | None] = {}
    chosen: Path | None = None
    try:
        for f in _selected(e, parts):
            path = _present(e, f, allow_pickle)
            if path is None:
                raise WeightsError(_missing_message(e, f, offline=False))
            rel = path.relative_to(e.local_dir).as_posix()
            if rel == f.path:
                pinned, prefix = f.sha256, f.sha256_prefix
            else:  # the converted copy, checked against its conversion note
                pinned, prefix = _note_sha(path), None
            _verify_cached(e, f, rel, path, pinned, prefix, lock, updates)
            chosen = path
    finally:
        if updates:
            _update_lock(updates)
    if e.single_file and chosen is not None:
        return chosen
    return e.local_dir


def _note_sha(converted: Path) -> str | None:
    """SHA-256 of a converted file as its conversion note recorded it."""
    try:
        return json.loads(_note_path(converted).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError):
        return None


def entry_status(e: Entry) -> str:
    """``yes`` (every file cached), ``partial`` or ``no``; a converted copy counts as cached."""
    present = 0
    for f in e.files:
        candidates = [e.local_dir / f.path]
        if f.is_pickle:
            candidates.append(e.local_dir / f.converted_path)
        present += any(p.is_file() for p in candidates)
    if present == len(e.files):
        return "yes"
    return "partial" if present else "no"


# ---------------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    name: str
    path: str  # relative to the entry folder
    status: str  # ok | ok-unpinned | recorded | mismatch | missing
    expected: str | None = None
    actual: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "ok-unpinned", "recorded")



def verify(names: Iterable[str] | None = None) -> list[VerifyResult]:
    """Hash every cached file again and compare with the manifest, or with the lock record.

    With no names, entries with nothing cached are skipped; a named entry reports missing files.
    """
    explicit = names is not None
    entries = [entry(n) for n in names] if explicit else list_entries()
    lock = _read_lock()
    updates: dict[str, dict | None] = {}
    results: list[VerifyResult] = []
    try:
        for e in entries:
            if not explicit and entry_status(e) == "no":
                continue
            for f in e.files:
                results.extend(_verify_file(e, f, lock, updates))
    finally:
        if updates:
            _update_lock(updates)
    return results


def _verify_file(e: Entry, f: WeightFile, lock: dict, updates: dict) -> list[VerifyResult]:
    raw = e.local_dir / f.path
    converted = e.local_dir / f.converted_path if f.is_pickle else None
    targets: list[tuple[str, Path, str | None, str | None]] = []
    if raw.is_file():
        targets.append((f.path, raw, f.sha256, f.sha256_prefix))
    if converted is not None and converted.is_file():
        targets.append((f.converted_path, converted, _note_sha(converted), None))
    if not targets:
        message = _missing_message(e, f, offline=False)
        return [VerifyResult(e.name, f.path, "missing", f.sha256, None, message)]
    results = []
    for rel, path, pinned, prefix in targets:
        check = _check_file(
            _key(e, rel), path, pinned=pinned, prefix=prefix, lock=lock, rehash=True,
            origin=_file_origin(e, f),
        )
        if check.lock_update:
            updates[_key(e, rel)] = check.lock_update
        if check.status == "mismatch":
            message = f"SHA-256 mismatch: expected {check.expected}, got {check.actual}"
        elif path == converted:
            same_source, message = _converted_provenance(e, f, path, lock)
            if not same_source:
                check.status = "mismatch"
        elif check.status == "ok":
            message = "matches the manifest"
        elif check.status == "ok-unpinned":
            message = (
                "matches the hash recorded on first download "
                f"(not pinned upstream: {f.sha256_note})"
            )
        else:
            message = f"hash recorded now (not pinned upstream: {f.sha256_note})"
        results.append(
            VerifyResult(e.name, rel, check.status, check.expected, check.actual, message)
        )
    return results


def _converted_provenance(
    e: Entry, f: WeightFile, converted: Path, lock: dict
) -> tuple[bool, str]:
    """Whether a converted copy was made from the file the manifest (or lock) names, and why."""
    try:
        note = json.loads(_note_path(converted).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True, "converted copy without its conversion note (provenance unknown)"
    source = note.get("source_sha256")
    expected = f.sha256 or lock.get(_key(e, f.path), {}).get("sha256")
    if expected and source != expected:
        return False, f"converted from a different file: source hash {source}, expected {expected}"
    return True, f"converted from {note.get('source')} ({source})"


# --------------------------------------------------------------------------------- convert

_WRAPPER_KEYS = ("state_dict", "model_state", "model")


def _note_path(dst: Path) -> Path:
    return Path(dst).with_suffix(".conversion.json")


def convert(src: Path | str, dst: Path | str, *, method: str | None = None) -> Path:
    """Turn a plain PyTorch state dict (pickle) into safetensors plus a small JSON note.

    The file is read with ``torch.load(weights_only=True)``: anything but tensors and plain
    containers is refused, never unpickled. Common wrappers (``state_dict``, ``model_state``,
    ``model``, a ``module.`` prefix from DataParallel) are unwrapped; ``method`` maps the released
    key names through that method's ``convert_released_state_dict`` when its class has one.
    """
    import pickle

    import torch

    from diqa_cli.safetensors_file import save_safetensors

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

        cls = load_model_class(get_method(method))
        converter = getattr(cls, "convert_released_state_dict", None)
        if converter is not None:
            tensors = dict(converter(tensors))
    tensors = _standalone_tensors(tensors)

    source_sha = sha256_file(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".partial")
    os.close(fd)
    try:
        save_safetensors(
            tensors,
            tmp,
            metadata={
                "source": src.name,
                "source_sha256": source_sha,
                "converted_by": f"diqa {__version__}",
            },
        )
        out_sha = sha256_file(Path(tmp))
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
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
    _atomic_write_text(_note_path(dst), json.dumps(note, indent=2) + "\n")
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


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"

