"""Contact sheets: one PNG per case with every run's samples and their scores, for a paper
figure or a look without a browser.

    [case id  ]  layout  | reference | reference | ...      (subject names under them)
    [run label]  sample 0 | sample 1 | ...                 (CLIP-T, CLIP-R, CLIP-I, DINO under each)
    [run label]  ...

Pictures are scaled to fit a tile (up or down, aspect kept) and centred in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import textwrap
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .aggregate import METRICS
from .gallery import CaseView, Gallery, ScoreColumn
from .layouts import draw_layout

BACKGROUND = (255, 255, 255)
EMPTY = (235, 235, 235)  # a tile whose picture could not be read
TEXT = (30, 30, 30)
FONT_SIZE = 13
SHEET_VERSION = 1  # change when the drawing changes: every sheet is drawn again


@dataclass(frozen=True)
class SheetGeometry:
    """Pixel sizes of a sheet: rows of square tiles after a label column, a caption under each tile."""

    tile: int = 192
    label: int = 168
    caption: int = 36  # two lines of FONT_SIZE text
    pad: int = 8

    def origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left corner (x, y) of a tile."""
        return (self.label + self.pad + column * (self.tile + self.pad),
                self.pad + row * (self.tile + self.caption + self.pad))

    def size(self, rows: int, columns: int) -> tuple[int, int]:
        """(width, height) of a sheet."""
        x, y = self.origin(rows, columns)
        return x, y


@dataclass
class SheetRow:
    label: str
    tiles: list[tuple[Image.Image | None, str]]  # (picture, None: unreadable; caption)
    tags: list[str] | None = None  # a short tag drawn in each tile's corner (a sample's "#0")


def draw_sheet(rows: list[SheetRow], geometry: SheetGeometry = SheetGeometry()) -> Image.Image:
    """The rows drawn on one white sheet (see the module's picture)."""
    g = geometry
    font = ImageFont.load_default(size=FONT_SIZE)
    columns = max([1, *(len(r.tiles) for r in rows)])
    sheet = Image.new("RGB", g.size(len(rows), columns), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        _, y = g.origin(r, 0)
        label = "\n".join(textwrap.wrap(row.label, width=max(8, g.label // 8), break_long_words=True)[:8])
        draw.multiline_text((g.pad, y + 4), label, fill=TEXT, font=font, spacing=3)
        for c, (picture, caption) in enumerate(row.tiles):
            x, y = g.origin(r, c)
            if picture is None:
                draw.rectangle([x, y, x + g.tile - 1, y + g.tile - 1], fill=EMPTY)
            else:
                fitted = ImageOps.contain(picture, (g.tile, g.tile), Image.Resampling.LANCZOS)
                sheet.paste(fitted, (x + (g.tile - fitted.width) // 2, y + (g.tile - fitted.height) // 2))
            draw.multiline_text((x, y + g.tile + 3), caption, fill=TEXT, font=font, spacing=3)
            if row.tags:
                box = draw.textbbox((x + 4, y + 3), row.tags[c], font=font)
                draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=BACKGROUND)
                draw.text((x + 4, y + 3), row.tags[c], fill=TEXT, font=font)
    return sheet


def score_caption(scores: dict[str, float], columns: list[ScoreColumn]) -> str:
    """The paper's four scores of an image on two lines ("CLIP-T 30.1  CLIP-R 20.2" / ...), in
    the first score group that has them; a missing one is left out."""
    shown = []
    for name in METRICS:
        column = next((c for c in columns if c.name == name and c.key in scores), None)
        if column is not None:
            shown.append(f"{column.title.split(' (')[0]} {scores[column.key]:.{column.digits}f}")
    return "\n".join("  ".join(shown[i:i + 2]) for i in range(0, len(shown), 2))


def _sheet_rows(view: CaseView, gallery: Gallery):
    """(the references' (sha256, subject name); per run with samples of the case, in the
    gallery's run order, its label and its samples): what a case's sheet shows."""
    case = view.case
    refs = [(ref.sha256, s.name) for s in case.subjects for ref in gallery.references.get((case.suite, s.name), [])]
    runs = [(label, view.samples[label]) for label, suite, _ in gallery.runs
            if suite == case.suite and label in view.samples]
    return refs, runs


def case_sheet(view: CaseView, gallery: Gallery, picture: Callable[[str], Image.Image | None],
               geometry: SheetGeometry = SheetGeometry()) -> Image.Image:
    """A case's sheet: its layout and references, then a row per run that has samples of it (in
    the gallery's run order). picture(sha256): a thumbnail, or None when unreadable."""
    case = view.case
    refs, runs = _sheet_rows(view, gallery)
    rows = [SheetRow(f"{case.suite} / {case.id}",
                     [(draw_layout(case, geometry.tile), "layout"), *((picture(sha), name) for sha, name in refs)])]
    for label, samples in runs:
        rows.append(SheetRow(label, [(picture(s.sha256), score_caption(s.scores, gallery.columns)) for s in samples],
                             [f"#{s.index}" for s in samples]))
    return draw_sheet(rows, geometry)


def sheet_key(view: CaseView, gallery: Gallery, geometry: SheetGeometry = SheetGeometry()) -> str:
    """A digest of everything a case's sheet shows (the case, its pictures by sha256, the
    captions, the geometry): an unchanged key means the sheet on disk is still right."""
    case = view.case
    refs, runs = _sheet_rows(view, gallery)
    content = {"version": SHEET_VERSION, "geometry": dataclasses.asdict(geometry), "case": case.id,
               "prompt": case.prompt, "boxes": [list(b) for b in case.boxes],
               "subjects": [[s.name, s.class_noun] for s in case.subjects], "refs": refs,
               "runs": [[label, [[s.index, s.sha256, score_caption(s.scores, gallery.columns)] for s in samples]]
                        for label, samples in runs]}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def png_bytes(image: Image.Image) -> bytes:
    """PNG at zlib level 1: most of a sheet's time went to compression at the default level
    (bench/RESULTS.md, "HTML report at scale"), for files about 8% smaller."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
