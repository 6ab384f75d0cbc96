"""Presets for the published label files of common quality datasets.

A preset says how one published file is laid out: which column (or MATLAB variable) holds the file
name and which the MOS, how a name becomes a path (KoNViD-1k's ``flickr_id`` + ``.mp4``), which
folder beside the label file holds the images or videos, the MOS scale as published, its direction
and the official split where there is one. :func:`diqa_cli.training.labels.read_labels` reads a
file through a preset; nothing here imports torch, and scipy only to read a ``.mat`` file.

A column written ``file.mat:variable`` is a variable of that ``.mat`` file, which sits beside the
file named on the command line (LIVE Challenge keeps names and MOS in two files).

Where each layout was checked (reference, not authority):

* koniq10k: the header and ``set`` values of ``metadata/koniq10k_distributions_sets.csv`` in
  github.com/subpic/koniq; image folders ``1024x768`` / ``512x384`` from the KonIQ archives' names
  (the KonCept512 notebook unpacks ``koniq10k_512x384.zip`` into ``512x384/``).
* clive: variable names, shapes and the ``[7:1169]`` exclusion as IQA-PyTorch's
  ``scripts/process_livechallenge.py`` and the widely copied HyperIQA ``LIVEChallengeFolder``
  (``Images/<name>``).
* spaq: ``Annotations/MOS and Image attribute scores.xlsx`` with ``Image name`` / ``MOS`` and
  images under ``TestImage/``, as IQA-PyTorch's ``scripts/process_spaq.py`` and several loaders
  that read the CSV export of the same name.
* kadid10k: ``dmos.csv`` with ``dist_img,ref_img,dmos,var`` beside ``images/`` (IQA-PyTorch's
  ``scripts/process_kadid10k.py``; the KADID paper's scale: 5 = imperceptible).
* konvid1k: ``KoNViD_1k_mos.csv`` with ``flickr_id,mos`` and ``KoNViD_1k_videos/<id>.mp4``, as
  several public VQA loaders read it.
* livevqc: ``data.mat`` with ``video_list`` (cell, one name a row) and ``mos`` beside ``Video/``, as
  public VQA loaders read it.

Published MOS ranges are IQA-PyTorch's ``pyiqa/dataset_info.py`` where it lists the set (KonIQ-10k,
LIVE Challenge, SPAQ 1-100; KADID-10k 1-5); KoNViD-1k (1-5, a 5-point ACR scale) and LIVE-VQC
(0-100, a continuous slider) are from the datasets' papers, not checked against a file here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

__all__ = ["Preset", "PRESETS", "get_preset", "preset_names", "detect_preset"]


@dataclass(frozen=True)
class Preset:
    """How one published label file is laid out (see the module docstring)."""

    name: str  # what --preset takes
    title: str  # the dataset's own name
    kind: str  # "image" or "video"
    files: tuple[str, ...]  # published names of the label file: any of them is recognised
    path_col: str  # column (or file.mat:variable) holding the file name
    mos_col: str  # column (or file.mat:variable) holding the MOS
    mos_range: tuple[float, float]  # the MOS scale as published (recorded, not used to normalise)
    media_dirs: tuple[str, ...]  # folder(s) of the images/videos, beside the label file or one up
    split_col: str | None = None  # the official split, where there is one
    split_names: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    suffix: str = ""  # appended to the name (KoNViD-1k's ids have no extension)
    skip_first: int = 0  # rows left out at the start (LIVE Challenge's 7 training images)
    higher_is_better: bool = True
    note: str = ""

    @property
    def is_mat(self) -> bool:
        return Path(self.files[0]).suffix.lower() == ".mat"

    def layout(self) -> dict:
        """What the sidecar's training record keeps of the preset."""
        return {
            "preset": self.name,
            "dataset": self.title,
            "path_column": self.path_col,
            "mos_column": self.mos_col,
            "split_column": self.split_col,
            "published_mos_range": list(self.mos_range),
            "higher_is_better": self.higher_is_better,
            **({"left_out_first_rows": self.skip_first} if self.skip_first else {}),
        }


_KONIQ_SETS = MappingProxyType({"training": "train", "validation": "val", "test": "test"})

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in (
            Preset(
                name="koniq10k",
                title="KonIQ-10k",
                kind="image",
                files=("koniq10k_distributions_sets.csv",),
                path_col="image_name",
                mos_col="MOS",
                mos_range=(1.0, 100.0),
                media_dirs=("1024x768", "512x384"),
                split_col="set",
                split_names=_KONIQ_SETS,
                note="official split: set training/validation/test -> train/val/test",
            ),
            Preset(
                name="clive",
                title="LIVE In the Wild Image Quality Challenge",
                kind="image",
                files=("AllMOS_release.mat", "AllImages_release.mat"),
                path_col="AllImages_release.mat:AllImages_release",
                mos_col="AllMOS_release.mat:AllMOS_release",
                mos_range=(1.0, 100.0),
                media_dirs=("Images",),
                skip_first=7,
                note="the first 7 rows (Images/trainingImages) are left out, as the common protocol does; no official split",
            ),
            Preset(
                name="spaq",
                title="SPAQ",
                kind="image",
                files=("MOS and Image attribute scores.csv",),
                path_col="Image name",
                mos_col="MOS",
                mos_range=(1.0, 100.0),
                media_dirs=("TestImage",),
                note="the published .xlsx saved as CSV with the same columns; no official split",
            ),
            Preset(
                name="kadid10k",
                title="KADID-10k",
                kind="image",
                files=("dmos.csv",),
                path_col="dist_img",
                mos_col="dmos",
                mos_range=(1.0, 5.0),
                media_dirs=("images",),
                note="'dmos' is the mean rating on a 5-point scale, 5 = imperceptible: higher is better; no official split",
            ),
            Preset(
                name="konvid1k",
                title="KoNViD-1k",
                kind="video",
                files=("KoNViD_1k_mos.csv",),
                path_col="flickr_id",
                mos_col="mos",
                mos_range=(1.0, 5.0),
                media_dirs=("KoNViD_1k_videos",),
                suffix=".mp4",
                note="path = flickr_id + .mp4; no official split",
            ),
            Preset(
                name="livevqc",
                title="LIVE Video Quality Challenge",
                kind="video",
                files=("data.mat",),
                path_col="data.mat:video_list",
                mos_col="data.mat:mos",
                mos_range=(0.0, 100.0),
                media_dirs=("Video",),
                note="no official split",
            ),
        )
    }
)


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    from diqa_cli.errors import UsageError

    preset = PRESETS.get(name.strip().lower())
    if preset is None:
        raise UsageError(f"unknown --preset {name!r}; choose one of {', '.join(PRESETS)}")
    return preset


def detect_preset(path: Path) -> Preset | None:
    """The preset whose published file ``path`` is: the name matches and, for a CSV, the header has
    the preset's columns (a user's own ``dmos.csv`` with ``path,mos`` stays a plain labels CSV);
    for a ``.mat`` file, the name alone."""
    for preset in PRESETS.values():
        if path.name not in preset.files:
            continue
        if preset.is_mat:
            return preset
        header = {c.lower() for c in _csv_header(path)}
        if preset.path_col.lower() in header and preset.mos_col.lower() in header:
            return preset
    return None


def _csv_header(path: Path) -> list[str]:
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            return [c.strip() for c in next(csv.reader(fh), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
