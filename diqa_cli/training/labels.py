"""Label files: rows of a path, a MOS and an optional split; MOS normalisation for training.

A labels CSV has the columns ``path`` and ``mos`` and optionally ``split`` (``train`` / ``test`` /
anything else), matched ignoring case; other names are given with ``path_col`` / ``mos_col`` /
``split_col``. Relative paths are resolved against the CSV's folder, or ``media_dir``.

The published label files of common datasets are read through a preset
(:mod:`diqa_cli.training.presets`), named or recognised by the file's published name: their own
columns (or MATLAB variables), how a name becomes a path, the folder of the images or videos and
the official split where there is one.

Everything that takes a labels path (:func:`~diqa_cli.training.train`, ``distill``, ``evaluate``)
also takes a :class:`LabelsSource`, which carries these choices with the path.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diqa_cli.errors import UsageError
from diqa_cli.training.presets import PRESETS, Preset, detect_preset, get_preset

__all__ = [
    "LabelRow",
    "LabelsSource",
    "labels_source",
    "labels_layout",
    "read_labels",
    "select_split",
    "default_split",
    "mos_normalisation",
    "normalised_targets",
]

_EXCEL = (".xlsx", ".xls", ".xlsm")


@dataclass(frozen=True)
class LabelRow:
    path: Path
    mos: float
    split: str | None


@dataclass(frozen=True)
class LabelsSource:
    """A label file and how to read it. ``os.PathLike`` (its file), so it goes wherever a labels
    path goes; ``str()`` is the file's path. ``detected`` says the preset was recognised from the
    file rather than named."""

    path: Path
    preset: Preset | None = None
    path_col: str | None = None
    mos_col: str | None = None
    split_col: str | None = None
    media_dir: Path | None = None
    detected: bool = False

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def layout(self) -> dict[str, Any]:
        """What the sidecar's training record keeps: preset, columns, published MOS range."""
        if self.preset is not None:
            layout = self.preset.layout()
            named = (("path_column", self.path_col), ("mos_column", self.mos_col), ("split_column", self.split_col))
            for key, value in named:
                if value is not None:
                    layout[key] = value
        else:
            layout = {
                "preset": None,
                "path_column": self.path_col or "path",
                "mos_column": self.mos_col or "mos",
                "split_column": self.split_col or "split",
            }
        if self.media_dir is not None:
            layout["media_dir"] = str(self.media_dir)
        return layout


def labels_source(
    data: str | os.PathLike,
    *,
    preset: str | Preset | None = None,
    path_col: str | None = None,
    mos_col: str | None = None,
    split_col: str | None = None,
    media_dir: str | os.PathLike | None = None,
) -> LabelsSource:
    """Resolve ``data`` (a labels file, or a dataset folder holding a published label file) and the
    reading choices into a :class:`LabelsSource`. With no preset and no column named, a file with a
    preset's published name and columns is read through that preset (``detected``)."""
    if isinstance(data, LabelsSource):
        if preset is path_col is mos_col is split_col is media_dir is None:
            return data
        data = data.path
    chosen = get_preset(preset) if isinstance(preset, str) else preset
    path = Path(data).expanduser()
    named_columns = any(c is not None for c in (path_col, mos_col, split_col))
    if path.is_dir():
        path = _find_label_file(path, chosen)
    if not path.is_file():
        raise UsageError(
            f"labels file {path} does not exist (expected a CSV with columns path,mos[,split], "
            f"or a published label file: {', '.join(_published_names())})"
        )
    if path.suffix.lower() in _EXCEL:
        raise UsageError(
            f"{path}: diqa does not read Excel files; open it and save it as CSV with the same columns "
            f"(SPAQ: 'MOS and Image attribute scores.csv' beside the .xlsx), then pass the .csv"
        )
    detected = False
    if chosen is None and not named_columns:
        chosen = detect_preset(path)
        detected = chosen is not None
    if chosen is not None and chosen.is_mat and named_columns:
        raise UsageError(
            f"--path-col/--mos-col/--split-col apply to CSV files; preset {chosen.name} reads the MATLAB "
            f"variables {chosen.path_col} and {chosen.mos_col}"
        )
    folder = None
    if media_dir is not None:
        folder = Path(media_dir).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--media-dir {folder} is not a folder")
    return LabelsSource(path, chosen, path_col, mos_col, split_col, folder, detected)


