"""Render the report: one HTML file that reads without JavaScript and without a network.

Jinja2 with autoescaping on renders ``templates/report.html.j2``: every path, error and setting
goes through HTML escaping, so a file named ``<script>…`` is text, not markup. Charts are inline
SVG built here as coordinates; thumbnails come from :class:`~diqa_cli.report.thumbs.Thumbnails`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from diqa_cli.report.sources import Source
from diqa_cli.report.summary import Group, histogram
from diqa_cli.report.thumbs import Thumb, Thumbnails

__all__ = ["render_html"]

_CHART_W, _CHART_H, _PAD = 360, 120, 24
_HEX_HASH = re.compile(r"^[0-9a-f]{32,}$")


def render_html(source: Source, groups: list[Group], thumbs: Thumbnails, *, title: str,
                files: dict[int, dict[str, Any]], sizes: tuple[int, int]) -> str:
    """The report as one HTML document. ``files[id(row)]`` holds each row's resolved input file
    (``input``), whether it is a video (``video``) and its quality map file (``map``); ``sizes``
    are the long sides of the table's and the best/worst grid's thumbnails."""
    import jinja2

    import diqa_cli

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    index: dict[int, int] = {}
    rows = []
    group_of = {id(row): group for group in groups for row in group.rows}
    for number, row in enumerate(source.rows, 1):
        index[id(row)] = number
        rows.append(_row_view(number, row, group_of[id(row)], thumbs, files[id(row)], sizes[0]))
    views = [_group_view(group, thumbs, files, index, sizes[1]) for group in groups]
    curves = [
        {"n": index[id(row)], "path": _text(row["path"]), "svg": _curve(row)}
        for row in source.rows if row.get("per_frame")
    ]
    template = env.get_template("report.html.j2")
    return template.render(
        title=_text(title),
        source=_text(source.path),
        source_kind={"sqlite": "score database", "csv": "CSV", "jsonl": "JSON Lines", "json": "JSON"}[source.kind],
        version=diqa_cli.__version__,
        rows=rows,
        groups=views,
        errors=[r for r in rows if r["status"] != "ok"],
        curves=curves,
        styles=thumbs.styles,
        strict_csp=thumbs.mode != "linked",
        has_video=any(r["video"] for r in rows),
        has_map=any(r["map"] for r in rows),
        ok=sum(1 for r in rows if r["status"] == "ok"),
        small=sizes[0],
        large=sizes[1],
    )


def _text(value: Any) -> str:
    """``value`` as text that UTF-8 can carry: a file name in another encoding (surrogate escapes,
    as os.fsdecode gives) shows its undecodable bytes as U+FFFD."""
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _file_uri(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.resolve().as_uri()
    except (OSError, ValueError):
        return None


def _thumb_view(thumb: Thumb | None) -> dict | None:
    """What the template needs to show a thumbnail (None: a placeholder)."""
    if thumb is None:
        return None
    return {"css_class": thumb.css_class, "src": thumb.src, "w": thumb.width, "h": thumb.height}


def _row_view(number: int, row: dict, group: Group, thumbs: Thumbnails, files: dict, size: int) -> dict:
    video = files["video"]
    frames = None
    if row.get("frames_sampled") is not None:
        frames = f"{row.get('frames_decoded') or 0}/{row['frames_sampled']}"
        if row.get("frames_lost"):
            frames += f" ({row['frames_lost']} lost)"
    return {
        "n": number,
        "path": _text(row["path"]),
        "href": _file_uri(files["input"]),
        "score": _fmt(row.get("score")),
        "score_v": "" if row.get("score") is None else repr(row["score"]),
        "raw_score": _fmt(row.get("raw_score")),
        "raw_v": "" if row.get("raw_score") is None else repr(row["raw_score"]),
        "status": row["status"],
        "error": _text(row.get("error") or ""),
        "group": group.id,
        "group_label": _text(group.label),
        "seconds": _fmt(row.get("seconds")),
        "video": video or frames is not None,
        "frames": frames or "",
        "frames_v": row.get("frames_decoded") if row.get("frames_decoded") is not None else "",
        "duration": _fmt(row.get("duration")),
        "duration_v": "" if row.get("duration") is None else repr(row["duration"]),
        "thumb": _thumb_view(thumbs.get(files["input"], size, video=video)),
        "map": _text(row.get("map") or ""),
        "map_thumb": _thumb_view(thumbs.get(files["map"], size)) if row.get("map") else None,
    }


def _group_view(group: Group, thumbs: Thumbnails, files: dict, index: dict[int, int], size: int) -> dict:
    scores = group.scores

    def tile(row: dict) -> dict:
        f = files[id(row)]
        return {
            "n": index[id(row)],
            "path": _text(row["path"]),
            "name": _text(os.path.basename(row["path"]) or row["path"]),
            "score": _fmt(row["score"]),
            "thumb": _thumb_view(thumbs.get(f["input"], size, video=f["video"])),
        }

    settings = []
    for name, value in group.settings.items():
        text = _text(value)
        short = text[:12] + "…" if _HEX_HASH.match(text) else text
        settings.append({"name": name.replace("_", " "), "value": short, "full": text})
    reasons: dict[str, int] = {}
    for row in group.rows:
        if row["status"] != "ok":
            reason = _text(row.get("error") or "(no reason recorded)")
            reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "id": group.id,
        "label": _text(group.label),
        "settings": settings,
        "count": len(group.rows),
        "ok": len(scores),
        "failures": group.failures,
        "quantiles": [(name, _fmt(value)) for name, value in group.quantiles()],
        "histogram": _histogram(scores),
        "best": [tile(r) for r in group.best],
        "worst": [tile(r) for r in group.worst],
        "reasons": sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])),
    }


def _histogram(scores: list[float]) -> dict | None:
    """Bars of the score histogram in a _CHART_W x _CHART_H box (inline SVG)."""
    bins = histogram(scores)
    if not bins:
        return None
    tallest = max(n for _, _, n in bins)
    inner_w, inner_h = _CHART_W - 2 * _PAD, _CHART_H - 2 * _PAD
    width = inner_w / len(bins)
    bars = []
    for i, (low, high, n) in enumerate(bins):
        h = inner_h * n / tallest
        bars.append({
            "x": f"{_PAD + i * width:.2f}", "y": f"{_PAD + inner_h - h:.2f}",
            "w": f"{max(width - 1, 0.5):.2f}", "h": f"{h:.2f}",
            "title": f"{_fmt(low)} to {_fmt(high)}: {n}",
        })
    return {"w": _CHART_W, "h": _CHART_H, "pad": _PAD, "bars": bars, "low": _fmt(bins[0][0]),
            "high": _fmt(bins[-1][1]), "tallest": tallest, "base": _PAD + inner_h}


def _curve(row: dict) -> dict:
    """A video's per-frame scores over time as a polyline (inline SVG), its score as a dashed line."""
    points = row["per_frame"]
    times = [p["time"] for p in points]
    values = [p["score"] for p in points]
    t_end = max(max(times), row.get("duration") or 0.0) or 1.0
    low, high = min(values), max(values)
    if row.get("score") is not None:
        low, high = min(low, row["score"]), max(high, row["score"])
    if math.isclose(low, high):
        low, high = low - 0.5, high + 0.5
    inner_w, inner_h = _CHART_W - 2 * _PAD, _CHART_H - 2 * _PAD

    def x(t: float) -> float:
        return _PAD + inner_w * t / t_end

    def y(v: float) -> float:
        return _PAD + inner_h * (high - v) / (high - low)

    dots = [{"x": f"{x(t):.2f}", "y": f"{y(v):.2f}", "title": f"{t:.3f} s: {_fmt(v)}"} for t, v in zip(times, values)]
    return {
        "w": _CHART_W, "h": _CHART_H, "pad": _PAD,
        "line": " ".join(f"{d['x']},{d['y']}" for d in dots),
        "dots": dots,
        "mean_y": f"{y(row['score']):.2f}" if row.get("score") is not None else None,
        "score": _fmt(row.get("score")),
        "low": _fmt(low), "high": _fmt(high), "end": f"{t_end:.3g}",
        "base": _PAD + inner_h, "right": _PAD + inner_w,
    }
