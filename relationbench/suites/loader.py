"""Load suite files (prompts/*.yaml) and validate them, naming the file and case at fault.

File format (YAML; documented in prompts/README.md):

    suite: relationbench          # name, also the file stem
    version: 1
    images_per_case: 1            # optional: the protocol's samples per case (DreamBench: 4)
    description: ...
    license: ...                  # optional notice carried with derived files
    predicates: none              # optional: how the case predicates were made ("none": no
                                  # relations); when given, a case without one has no relation
    subjects:                     # registry: name -> class noun and image location
      dog: {class: dog, source: dreambench, dir: dog, category: pets}
      rex: {class: dog, images: [rex/1.jpg, rex/2.jpg]}   # or by path: files or folders,
                                  # relative to this file's folder
    relations:                    # optional: [{verb: hug, ing: hugging}, ...]
    cases:
      - {id: rb-s-001, kind: single, subjects: [dog], prompt: a dog riding a bicycle,
         predicate: riding, relation: ride, boxes: [[0.1, 0.1, 0.9, 0.9]], seed: 1}
      # predicate_source: <extractor id>  optional per case: an extracted predicate to review
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..userfiles import QUOTE_HINT, load_data, show, text_problem, type_problem
from .model import NO_PREDICATES, Case, Subject, Suite, find_phrase, phrase_in

SUITE_SUFFIXES = (".yaml", ".yml", ".json")
KINDS = {"single": 1, "multi": 2}
# ids and suite names name folders (results/<suite>/.../images/<case_id>/): keep them path-safe
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# every field's type (None: the field is absent); strings are one line unless free text
_TOP_FIELDS = {"suite": (str,), "version": (int,), "images_per_case": (int,), "description": (str,),
               "license": (str,), "predicates": (str,), "subjects": (dict,), "cases": (list,), "relations": (list,)}
_SUBJECT_FIELDS = {"class": (str,), "source": (str,), "dir": (str,), "category": (str,), "images": (list, str)}
_CASE_FIELDS = {"id": (str,), "kind": (str,), "subjects": (list, str), "prompt": (str,), "predicate": (str,),
                "predicate_source": (str,), "relation": (str,), "boxes": (list,), "seed": (int,)}
_FREE_TEXT = {"description", "license"}


class SuiteError(UserError):
    """A suite file that does not validate; the message names the file and the case."""


def prompts_dir() -> Path:
    """The project's prompts/ folder (next to the package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "prompts"


def available_suites(directory: Path | None = None) -> dict[str, Path]:
    directory = directory or prompts_dir()
    if not directory.is_dir():
        return {}
    return {p.stem: p for p in sorted(directory.iterdir()) if p.suffix in SUITE_SUFFIXES}


def resolve_suite_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in SUITE_SUFFIXES or len(path.parts) > 1:
        if not path.is_file():
            raise UserError("suite file not found", path=path, hint="check the path, or pass a suite name")
        return path
    suites = available_suites()
    if str(name_or_path) in suites:
        return suites[str(name_or_path)]
    known = ", ".join(suites) or "none"
    raise UserError(
        f"unknown suite {str(name_or_path)!r} (known: {known})",
        hint="pass a suite name from `relbench prompts list` or the path of a suite file",
    )


def load_suite(name_or_path: str | Path, base: Path | None = None) -> Suite:
    """The suite of a name or file. `base`: the folder that subject image paths written
    relative are relative to (default: the suite file's own folder; a run's copy of a suite
    file passes the original's folder)."""
    path = resolve_suite_path(name_or_path)
    try:
        data = load_data(path)
    except UserError as exc:  # the suite's own error type, for callers that catch it
        raise SuiteError(exc.message, path=path, hint=exc.hint) from None
    return parse_suite(data, path, base)


def parse_suite(data: Any, path: Path, base: Path | None = None) -> Suite:
    """Build a Suite from parsed data, raising SuiteError on the first problem found. `base`:
    see load_suite."""

    def fail(msg: str, hint: str | None = None) -> SuiteError:
        return SuiteError(msg, path=path, hint=hint)

    if not isinstance(data, dict):
        raise fail("top level must be a mapping with keys suite, version, subjects, cases")
    check_fields(data, _TOP_FIELDS, ("suite", "subjects", "cases"), fail)
    name = data["suite"]
    check_suite_name(name, path)
    version, images_per_case = (1 if data.get(key) is None else data[key] for key in ("version", "images_per_case"))
    for key, value in (("version", version), ("images_per_case", images_per_case)):
        if value < 1:
            raise fail(f"{key} must be a positive integer, got {value!r}")
    predicates = data.get("predicates")
    if predicates is not None and not predicates.strip():
        raise fail(f"predicates must name how the case predicates were made, got {predicates!r}",
                   hint=f"e.g. {NO_PREDICATES!r} for a suite without relations")
    relations = data.get("relations") or []
    if not all(isinstance(r, dict) and all(isinstance(k, str) and _plain(v) for k, v in r.items()) for r in relations):
        raise fail(f"relations must be a list of mappings of names to text, numbers or booleans, got {show(relations)}")
    base = Path(path).resolve().parent if base is None else Path(base)
    subjects = _parse_subjects(data["subjects"], fail, path, base)
    if not data["cases"]:
        raise fail("'cases' must be a non-empty list")
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data["cases"]):
        case = _parse_case(raw, i, name, subjects, path)
        if case.id in seen:
            raise fail(f"case {case.id}: duplicate id (also case #{seen[case.id]})", hint="give every case a unique id")
        seen[case.id] = i
        if predicates == NO_PREDICATES and case.predicate is not None:
            raise fail(f"case {case.id}: has predicate {case.predicate!r}, but the suite says "
                       f"predicates: {NO_PREDICATES}",
                       hint=f"drop the predicate, or the suite's `predicates: {NO_PREDICATES}`")
        cases.append(case)
    return Suite(
        name=name,
        version=version,
        description=(data.get("description") or "").strip(),
        path=str(path),
        subjects=subjects,
        cases=tuple(cases),
        license=data.get("license"),
        relations=tuple(relations),
        images_per_case=images_per_case,
        predicates=predicates,
    )