def labels_layout(data) -> dict[str, Any]:
    """The layout record of a labels path or :class:`LabelsSource` (see :meth:`LabelsSource.layout`)."""
    return labels_source(data).layout()


def read_labels(data, **choices) -> list[LabelRow]:
    """Rows of a label file: a labels CSV (``path``, ``mos``, optional ``split``, or the columns
    named in ``choices``), or a preset's published file. ``choices`` are :func:`labels_source`'s."""
    source = labels_source(data, **choices)
    preset = source.preset
    if preset is not None and preset.is_mat:
        rows = _read_mat(source)
    else:
        rows = _read_csv(source)
    if preset is not None and preset.skip_first:
        rows = rows[preset.skip_first :]
    if not rows:
        raise UsageError(f"{source.path}: no rows under the header")
    return rows


# --- CSV ------------------------------------------------------------------------------------


def _find_column(columns: list[str], wanted: str) -> str | None:
    """``wanted`` among ``columns``: exactly, else ignoring case when that is unambiguous."""
    if wanted in columns:
        return wanted
    matches = [c for c in columns if c.lower() == wanted.lower()]
    return matches[0] if len(matches) == 1 else None


def _read_csv(source: LabelsSource) -> list[LabelRow]:
    file, preset = source.path, source.preset
    path_col = source.path_col or (preset.path_col if preset else "path")
    mos_col = source.mos_col or (preset.mos_col if preset else "mos")
    split_col = source.split_col or (preset.split_col if preset else None)
    split_required = split_col is not None
    split_col = split_col or "split"
    with file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        columns = [c.strip() for c in next(reader, [])]
        found = {name: _find_column(columns, name) for name in (path_col, mos_col, split_col)}
        missing = [name for name in (path_col, mos_col) if found[name] is None]
        if split_required and found[split_col] is None:
            missing.append(split_col)
        if missing:
            have = ", ".join(columns) if columns else "none"
            if preset is not None and source.path_col is source.mos_col is source.split_col is None:
                fix = (
                    f"preset {preset.name} expects {preset.title}'s {preset.files[0]}; "
                    "name the columns with --path-col/--mos-col instead"
                )
            else:
                fix = (
                    "name yours with --path-col/--mos-col/--split-col (case is ignored), "
                    "or use --preset for a published label file"
                )
            raise UsageError(f"{file}: missing column(s) {', '.join(missing)} (found: {have}); {fix}")
        index = {name: columns.index(col) for name, col in found.items() if col is not None}
        root = _media_root(source)
        split_names = preset.split_names if preset is not None else {}
        rows = []
        for line, record in enumerate(reader, start=2):
            if not any(cell.strip() for cell in record):
                continue  # blank lines (a trailing one from a spreadsheet export)
            cell = lambda name: record[index[name]].strip() if index[name] < len(record) else ""  # noqa: E731
            name = cell(path_col)
            if not name:
                raise UsageError(f"{file}, line {line}: empty {found[path_col]}")
            mos = _mos_value(cell(mos_col), f"{file}, line {line}")
            split = None
            if split_col in index:
                value = cell(split_col)
                split = split_names.get(value.lower(), value) if value else None
            rows.append(LabelRow(_path(root, name, preset), mos, split))
    return rows


# --- MATLAB ---------------------------------------------------------------------------------


def _read_mat(source: LabelsSource) -> list[LabelRow]:
    preset = source.preset
    names = [_text(item, source.path, preset.path_col) for item in _mat_variable(source.path, preset.path_col).ravel()]
    scores = _mat_variable(source.path, preset.mos_col)
    try:
        values = [float(v) for v in scores.ravel()]
    except (TypeError, ValueError):
        raise UsageError(f"{source.path}: {preset.mos_col} does not hold numbers") from None
    if len(values) != len(names):
        raise UsageError(
            f"{source.path}: {preset.path_col} has {len(names)} names but {preset.mos_col} has {len(values)} scores"
        )
    root = _media_root(source)
    rows = []
    for i, (name, value) in enumerate(zip(names, values), start=1):
        if not math.isfinite(value):
            raise UsageError(f"{source.path}: {preset.mos_col} entry {i} ({name}) is not a finite number")
        rows.append(LabelRow(_path(root, name, preset), value, None))
    return rows


