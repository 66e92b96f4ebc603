"""Synthetic stand-ins for subject images (`relbench data example-subjects OUT`), so the offline
tiny demo (README command 1) can run the methods that read subject images without downloading
a dataset: per subject, two 256 px drawings in a colour of its own (a four-legged stick figure
for animals, a person for people, a patterned disc for objects), written into a separate data
root in the datasets' layout (`OUT/<source>/<dir>/00.png`). They are not the datasets' images:
scores against them only check that the pipeline runs. The writer refuses the default data
root and a folder that is not new or empty, and writes a NOTE.txt saying what the files are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError
from . import DEFAULT_ROOT, data_root
from .annotators import PERSON_NOUNS
from .example_triplets import _PERSON, _QUADRUPED, _draw
from .triplets import new_folder

SIZE = 256
IMAGES_PER_SUBJECT = 2
ANIMALS = ("dog", "cat", "bear", "tiger", "horse", "cow", "pet", "animal", "duck", "rabbit", "monkey", "lion",
           "panda", "penguin", "elephant", "bird", "sloth", "fox", "wolf", "turtle", "owl", "pig", "plushie")
NOTE = ("These are synthetic stand-ins written by `relbench data example-subjects`, not the datasets' "
        "images. Use this folder only with --data-dir for dry runs; scores against it mean nothing.\n")


def _kind(subject) -> str:
    words = f"{subject.class_noun} {subject.category or ''}".lower().split()
    if any(w in PERSON_NOUNS for w in words):  # the keypoint annotator's people: drawn as people
        return "person"
    return "animal" if any(w in ANIMALS or w == "pets" for w in words) else "object"


def _colour(name: str) -> tuple[int, int, int]:
    h = hashlib.sha256(name.encode()).digest()
    return (40 + h[0] % 180, 40 + h[1] % 180, 40 + h[2] % 180)


def draw_subject(subject, index: int) -> Image.Image:
    """Image `index` of the subject's stand-in: the same figure and colour, a pose jittered from
    a generator seeded by the name and index (the same call draws the same image)."""
    rng = np.random.default_rng(list(f"{subject.name}/{index}".encode()))
    image = Image.new("RGB", (SIZE, SIZE), (236, 234, 226))
    colour, kind = _colour(subject.name), _kind(subject)
    if kind == "object":
        draw = ImageDraw.Draw(image)
        r = SIZE * rng.uniform(0.25, 0.32)
        cx, cy = SIZE / 2 + rng.uniform(-10, 10), SIZE / 2 + rng.uniform(-10, 10)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        for k in range(4):  # stripes, so the identity is more than a colour
            y = cy - r + (k + 1) * 2 * r / 5
            draw.line([(cx - r * 0.8, y), (cx + r * 0.8, y)], fill=tuple(255 - c for c in colour), width=4)
        return image
    pose = np.asarray(_QUADRUPED if kind == "animal" else _PERSON) + rng.normal(0, 0.04, size=(17, 2))
    scale = SIZE * (0.3 if kind == "animal" else 0.42)
    xy = np.clip(np.rint(np.array([SIZE / 2, SIZE / 2]) + pose * scale), 2, SIZE - 3).astype(int)
    _draw(image, xy, "ap10k-17" if kind == "animal" else "coco-17", colour)
    return image


def write_example_subjects(out: str | Path, subjects: Iterable) -> list[Path]:
    """Write IMAGES_PER_SUBJECT stand-ins of each dataset subject into `out` (new or empty;
    atomically) and return the subject folders. Subjects named by path are skipped (they have
    their own images). Raises UserError for the data root in use (default or $RELBENCH_DATA):
    there they would pass for real images without any --data-dir."""
    out = Path(out)
    where = out.expanduser().resolve()
    if where in {DEFAULT_ROOT.expanduser().resolve(), data_root().resolve()}:
        raise UserError("example subjects never go into the data root in use (they would pass for real images)",
                        path=out, hint="give another folder and pass it to generate and score as --data-dir")
    unique = {(s.source, s.dir): s for s in subjects if not getattr(s, "images", None)}
    folders = []
    with new_folder(out) as tmp:
        (tmp / "NOTE.txt").write_text(NOTE, encoding="utf-8")
        for (source, folder), subject in sorted(unique.items()):
            (tmp / source / folder).mkdir(parents=True, exist_ok=True)
            for i in range(IMAGES_PER_SUBJECT):
                draw_subject(subject, i).save(tmp / source / folder / f"{i:02d}.png")
            folders.append(out / source / folder)
    return folders
