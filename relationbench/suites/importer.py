"""Turn an outside case list (JSON, JSONL or CSV) into a validated suite file.

Columns (rename any with a mapping {field: column}; only `prompt` and `subjects` are required):

    id         case id                        default: <suite>-<row, 4 digits>
    kind       single | multi                 default: from the number of subjects
    subjects   subject names, a JSON list or a string split on ';' or ','
               (names from the registry of an existing suite, relationbench by default)
    prompt     the prompt, naming each subject by its class noun
    predicate  the relation phrase in the prompt  default: spaCy extraction (predicates.py),
               which needs the spaCy English model; the suite then names it (`predicates:`)
               and each extracted predicate is marked for review (`predicate_source:`)
    predicate_source  the mark of an unreviewed extracted predicate, kept with a given
               predicate (`relbench prompts export` writes it)
    boxes      JSON list of normalized xyxy boxes, one per subject
               default: one central box; two side-by-side boxes for two subjects
    seed       integer                        default: from a hash of the id
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import UserError
from ..userfiles import load_json, read_text, show, text_problem
from .loader import check_suite_name, load_suite, parse_suite, subject_entry
from .model import Suite
from .predicates import extract_predicate, predicate_backend

FIELDS = ("id", "kind", "subjects", "prompt", "predicate", "predicate_source", "boxes", "seed")
DEFAULT_BOXES = {1: [[0.15, 0.15, 0.85, 0.85]], 2: [[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]]}


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON list (or {"cases": [...]}), a JSONL file (one object a line) or a CSV
    with a header (by the .csv suffix); UTF-8, a BOM allowed. Anything else is a UserError."""
    text = read_text(path)
    if path.suffix.lower() == ".csv":
        return _csv_rows(text, path)
    try:
        data = load_json(text, path)
    except UserError as whole:
        lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]  # "\u2028" is no line end
        try:
            data = [_json_line(line, n, path) for n, line in lines]
        except UserError as line_error:
            raise UserError(f"neither a JSON document ({whole.message}) nor JSON lines ({line_error.message})",
                            path=path, hint="a .csv file is read as CSV") from None
    if isinstance(data, dict):  # {"cases": [...]}, or the one row of a one-line JSONL file
        data = data["cases"] if "cases" in data else [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UserError("expected a list of objects (or {\"cases\": [...]})", path=path)
    return data


def _json_line(line: str, n: int, path: Path) -> dict[str, Any]:
    try:
        row = load_json(line, path)
    except UserError as exc:
        raise UserError(f"line {n}: {exc.message}", path=path) from None
    if not isinstance(row, dict):
        raise UserError(f"line {n}: expected an object, got {show(row)}", path=path)
    return row


def _csv_rows(text: str, path: Path) -> list[dict[str, str]]:
    """A CSV's rows by header name; blank lines skipped, a short row's missing cells empty.
    Refused: duplicate header names, a row longer than the header (an unquoted comma would
    cut a prompt), what the csv module cannot read (a NUL byte, an unclosed quote)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        table = [(reader.line_num, row) for row in reader if row]
    except csv.Error as exc:
        raise UserError(f"not a valid CSV file: line {reader.line_num}: {exc}", path=path) from None
    if not table:
        return []
    (_, header), body = table[0], table[1:]
    header = [h.strip() for h in header]
    repeated = sorted({h for h in header if h and header.count(h) > 1})
    if repeated:
        raise UserError(f"the CSV header repeats column(s) {', '.join(map(repr, repeated))}", path=path,
                        hint="give every column its own name")
    rows = []
    for line, cells in body:
        if len(cells) > len(header):
            raise UserError(f"line {line}: {len(cells)} cells, the header has {len(header)}", path=path,
                            hint="quote cells that hold a comma: \"a dog, a cat\"")
        rows.append(dict(zip(header, cells + [""] * (len(header) - len(cells)))))
    return rows


def import_cases(
    path: Path,
    name: str,
    registry: Suite,
    mapping: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The suite file's data for the rows of `path`, validated as a suite."""
    check_suite_name(name)  # before it makes default ids and seeds
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
        "subjects": {s: subject_entry(registry.subjects[s]) for s in used},
        "cases": cases,
    }
    parse_suite(data, path)  # the same validation as any suite file, naming the imported file
    return data


def import_suite_file(path: Path, name: str, out: Path, *, mapping: Mapping[str, str] | None = None,
                      subjects_from: str = "relationbench",
                      image_root: Path | None = None) -> tuple[dict[str, Any], list[str]]:
    """(the suite file's data, notes for the user) of a case list (JSON, JSONL, CSV: import_cases,
    subjects named from the `subjects_from` suite's registry) or of the RelationBooth authors'
    inference config (authors_config.py; `out`: where the suite will be, as its image paths are
    written relative to it). Refuses an option that does not apply to the file's kind."""
    from .authors_config import import_authors_config, is_authors_config

    if is_authors_config(path):
        if mapping:
            raise UserError("--map renames case-list columns; this file is an authors' inference config", path=path)
        return import_authors_config(path, out, name, image_root)
    if image_root is not None:
        raise UserError("--image-root is for an authors' inference config; this file is a case list", path=path)
    return import_cases(path, name, load_suite(subjects_from), mapping), []


