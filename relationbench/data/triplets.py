"""Relation triplets: what RelationBooth trains a RelationLoRA on (paper Sec. 3.3, D = (x, c_i, c_t)).

Per sample: a target image x showing the relation, one reference image c_i per entity (the same
object in another pose), the prompt c_t, its entities and predicate, and per object in x a mask
(or box) and 17 keypoints, plus 17 keypoints per reference (the keypoint matching loss pairs
them by index, Sec. 3.4.2). On disk, one folder per relation:

    DIR/<relation>/triplets.json     the manifest (below); <relation> is letters, digits, _ and -
    DIR/<relation>/<any files>       images and masks, named by the manifest (paths relative to
                                     the relation folder, never leaving it)

`triplets.json` (one JSON document: read by the one reader of user files, so repeated keys,
NaN and non-UTF-8 text are refused; the relation's whole content in one file, hashed with the
images into the LoRA bank key; keypoints stored inline, 17 points are short):

    {"format": "relationbench-triplets", "version": 1,      # both optional
     "samples": [
       {"id": "0",                                          # unique within the relation
        "prompt": "A bear is hugging a tiger.",             # c_t
        "entities": ["bear", "tiger"],                      # 1 or 2 class nouns, in order; each
                                                            #   stands in the prompt as whole words
        "predicate": "hugging",                             # the relation phrase as it stands in
                                                            #   the prompt (whole words)
        "predicate_source": "spacy:...",                    # optional: set when a program
                                                            #   extracted the predicate (review it)
        "target": "0/target.png",                           # x
        "objects": [                                        # one per entity, same order
          {"mask": "0/mask0.png",                           # PNG, not black = the object; same
                                                            #   size as x; the box comes from it
           "keypoints": {"schema": "ap10k-17",
                         "xy": [[0.41, 0.22], ...],         # 17 (x, y), normalized to [0, 1]
                         "score": [0.9, ...]}},             # optional, 17 values in [0, 1]
          {"box": [0.5, 0.1, 0.95, 0.9],                    # or a box: normalized x0, y0, x1, y1
           "keypoints": {...}}],                            #   (a mask or a box, not both)
        "references": [                                     # one per entity, same order
          {"image": "0/reference0.png", "keypoints": {...}}, ...]}]}

Keypoint schemas (`KEYPOINT_SCHEMAS`; an object and its reference use the same one):
- `ap10k-17` (AP-10K animals; what the paper's X-Pose annotations use): left eye, right eye,
  nose, neck, tail root, left shoulder, left elbow, left front paw, right shoulder, right
  elbow, right front paw, left hip, left knee, left back paw, right hip, right knee, right
  back paw.
- `coco-17` (COCO people): nose, left eye, right eye, left ear, right ear, left shoulder,
  right shoulder, left elbow, right elbow, left wrist, right wrist, left hip, right hip, left
  knee, right knee, left ankle, right ankle.
x runs left to right, y top to bottom, (0, 0) the top-left corner of the image, (1, 1) its
bottom-right one. A box derived from a mask covers its pixels: x0 = first column / width, x1 =
(last column + 1) / width.

`check_triplets` lists every problem (never stopping at the first), each naming its file;
`load_triplets` raises one UserError listing them all, else returns the samples;
`scan_triplets` gives both from one pass. Every image is read whole with `read_image`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import UserError
from ..images import read_image
from ..suites.model import phrase_in
from ..userfiles import load_json, read_text, show, type_problem
from . import sha256_file

MANIFEST = "triplets.json"
FORMAT = "relationbench-triplets"
VERSION = 1
N_KEYPOINTS = 17  # per object and per reference (paper Sec. 3.4.2: c_kp in R^{17x2})
MAX_ENTITIES = 2  # the paper's basic triplet has N = 2 image prompts (Sec. 3.1); single-object samples have 1
RELATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder, LoRA bank and adapter name

KEYPOINT_SCHEMAS: dict[str, tuple[str, ...]] = {
    "ap10k-17": (
        "left eye", "right eye", "nose", "neck", "tail root", "left shoulder", "left elbow",
        "left front paw", "right shoulder", "right elbow", "right front paw", "left hip", "left knee",
        "left back paw", "right hip", "right knee", "right back paw",
    ),
    "coco-17": (
        "nose", "left eye", "right eye", "left ear", "right ear", "left shoulder", "right shoulder",
        "left elbow", "right elbow", "left wrist", "right wrist", "left hip", "right hip", "left knee",
        "right knee", "left ankle", "right ankle",
    ),
}

_TOP_FIELDS = {"format": (str,), "version": (int,), "samples": (list,)}
_SAMPLE_FIELDS = {"id": (str,), "prompt": (str,), "entities": (list,), "predicate": (str,),
                  "predicate_source": (str,), "target": (str,), "objects": (list,), "references": (list,)}
_SAMPLE_OPTIONAL = {"predicate_source"}
_FORMAT_HINT = "see the format in the README (## Relation triplets) or `relbench data example-triplets OUT`"


# ---------------------------------------------------------------------------------------------
# what a loaded set holds


@dataclass(frozen=True, eq=False)
class Keypoints:
    """17 keypoints of one object: xy [17, 2] float32 (x, y normalized to [0, 1]), score [17]
    float32 in [0, 1] or None, and the schema naming the points (KEYPOINT_SCHEMAS). Read-only."""

    xy: np.ndarray
    score: np.ndarray | None
    schema: str

    def __post_init__(self):
        xy = np.array(self.xy, dtype=np.float32)
        xy.setflags(write=False)
        object.__setattr__(self, "xy", xy)
        if self.score is not None:
            score = np.array(self.score, dtype=np.float32)
            score.setflags(write=False)
            object.__setattr__(self, "score", score)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keypoints):
            return NotImplemented
        return (self.schema == other.schema and np.array_equal(self.xy, other.xy)
                and (self.score is None) == (other.score is None)
                and (self.score is None or np.array_equal(self.score, other.score)))

    __hash__ = None  # type: ignore[assignment]  # arrays are not hashable


@dataclass(frozen=True)
class ObjectAnnotation:
    """One object in the target image: its entity, box (normalized xyxy; from the mask when
    there is one), mask file (None when the manifest gives a box) and keypoints."""

    entity: str
    box: tuple[float, float, float, float]
    mask: Path | None
    keypoints: Keypoints


@dataclass(frozen=True)
class Reference:
    """The reference image c_i of one entity and its keypoints."""

    entity: str
    image: Path
    keypoints: Keypoints


@dataclass(frozen=True)
class TripletSample:
    """One training sample (x, c_i, c_t). objects[i] and references[i] belong to entities[i]."""

    id: str
    relation: str
    prompt: str
    entities: tuple[str, ...]
    predicate: str
    target: Path
    objects: tuple[ObjectAnnotation, ...]
    references: tuple[Reference, ...]
    predicate_source: str | None = None  # set when a program extracted the predicate


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a triplet set: the file at fault and what is wrong with it."""

    path: Path
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class TripletSet:
    """A checked triplet set: relation -> its samples in manifest order."""

    root: Path
    relations: dict[str, list[TripletSample]] = field(default_factory=dict)

    def manifest(self, relation: str) -> Path:
        return self.root / relation / MANIFEST

    def content_hash(self, relation: str) -> str:
        """sha256 (hex) over the relation's manifest and every file its samples use, each with
        its path relative to the relation folder: the same data gives the same LoRA bank key."""
        folder = self.root / relation
        files = {self.manifest(relation)}
        for s in self.relations[relation]:
            files.add(s.target)
            files.update(o.mask for o in s.objects if o.mask is not None)
            files.update(r.image for r in s.references)
        h = hashlib.sha256()
        for rel, path in sorted((p.relative_to(folder).as_posix(), p) for p in files):
            h.update(f"{rel}\0{sha256_file(path)}\n".encode())
        return h.hexdigest()

    def summary(self) -> list[str]:
        """One line per relation: samples, objects, keypoint schemas."""
        lines = []
        for relation, samples in self.relations.items():
            objects = sum(len(s.objects) for s in samples)
            schemas = sorted({o.keypoints.schema for s in samples for o in s.objects})
            lines.append(f"{relation}: {len(samples)} samples, {objects} objects, keypoints {', '.join(schemas)}")
        return lines


