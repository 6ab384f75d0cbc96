"""Labels CSVs: rows of ``path``, ``mos`` and optional ``split``; MOS normalisation for training.

A labels CSV has the columns ``path`` and ``mos`` and optionally ``split`` (``train`` / ``test`` /
anything else); relative paths are resolved against the CSV's folder.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from diqa_cli.errors import UsageError

__all__ = ["LabelRow", "read_labels", "select_split", "default_split", "mos_normalisation", "normalised_targets"]


@dataclass(frozen=True)
class LabelRow:
    path: Path
    mos: float
    split: str | None


def read_labels(csv_path: str | Path) -> list[LabelRow]:
    """Rows of a labels CSV (``path``, ``mos``, optional ``split``), paths resolved against its folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"labels file {csv_path} does not exist (expected a CSV with columns path,mos[,split])")
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "mos") if c not in columns]
        if missing:
            found = ", ".join(columns) if columns else "none"
            raise UsageError(
                f"{csv_path}: missing column(s) {', '.join(missing)} (found: {found}); "
                "a labels CSV needs a header with path and mos, and may have split"
            )
        reader.fieldnames = columns
        has_split = "split" in columns
        rows = []
        for line, record in enumerate(reader, start=2):
            path_text = (record.get("path") or "").strip()
            mos_text = (record.get("mos") or "").strip()
            if not path_text:
                raise UsageError(f"{csv_path}, line {line}: empty path")
            try:
                mos = float(mos_text)
            except ValueError:
                raise UsageError(f"{csv_path}, line {line}: mos {mos_text!r} is not a number") from None
            if not math.isfinite(mos):
                raise UsageError(f"{csv_path}, line {line}: mos {mos_text!r} is not a finite number")
            path = Path(path_text).expanduser()
            if not path.is_absolute():
                path = csv_path.parent / path
            split = (record.get("split") or "").strip() or None if has_split else None
            rows.append(LabelRow(path, mos, split))
    if not rows:
        raise UsageError(f"{csv_path}: no rows under the header")
    return rows


def select_split(rows: list[LabelRow], split: str | None, *, source: str | Path = "labels") -> list[LabelRow]:
    """Rows of one split; ``None`` or ``"all"`` keeps every row."""
    if split in (None, "all"):
        return list(rows)
    chosen = [r for r in rows if r.split == split]
    if not chosen:
        present = sorted({r.split for r in rows if r.split})
        have = ", ".join(present) if present else "no split column"
        raise UsageError(f"{source}: no rows in split {split!r} (present: {have}); use --split all for every row")
    return chosen


def default_split(rows: list[LabelRow], wanted: str) -> str | None:
    """``wanted`` when the CSV has a split column, else None (every row)."""
    return wanted if any(r.split for r in rows) else None


def mos_normalisation(rows: list[LabelRow], source) -> dict[str, float]:
    """The training split's MOS offset (minimum) and scale (range): targets are mapped to [0, 1]."""
    values = [r.mos for r in rows]
    low, high = min(values), max(values)
    if high == low:
        raise UsageError(f"{source}: every training MOS is {low}; training needs labels that differ")
    return {"offset": low, "scale": high - low}


def normalised_targets(rows: list[LabelRow], indices, normalisation, device):
    """The normalised MOS of ``rows[indices]`` as a float32 tensor on ``device``."""
    import torch

    values = [(rows[i].mos - normalisation["offset"]) / normalisation["scale"] for i in indices]
    return torch.tensor(values, dtype=torch.float32, device=device)
