"""A PNG contact sheet of the best and the worst rows of each group, with scores under each
thumbnail, for people reading results in a terminal session (Pillow only).

Layout: for each group a title strip, then a line of its best rows and a line of its worst rows
(a line is left out when empty). Every cell is ``CELL_W x CELL_H``: the thumbnail centred in a
``thumb x thumb`` box, then two caption lines (score, file name).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from diqa_cli.report.summary import Group

__all__ = ["GAP", "TITLE_H", "CAPTION_H", "LABEL_W", "cell_size", "contact_sheet"]

GAP = 8  # px around and between cells
TITLE_H = 22  # a group's title strip
CAPTION_H = 30  # two lines of text under a thumbnail
LABEL_W = 56  # "best" / "worst" left of each line


def cell_size(thumb: int) -> tuple[int, int]:
    """Width and height of one cell, gaps included, for thumbnails of ``thumb`` px."""
    return thumb + GAP, thumb + CAPTION_H + GAP


def contact_sheet(groups: list[Group], *, thumb: int, columns: int,
                  image_of: Callable[[dict], Image.Image | None]) -> Image.Image:
    """The sheet as an RGB image; ``image_of(row)`` gives a row's thumbnail or None (a grey
    placeholder is drawn). ``columns`` is the number of cells per line (the report's ``--top``)."""
    cell_w, cell_h = cell_size(thumb)
    lines = [(g, name, rows) for g in groups for name, rows in (("best", g.best), ("worst", g.worst)) if rows]
    shown = [g for g in groups if g.best or g.worst]
    width = GAP + LABEL_W + max(columns, 1) * cell_w
    height = GAP + len(shown) * TITLE_H + len(lines) * cell_h
    sheet = Image.new("RGB", (width, max(height, GAP + TITLE_H)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    if not lines:
        draw.text((GAP, GAP), "no scored rows", fill="black", font=font)
        return sheet
    y = GAP
    current = None
    for group, name, rows in lines:
        if group is not current:
            current = group
            heading = f"{group.label}: {len(group.rows)} rows, {group.failures} failed"
            draw.text((GAP, y + 4), _fit(draw, font, heading, width - 2 * GAP), fill="black", font=font)
            y += TITLE_H
        draw.text((GAP, y + thumb // 2), name, fill="black", font=font)
        for i, row in enumerate(rows[:columns]):
            x = GAP + LABEL_W + i * cell_w
            image = image_of(row)
            if image is None:
                draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(225, 225, 225))
                draw.text((x + 4, y + thumb // 2 - 6), "no preview", fill=(120, 120, 120), font=font)
            else:
                sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
            draw.text((x, y + thumb + 2), f"{row['score']:.6g}", fill="black", font=font)
            draw.text((x, y + thumb + 15), _fit(draw, font, Path(row["path"]).name, thumb), fill=(80, 80, 80), font=font)
        y += cell_h
    return sheet


def _fit(draw: ImageDraw.ImageDraw, font, text: str, width: int) -> str:
    """``text`` cut (with "...") to fit ``width`` px; characters the font cannot draw become "?"."""
    try:
        draw.textlength(text, font=font)
    except (UnicodeError, ValueError):  # Pillow's bitmap fallback font knows Latin-1 only
        text = text.encode("ascii", "replace").decode("ascii")
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
