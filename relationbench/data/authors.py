"""Import of the RelationBooth authors' training data (hub QingyuShi/DreamRelation_Data, read by
the DreamRelation train.py) into our triplet format (`relbench data import-triplets DIR OUT`).

Their layout, one folder per relation (DIR may also be one relation folder itself):

    <relation>/prompts.json       {"<id>": {"prompt": ..., "entities": [a, b], "predicate": ...}}
                                  single-object samples: "entity" (a string, or a list of one)
    <relation>/videos/<id>/       motion.png (the target x); concept0.png, concept1.png (the
                                  references; single: concept.png); concept_keyposes_one.pth,
                                  concept_keyposes_two.pth (float [1, 17, 2] each; single:
                                  concept_keyposes.pth as their code reads it, else
                                  concept_keyposes_one.pth); motion_keyposes.pth ([n, 17, 2],
                                  row i = entity i); pred.jpg and anything else: ignored
    <relation>/masks/<id>/        motion0.png, motion1.png (single: motion.png as their code
                                  reads it, else motion0.png)

Keypoints are normalized (x, y) in [0, 1], AP-10K order (`--schema` for others), no scores.
Decisions where their files leave a choice:
- "predicate": a string is taken as it is; a list is joined with spaces (["shaking", "hands"]
  -> "shaking hands"), since their code looks up one phrase per sample; when it is missing (as
  in their published example) it is extracted from the prompt with the spaCy model and marked
  `predicate_source` for review, as suite imports do. Either way it must stand in the prompt.
- Other fields of a prompt record are ignored (our format has no place for them).
- Masks are written binarized: grey >= 128 -> 255, else 0 (their code keeps mask >= 0.5 after
  scaling to [0, 1]), so boxes come out as in their training.
- .pth files are read with torch.load(weights_only=True): a pickle holding code is refused,
  never run. Each must hold one floating-point tensor of the expected shape, finite, in [0, 1].

Every problem of the source is reported at once with its file, and nothing is written then: the
samples are converted into a temporary folder beside OUT, checked with check_triplets (its
findings named by the source files they came from) and only then renamed to OUT.
"""

from __future__ import annotations

import io
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..images import read_image
from ..userfiles import show, type_problem
from .triplets import MAX_ENTITIES, N_KEYPOINTS, RELATION_NAME, KEYPOINT_SCHEMAS, Problem, TripletSet, \
    keypoints_record, new_folder, problems_error, read_json_object, sample_files, scan_triplets, write_manifest

PROMPTS = "prompts.json"
MASK_THRESHOLD = 128  # grey level: their code keeps mask >= 0.5 after ToTensor (x / 255)
DEFAULT_SCHEMA = "ap10k-17"  # X-Pose's animal keypoints (paper Sec. 3.4.2)
_REFERENCE_KEYPOINTS = ("concept_keyposes_one.pth", "concept_keyposes_two.pth")


@dataclass
class _Converted:
    """One source sample ready to write: its manifest record, files to copy (dest -> source),
    binarized masks (dest -> (PNG bytes, source))."""

    record: dict[str, Any]
    copies: dict[str, Path] = field(default_factory=dict)
    masks: dict[str, tuple[bytes, Path]] = field(default_factory=dict)


def import_authors_triplets(src: str | Path, out: str | Path, relations: Sequence[str] | None = None, *,
                            schema: str = DEFAULT_SCHEMA, quiet: bool = False) -> TripletSet:
    """Convert the authors' layout at `src` (all relations, or those named) into a new triplet
    set at `out` (new or empty) and return it. Raises one UserError listing every problem, with
    nothing written, when the source has any."""
    from tqdm.auto import tqdm

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if schema not in KEYPOINT_SCHEMAS:
        raise UserError(f"unknown keypoint schema {schema!r}", hint=f"use one of {', '.join(KEYPOINT_SCHEMAS)}")
    if not src.is_dir():
        raise UserError("no such folder" if not src.exists() else "not a folder", path=src,
                        hint=f"pass the folder holding <relation>/{PROMPTS} (the authors' data)")
    problems: list[Problem] = []
    folders = _relation_folders(src, relations, problems)
    converted: dict[str, list[_Converted]] = {}
    for name, folder in folders.items():
        samples = _read_relation(folder, problems)
        ready = [c for c in (_convert(folder, sid, rec, schema, problems)
                             for sid, rec in tqdm(samples, desc=f"read {name}", unit="sample", disable=quiet))
                 if c is not None]
        if ready:  # a relation without any (its problems are listed already)
            converted[name] = ready
    with new_folder(out) as tmp:
        sources: dict[Path, Path] = {}  # written file -> the source file it came from
        for name, samples in converted.items():
            (tmp / name).mkdir()
            for c in samples:
                for dest, source in c.copies.items():
                    (tmp / name / dest).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(source, tmp / name / dest)
                    sources[tmp / name / dest] = source
                for dest, (png, source) in c.masks.items():
                    (tmp / name / dest).write_bytes(png)
                    sources[tmp / name / dest] = source
            sources[write_manifest(tmp / name, [c.record for c in samples])] = folders[name] / PROMPTS
        found, result = scan_triplets(tmp, list(converted), quiet=quiet, as_root=out)
        problems += [Problem(sources.get(p.path, p.path), p.message) for p in found]
        if problems:
            raise problems_error(problems, src)
    return result


