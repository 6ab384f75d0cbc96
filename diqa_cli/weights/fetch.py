"""Fetching weights: ``pull`` and ``resolve``, offline mode, downloads checked before use.

A download goes to a temporary name in its final directory, is hashed, and is renamed into place
only when the hash matches the manifest (or the lock's record).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from diqa_cli import __version__, home
from diqa_cli.errors import WeightsError
from diqa_cli.files import sha256_file
from diqa_cli.weights.manifest import Entry, WeightFile, _file_origin, _key, _selected, entry
from diqa_cli.weights.cache import (
    _entry_result,
    _lock_record,
    _missing_message,
    _pickle_message,
    _present,
    _read_lock,
    _update_lock,
    _verify_cached,
)

__all__ = ["pull", "resolve"]

_CHUNK = 1 << 20


# progress(label, bytes_done, bytes_total_or_None)
ProgressFn = Callable[[str, int, "int | None"], None]


def _transport(e: Entry, f: WeightFile) -> str:
    if f.url:
        return "pkg" if f.url.startswith("pkg://") else "url"
    if e.source.startswith("hf://"):
        return "hf"
    return "pkg" if e.source.startswith("pkg://") else "url"


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
