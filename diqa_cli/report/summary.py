"""Group rows by the settings that produced them and summarise each group: counts, quantiles,
a histogram, the best and the worst rows. Pure Python; no image is read here.

Scores of different methods (or checkpoints) live on different scales, so every statistic and the
best/worst choice is per group, never across groups.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["QUANTILES", "SETTINGS_FIELDS", "Group", "group_rows", "histogram", "quantile"]

# What a source may record about how its scores were made, in the order a person reads them.
# Rows that agree on all of these (the ones they carry) form one group.
SETTINGS_FIELDS = (
    "method", "checkpoint", "checkpoint_sha256", "backbone", "backbone_identity", "slowfast",
    "seed", "resolution", "dtype", "diqa_version", "settings_key",
)
QUANTILES = (("min", 0.0), ("5%", 0.05), ("25%", 0.25), ("median", 0.5), ("75%", 0.75), ("95%", 0.95), ("max", 1.0))


@dataclass
class Group:
    """The rows of one (method, checkpoint/settings) combination and their summary."""

    id: str  # "g1", "g2"… (HTML ids and the table's filter)
    settings: dict[str, Any]  # the recorded settings (only those the source carries)
    rows: list[dict] = field(default_factory=list)
    best: list[dict] = field(default_factory=list)
    worst: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        method = self.settings.get("method") or "scores"
        checkpoint = self.settings.get("checkpoint")
        if checkpoint:
            return f"{method} · {os.path.basename(str(checkpoint))}"
        sha = self.settings.get("checkpoint_sha256")
        return f"{method} · {str(sha)[:12]}" if sha else str(method)

    @property
    def scores(self) -> list[float]:
        """The ok rows' scores, ascending."""
        return sorted(r["score"] for r in self.rows if r["status"] == "ok")

    @property
    def failures(self) -> int:
        return sum(1 for r in self.rows if r["status"] != "ok")

    def quantiles(self) -> list[tuple[str, float]]:
        scores = self.scores
        return [(name, quantile(scores, q)) for name, q in QUANTILES] if scores else []


def group_rows(rows: list[dict], *, top: int) -> list[Group]:
    """Rows grouped by their recorded settings (first-seen order), each with its best and worst
    ``top`` ok rows. A row is never both: with fewer than ``2 * top`` ok rows the worst list
    holds what the best list left."""
    groups: dict[tuple, Group] = {}
    for row in rows:
        settings = {k: row[k] for k in SETTINGS_FIELDS if row.get(k) not in (None, "")}
        key = tuple(sorted((k, str(v)) for k, v in settings.items()))
        if key not in groups:
            groups[key] = Group(id=f"g{len(groups) + 1}", settings=settings)
        groups[key].rows.append(row)
    for group in groups.values():
        ranked = sorted((r for r in group.rows if r["status"] == "ok"), key=lambda r: (-r["score"], r["path"]))
        group.best = ranked[:top]
        group.worst = ranked[len(group.best):][-top:][::-1] if top else []
    return list(groups.values())


def quantile(ascending: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, R type 7)."""
    if not ascending:
        raise ValueError("quantile of no values")
    position = q * (len(ascending) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ascending) - 1)
    return ascending[low] + (ascending[high] - ascending[low]) * (position - low)


def histogram(values: list[float], bins: int | None = None) -> list[tuple[float, float, int]]:
    """``(low, high, count)`` per bin over [min, max]; about sqrt(n) bins, 5 to 30. Equal values
    give one bin."""
    if not values:
        return []
    low, high = min(values), max(values)
    if high == low:
        return [(low, high, len(values))]
    bins = bins or max(5, min(30, math.ceil(math.sqrt(len(values)))))
    width = (high - low) / bins
    counts = [0] * bins
    for value in values:
        counts[min(int((value - low) / width), bins - 1)] += 1
    return [(low + i * width, low + (i + 1) * width, n) for i, n in enumerate(counts)]
