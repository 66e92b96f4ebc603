"""Turn an outside case list (JSON, JSONL or CSV) into a validated suite file.

Columns (rename any with a mapping {field: column}; only `prompt` and `subjects` are required):

    id         case id                        default: <suite>-<row, 4 digits>
    kind       single | multi                 default: from the number of subjects
    subjects   subject names, a JSON list or a string split on ';' or ','
               (names from the registry of an existing suite, relationbench by default)
    prompt     the prompt, naming each subject by its class noun
    predicate  the relation phrase in the prompt  default: spaCy extraction (predicates.py),
               which needs the spaCy English model; the suite then names it (`predicates:`)
    boxes      JSON list of normalized xyxy boxes, one per subject
               default: one central box; two side-by-side boxes for two subjects
    seed       integer                        default: from a hash of the id
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import UserError
from .loader import parse_suite
from .model import Suite
from .predicates import extract_predicate, predicate_backend

FIELDS = ("id", "kind", "subjects", "prompt", "predicate", "boxes", "seed")
DEFAULT_BOXES = {1: [[0.15, 0.15, 0.85, 0.85]], 2: [[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]]}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON list (or {"cases": [...]}), a JSONL file or a CSV with a header."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(text.splitlines()))
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise UserError(f"neither JSON, JSONL nor CSV ({exc})", path=path) from None
    if isinstance(data, dict) and isinstance(data.get("cases"), list):
        data = data["cases"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError("expected a list of objects (or {\"cases\": [...]})", path=path)
    return data


def import_cases(
    path: Path,
    name: str,
    registry: Suite,
    mapping: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The suite file's data for the rows of `path`, validated as a suite."""
    mapping = dict(mapping or {})
    bad = sorted(set(mapping) - set(FIELDS))
    if bad:
        raise UserError(f"unknown field(s) in the column mapping: {', '.join(bad)}", hint=f"fields: {', '.join(FIELDS)}")
    rows = read_rows(path)
    if not rows:
        raise UserError("no rows to import", path=path)
    cases = [_case(row, i, name, registry, mapping, path) for i, row in enumerate(rows)]
    extracted = any(_value(row, mapping, "predicate") is None for row in rows)  # _case extracted these
    used = sorted({s for c in cases for s in c["subjects"]})
    data = {
        "suite": name,
        "version": 1,
        "description": f"Imported from {path.name} with `relbench prompts import` "
        f"(subjects from the {registry.name} registry).",
        "license": registry.license,
        **({"predicates": predicate_backend("model")} if extracted else {}),  # what made them: never a silent fallback
        "subjects": {
            s: {k: v for k, v in {"class": registry.subjects[s].class_noun, "source": registry.subjects[s].source,
                                  "dir": registry.subjects[s].dir, "category": registry.subjects[s].category}.items()
                if v is not None}
            for s in used
        },
        "cases": cases,
    }
    parse_suite(data, path)  # the same validation as any suite file, naming the imported file
    return data


def write_suite(data: dict[str, Any], out: Path, force: bool = False) -> None:
    if out.exists() and not force:
        raise UserError("suite file exists", path=out, hint="pass --force to replace it, or another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True), encoding="utf-8")
    tmp.replace(out)


def _value(row: Mapping[str, Any], mapping: Mapping[str, str], field: str) -> Any:
    """A field's cell in a row (its column renamed by `mapping`); None when absent or empty."""
    value = row.get(mapping.get(field, field))
    return None if value in ("", None) else value


def _case(row: Mapping[str, Any], i: int, name: str, registry: Suite, mapping: Mapping[str, str], path: Path) -> dict:
    def get(field: str) -> Any:
        return _value(row, mapping, field)

    where = f"row {i + 1}"
    prompt = get("prompt")
    subjects = get("subjects")
    if prompt is None or subjects is None:
        raise UserError(f"{where}: needs 'prompt' and 'subjects' columns", path=path,
                        hint="map your column names with --map prompt=COLUMN --map subjects=COLUMN")
    subjects = _as_list(subjects)
    unknown = [s for s in subjects if s not in registry.subjects]
    if unknown:
        raise UserError(f"{where}: subject(s) {', '.join(unknown)} not in the {registry.name} registry", path=path,
                        hint="use subject names of `relbench prompts export --suite " + registry.name + "`")
    case_id = str(get("id") or f"{name}-{i:04d}")
    predicate = get("predicate")
    if predicate is None:
        predicate = extract_predicate(prompt, [registry.subjects[s].class_noun for s in subjects], backend="model")
        if predicate is None:
            raise UserError(f"{where}: no relation predicate found in {prompt!r}", path=path,
                            hint="add a 'predicate' column")
    boxes = get("boxes")
    boxes = json.loads(boxes) if isinstance(boxes, str) else boxes
    seed = get("seed")
    return {
        "id": case_id,
        "kind": get("kind") or ("single" if len(subjects) == 1 else "multi"),
        "subjects": subjects,
        "prompt": prompt,
        "predicate": predicate,
        "boxes": boxes if boxes is not None else DEFAULT_BOXES.get(len(subjects), []),
        "seed": int(seed) if seed is not None else int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "big"),
    }


def _as_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    sep = ";" if ";" in text else ","
    return [s.strip() for s in text.split(sep) if s.strip()]
