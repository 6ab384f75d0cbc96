"""The weights cache: what is present, the lock file of recorded hashes, verification.

Where the manifest cannot know a hash (files behind Google Drive, or hub files whose hash was not
published), the first download records it in ``<cache>/weights.lock.json`` (trust on first use)
and later checks compare against that record; ``verify`` never creates trust.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from diqa_cli.errors import WeightsError
from diqa_cli.files import atomic_write_text, sha256_file
from diqa_cli.weights.manifest import (
    Entry,
    WeightFile,
    _file_origin,
    _key,
    _selected,
    cache_dir,
    entry,
    list_entries,
)

__all__ = ["LOCK_FORMAT", "LOCK_NAME", "entry_status", "VerifyResult", "verify"]

LOCK_FORMAT = "diqa-weights-lock/1"


LOCK_NAME = "weights.lock.json"


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
        atomic_write_text(lock_file, json.dumps(payload, indent=2) + "\n")


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


@dataclass
class VerifyResult:
    name: str
    path: str  # relative to the entry folder
    # ok | ok-unpinned | not-pulled (a part no method read; fine) | unverified (no hash to compare
    # with: verify never creates trust) | mismatch | missing (a file of an entry named to verify)
    status: str
    expected: str | None = None
    actual: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "ok-unpinned", "not-pulled")


def verify(names: Iterable[str] | None = None) -> list[VerifyResult]:
    """Hash every cached file again and compare with the manifest, or with the lock record.

    With no names, entries with nothing cached are skipped and the files of a partly pulled entry
    that were never pulled are ``not-pulled``; a named entry reports missing files. A file with no
    hash to compare with (not pinned upstream, none recorded on download) is ``unverified``, not ok:
    verification never records a hash itself.
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
                results.extend(_verify_file(e, f, lock, updates, explicit=explicit))
    finally:
        if updates:
            _update_lock(updates)
    return results


def _verify_file(e: Entry, f: WeightFile, lock: dict, updates: dict, *, explicit: bool) -> list[VerifyResult]:
    raw = e.local_dir / f.path
    converted = e.local_dir / f.converted_path if f.is_pickle else None
    targets: list[tuple[str, Path, str | None, str | None]] = []
    if raw.is_file():
        targets.append((f.path, raw, f.sha256, f.sha256_prefix))
    if converted is not None and converted.is_file():
        targets.append((f.converted_path, converted, _note_sha(converted), None))
    if not targets:
        if not explicit:
            return [VerifyResult(e.name, f.path, "not-pulled", f.sha256, None, "not pulled (no method set up reads it)")]
        message = _missing_message(e, f, offline=False)
        return [VerifyResult(e.name, f.path, "missing", f.sha256, None, message)]
    results = []
    for rel, path, pinned, prefix in targets:
        check = _check_file(
            _key(e, rel), path, pinned=pinned, prefix=prefix, lock=lock, rehash=True,
            origin=_file_origin(e, f),
        )
        if check.lock_update and check.status != "recorded":
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
        else:  # nothing to compare with; verifying must not make the file trusted
            check.status = "unverified"
            message = (
                f"no hash to compare with (not pinned upstream: {f.sha256_note}; `diqa weights pull "
                f"{e.name} --force` downloads it again and records one)"
            )
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


def _note_path(dst: Path) -> Path:
    return Path(dst).with_suffix(".conversion.json")
