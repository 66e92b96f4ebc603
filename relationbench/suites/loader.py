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
    relations:                    # optional: [{verb: hug, ing: hugging}, ...]
    cases:
      - {id: rb-s-001, kind: single, subjects: [dog], prompt: a dog riding a bicycle,
         predicate: riding, relation: ride, boxes: [[0.1, 0.1, 0.9, 0.9]], seed: 1}
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .model import NO_PREDICATES, Case, Subject, Suite, find_phrase, phrase_in

SUITE_SUFFIXES = (".yaml", ".yml", ".json")
# libyaml's safe loader parses the 1212-case suite in 0.2 s instead of 1.5 s
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KINDS = {"single": 1, "multi": 2}
# ids name folders in a run (images/<case_id>/): keep them path-safe
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


def load_suite(name_or_path: str | Path) -> Suite:
    path = resolve_suite_path(name_or_path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)
    except yaml.YAMLError as exc:
        raise SuiteError(f"not valid YAML/JSON: {exc}", path=path) from None
    return parse_suite(data, path)


def parse_suite(data: Any, path: Path) -> Suite:
    """Build a Suite from parsed data, raising SuiteError on the first problem found."""
    if not isinstance(data, dict):
        raise SuiteError("top level must be a mapping with keys suite, version, subjects, cases", path=path)
    for key in ("suite", "subjects", "cases"):
        if key not in data:
            raise SuiteError(f"missing top-level key {key!r}", path=path)
    name = str(data["suite"])
    try:
        version = int(data.get("version", 1))
    except (TypeError, ValueError):
        raise SuiteError(f"version must be an integer, got {data.get('version')!r}", path=path) from None
    images_per_case = data.get("images_per_case", 1)
    if not isinstance(images_per_case, int) or isinstance(images_per_case, bool) or images_per_case < 1:
        raise SuiteError(f"images_per_case must be a positive integer, got {images_per_case!r}", path=path)
    predicates = data.get("predicates")
    if predicates is not None and (not isinstance(predicates, str) or not predicates.strip()):
        raise SuiteError(f"predicates must name how the case predicates were made, got {predicates!r}", path=path,
                         hint=f"e.g. {NO_PREDICATES!r} for a suite without relations")
    subjects = _parse_subjects(data["subjects"], path)
    if not isinstance(data["cases"], list) or not data["cases"]:
        raise SuiteError("'cases' must be a non-empty list", path=path)
    cases: list[Case] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(data["cases"]):
        case = _parse_case(raw, i, name, subjects, path)
        if case.id in seen:
            raise SuiteError(
                f"case {case.id}: duplicate id (also case #{seen[case.id]})",
                path=path,
                hint="give every case a unique id",
            )
        seen[case.id] = i
        if predicates == NO_PREDICATES and case.predicate is not None:
            raise SuiteError(f"case {case.id}: has predicate {case.predicate!r}, but the suite says "
                             f"predicates: {NO_PREDICATES}", path=path,
                             hint=f"drop the predicate, or the suite's `predicates: {NO_PREDICATES}`")
        cases.append(case)
    return Suite(
        name=name,
        version=version,
        description=str(data.get("description", "")).strip(),
        path=str(path),
        subjects=subjects,
        cases=tuple(cases),
        license=data.get("license"),
        relations=tuple(data.get("relations") or ()),
        images_per_case=images_per_case,
        predicates=predicates,
    )


def _parse_subjects(raw: Any, path: Path) -> dict[str, Subject]:
    if not isinstance(raw, dict) or not raw:
        raise SuiteError("'subjects' must be a non-empty mapping name -> {class, source}", path=path)
    out: dict[str, Subject] = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or "class" not in spec or "source" not in spec:
            raise SuiteError(f"subject {name!r}: needs 'class' and 'source'", path=path)
        out[str(name)] = Subject(
            name=str(name),
            class_noun=str(spec["class"]),
            source=str(spec["source"]),
            dir=str(spec.get("dir", name)),
            category=spec.get("category"),
        )
    return out


def _parse_case(raw: Any, index: int, suite: str, subjects: dict[str, Subject], path: Path) -> Case:
    where = f"case #{index}"
    if not isinstance(raw, dict):
        raise SuiteError(f"{where}: must be a mapping", path=path)
    if "id" in raw:
        where = f"case {raw['id']}"

    def fail(msg: str, hint: str | None = None) -> SuiteError:
        return SuiteError(f"{where}: {msg}", path=path, hint=hint)

    for key in ("id", "kind", "subjects", "prompt", "boxes", "seed"):
        if key not in raw:
            raise fail(f"missing field {key!r}")
    if not CASE_ID.match(str(raw["id"])):
        raise fail("id may hold only letters, digits, '_', '.', '-' (it names a folder)")
    kind = raw["kind"]
    if kind not in KINDS:
        raise fail(f"kind {kind!r} must be 'single' or 'multi'")
    names = raw["subjects"]
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or len(names) != KINDS[kind]:
        raise fail(f"a {kind} case has {KINDS[kind]} subject(s), got {names!r}")
    unknown = [n for n in names if n not in subjects]
    if unknown:
        raise fail(
            f"unknown subject(s) {', '.join(map(repr, unknown))}",
            hint="add them under 'subjects:' or fix the name (known: "
            + ", ".join(sorted(subjects)[:12])
            + (", ..." if len(subjects) > 12 else "")
            + ")",
        )
    case_subjects = tuple(subjects[n] for n in names)
    prompt = raw["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
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
    if predicate is not None and not str(predicate).strip():
        # "" would read as "no predicate" downstream, where a missing one may be extracted
        raise fail(f"predicate {predicate!r} is empty", hint="leave `predicate` out for a case without a relation")
    if predicate is not None and not phrase_in(prompt, str(predicate)):
        raise fail(f"predicate {predicate!r} not found in prompt {prompt!r}")
    boxes = _parse_boxes(raw["boxes"], len(case_subjects), fail)
    seed = raw["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise fail(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return Case(
        id=str(raw["id"]),
        suite=suite,
        kind=kind,
        subjects=case_subjects,
        prompt=prompt,
        predicate=None if predicate is None else str(predicate),
        boxes=boxes,
        seed=seed,
        relation=raw.get("relation"),
    )


def _mention_spans(prompt: str, nouns: list[str]) -> list[tuple[int, int]]:
    """Where Case.class_spans will find each subject (the same search, before the Case exists)."""
    spans, start = [], 0
    for noun in nouns:
        span = find_phrase(prompt, noun, start) or find_phrase(prompt, noun)
        spans.append(span)
        start = span[1]
    return spans


def _parse_boxes(raw: Any, n: int, fail) -> tuple[tuple[float, float, float, float], ...]:
    if not isinstance(raw, list) or len(raw) != n:
        raise fail(f"needs {n} box(es), one per subject, got {raw!r}")
    out = []
    for j, box in enumerate(raw):
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            raise fail(f"box {j} must be [x0, y0, x1, y1], got {box!r}")
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise fail(f"box {j} must hold numbers, got {box!r}") from None
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
            raise fail(f"box {j} {box!r} lies outside [0, 1]", hint="boxes are normalized xyxy")
        if not (x0 < x1 and y0 < y1):
            raise fail(f"box {j} {box!r} needs x0 < x1 and y0 < y1", hint="boxes are normalized xyxy")
        out.append((x0, y0, x1, y1))
    return tuple(out)
