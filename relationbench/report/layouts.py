"""Draw a case's layout (its subject boxes over the prompt) so a suite can be checked by eye."""

from __future__ import annotations

import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from ..suites import Case

COLORS = ((230, 80, 60), (40, 120, 220), (60, 170, 90))
TITLE_LINES = 2


def draw_layout(case: Case, size: int = 384) -> Image.Image:
    """The case's boxes on a square canvas, each labelled with its subject and class noun."""
    font = ImageFont.load_default()
    title = textwrap.wrap(f"{case.id}: {case.prompt}", width=max(20, size // 6))[:TITLE_LINES]
    title_h = 8 + 12 * TITLE_LINES
    img = Image.new("RGB", (size, size + title_h), "white")
    draw = ImageDraw.Draw(img)
    draw.multiline_text((6, 4), "\n".join(title), fill="black", font=font, spacing=2)
    draw.rectangle([0, title_h, size - 1, size + title_h - 1], outline=(180, 180, 180))
    for j, (subject, (x0, y0, x1, y1)) in enumerate(zip(case.subjects, case.boxes)):
        color = COLORS[j % len(COLORS)]
        box = [x0 * (size - 1), title_h + y0 * (size - 1), x1 * (size - 1), title_h + y1 * (size - 1)]
        draw.rectangle(box, outline=color, width=3)
        # first subject's label at its box's top, the second's at its bottom: they rarely collide
        y = box[1] + 4 if j == 0 else box[3] - 16
        draw.text((box[0] + 5, y), f"{subject.name} ({subject.class_noun})", fill=color, font=font)
    return img


def layout_sheet(cases: Sequence[Case], columns: int = 5, size: int = 256) -> Image.Image:
    """A grid of layouts, for a whole suite or a selection of it."""
    tiles = [draw_layout(c, size) for c in cases]
    w, h = tiles[0].size
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * w, (i // columns) * h))
    return sheet