# ---------------------------------------------------------------------------------------------
# checking and loading


def check_triplets(root: str | Path, relations: Sequence[str] | None = None, *, quiet: bool = True) -> list[Problem]:
    """Every problem of the triplet set at `root` (all relations, or those named), in folder and
    manifest order; [] when it is fine. Reads every image whole (progress bar unless quiet)."""
    return scan_triplets(root, relations, quiet=quiet)[0]


def load_triplets(root: str | Path, relations: Sequence[str] | None = None, *, quiet: bool = True) -> TripletSet:
    """The triplet set at `root` (all relations, or those named). Raises one UserError listing
    every problem (file: message, one per line) when there is any."""
    problems, found = scan_triplets(root, relations, quiet=quiet)
    if problems:
        raise problems_error(problems, Path(root))
    return found


def problems_error(problems: Sequence[Problem], where: Path) -> UserError:
    """The one UserError for a list of problems: all of them, one per line."""
    lines = "\n".join(f"  {p}" for p in problems)
    return UserError(f"{len(problems)} problem(s) in the relation triplets:\n{lines}", path=where,
                     hint=f"fix each file named above; {_FORMAT_HINT}")


def read_mask(path: str | Path) -> np.ndarray:
    """A mask file -> bool [H, W], True where the pixel is not black. Read with read_image
    (UserError when unreadable). A mask with transparency is refused: the reader flattens
    alpha onto white, which would make every transparent pixel part of the object."""
    from PIL import Image

    image = read_image(path)
    with Image.open(path) as header:  # the mode only; the pixels came from read_image
        if header.mode in ("LA", "PA", "RGBA", "La", "RGBa") or "transparency" in header.info:
            raise UserError("a mask with an alpha channel (transparent pixels would count as object)",
                            path=path, hint="save the mask as a greyscale PNG: object white, background black")
    return np.asarray(image).any(axis=-1)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """The normalized xyxy box covering the True pixels of a [H, W] mask (x1 = (last column +
    1) / W). Raises ValueError for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        raise ValueError("empty mask")
    h, w = mask.shape
    return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def scan_triplets(root: str | Path, relations: Sequence[str] | None = None, *, quiet: bool = True,
                  as_root: str | Path | None = None) -> tuple[list[Problem], TripletSet]:
    """Both at once: every problem, and the samples that have none. The samples' paths lie
    under `as_root` (default: root), so a staged copy can be checked before it moves there."""
    from tqdm.auto import tqdm

    root, as_root = Path(root), None if as_root is None else Path(as_root)
    problems: list[Problem] = []
    found = TripletSet(root=as_root or root)
    if not root.is_dir():
        return [Problem(root, "no such folder" if not root.exists() else "not a folder")], found
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if relations is None and not any((root / n / MANIFEST).is_file() for n in present):
        return [Problem(root, f"no relation folders (<relation>/{MANIFEST}) here")], found
    images = _ImageCache()
    for name in present if relations is None else dict.fromkeys(relations):
        if not RELATION_NAME.fullmatch(name):  # checked first: a name may not even stay inside root
            problems.append(Problem(root / name, f"relation name {name!r} must be letters, digits, _ and - "
                                                 "(not first): it names a LoRA"))
            continue
        if not (root / name / MANIFEST).is_file():
            problems.append(Problem(root / name, f"no {MANIFEST}: every folder here must be a relation"
                                    if relations is None else
                                    f"no relation {name!r} here (found: {', '.join(present) or 'none'})"))
            continue
        records = _read_manifest(root / name / MANIFEST, problems)
        samples, seen = [], {}
        for i, record in enumerate(tqdm(records, desc=f"check {name}", unit="sample", disable=quiet)):
            sample = _Sample(root / name, name, i, record, problems, images, as_root=(as_root or root) / name)
            if sample.id is not None:
                if sample.id in seen:
                    problems.append(Problem(root / name / MANIFEST, f"sample {sample.id}: the id is used twice "
                                                                    f"(samples #{seen[sample.id]} and #{i})"))
                seen.setdefault(sample.id, i)
            if sample.result is not None:
                samples.append(sample.result)
        found.relations[name] = samples
    return problems, found


def read_json_object(path: Path, problems: list[Problem], what: str) -> dict | None:
    """A JSON file that must hold an object (`what` says which), or None with a problem."""
    try:
        data = load_json(read_text(path), path)
    except UserError as exc:
        problems.append(Problem(path, exc.message))
        return None
    if not isinstance(data, dict):
        problems.append(Problem(path, f"must be {what}, got {show(data)}"))
        return None
    return data


def _read_manifest(path: Path, problems: list[Problem]) -> list[Any]:
    """The manifest's sample records ([] with a problem when the file itself is wrong)."""
    data = read_json_object(path, problems, "a JSON object with a 'samples' list")
    if data is None:
        return []
    bad = False
    for key in sorted(set(data) - set(_TOP_FIELDS)):
        problems.append(Problem(path, f"unknown field {key!r} (known: {', '.join(_TOP_FIELDS)})"))
    for key, kinds in _TOP_FIELDS.items():
        if key in data and (why := type_problem(data[key], kinds)):
            problems.append(Problem(path, f"{key} {why}"))
            bad = True
    if "samples" not in data:
        problems.append(Problem(path, "missing field 'samples' (the list of samples)"))
        return []
    if not bad and data.get("format", FORMAT) != FORMAT:
        problems.append(Problem(path, f"format must be {FORMAT!r}, got {data['format']!r}"))
    if not bad and data.get("version", VERSION) != VERSION:
        problems.append(Problem(path, f"version {data['version']} is not one this relationbench reads ({VERSION})"))
    if not bad and not data["samples"]:
        problems.append(Problem(path, "no samples: a relation needs at least one"))
    return [] if bad else data["samples"]


