"""`relbench data show DIR --out sheet.png`: a contact sheet of a relation-triplet set, so a
person can check masks, boxes and keypoints at a glance (issue J, the data engine's output or
any set in the triplet format).

One row per sample, in relation and manifest order: a caption band (relation/id, the
predicate, each entity's name in its colour over its reference, then the prompt), the target
with each object's mask (translucent, MASK_ALPHA of its colour), its box (outline) and its
keypoint skeleton, then each reference with its skeleton. Object k is drawn in COLOURS[k], its
reference too. Skeleton edges are those of the example set (example_triplets.SKELETONS, by
schema: AP-10K animals, COCO-17 people, in the point order of triplets.KEYPOINT_SCHEMAS); a
keypoint whose score is 0 is not drawn, nor are its edges.

Geometry (pixels): every image is scaled to fit a TILE x TILE square (longer side TILE), put at
the tile's top-left corner; tile (row, column) starts at tile_origin(row, column); the sheet is
sheet_size(rows): width MARGIN + 3 (TILE + MARGIN), height MARGIN + rows (CAPTION + TILE +
MARGIN). At most `max_samples` rows (default MAX_SAMPLES: under 10,000 px tall); the rest are
counted, not drawn (narrow with --relation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import UserError
from ..images import read_image
from .example_triplets import SKELETONS
from .triplets import MAX_ENTITIES, Keypoints, TripletSample, load_triplets, read_mask

TILE = 256  # pixels, the longer side of every image on the sheet
MARGIN = 8
CAPTION = 30  # the band above each row: two lines of text
MAX_SAMPLES = 32  # rows per sheet by default
MASK_ALPHA = 0.4  # the mask's colour over the target: (1 - a) pixel + a colour
LINE_WIDTH = 2  # box outlines and skeleton edges
DOT_RADIUS = 3  # keypoints: a filled disc
COLOURS = ((230, 25, 75), (0, 130, 200))  # object k and its reference (red, blue)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)


@dataclass(frozen=True)
class ShowSummary:
    out: Path
    shown: int  # samples drawn
    total: int  # samples in the set (or the relations asked for)


def sheet_size(rows: int) -> tuple[int, int]:
    """(width, height) of a sheet of `rows` samples."""
    return MARGIN + (1 + MAX_ENTITIES) * (TILE + MARGIN), MARGIN + rows * (CAPTION + TILE + MARGIN)


def tile_origin(row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of a tile: column 0 the target, 1 + k the reference of entity k."""
    return MARGIN + column * (TILE + MARGIN), MARGIN + row * (CAPTION + TILE + MARGIN) + CAPTION


def fitted(size: tuple[int, int]) -> tuple[int, int]:
    """An image's size on the sheet: scaled so its longer side is TILE (rounded, at least 1)."""
    scale = TILE / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def show_triplets(root: str | Path, out: str | Path, relations: Sequence[str] | None = None,
                  max_samples: int = MAX_SAMPLES, quiet: bool = True) -> ShowSummary:
    """Check the set at `root` (load_triplets: UserError listing every problem) and write its
    contact sheet as a PNG to `out` (parent folders created)."""
    from tqdm.auto import tqdm

    if max_samples < 1:
        raise UserError(f"--max-samples must be at least 1, got {max_samples}")
    found = load_triplets(root, relations, quiet=quiet)
    samples = [s for r in found.relations.values() for s in r]
    if not samples:
        raise UserError("no samples to show", path=root, hint="the triplets.json files list none")
    shown = samples[:max_samples]
    sheet = Image.new("RGB", sheet_size(len(shown)), BACKGROUND)
    for row, sample in enumerate(tqdm(shown, desc="contact sheet", unit="sample", disable=quiet)):
        draw_row(sheet, row, sample)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return ShowSummary(out, len(shown), len(samples))


def draw_row(sheet: Image.Image, row: int, sample: TripletSample) -> None:
    """Draw one sample's caption and tiles into row `row` of the sheet."""
    target = read_image(sample.target)
    size = fitted(target.size)
    pixels = np.asarray(target.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)
    for k, obj in enumerate(sample.objects):
        if obj.mask is not None:
            mask = Image.fromarray(read_mask(obj.mask).astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
            inside = np.asarray(mask) > 0
            pixels[inside] = (1 - MASK_ALPHA) * pixels[inside] + MASK_ALPHA * np.asarray(COLOURS[k])
    tile = Image.fromarray(np.rint(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(tile)
    for k, obj in enumerate(sample.objects):
        x0, y0, x1, y1 = obj.box
        draw.rectangle([x0 * size[0], y0 * size[1], x1 * size[0] - 1, y1 * size[1] - 1], outline=COLOURS[k],
                       width=LINE_WIDTH)
    for k, obj in enumerate(sample.objects):
        draw_skeleton(draw, obj.keypoints, size, COLOURS[k])
    sheet.paste(tile, tile_origin(row, 0))
    for k, ref in enumerate(sample.references):
        image = read_image(ref.image)
        ref_size = fitted(image.size)
        tile = image.resize(ref_size, Image.Resampling.LANCZOS)
        draw_skeleton(ImageDraw.Draw(tile), ref.keypoints, ref_size, COLOURS[k])
        sheet.paste(tile, tile_origin(row, 1 + k))
    _caption(sheet, row, sample)


def draw_skeleton(draw: ImageDraw.ImageDraw, keypoints: Keypoints, size: tuple[int, int], colour) -> None:
    """The schema's edges, then a disc on every keypoint, at (x width, y height) pixels; points
    scored 0 are left out with their edges."""
    xy = keypoints.xy * np.asarray(size, dtype=np.float64)
    visible = np.ones(len(xy), bool) if keypoints.score is None else keypoints.score > 0
    for a, b in SKELETONS[keypoints.schema]:
        if visible[a] and visible[b]:
            draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=LINE_WIDTH)
    for (x, y), seen in zip(xy, visible):
        if seen:
            draw.ellipse([x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS], fill=colour)


def _caption(sheet: Image.Image, row: int, sample: TripletSample) -> None:
    """Line 1: relation/id and the predicate, each entity's name over its reference; line 2:
    the prompt, cut to the sheet's width."""
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    x, y = tile_origin(row, 0)
    top = y - CAPTION + 2
    draw.text((x, top), f"{sample.relation}/{sample.id}: {sample.predicate}", fill=TEXT, font=font)
    for k, entity in enumerate(sample.entities):
        draw.text((tile_origin(row, 1 + k)[0], top), entity, fill=COLOURS[k], font=font)
    width = sheet.width - 2 * MARGIN
    prompt = sample.prompt
    if draw.textlength(prompt, font=font) > width:
        while prompt and draw.textlength(prompt + "...", font=font) > width:
            prompt = prompt[:-1]
        prompt += "..."
    draw.text((x, top + CAPTION // 2), prompt, fill=TEXT, font=font)


__all__ = ["ShowSummary", "draw_row", "draw_skeleton", "fitted", "sheet_size", "show_triplets", "tile_origin"]