def check_suite_name(name: str, path: Path | None = None) -> None:
    """A suite's name names folders (results/<suite>/): the rule of case ids."""
    if not CASE_ID.fullmatch(name):
        raise SuiteError(f"suite name {name!r} may hold only letters, digits, '_', '.', '-', at most 100 "
                         "(it names a folder)", path=path)


def check_fields(raw: dict, fields: dict[str, tuple[type, ...]], required: tuple[str, ...], fail) -> None:
    """Every field's type in one place: no field outside `fields` (a typo would otherwise drop
    a value silently), the `required` ones present (not null), each field of
    `fields` absent, null or of its type (userfiles.type_problem: strings writable as UTF-8
    and, but for free text, one line without control characters)."""
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:  # a misspelt field would otherwise vanish silently (a `predicat:` is no predicate)
        near = difflib.get_close_matches(unknown[0], list(fields), n=1)
        raise fail(f"unknown field {unknown[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
                   f"the fields are: {', '.join(fields)}")
    for key in required:
        if raw.get(key) is None:
            raise fail(f"missing field {key!r}")
    for key, kinds in fields.items():
        value = raw.get(key)
        why = None if value is None else type_problem(value, kinds, one_line=key not in _FREE_TEXT)
        if why:
            raise fail(f"{key} {why}", QUOTE_HINT if str in kinds and not isinstance(value, str) else None)


def _plain(value: Any) -> bool:
    """A value JSON and YAML write and read back as is (a suite copy in a run is JSON)."""
    if isinstance(value, str):
        return text_problem(value, one_line=False) is None
    return value is None or isinstance(value, (bool, int, float))


def _parse_subjects(raw: dict, fail, path: Path, base: Path) -> dict[str, Subject]:
    """The registry; `images` paths resolved against `base` (absolute, normalized: no file
    system access, so a suite loads where its images are not)."""
    if not raw:
        raise fail("'subjects' must be a non-empty mapping name -> {class, source} or {class, images}")
    out: dict[str, Subject] = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not name.strip() or text_problem(name):
            raise fail(f"subject name {show(name)} must be a one-line string", "quote names YAML reads as numbers")
        if not isinstance(spec, dict):
            raise fail(f"subject {name!r}: needs 'class', and 'source' or 'images'")

        def subject_fail(msg: str, hint: str | None = None, name=name) -> SuiteError:
            return fail(f"subject {name!r}: {msg}", hint)

        check_fields(spec, _SUBJECT_FIELDS, ("class",), subject_fail)
        if not spec["class"].strip():
            raise subject_fail("class must name the subject's class noun, got ''")
        images = _parse_images(spec, subject_fail)
        out[name] = Subject(
            name=name,
            class_noun=spec["class"],
            source=spec.get("source"),
            dir=None if images else spec.get("dir") or name,
            category=spec.get("category"),
            images=tuple(os.path.normpath(os.path.abspath(base / Path(p).expanduser())) for p in images),
            suite_file=str(path),
        )
    return out


def subject_entry(subject: Subject) -> dict[str, Any]:
    """A subject's registry entry in a suite file (what _parse_subjects reads back); its image
    paths absolute, so the entry names the same files from any suite file's folder."""
    entry = {"class": subject.class_noun, "source": subject.source, "dir": subject.dir,
             "category": subject.category, "images": list(subject.images) or None}
    return {k: v for k, v in entry.items() if v is not None}


def _parse_images(spec: dict, fail) -> list[str]:
    """A subject's `images` as written (one path or a list); [] for a subject of a dataset.
    Exactly one of `source` and `images`; `dir` only with `source`."""
    images = spec.get("images")
    if images is None:
        if spec.get("source") is None:
            raise fail("needs 'source' (a dataset, with 'dir') or 'images' (paths of image files or folders)")
        return []
    if spec.get("source") is not None or spec.get("dir") is not None:
        raise fail("has both 'images' and 'source'/'dir'", hint="name its images either by path or by dataset")
    images = [images] if isinstance(images, str) else images
    if not images or not all(isinstance(p, str) and p.strip() and not text_problem(p) for p in images):
        raise fail(f"images must be a path or a non-empty list of paths, got {show(images)}",
                   hint="paths of image files or folders, relative to the suite file's folder")
    return images