class _ImageCache:
    """Each image file read once per scan (a reference may serve several samples): path ->
    (width, height) or its UserError."""

    def __init__(self):
        self._sizes: dict[Path, tuple[int, int] | UserError] = {}

    def size(self, path: Path) -> tuple[int, int] | UserError:
        if path not in self._sizes:
            try:
                self._sizes[path] = read_image(path).size
            except UserError as exc:
                self._sizes[path] = exc
        return self._sizes[path]


def relative_inside(value: str) -> PurePosixPath | None:
    """A manifest's file path as a relative path that stays inside its folder (either slash);
    None for an empty, absolute, drive-lettered or `..` path."""
    rel = PurePosixPath(value.replace("\\", "/"))
    if not value.strip() or rel.is_absolute() or ".." in rel.parts or re.match(r"^[A-Za-z]:", value):
        return None
    return rel


class _Sample:
    """Checks one manifest record; `result` is the TripletSample when nothing is wrong."""

    def __init__(self, folder: Path, relation: str, index: int, record: Any, problems: list[Problem],
                 images: _ImageCache, as_root: Path):
        self.folder, self.manifest, self.images, self.as_root = folder, folder / MANIFEST, images, as_root
        self.problems, self.count = problems, len(problems)
        self.id: str | None = None
        self.result: TripletSample | None = None
        self.where = f"sample #{index}"
        if not isinstance(record, dict):
            self.fail(f"must be an object with {', '.join(_SAMPLE_FIELDS)}, got {show(record)}")
            return
        if isinstance(record.get("id"), str) and not type_problem(record["id"], (str,)) and record["id"].strip():
            self.id = record["id"]
            self.where = f"sample {self.id}"
        ok = self.fields(record, _SAMPLE_FIELDS, _SAMPLE_OPTIONAL)
        if not ok:
            return
        if not record["id"].strip():
            self.fail("id is empty")
        prompt, predicate = record["prompt"], record["predicate"]
        entities = self.entities(record["entities"], prompt)
        if not predicate.strip():
            self.fail("predicate is empty")
        elif not phrase_in(prompt, predicate):
            self.fail(f"predicate {predicate!r} is not in the prompt {prompt!r} (as whole words)")
        if record.get("predicate_source") is not None and not record["predicate_source"].strip():
            self.fail("predicate_source is empty (name the extractor, or drop the field once reviewed)")
        target = self.path(record["target"], "target")
        size = self.image(target, "target image") if target is not None else None
        n = len(entities) if entities is not None else None
        for key in ("objects", "references"):
            if n is not None and len(record[key]) != n:
                self.fail(f"{len(record[key])} {key} for {n} entit{'y' if n == 1 else 'ies'} "
                          f"({', '.join(entities)}): give one per entity, in the same order")
        names = entities if entities is not None and n == len(record["objects"]) else None
        objects = [self.object(k, o, names[k] if names else f"#{k}", size) for k, o in enumerate(record["objects"])]
        names = entities if entities is not None and n == len(record["references"]) else None
        references = [self.reference(k, r, names[k] if names else f"#{k}") for k, r in enumerate(record["references"])]
        for k, (o, r) in enumerate(zip(objects, references)):
            if o is not None and r is not None and o.keypoints.schema != r.keypoints.schema:
                self.fail(f"object {k} uses keypoint schema {o.keypoints.schema} but its reference "
                          f"{r.keypoints.schema}: the keypoint matching loss pairs points by index")
        if len(self.problems) == self.count:
            self.result = TripletSample(
                id=record["id"], relation=relation, prompt=prompt, entities=tuple(entities), predicate=predicate,
                target=self.moved(target), objects=tuple(objects), references=tuple(references),
                predicate_source=record.get("predicate_source"))

    def fail(self, message: str, path: Path | None = None) -> None:
        self.problems.append(Problem(path or self.manifest, f"{self.where}: {message}"))

    def fields(self, record: Mapping, kinds: Mapping[str, tuple], optional: set[str] | frozenset = frozenset(),
               what: str = "") -> bool:
        """Unknown, missing and mistyped fields of `record` as problems; True when no field
        the other checks need is missing or mistyped."""
        for key in sorted(set(record) - set(kinds), key=str):  # reported, not blocking the other checks
            self.fail(f"{what}unknown field {key!r} (known: {', '.join(kinds)})")
        ok = True
        for key, types in kinds.items():
            if key not in record:
                if key not in optional:
                    self.fail(f"{what}missing field {key!r}")
                    ok = False
            elif why := type_problem(record[key], types):
                self.fail(f"{what}{key} {why}")
                ok = False
        return ok

    def entities(self, value: list, prompt: str) -> list[str] | None:
        if not 1 <= len(value) <= MAX_ENTITIES:
            self.fail(f"entities must name 1 to {MAX_ENTITIES} objects, got {len(value)}")
            return None
        ok = True
        for e in value:
            if why := type_problem(e, (str,)):
                self.fail(f"each entity {why}")
                ok = False
            elif not e.strip():
                self.fail("an entity is empty")
                ok = False
            elif not phrase_in(prompt, e):
                self.fail(f"entity {e!r} is not in the prompt {prompt!r} (as whole words): name each "
                          "entity by its class noun in the prompt")
        return list(value) if ok else None

    def path(self, value: str, what: str) -> Path | None:
        """A file named by the manifest, relative to the relation folder and staying inside it."""
        rel = relative_inside(value)
        if rel is None:
            self.fail(f"{what} {value!r} must be a file path relative to the relation folder, inside it")
            return None
        return self.folder / rel

    def moved(self, path: Path) -> Path:
        return self.as_root / path.relative_to(self.folder)

    def image(self, path: Path, what: str) -> tuple[int, int] | None:
        size = self.images.size(path)
        if isinstance(size, UserError):
            self.fail(f"{what}: {size.message}", path)
            return None
        return size

    def object(self, k: int, value: Any, entity: str, size: tuple[int, int] | None) -> ObjectAnnotation | None:
        what = f"object {k} ({entity}): "
        if not isinstance(value, dict):
            self.fail(f"{what}must be an object with 'mask' or 'box', and 'keypoints', got {show(value)}")
            return None
        if not self.fields(value, {"mask": (str,), "box": (list,), "keypoints": (dict,)}, {"mask", "box"}, what):
            return None
        if ("mask" in value) == ("box" in value):
            self.fail(f"{what}give a 'mask' or a 'box' (not both: the box comes from the mask)")
            return None
        keypoints = self.keypoints(value["keypoints"], what)
        mask = box = None
        if "mask" in value:
            mask = self.path(value["mask"], f"{what}mask")
            pixels = None
            if mask is not None:
                try:
                    pixels = read_mask(mask)
                except UserError as exc:
                    self.fail(f"{what}mask: {exc.message}", mask)
            if pixels is not None:
                h, w = pixels.shape
                if size is not None and (w, h) != size:
                    self.fail(f"{what}the mask is {w}x{h} pixels but its target image is {size[0]}x{size[1]}", mask)
                elif not pixels.any():
                    self.fail(f"{what}the mask is empty (all black)", mask)
                else:
                    box = mask_box(pixels)
        else:
            box = self.box(value["box"], what)
        if keypoints is None or box is None:
            return None
        return ObjectAnnotation(entity=entity, box=box, mask=None if mask is None else self.moved(mask),
                                keypoints=keypoints)

    def box(self, value: list, what: str) -> tuple[float, float, float, float] | None:
        if len(value) != 4 or any(type_problem(v, (int, float)) for v in value):
            self.fail(f"{what}box must be 4 numbers x0, y0, x1, y1, got {show(value)}")
            return None
        if not all(0.0 <= v <= 1.0 for v in value):  # compared as given: float() fails on a 400-digit integer
            self.fail(f"{what}box {show(value)} is outside [0, 1] (normalized to the image size)")
            return None
        x0, y0, x1, y1 = (float(v) for v in value)
        if x0 >= x1 or y0 >= y1:
            self.fail(f"{what}box {show(value)} needs x0 < x1 and y0 < y1")
            return None
        return (x0, y0, x1, y1)

    def reference(self, k: int, value: Any, entity: str) -> Reference | None:
        what = f"reference {k} ({entity}): "
        if not isinstance(value, dict):
            self.fail(f"{what}must be an object with 'image' and 'keypoints', got {show(value)}")
            return None
        if not self.fields(value, {"image": (str,), "keypoints": (dict,)}, what=what):
            return None
        keypoints = self.keypoints(value["keypoints"], what)
        image = self.path(value["image"], f"{what}image")
        if image is not None and self.image(image, f"{what}image") is None:
            image = None
        if keypoints is None or image is None:
            return None
        return Reference(entity=entity, image=self.moved(image), keypoints=keypoints)

    def keypoints(self, value: dict, what: str) -> Keypoints | None:
        what += "keypoints "
        if not self.fields(value, {"schema": (str,), "xy": (list,), "score": (list,)}, {"score"}, what):
            return None
        ok = True
        if value["schema"] not in KEYPOINT_SCHEMAS:
            self.fail(f"{what}schema {value['schema']!r} is unknown (known: {', '.join(KEYPOINT_SCHEMAS)})")
            ok = False
        xy = value["xy"]
        if len(xy) != N_KEYPOINTS or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in xy):
            self.fail(f"{what}xy must be {N_KEYPOINTS} (x, y) pairs, got {show(xy)}")
            ok = False
        elif not self.unit_numbers([v for p in xy for v in p], f"{what}xy"):
            ok = False
        score = value.get("score")
        if score is not None:
            if len(score) != N_KEYPOINTS:
                self.fail(f"{what}score must hold {N_KEYPOINTS} values, got {len(score)}")
                ok = False
            elif not self.unit_numbers(score, f"{what}score"):
                ok = False
        if not ok:
            return None
        return Keypoints(xy=np.array(xy, dtype=np.float32), score=None if score is None else np.array(score),
                         schema=value["schema"])

    def unit_numbers(self, values: list, what: str) -> bool:
        """True when every value is a finite number in [0, 1], else one problem."""
        if bad := [v for v in values if type_problem(v, (int, float))]:
            self.fail(f"{what} must hold numbers, got {show(bad[0])}")
            return False
        if bad := [v for v in values if not 0.0 <= v <= 1.0]:  # NaN and inf compare False
            self.fail(f"{what} must lie in [0, 1] (normalized), got {show(bad[0])}"
                      + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
            return False
        return True


# ---------------------------------------------------------------------------------------------
# writing (the example set and the import of the authors' layout)


def sample_files(sample_id: str, n: int) -> tuple[str, list[str], list[str]]:
    """Where a writer puts a sample's files, relative to the relation folder: the target, the
    n references and the n masks, all under `<id>/`."""
    return (f"{sample_id}/target.png", [f"{sample_id}/reference{i}.png" for i in range(n)],
            [f"{sample_id}/mask{i}.png" for i in range(n)])


def keypoints_record(xy: np.ndarray, schema: str, score: np.ndarray | None = None) -> dict[str, Any]:
    """The manifest form of 17 keypoints. float32 values are written in their shortest form
    that reads back to the same float32 (0.1, not 0.10000000149011612)."""
    def short(values: np.ndarray) -> list:
        return [float(np.format_float_positional(np.float32(v), unique=True, trim="0")) for v in values]

    record: dict[str, Any] = {"schema": schema, "xy": [short(p) for p in np.asarray(xy, dtype=np.float32)]}
    if score is not None:
        record["score"] = short(np.asarray(score, dtype=np.float32))
    return record


def write_manifest(relation_dir: Path, samples: Sequence[Mapping[str, Any]]) -> Path:
    """Write `relation_dir/triplets.json` for the sample records (the form in the module
    docstring); number pairs and lists stay on one line each."""
    text = json.dumps({"format": FORMAT, "version": VERSION, "samples": list(samples)}, indent=2, ensure_ascii=False)
    # a list of numbers on one line; JSON strings never hold a raw newline, so no prompt is touched
    text = re.sub(r"\[\n\s*([-+0-9.eE,\s]*?)\n\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    path = Path(relation_dir) / MANIFEST
    path.write_text(text + "\n", encoding="utf-8")
    return path


@contextmanager
def new_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out` that becomes `out` when the block succeeds, and is
    removed (with any parent folders this created) when it fails: nothing half-written.
    Raises UserError when `out` exists and is not an empty folder."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError("already exists and is not an empty folder", path=out,
                        hint="pass a new folder (or remove this one)")
    created = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder ({exc.strerror or exc})", path=out.parent) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise


__all__ = [
    "KEYPOINT_SCHEMAS",
    "MANIFEST",
    "Keypoints",
    "ObjectAnnotation",
    "Problem",
    "Reference",
    "TripletSample",
    "TripletSet",
    "check_triplets",
    "keypoints_record",
    "load_triplets",
    "mask_box",
    "new_folder",
    "problems_error",
    "read_json_object",
    "read_mask",
    "sample_files",
    "scan_triplets",
    "write_manifest",
]