def _mat_variable(label_file: Path, spec: str):
    """``file.mat:variable`` read from the folder of ``label_file``."""
    from scipy.io import loadmat, whosmat

    file_name, variable = spec.split(":", 1)
    target = label_file.parent / file_name
    if not target.is_file():
        raise UsageError(
            f"{label_file}: {file_name} (with the variable {variable}) must sit beside it; not found in {label_file.parent}"
        )
    try:
        content = loadmat(str(target), variable_names=[variable])
    except NotImplementedError:
        raise UsageError(f"{target}: a MATLAB v7.3 (HDF5) file; save it with -v7, or write path,mos to a CSV") from None
    except Exception as exc:  # scipy raises ValueError/TypeError/OSError on files it cannot parse
        raise UsageError(f"{target}: not a MATLAB file scipy can read ({type(exc).__name__}: {exc})") from None
    if variable not in content:
        present = ", ".join(name for name, _, _ in whosmat(str(target))) or "none"
        raise UsageError(f"{target}: no variable {variable} (found: {present})")
    return content[variable]


def _text(item, label_file: Path, spec: str) -> str:
    """One cell of a MATLAB cell array of names (loadmat nests each string in arrays)."""
    while not isinstance(item, str):
        try:
            if len(item) != 1:
                break
            item = item[0]
        except TypeError:
            break
    if not isinstance(item, str) or not item.strip():
        raise UsageError(f"{label_file}: {spec} holds {item!r} where a file name was expected")
    return item.strip()


# --- shared ---------------------------------------------------------------------------------


def _mos_value(text: str, where: str) -> float:
    try:
        mos = float(text)
    except ValueError:
        raise UsageError(f"{where}: mos {text!r} is not a number") from None
    if not math.isfinite(mos):
        raise UsageError(f"{where}: mos {text!r} is not a finite number")
    return mos


def _path(root: Path, name: str, preset: Preset | None) -> Path:
    path = Path(name + (preset.suffix if preset is not None else "")).expanduser()
    return path if path.is_absolute() else root / path


def _media_root(source: LabelsSource) -> Path:
    """Where the names are relative to: ``--media-dir``; for a preset, its image/video folder beside
    the label file or one level up (LIVE Challenge keeps its .mat files in ``Data/``, SPAQ its
    annotations in ``Annotations/``); else the label file's folder."""
    if source.media_dir is not None:
        return source.media_dir
    preset, folder = source.preset, source.path.parent
    if preset is None:
        return folder
    for base in (folder, folder.parent):
        for name in preset.media_dirs:
            if (base / name).is_dir():
                return base / name
    wanted = " or ".join(preset.media_dirs)
    raise UsageError(
        f"{source.path}: no {wanted} folder beside it or one level up, where {preset.title} keeps its "
        f"{preset.kind}s; unpack them there, or name their folder with --media-dir"
    )


def _published_names() -> list[str]:
    return [f"{name} ({p.name})" for p in PRESETS.values() for name in p.files]


def _find_label_file(folder: Path, preset: Preset | None) -> Path:
    """The published label file in a dataset folder or one of its subfolders (``Data/``)."""
    presets = [preset] if preset is not None else list(PRESETS.values())
    places = [folder, *sorted(p for p in folder.iterdir() if p.is_dir())]
    for candidate in presets:
        for place in places:
            for name in candidate.files:
                if (place / name).is_file() and (preset is not None or detect_preset(place / name) is candidate):
                    return place / name
    names = ", ".join(n for p in presets for n in p.files)
    raise UsageError(f"{folder} is a folder without a published label file ({names}) in it or its subfolders; pass the file")


# --- splits and normalisation ---------------------------------------------------------------


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
    """``wanted`` when the labels have a split, else None (every row)."""
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
