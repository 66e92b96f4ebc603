"""`relbench data annotate RAW OUT`: annotate raw relation samples into relation triplets (paper
Sec. 3.3's data engine: masks, keypoints and captions for the target x and each reference c_i).

RAW (what `relbench data synthesize` writes; a person can write it by hand): `RAW/raw.json`,
one JSON document, paths relative to RAW:

    {"version": 1,
     "samples": [
       {"id": "hug-0",                       # unique in the file; letters, digits, _ . - (a folder name)
        "relation": "hug",                   # the relation folder it goes to (letters, digits, _ -)
        "prompt": "A bear is hugging a tiger.",
        "entities": ["bear", "tiger"],       # 1 or 2 class nouns, each in the prompt as whole words
        "predicate": "hugging",              # in the prompt as whole words
        "target": "hug-0/target.png",        # the image x showing the relation
        "references": ["hug-0/bear.png",     # optional: one image per entity, same order, showing
                       "hug-0/tiger.png"]}]} #   that entity alone (without them the sample is set aside)

A wrong raw.json (bad JSON, a missing or unknown field, a file that does not exist, an entity
or predicate not in its prompt, repeated ids) is one UserError listing every problem, before
any model runs.

Per sample: the mask annotator looks for each entity name in the target and each reference's
entity in its reference; the keypoint annotator puts 17 keypoints in each object's box (the
box of its mask); the captioner (when asked) captions the target and each reference. OUT is
then (D)'s triplet format (triplets.py), written atomically into a new or empty folder:

    OUT/<relation>/triplets.json             the manifest; <id>/target.png, <id>/mask<k>.png,
                                             <id>/reference<k>.png (images re-encoded as PNG)
    OUT/<relation>/captions.json             with --caption: {id: {"target": ..., "references": [...]}}
    OUT/annotate-report.json, .md            what was kept, what was set aside and why, the
                                             annotators (names and weights) and the settings

and checked with `check_triplets` (a problem there is a bug, raised, and nothing is written).

A sample whose detections do not match its entities is set aside (listed in the report with
its reason, never silently kept). For each label in an image (a label named twice, e.g. two
bears, needs two objects), the annotator's detections scoring at least settings.threshold,
best first:
- duplicates: a detection whose mask overlaps a better one of the same label by
  settings.same_object_iou or more (mask IoU) is the same object, dropped;
- `missing`: fewer objects than the label is named;
- `extra`: one more object beyond the named count scoring at least settings.extra_ratio times
  the weakest one kept (the image shows more of them than the prompt names);
- `empty-mask`: a kept object's mask has no pixels;
- `same-object`: two entities of different labels found on one object (their masks overlap
  by settings.same_object_iou or more: a detector often answers "bear" and "tiger" with the
  same animal). Masks, not boxes: hugging objects' boxes overlap a lot, their masks hardly;
- `no-references`: the sample has no reference images (the format needs one per entity);
- `schema-mismatch`: an object and its reference got different keypoint schemas.
Two objects of one label are given to its entities left to right (by their boxes' left edge).
With random-weight annotators (the tiny backbone) the rules that compare detections (extra,
same-object and the duplicate merge) are off, and the report says so: random detectors give
every name the same boxes with saturated scores, and would set every sample aside.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import UserError
from ..images import read_image
from ..suites.model import phrase_in
from ..userfiles import show, type_problem
from .annotators import AnnotateSettings, Annotators, Detection, MaskAnnotator, load_annotators
from .triplets import (KEYPOINT_SCHEMAS, MAX_ENTITIES, N_KEYPOINTS, RELATION_NAME, Keypoints, Problem, check_triplets,
                       keypoints_record, mask_box, new_folder, problems_error, read_json_object, relative_inside,
                       sample_files,
                       write_manifest)

if TYPE_CHECKING:
    from PIL import Image

RAW_MANIFEST = "raw.json"
RAW_VERSION = 1
REPORT = "annotate-report"  # .json and .md in OUT
CAPTIONS = "captions.json"
SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_RAW_FIELDS = {"id": (str,), "relation": (str,), "prompt": (str,), "entities": (list,), "predicate": (str,),
               "target": (str,), "references": (list,)}
_RAW_HINT = "the RAW format is in the README (section 'Make training data for a new relation') and relationbench/data/annotate.py"


@dataclass(frozen=True)
class RawSample:
    """One sample of raw.json; paths absolute. references is None when the file gives none."""

    id: str
    relation: str
    prompt: str
    entities: tuple[str, ...]
    predicate: str
    target: Path
    references: tuple[Path, ...] | None


@dataclass(frozen=True)
class SetAside:
    """A sample not written: its kind of failure (module docstring) and the reason in words."""

    id: str
    relation: str
    kind: str
    reason: str


@dataclass
class AnnotateReport:
    """What one annotate run did: kept samples (relation, id, per object what was found) and
    those set aside, the annotators' names and the settings."""

    annotators: dict[str, str | None]
    settings: dict[str, Any]
    random_weights: bool = False
    kept: list[dict[str, Any]] = field(default_factory=list)
    set_aside: list[SetAside] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": 1, "annotators": self.annotators, "settings": self.settings,
                "random_weights": self.random_weights, "kept": self.kept,
                "set_aside": [asdict(s) for s in self.set_aside]}

    def summary(self) -> list[str]:
        """Lines for a person: counts per relation, then each set-aside sample and its reason."""
        lines = []
        relations = dict.fromkeys([k["relation"] for k in self.kept] + [s.relation for s in self.set_aside])
        for relation in relations:
            kept = sum(k["relation"] == relation for k in self.kept)
            aside = sum(s.relation == relation for s in self.set_aside)
            lines.append(f"{relation}: {kept} kept, {aside} set aside")
        lines += [f"  set aside {s.relation}/{s.id} ({s.kind}): {s.reason}" for s in self.set_aside]
        if self.random_weights:
            lines.append("random-weight annotators (tiny backbone): the extra, same-object and duplicate rules "
                         "were off")
        return lines

    def markdown(self) -> str:
        rows = "\n".join(f"| {s.relation} | {s.id} | {s.kind} | {s.reason.replace('|', '/')} |" for s in self.set_aside)
        kept = "\n".join(f"- {k['relation']}/{k['id']}: " + ", ".join(
            f"{o['entity']} (score {o['score']:.2f}, {o['schema']})" for o in k["objects"]) for k in self.kept)
        names = "\n".join(f"- {what}: {name}" for what, name in self.annotators.items() if name)
        return (f"# Annotation report\n\n{names}\n\n" + "\n".join(f"    {line}" for line in self.summary())
                + f"\n\n## Set aside ({len(self.set_aside)})\n\n"
                + (f"| relation | id | kind | reason |\n|---|---|---|---|\n{rows}\n" if rows else "none\n")
                + f"\n## Kept ({len(self.kept)})\n\n" + (kept or "none") + "\n")

    def write(self, folder: Path) -> None:
        (folder / f"{REPORT}.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        (folder / f"{REPORT}.md").write_text(self.markdown(), encoding="utf-8")


class _Aside(Exception):
    """Raised inside a sample's annotation: set it aside for this reason."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# ---------------------------------------------------------------------------------------------
# reading RAW


def read_raw(raw: str | Path) -> list[RawSample]:
    """The samples of RAW/raw.json, in file order. Raises one UserError listing every problem."""
    raw = Path(raw)
    path = raw / RAW_MANIFEST
    if not path.is_file():
        raise UserError(f"no {RAW_MANIFEST} here", path=raw, hint=_RAW_HINT)
    problems: list[Problem] = []
    data = read_json_object(path, problems, "a JSON object with a 'samples' list")
    samples: list[RawSample] = []
    if data is not None:
        for key in sorted(set(data) - {"version", "samples"}):
            problems.append(Problem(path, f"unknown field {key!r} (known: version, samples)"))
        if data.get("version", RAW_VERSION) != RAW_VERSION:
            problems.append(Problem(path, f"version must be {RAW_VERSION}, got {show(data['version'])}"))
        records = data.get("samples")
        if not isinstance(records, list) or not records:
            problems.append(Problem(path, f"samples must be a non-empty list, got {show(records)}"))
            records = []
        seen: set[str] = set()
        for i, record in enumerate(records):
            sample = _raw_sample(raw, i, record, problems)
            if sample is not None:
                samples.append(sample)
            id = record.get("id") if isinstance(record, dict) else None
            if isinstance(id, str):
                if id in seen:
                    problems.append(Problem(path, f"sample {id}: the id is used twice"))
                seen.add(id)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise UserError(f"{len(problems)} problem(s) in the raw samples:\n{lines}", path=path, hint=_RAW_HINT)
    return samples


def _raw_sample(raw: Path, index: int, record: Any, problems: list[Problem]) -> RawSample | None:
    """One record checked; None (with problems) when anything is wrong."""
    path, count = raw / RAW_MANIFEST, len(problems)
    where = f"sample #{index}"

    def fail(message: str) -> None:
        problems.append(Problem(path, f"{where}: {message}"))

    if not isinstance(record, dict):
        fail(f"must be an object with {', '.join(_RAW_FIELDS)}, got {show(record)}")
        return None
    if isinstance(record.get("id"), str):
        where = f"sample {record['id']}"
    for key in sorted(set(record) - set(_RAW_FIELDS), key=str):
        fail(f"unknown field {key!r} (known: {', '.join(_RAW_FIELDS)})")
    for key, kinds in _RAW_FIELDS.items():
        if key not in record:
            if key != "references":
                fail(f"missing field {key!r}")
        elif why := type_problem(record[key], kinds):
            fail(f"{key} {why}")
    if len(problems) > count:
        return None
    prompt, entities = record["prompt"], record["entities"]
    if not SAMPLE_ID.fullmatch(record["id"]):
        fail("id must be letters, digits, _ . and - (it names the sample's folder)")
    if not RELATION_NAME.fullmatch(record["relation"]):
        fail(f"relation {record['relation']!r} must be letters, digits, _ and - (it names a folder and a LoRA)")
    if not 1 <= len(entities) <= MAX_ENTITIES:
        fail(f"entities must name 1 to {MAX_ENTITIES} objects, got {len(entities)}")
    for entity in entities:
        if type_problem(entity, (str,)) or not entity.strip():
            fail(f"each entity must be a non-empty string, got {show(entity)}")
        elif not phrase_in(prompt, entity):
            fail(f"entity {entity!r} is not in the prompt {prompt!r} (as whole words)")
    if not record["predicate"].strip() or not phrase_in(prompt, record["predicate"]):
        fail(f"predicate {record['predicate']!r} is not in the prompt {prompt!r} (as whole words)")
    target = _raw_file(raw, record["target"], "target", fail)
    references = None
    if "references" in record:
        if len(record["references"]) != len(entities):
            fail(f"{len(record['references'])} references for {len(entities)} entities: give one per entity, "
                 "in the same order (or none)")
        references = []
        for k, value in enumerate(record["references"]):
            if why := type_problem(value, (str,)):
                fail(f"reference {k} {why}")
            else:
                references.append(_raw_file(raw, value, f"reference {k}", fail))
    if len(problems) > count:
        return None
    return RawSample(id=record["id"], relation=record["relation"], prompt=prompt, entities=tuple(entities),
                     predicate=record["predicate"], target=target,
                     references=None if references is None else tuple(references))


def _raw_file(raw: Path, value: str, what: str, fail) -> Path | None:
    """A file named by raw.json: relative to RAW, inside it, existing."""
    rel = relative_inside(value)
    if rel is None:
        fail(f"{what} {value!r} must be a file path relative to the RAW folder, inside it")
        return None
    if not (raw / rel).is_file():
        fail(f"{what} {value!r}: no such file in {raw}")
        return None
    return raw / rel


# ---------------------------------------------------------------------------------------------
# matching detections to entities


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one size; 0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def match_entities(entities: Sequence[str], found: Mapping[str, Sequence[Detection]], settings: AnnotateSettings,
                   where: str, *, compare: bool = True) -> list[Detection]:
    """One detection per entity, in entity order, by the rules of the module docstring; raises
    _Aside. `found` maps each label to its detections, best first; compare=False turns off the
    rules that compare detections (extra, same-object, duplicates)."""
    same_iou = settings.same_object_iou if compare else None
    extra = settings.extra_ratio if compare else None
    picks: dict[str, list[Detection]] = {}
    for label in dict.fromkeys(entities):
        n = list(entities).count(label)
        objects: list[Detection] = []
        for d in sorted((d for d in found[label] if d.score >= settings.threshold), key=lambda d: -d.score):
            if same_iou is None or all(mask_iou(d.mask, o.mask) < same_iou for o in objects):
                objects.append(d)
        if len(objects) < n:
            raise _Aside("missing", f"{where}: {label!r} found {len(objects)} time(s) scoring at least "
                                    f"{settings.threshold}, named {n} time(s)")
        if extra is not None and len(objects) > n and objects[n].score >= extra * objects[n - 1].score:
            raise _Aside("extra", f"{where}: {len(objects)} {label!r} objects found for {n} named (the next scores "
                                  f"{objects[n].score:.2f}, the weakest kept {objects[n - 1].score:.2f})")
        picks[label] = sorted(objects[:n], key=lambda d: mask_box(d.mask)[0] if d.mask.any() else d.box[0])
    chosen = [picks[label].pop(0) for label in entities]
    for entity, d in zip(entities, chosen):
        if not d.mask.any():
            raise _Aside("empty-mask", f"{where}: the mask of {entity!r} is empty")
    for i in range(len(chosen)):
        for j in range(i + 1, len(chosen)):
            if same_iou is not None and entities[i] != entities[j] and \
                    (iou := mask_iou(chosen[i].mask, chosen[j].mask)) >= same_iou:
                raise _Aside("same-object", f"{where}: {entities[i]!r} and {entities[j]!r} were found on one "
                                            f"object (mask IoU {iou:.2f})")
    return chosen


# ---------------------------------------------------------------------------------------------
# annotating


@dataclass
class _Annotated:
    """One sample's annotations, ready to write."""

    target: "Image.Image"
    objects: list[Detection]
    keypoints: list[Keypoints]
    references: list[tuple["Image.Image", Detection, Keypoints]]
    captions: dict[str, Any] | None


def detect(masks: MaskAnnotator, image: "Image.Image", labels: list[str]) -> dict[str, list[Detection]]:
    """The mask annotator's detections by label, its output checked (a plugin's mistake is a
    UserError naming it)."""
    found = masks.detect(image, labels)
    size = (image.size[1], image.size[0])
    if len(found) != len(labels) or any(
            not isinstance(d, Detection) or np.shape(d.mask) != size for per in found for d in per):
        raise UserError(f"the mask annotator {masks.name} did not return, for each of {len(labels)} "
                        f"labels, a list of Detection with a [H, W] = {list(size)} mask",
                        hint="fix the plugin (relationbench.data.annotators.MaskAnnotator)")
    return {label: [replace(d, mask=np.asarray(d.mask, dtype=bool)) for d in per] for label, per in zip(labels, found)}


def _keypoints(annotators: Annotators, image: "Image.Image", objects: Sequence[Detection],
               labels: Sequence[str]) -> list[Keypoints]:
    """The keypoint annotator's points for each object's mask box, its output checked."""
    found = annotators.keypoints.keypoints(image, [mask_box(o.mask) for o in objects], list(labels))

    def unit(values: np.ndarray) -> bool:  # NaN fails
        return bool(np.all((values >= 0) & (values <= 1)))

    def ok(k: Any) -> bool:
        return (isinstance(k, Keypoints) and k.schema in KEYPOINT_SCHEMAS and k.xy.shape == (N_KEYPOINTS, 2)
                and unit(k.xy) and (k.score is None or (k.score.shape == (N_KEYPOINTS,) and unit(k.score))))

    if len(found) != len(objects) or not all(ok(k) for k in found):
        raise UserError(f"the keypoint annotator {annotators.keypoints.name} did not return, for each of "
                        f"{len(objects)} boxes, Keypoints with {N_KEYPOINTS} (x, y) in [0, 1], scores in [0, 1] "
                        f"and a schema of {', '.join(KEYPOINT_SCHEMAS)}",
                        hint="fix the plugin (relationbench.data.annotators.KeypointAnnotator)")
    return list(found)


def _annotate(sample: RawSample, annotators: Annotators, settings: AnnotateSettings, compare: bool) -> _Annotated:
    """Everything one sample needs; raises _Aside."""
    if sample.references is None:
        raise _Aside("no-references", "no reference images (the triplet format needs one per entity)")
    target = read_image(sample.target)
    labels = list(dict.fromkeys(sample.entities))
    objects = match_entities(sample.entities, detect(annotators.masks, target, labels), settings, "target",
                             compare=compare)
    keypoints = _keypoints(annotators, target, objects, sample.entities)
    references = []
    for k, (entity, path) in enumerate(zip(sample.entities, sample.references)):
        image = read_image(path)
        [found] = match_entities([entity], detect(annotators.masks, image, [entity]), settings, f"reference {k}",
                                 compare=compare)
        [points] = _keypoints(annotators, image, [found], [entity])
        if points.schema != keypoints[k].schema:
            raise _Aside("schema-mismatch", f"{entity!r} got keypoint schema {keypoints[k].schema} in the target "
                                            f"but {points.schema} in reference {k}")
        references.append((image, found, points))
    captions = None
    if annotators.captioner is not None:
        captions = {"target": annotators.captioner.caption(target),
                    "references": [annotators.captioner.caption(image) for image, _, _ in references]}
    return _Annotated(target, objects, keypoints, references, captions)


def _write_sample(folder: Path, sample: RawSample, done: _Annotated) -> dict[str, Any]:
    """Write one sample's images and masks under folder/<id>/; its manifest record."""
    from PIL import Image

    target_rel, reference_rels, mask_rels = sample_files(sample.id, len(sample.entities))
    (folder / sample.id).mkdir(parents=True)
    done.target.save(folder / target_rel)
    objects, references = [], []
    for k, (obj, points) in enumerate(zip(done.objects, done.keypoints)):
        Image.fromarray(obj.mask.astype(np.uint8) * 255).save(folder / mask_rels[k])  # 2-D uint8: greyscale
        objects.append({"mask": mask_rels[k], "keypoints": keypoints_record(points.xy, points.schema, points.score)})
    for k, (image, _, points) in enumerate(done.references):
        image.save(folder / reference_rels[k])
        references.append({"image": reference_rels[k],
                           "keypoints": keypoints_record(points.xy, points.schema, points.score)})
    return {"id": sample.id, "prompt": sample.prompt, "entities": list(sample.entities),
            "predicate": sample.predicate, "target": target_rel, "objects": objects, "references": references}


def _kept_entry(sample: RawSample, done: _Annotated) -> dict[str, Any]:
    """The report's record of a kept sample: per object and reference what was found."""
    def found(entity: str, d: Detection, points: Keypoints) -> dict[str, Any]:
        return {"entity": entity, "score": round(float(d.score), 4),
                "box": [round(float(v), 4) for v in mask_box(d.mask)], "schema": points.schema}

    entry = {"id": sample.id, "relation": sample.relation,
             "objects": [found(e, d, p) for e, d, p in zip(sample.entities, done.objects, done.keypoints)],
             "references": [found(e, d, p) for e, (_, d, p) in zip(sample.entities, done.references)]}
    if done.captions is not None:
        entry["captions"] = done.captions
    return entry


def annotate_raw(raw: Path, out: Path, *, annotators: Annotators, settings: AnnotateSettings,
                 progress: bool = True) -> AnnotateReport:
    """Annotate every sample of RAW into the triplet folder OUT (new or empty; written
    atomically, with the report), check it, and return the report. Raises UserError for a
    wrong raw.json, a non-empty OUT or a plugin returning malformed output; samples whose
    detections do not match are set aside in the report (none kept is not an error here)."""
    from tqdm.auto import tqdm

    samples = read_raw(raw)
    out = Path(out)
    compare = not annotators.random_weights
    report = AnnotateReport(annotators=annotators.names(), settings=asdict(settings),
                            random_weights=annotators.random_weights)
    with new_folder(out) as tmp:
        records: dict[str, list[dict[str, Any]]] = {}
        captions: dict[str, dict[str, Any]] = {}
        for sample in tqdm(samples, desc="annotate", unit="sample", disable=not progress):
            try:
                done = _annotate(sample, annotators, settings, compare)
            except _Aside as aside:
                report.set_aside.append(SetAside(sample.id, sample.relation, aside.kind, aside.reason))
                continue
            records.setdefault(sample.relation, []).append(_write_sample(tmp / sample.relation, sample, done))
            if done.captions is not None:
                captions.setdefault(sample.relation, {})[sample.id] = done.captions
            report.kept.append(_kept_entry(sample, done))
        for relation, relation_records in records.items():
            write_manifest(tmp / relation, relation_records)
            if relation in captions:
                (tmp / relation / CAPTIONS).write_text(json.dumps(captions[relation], indent=2, ensure_ascii=False)
                                                       + "\n", encoding="utf-8")
        if records and (problems := check_triplets(tmp, list(records))):
            raise problems_error(problems, tmp)  # a bug here (the outputs were checked), never a half-written OUT
        report.write(tmp)
    return report


def annotate(raw: str | Path, out: str | Path, *, backbone: str = "sdxl", weights: Mapping[str, str] | None = None,
             device: str = "auto", progress: bool = True, **given: Any) -> AnnotateReport:
    """What `relbench data annotate` does: check RAW, load the annotators AnnotateSettings(**given)
    names on the backbone, annotate. UserError for anything the user can fix."""
    from ..backbones import get_backbone
    from ..devices import resolve_device

    read_raw(raw)  # a wrong raw.json fails before any model loads
    settings = AnnotateSettings(**given)
    model = get_backbone(backbone, weights)
    annotators = load_annotators(model, settings, resolve_device(device))
    return annotate_raw(Path(raw), Path(out), annotators=annotators, settings=settings, progress=progress)


__all__ = [
    "AnnotateReport",
    "RawSample",
    "SetAside",
    "annotate",
    "annotate_raw",
    "mask_iou",
    "match_entities",
    "read_raw",
]