def _relation_folders(src: Path, relations: Sequence[str] | None, problems: list[Problem]) -> dict[str, Path]:
    """Relation name -> its source folder: src itself when it holds prompts.json, else its
    subfolders (each must hold one)."""
    if (src / PROMPTS).is_file():
        present = {src.name: src}
    else:
        present = {}
        for p in sorted(src.iterdir()):
            if p.is_dir() and not p.name.startswith("."):
                if (p / PROMPTS).is_file():
                    present[p.name] = p
                elif relations is None:
                    problems.append(Problem(p, f"no {PROMPTS}: not a relation folder of the authors' layout"))
        if not present and not problems:
            problems.append(Problem(src, f"no <relation>/{PROMPTS} here: not the authors' layout"))
    if relations is not None:
        for name in relations:
            if name not in present:
                problems.append(Problem(src / name, f"no relation {name!r} here (found: {', '.join(present) or 'none'})"))
        present = {n: present[n] for n in dict.fromkeys(relations) if n in present}
    for name in list(present):
        if not RELATION_NAME.fullmatch(name):
            problems.append(Problem(present.pop(name), f"relation name {name!r} must be letters, digits, _ and - "
                                                      "(not first): rename the folder"))
    return present


def _read_relation(folder: Path, problems: list[Problem]) -> list[tuple[str, dict]]:
    """(sample id, record) pairs of prompts.json, in file order; sample folders without a record
    are problems."""
    path = folder / PROMPTS
    data = read_json_object(path, problems, "an object mapping each sample id to its record")
    if data is None:
        return []
    if not data:
        problems.append(Problem(path, "no samples"))
    samples = []
    for sid, record in data.items():
        if sid in ("", ".", "..") or "/" in sid or "\\" in sid or type_problem(sid, (str,)):
            problems.append(Problem(path, f"sample id {sid!r} cannot name a folder"))
        elif not isinstance(record, dict):
            problems.append(Problem(path, f"sample {sid}: must be an object with prompt and entities, got {show(record)}"))
        else:
            samples.append((sid, record))
    videos = folder / "videos"
    if videos.is_dir():
        for p in sorted(videos.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and p.name not in data:
                problems.append(Problem(p, f"sample folder without a record in {PROMPTS}: add one or remove the folder"))
    return samples


def _convert(folder: Path, sid: str, record: dict, schema: str, problems: list[Problem]) -> _Converted | None:
    """One source sample -> our record and its files; None (with problems) when it cannot be."""
    count = len(problems)
    prompts = folder / PROMPTS

    def fail(message: str, path: Path = prompts) -> None:
        problems.append(Problem(path, f"sample {sid}: {message}"))

    prompt = record.get("prompt")
    if prompt is None or (why := type_problem(prompt, (str,))):
        fail("missing 'prompt'" if prompt is None else f"prompt {why}")
        prompt = None
    single = "entity" in record
    if single and "entities" in record:
        fail("has both 'entity' and 'entities': a sample is single- or multi-object")
        return None
    entities = record.get("entity" if single else "entities")
    if single and isinstance(entities, str):
        entities = [entities]
    if entities is None or type_problem(entities, (list,)) or any(type_problem(e, (str,)) for e in entities):
        fail(f"'entities' must be a list of class nouns (single-object samples: 'entity'), got {show(entities)}")
        return None
    if not 1 <= len(entities) <= (1 if single else MAX_ENTITIES):
        fail(f"{len(entities)} entities: give 1 ('entity') or up to {MAX_ENTITIES} ('entities')")
        return None
    predicate, predicate_source = _predicate(record.get("predicate"), prompt, entities, fail)

    n = len(entities)
    video, masks = folder / "videos" / sid, folder / "masks" / sid
    if single:
        reference_images = [video / "concept.png"]
        reference_points = [_first(video, ("concept_keyposes.pth", _REFERENCE_KEYPOINTS[0]))]
        mask_files = [_first(masks, ("motion.png", "motion0.png"))]
    else:
        reference_images = [video / f"concept{i}.png" for i in range(n)]
        reference_points = [video / _REFERENCE_KEYPOINTS[i] for i in range(n)]
        mask_files = [masks / f"motion{i}.png" for i in range(n)]
    target = video / "motion.png"
    images = [(target, "the target image"), *((p, f"the reference image of {e!r}") for p, e in zip(reference_images, entities))]
    for path, role in images:  # present here; read (once) by the check of the copies, named by this path
        if not path.is_file():
            fail(f"missing {role}", path)
    binarized = [_binarize(p, f"the mask of {e!r}", fail) for p, e in zip(mask_files, entities)]
    reference_xy = [_load_keypoints(p, (1, N_KEYPOINTS, 2), f"the reference keypoints of {e!r}", fail)
                    for p, e in zip(reference_points, entities)]
    target_xy = _load_keypoints(video / "motion_keyposes.pth", (n, N_KEYPOINTS, 2), "the target keypoints", fail)
    if len(problems) > count:
        return None

    target_rel, reference_rels, mask_rels = sample_files(sid, n)
    converted = _Converted(record={
        "id": sid, "prompt": prompt, "entities": list(entities), "predicate": predicate,
        **({"predicate_source": predicate_source} if predicate_source else {}),
        "target": target_rel,
        "objects": [{"mask": mask_rels[i], "keypoints": keypoints_record(target_xy[i], schema)} for i in range(n)],
        "references": [{"image": reference_rels[i], "keypoints": keypoints_record(reference_xy[i][0], schema)}
                       for i in range(n)],
    })
    converted.copies = {target_rel: target, **dict(zip(reference_rels, reference_images))}
    converted.masks = {dest: (png, source) for dest, png, source in zip(mask_rels, binarized, mask_files)}
    return converted


def _predicate(value: Any, prompt: str | None, entities: list[str], fail) -> tuple[str | None, str | None]:
    """The predicate phrase and, when extracted, the extractor's id (see the module docstring)."""
    if isinstance(value, list) and value and not any(type_problem(v, (str,)) for v in value):
        return " ".join(v.strip() for v in value), None
    if value is not None:
        if why := type_problem(value, (str,)):
            fail(f"predicate {why} (or a list of words)")
        return value, None
    if prompt is None:
        return None, None
    from ..suites.predicates import extract_predicate, predicate_backend

    try:
        phrase = extract_predicate(prompt, entities, backend="model")
    except UserError as exc:
        fail(f"no 'predicate', and it cannot be extracted from the prompt: {exc.message}"
             + (f" ({exc.hint})" if exc.hint else ""))
        return None, None
    if phrase is None:
        fail(f"no 'predicate', and the prompt {prompt!r} has no verb to take it from: add one")
        return None, None
    return phrase, predicate_backend("model")


def _first(folder: Path, names: tuple[str, ...]) -> Path:
    """The first of `names` present in folder (else the first name, reported missing later)."""
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


def _binarize(path: Path, what: str, fail) -> bytes | None:
    """A mask file as the PNG bytes of its binarized form (0 or 255, see MASK_THRESHOLD); None
    (with a problem) when it is missing or unreadable."""
    if not path.is_file():
        fail(f"missing {what}", path)
        return None
    try:
        grey = np.asarray(read_image(path).convert("L"))
    except UserError as exc:
        fail(f"{what}: {exc.message}", path)
        return None
    buffer = io.BytesIO()
    Image.fromarray(np.where(grey >= MASK_THRESHOLD, 255, 0).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _load_keypoints(path: Path, shape: tuple[int, ...], what: str, fail) -> np.ndarray | None:
    """A keypoint .pth, loaded safely, as float32 of `shape`; None (with a problem) otherwise."""
    import torch

    if not path.is_file():
        fail(f"missing {what} file", path)
        return None
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        fail(f"{what}: holds Python objects other than tensors (a pickle may run code), refused unread; "
             "save the keypoints as a plain tensor", path)
        return None
    except Exception as exc:  # RuntimeError, EOFError, ... for a damaged or foreign file
        fail(f"{what}: not a tensor file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
             path)
        return None
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        fail(f"{what}: must hold one floating-point tensor, got {kind}", path)
        return None
    if tuple(value.shape) != shape:
        fail(f"{what}: shape {list(value.shape)}, expected {list(shape)}", path)
        return None
    xy = value.float().numpy()
    if not (np.isfinite(xy).all() and xy.min() >= 0.0 and xy.max() <= 1.0):
        fail(f"{what}: values must be normalized to [0, 1], got {'NaN or inf' if not np.isfinite(xy).all() else f'{xy.min():g} .. {xy.max():g}'}",
             path)
        return None
    return xy