def _parse_case(raw: Any, index: int, suite: str, subjects: dict[str, Subject], path: Path) -> Case:
    case_id = raw.get("id") if isinstance(raw, dict) else None
    where = f"case {case_id}" if isinstance(case_id, str) and not text_problem(case_id) else f"case #{index}"

    def fail(msg: str, hint: str | None = None) -> SuiteError:
        return SuiteError(f"{where}: {msg}", path=path, hint=hint)

    if not isinstance(raw, dict):
        raise fail("must be a mapping")
    check_fields(raw, _CASE_FIELDS, ("id", "kind", "subjects", "prompt", "boxes", "seed"), fail)
    if not CASE_ID.fullmatch(case_id):
        raise fail("id may hold only letters, digits, '_', '.', '-', at most 100 (it names a folder)")
    kind = raw["kind"]
    if kind not in KINDS:
        raise fail(f"kind {kind!r} must be 'single' or 'multi'")
    names = raw["subjects"]
    if isinstance(names, str):
        names = [names]
    if len(names) != KINDS[kind]:
        raise fail(f"a {kind} case has {KINDS[kind]} subject(s), got {show(names)}")
    unknown = [n for n in names if not isinstance(n, str) or n not in subjects]
    if unknown:
        raise fail(
            f"unknown subject(s) {', '.join(map(show, unknown))}",
            hint="add them under 'subjects:' or fix the name (known: "
            + ", ".join(sorted(subjects)[:12])
            + (", ..." if len(subjects) > 12 else "")
            + ")",
        )
    case_subjects = tuple(subjects[n] for n in names)
    prompt = raw["prompt"]
    if not prompt.strip():
        raise fail("prompt must be a non-empty string")
    for s in case_subjects:
        if not phrase_in(prompt, s.class_noun):
            raise fail(
                f"class noun {s.class_noun!r} of subject {s.name!r} not found in prompt {prompt!r}",
                hint="the prompt must name each subject by its class noun",
            )
    spans = _mention_spans(prompt, [s.class_noun for s in case_subjects])
    if len(set(spans)) != len(spans):
        raise fail(
            f"the prompt {prompt!r} names the {len(spans)} subjects with fewer separate class-noun mentions",
            hint="name each subject by its own class noun in the prompt",
        )
    predicate = raw.get("predicate")
    if predicate is not None and not predicate.strip():
        # "" would read as "no predicate" downstream, where a missing one may be extracted
        raise fail(f"predicate {predicate!r} is empty", hint="leave `predicate` out for a case without a relation")
    if predicate is not None and not phrase_in(prompt, predicate):
        raise fail(f"predicate {predicate!r} not found in prompt {prompt!r}")
    predicate_source = raw.get("predicate_source")  # the review mark of an extracted predicate
    if predicate_source is not None and not predicate_source.strip():
        raise fail(f"predicate_source must name the extractor of the predicate, got {predicate_source!r}",
                   hint="delete the mark once a person has checked the predicate")
    if predicate_source is not None and predicate is None:
        raise fail(f"predicate_source {predicate_source!r} marks a predicate, but the case has none",
                   hint="delete predicate_source, or add the predicate")
    boxes = parse_boxes(raw["boxes"], len(case_subjects), fail)
    seed = raw["seed"]
    if not 0 <= seed < 2**32:
        raise fail(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return Case(
        id=case_id,
        suite=suite,
        kind=kind,
        subjects=case_subjects,
        prompt=prompt,
        predicate=predicate,
        boxes=boxes,
        seed=seed,
        relation=raw.get("relation"),
        predicate_source=predicate_source,
    )


def _mention_spans(prompt: str, nouns: list[str]) -> list[tuple[int, int]]:
    """Where Case.class_spans will find each subject (the same search, before the Case exists)."""
    spans, start = [], 0
    for noun in nouns:
        span = find_phrase(prompt, noun, start) or find_phrase(prompt, noun)
        spans.append(span)
        start = span[1]
    return spans


def parse_boxes(raw: list | tuple, n: int, fail) -> tuple[tuple[float, float, float, float], ...]:
    if len(raw) != n:
        raise fail(f"needs {n} box(es), one per subject, got {show(raw)}")
    out = []
    for j, box in enumerate(raw):
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise fail(f"box {j} must be [x0, y0, x1, y1], got {show(box)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise fail(f"box {j} must hold numbers, got {show(box)}")
        if not all(0 <= v <= 1 for v in box):  # before float(): 10**400 has none; NaN fails here
            raise fail(f"box {j} {show(box)} lies outside [0, 1]", hint="boxes are normalized xyxy")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (x0 < x1 and y0 < y1):
            raise fail(f"box {j} {show(box)} needs x0 < x1 and y0 < y1", hint="boxes are normalized xyxy")
        out.append((x0, y0, x1, y1))
    return tuple(out)
