"""safetensors files whose bytes depend only on their content.

safetensors keeps a file's metadata in a Rust HashMap and writes it in a per-process random order
(safetensors issue #584), so two saves of the same tensors and metadata differ byte for byte and
in SHA-256. The tensors themselves are written sorted; only the metadata needs putting in order.
"""

from __future__ import annotations

import json
import os


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
