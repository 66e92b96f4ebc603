"""A small synthetic relation-triplet set (`relbench data example-triplets OUT`): stick figures
whose keypoints and masks are known exactly, for the tests, the README and a first training run.

Two relations of five samples each (the paper tunes on 4-6 samples per relation, Sec. 4), 128 px:
- `hug`: a bear and a tiger (AP-10K animal skeletons, brown and orange) facing each other with
  their front legs reaching out; references: each animal alone, standing on four legs.
- `wave`: a person (COCO-17 skeleton, blue) with one arm raised; reference: arms down.
Each figure is drawn as lines between its skeleton's joints with a disc on every keypoint, in
one flat colour on a plain background; its mask is the same drawing. Keypoints sit on pixel
centres, x = (column + 0.5) / 128 (exact in float32 and in JSON), so the pixel under a keypoint
always has the figure's colour and lies in its mask. Poses are jittered per sample from a fixed
seed: the same command writes the same files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..errors import UserError

from .triplets import TripletSet, check_triplets, keypoints_record, load_triplets, new_folder, problems_error, \
    sample_files, write_manifest

SIZE = 128  # pixels, square: small enough for tiny-backbone training in seconds
SAMPLES_PER_RELATION = 5  # paper Sec. 4: 4-6 samples per relation
BACKGROUND = (236, 234, 226)
LINE_WIDTH = 3  # pixels
DISC_RADIUS = 2  # pixels, around each keypoint
JITTER = 0.04  # standard deviation of each joint's offset, in figure units (a figure spans about 2)

# joint pairs drawn as lines
SKELETONS: dict[str, tuple[tuple[int, int], ...]] = {
    "ap10k-17": ((0, 2), (1, 2), (2, 3), (3, 4), (3, 5), (5, 6), (6, 7), (3, 8), (8, 9), (9, 10),
                 (4, 11), (11, 12), (12, 13), (4, 14), (14, 15), (15, 16)),
    "coco-17": ((0, 1), (0, 2), (1, 3), (2, 4), (0, 5), (0, 6), (5, 6), (5, 7), (7, 9), (6, 8), (8, 10),
                (5, 11), (6, 12), (11, 12), (11, 13), (13, 15), (12, 14), (14, 16)),
}

# Poses in figure units (x right, y down, the figure's centre at 0), in the schema's order.
_QUADRUPED = [(0.75, -0.55), (0.65, -0.55), (0.9, -0.4), (0.5, -0.3), (-0.7, -0.2),
              (0.45, -0.1), (0.5, 0.35), (0.5, 0.8), (0.35, -0.1), (0.35, 0.35), (0.3, 0.8),
              (-0.55, -0.1), (-0.5, 0.35), (-0.55, 0.8), (-0.65, -0.1), (-0.65, 0.35), (-0.7, 0.8)]
_REACHING = list(_QUADRUPED)  # front legs stretched out forward: the hug
_REACHING[6:8] = [(0.8, -0.1), (1.1, -0.25)]
_REACHING[9:11] = [(0.7, 0.0), (1.0, -0.1)]
_PERSON = [(0.0, -0.75), (0.06, -0.8), (-0.06, -0.8), (0.12, -0.77), (-0.12, -0.77),
           (0.2, -0.5), (-0.2, -0.5), (0.3, -0.2), (-0.3, -0.2), (0.35, 0.05), (-0.35, 0.05),
           (0.12, 0.1), (-0.12, 0.1), (0.14, 0.5), (-0.14, 0.5), (0.15, 0.9), (-0.15, 0.9)]
_WAVING = list(_PERSON)  # the left arm raised
_WAVING[7], _WAVING[9] = (0.45, -0.55), (0.5, -0.95)


@dataclass(frozen=True)
class _Figure:
    """One object of a target image: who, its colour, its pose there and in its reference, and
    where it stands (centre and size as fractions of the image; mirrored = facing left)."""

    entity: str
    colour: tuple[int, int, int]
    schema: str
    pose: list[tuple[float, float]]
    reference_pose: list[tuple[float, float]]
    centre: tuple[float, float]
    scale: float
    mirrored: bool = False


@dataclass(frozen=True)
class _Relation:
    predicate: str
    prompts: tuple[str, ...]  # one per sample
    figures: tuple[_Figure, ...]
    scores: bool  # write keypoint scores (all 1.0: every point is visible)


RELATIONS: dict[str, _Relation] = {
    "hug": _Relation(
        predicate="hugging",
        prompts=("A bear is hugging a tiger.", "A bear hugging a tiger in the snow.",
                 "A photo of a bear hugging a tiger.", "A bear is hugging a tiger on the grass.",
                 "A brown bear hugging a tiger."),
        figures=(_Figure("bear", (120, 72, 40), "ap10k-17", _REACHING, _QUADRUPED, (0.27, 0.55), 0.16),
                 _Figure("tiger", (235, 140, 30), "ap10k-17", _REACHING, _QUADRUPED, (0.73, 0.55), 0.16,
                         mirrored=True)),
        scores=False,
    ),
    "wave": _Relation(
        predicate="waving",
        prompts=("A person waving.", "A person is waving at the camera.", "A photo of a person waving.",
                 "A person waving in a park.", "A smiling person waving."),
        figures=(_Figure("person", (40, 90, 200), "coco-17", _WAVING, _PERSON, (0.5, 0.5), 0.4),),
        scores=True,
    ),
}


def example_relation(relation: str) -> _Relation:
    """The example spec of any relation folder name: RELATIONS' own, else a bear and a tiger
    ("a bear lean on a tiger": the folder name's words as the predicate) in the hug's
    placement, with front legs posed by a generator seeded from the name, so each relation's
    pose differs and the same name always draws the same set."""
    if relation in RELATIONS:
        return RELATIONS[relation]
    words = relation.replace("_", " ")
    rng = np.random.default_rng(list(relation.encode()))
    pose = list(_QUADRUPED)
    for joint in (6, 7, 9, 10):  # elbows and front paws
        x, y = pose[joint]
        pose[joint] = (x + float(rng.uniform(-0.4, 0.6)), y + float(rng.uniform(-0.6, 0.2)))
    return _Relation(
        predicate=words,
        prompts=tuple(f"{p.format(words)}" for p in ("A bear {} a tiger.", "A photo of a bear {} a tiger.",
                                                   "A bear {} a tiger on the grass.", "A brown bear {} a tiger.",
                                                   "A bear {} a tiger in the snow.")),
        figures=(_Figure("bear", (120, 72, 40), "ap10k-17", pose, _QUADRUPED, (0.27, 0.55), 0.16),
                 _Figure("tiger", (235, 140, 30), "ap10k-17", pose, _QUADRUPED, (0.73, 0.55), 0.16, mirrored=True)),
        scores=False,
    )


def write_example_triplets(out: str | Path, *, seed: int = 0, relations: Sequence[str] | None = None) -> TripletSet:
    """Write the example set into `out` (new or empty; written atomically) and return it loaded:
    RELATIONS, or the given relation folder names (example_relation).

    Raises UserError when `out` exists and is not an empty folder.
    """
    out = Path(out)
    specs = {r: example_relation(r) for r in relations} if relations is not None else RELATIONS
    with new_folder(out) as tmp:
        for relation, spec in specs.items():
            folder = tmp / relation
            records = [_write_sample(folder, i, spec, np.random.default_rng([seed, i, len(relation)]))
                       for i in range(SAMPLES_PER_RELATION)]
            write_manifest(folder, records)
        problems = check_triplets(tmp)
        if problems:  # a bug here, not the user's: never leave a set that fails its own check
            raise problems_error(problems, tmp)
    return load_triplets(out)


def _write_sample(folder: Path, index: int, spec: _Relation, rng: np.random.Generator) -> dict:
    """Draw sample `index` (its target, references and masks) into folder; its manifest record."""
    sample_id, n = str(index), len(spec.figures)
    target_rel, reference_rels, mask_rels = sample_files(sample_id, n)
    (folder / sample_id).mkdir(parents=True)
    target = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    shift = rng.uniform(-0.03, 0.03, size=2)  # the whole scene moves a little
    objects, references = [], []
    for k, fig in enumerate(spec.figures):
        xy = _place(fig.pose, fig, (fig.centre[0] + shift[0], fig.centre[1] + shift[1]), rng)
        mask = Image.new("L", (SIZE, SIZE), 0)
        _draw(target, xy, fig.schema, fig.colour)
        _draw(mask, xy, fig.schema, 255)
        mask.save(folder / mask_rels[k])
        objects.append({"mask": mask_rels[k], "keypoints": _keypoints(xy, fig.schema, spec.scores)})

        reference = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
        ref_xy = _place(fig.reference_pose, fig, (0.5, 0.5), rng, scale=0.3)
        _draw(reference, ref_xy, fig.schema, fig.colour)
        reference.save(folder / reference_rels[k])
        references.append({"image": reference_rels[k], "keypoints": _keypoints(ref_xy, fig.schema, spec.scores)})
    target.save(folder / target_rel)
    return {"id": sample_id, "prompt": spec.prompts[index % len(spec.prompts)],
            "entities": [f.entity for f in spec.figures], "predicate": spec.predicate, "target": target_rel,
            "objects": objects, "references": references}


def _place(pose: list[tuple[float, float]], fig: _Figure, centre: tuple[float, float], rng: np.random.Generator,
           scale: float | None = None) -> np.ndarray:
    """A jittered pose in whole pixels: int [17, 2] (column, row), kept 2 px inside the image."""
    units = np.asarray(pose) + rng.normal(0.0, JITTER, size=(len(pose), 2))
    if fig.mirrored:
        units[:, 0] *= -1
    size = (scale or fig.scale) * rng.uniform(0.92, 1.08) * SIZE
    pixels = np.rint(np.asarray(centre) * SIZE + units * size).astype(int)
    return np.clip(pixels, 2, SIZE - 3)


def _draw(image: Image.Image, xy: np.ndarray, schema: str, colour) -> None:
    draw = ImageDraw.Draw(image)
    for a, b in SKELETONS[schema]:
        draw.line([tuple(xy[a]), tuple(xy[b])], fill=colour, width=LINE_WIDTH)
    for x, y in xy:
        draw.ellipse([x - DISC_RADIUS, y - DISC_RADIUS, x + DISC_RADIUS, y + DISC_RADIUS], fill=colour)


def _keypoints(xy: np.ndarray, schema: str, scores: bool) -> dict:
    """Pixel centres, normalized: (column + 0.5) / SIZE."""
    return keypoints_record((xy + 0.5) / SIZE, schema, np.ones(len(xy)) if scores else None)


def cached_example_triplets(relation: str) -> Path:
    """The example triplets of one relation in the cache ($RELBENCH_CACHE/relationbooth/
    example-triplets/<relation>/, a triplet folder holding that relation only), written on
    first use: what the tiny backbone's RelationLoRAs train on when no data is given. Safe
    when another process (a launch, a parallel run) writes it at the same time."""
    from ..paths import cache_root

    folder = cache_root() / "relationbooth" / "example-triplets" / relation
    manifest = folder / relation / "triplets.json"
    try:
        if not manifest.is_file():
            write_example_triplets(folder, relations=[relation])
    except (UserError, OSError):  # another process wrote it first
        if not manifest.is_file():
            raise
    return folder
