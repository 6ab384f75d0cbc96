"""Weights: the manifest, one cache, pull / resolve / verify with SHA-256, offline mode, convert.

* :mod:`.manifest`  ``weights_manifest.json``: entries, their files, sources, licences;
* :mod:`.cache`     what is in ``<DIQA_HOME>/weights``, the lock file of recorded hashes, ``verify``;
* :mod:`.fetch`     ``pull`` and ``resolve`` (downloads hashed before they are renamed into place);
* :mod:`.convert`   released pickles to safetensors (``torch.load(weights_only=True)`` only).

The top-level ``weights_manifest.json`` is the one source of truth; the packaged copy
(``diqa_cli/data/weights_manifest.json``) is generated from it (``make manifest``) and a test holds
them equal. Nothing here imports torch at import time (``diqa weights list`` must start fast);
only :func:`convert` does.
"""

from diqa_cli.files import sha256_file
from diqa_cli.weights.cache import LOCK_FORMAT, LOCK_NAME, VerifyResult, entry_status, verify
from diqa_cli.weights.convert import CONVERSION_FORMAT, conversion_summary, convert, convert_entry
from diqa_cli.weights.fetch import pull, resolve
from diqa_cli.weights.manifest import (
    FORMATS,
    KINDS,
    MANIFEST_FORMAT,
    Entry,
    WeightFile,
    cache_dir,
    entry,
    human_size,
    list_entries,
    load_manifest,
    manifest_path,
)

__all__ = [
    "CONVERSION_FORMAT",
    "FORMATS",
    "KINDS",
    "LOCK_FORMAT",
    "LOCK_NAME",
    "MANIFEST_FORMAT",
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
    "conversion_summary",
    "sha256_file",
    "human_size",
]