def write_suite(data: dict[str, Any], out: Path, force: bool = False) -> None:
    if out.exists() and not force:
        raise UserError("suite file exists", path=out, hint="pass --force to replace it, or another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False, width=120, allow_unicode=True), encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:
        raise UserError(f"cannot write the suite file ({exc.strerror or exc})", path=out,
                        hint="check that the folder exists and is writable") from None


def _value(row: Mapping[str, Any], mapping: Mapping[str, str], field: str) -> Any:
    """A field's cell in a row (its column renamed by `mapping`); None when absent or empty."""
    value = row.get(mapping.get(field, field))
    return None if value in ("", None) else value


def _cell(row: Mapping[str, Any], mapping: Mapping[str, str], field: str, where: str, path: Path) -> Any:
    """A field's value in a row, typed: subjects a list of names, boxes a parsed list, seed an
    int, the rest one-line strings (an integer id as text); None when absent or empty. A
    value of the wrong type is a UserError naming the row, never a crash or a silent str()."""
    value = _value(row, mapping, field)

    def wrong(expected: str) -> UserError:
        return UserError(f"{where}: {field} must be {expected}, got {show(value)}", path=path)

    if value is None:
        return None
    if field == "subjects":
        return _as_list(value, wrong)
    if field == "boxes":
        return _json_cell(value, field, where, path) if isinstance(value, str) else value
    if field == "seed":
        if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,20}\s*", value):
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise wrong("an integer")
        return value
    if field == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise wrong("a string")
    why = text_problem(value)  # before a default seed hashes the id, or spaCy reads the prompt
    if why:
        raise UserError(f"{where}: {field} {why}", path=path)
    return value


def _json_cell(text: str, field: str, where: str, path: Path) -> Any:
    try:
        return load_json(text, path)
    except UserError as exc:
        raise UserError(f"{where}: {field}: {exc.message}", path=path) from None


def _case(row: Mapping[str, Any], i: int, name: str, registry: Suite, mapping: Mapping[str, str], path: Path) -> dict:
    where = f"row {i + 1}"

    def get(field: str) -> Any:
        return _cell(row, mapping, field, where, path)

    prompt = get("prompt")
    subjects = get("subjects")
    if prompt is None or subjects is None:
        raise UserError(f"{where}: needs 'prompt' and 'subjects' columns", path=path,
                        hint="map your column names with --map prompt=COLUMN --map subjects=COLUMN")
    unknown = [s for s in subjects if s not in registry.subjects]
    if unknown:
        raise UserError(f"{where}: subject(s) {', '.join(unknown)} not in the {registry.name} registry", path=path,
                        hint="use subject names of `relbench prompts export --suite " + registry.name + "`")
    case_id = get("id") or f"{name}-{i:04d}"
    predicate, source = get("predicate"), get("predicate_source")
    if predicate is None:
        predicate = extract_predicate(prompt, [registry.subjects[s].class_noun for s in subjects], backend="model")
        if predicate is None:
            raise UserError(f"{where}: no relation predicate found in {prompt!r}", path=path,
                            hint="add a 'predicate' column")
        source = predicate_backend("model")  # marked for review: a program chose it
    boxes, seed = get("boxes"), get("seed")
    return {
        "id": case_id,
        "kind": get("kind") or ("single" if len(subjects) == 1 else "multi"),
        "subjects": subjects,
        "prompt": prompt,
        "predicate": predicate,
        **({"predicate_source": source} if source is not None else {}),
        "boxes": boxes if boxes is not None else DEFAULT_BOXES.get(len(subjects), []),
        "seed": seed if seed is not None else int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "big"),
    }


def _as_list(value: Any, wrong) -> list[str]:
    """Subject names from a list (of names, or of {"name": ..., "class": ...} as `prompts
    export` writes them), a JSON list in a string, or a string split on ';' or ','."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = load_json(value, None)
        except UserError:
            raise wrong("a JSON list of names") from None
    if isinstance(value, list):
        names = [v["name"] if isinstance(v, dict) and "name" in v else v for v in value]
        if not all(isinstance(n, str) for n in names):
            raise wrong("a list of subject names")
        return names
    if not isinstance(value, str):
        raise wrong("subject names")
    sep = ";" if ";" in value else ","
    return [s.strip() for s in value.split(sep) if s.strip()]
