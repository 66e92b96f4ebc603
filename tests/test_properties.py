"""Property tests of every file a user hands the toolkit: suite files, `prompts import` case
lists (CSV, JSON, JSONL) and method cards (files and --set).

Two properties, over generated inputs: a malformed or oddly typed file is one UserError
(through the CLI: exit 2, one message, no traceback), never another exception; an accepted
file round-trips with its strings intact (prompts, names and predicates byte-identical,
quotes, colons, '#', unicode and leading/trailing spaces included). The examples are fixed
per test (profile "ci" in conftest.py); HYPOTHESIS_PROFILE=explore searches new ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import string
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relationbench.cli import cli
from relationbench.generate import default_out
from relationbench.errors import UserError
from relationbench.methods import default_registry, load_card
from relationbench.methods.cards import VALUE_CHARS, parse_set
from relationbench.suites import Suite, load_suite
from relationbench.suites.importer import import_cases, write_suite
from relationbench.userfiles import CONTROL_CHARS, text_problem

from .conftest import mini_suite_data


def scaled(n: int) -> int:
    """`n` examples under the default profile (100 examples), ten times more under explore."""
    return max(1, n * settings.default.max_examples // 100)


SCRATCH: list[Path] = []  # this module's folder under pytest's tmp root (cleaned up as pytest does)


@pytest.fixture(scope="module", autouse=True)
def _scratch(tmp_path_factory):
    SCRATCH.append(tmp_path_factory.mktemp("examples"))
    yield
    SCRATCH.pop()


def fresh_dir() -> Path:
    """A folder for one example's files (pytest's tmp_path is one folder per test, not per example)."""
    return Path(tempfile.mkdtemp(dir=SCRATCH[-1]))


def cli_run(*args: str):
    """The CLI in-process; what a user sees: an exit code and the output."""
    return CliRunner().invoke(cli, list(args))


def assert_clean_exit(res) -> None:
    """Exit 0, or 2 with one error message; never an escaped exception or a traceback."""
    assert res.exit_code in (0, 2), (res.exit_code, res.output, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    if res.exit_code == 2:
        assert res.output.count("Error: ") == 1, res.output


# -- strategies ------------------------------------------------------------------------------
# what YAML, JSON and CSV treat specially, spliced into every generated string
SPECIALS = [": ", " #", "#", "'", '"', "\\", ",", ";", "---", "- ", "? ", "&a", "*a", "!!str ", "null", "yes",
            "0x1F", "1e3", "~", "%", "@", "`", "|", ">", "{", "}", "[", "]", "😀", "é", "中", "\ufeff", "\u200b",
            "\\n", "\\u00e9", "  "]
LINE_CHARS = st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\u2028\u2029")
# filler never holds an ASCII letter, so it never holds a class noun by accident
FILLER_CHARS = st.characters(exclude_categories=("Cs", "Cc"),
                             exclude_characters="\u2028\u2029" + string.ascii_letters + string.digits)


def tricky(chars=LINE_CHARS, specials=SPECIALS, max_size: int = 4) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(specials) | st.text(chars, min_size=1, max_size=6),
                    max_size=max_size).map("".join)


LINE = tricky()  # one line of any text, leading/trailing spaces included
FILLER = tricky(FILLER_CHARS, [s for s in SPECIALS if not set(s) & set(string.ascii_letters)])
# non-blank (names, predicates): something visible between any spaces
WORDY = st.builds("".join, st.tuples(tricky(max_size=2), st.sampled_from([s for s in SPECIALS if s.strip()])
                                     | st.text(LINE_CHARS.filter(lambda c: not c.isspace()), min_size=1, max_size=4),
                                     tricky(max_size=2)))
# free text (descriptions, settings text): may span lines and hold control characters
MULTILINE = st.text(st.characters(exclude_categories=("Cs",)), max_size=30) | tricky(st.characters(
    exclude_categories=("Cs",)))
NOUN = st.from_regex(r"[a-z]{2,6}( [a-z]{2,6})?", fullmatch=True)
ID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True)
# values of the wrong type or range for any field
ODD = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([-1, 0, 2**32, 2**64, 10**400, 1.5, -0.0]),
    st.floats(), st.text(max_size=5), st.sampled_from(["", " ", "\ud800", "a\x00b", "a\tb", "a\nb", "x\u2028y"]),
    st.lists(st.integers() | st.text(max_size=3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=2),
    st.binary(max_size=3), st.just([[0.1, 0.1, 0.9]]), st.just({"name": None}),
)
DELETE = object()


@st.composite
def boxes(draw, n: int) -> list[list[float]]:
    out = []
    for _ in range(n):
        x0, y0 = draw(st.floats(0, 1, exclude_max=True)), draw(st.floats(0, 1, exclude_max=True))
        out.append([x0, y0, draw(st.floats(x0, 1, exclude_min=True)), draw(st.floats(y0, 1, exclude_min=True))])
    return out


@st.composite
def suites(draw) -> dict:
    """A valid suite's data with YAML-hostile text in every string field."""
    subjects: dict[str, dict] = {}
    nouns = draw(st.lists(NOUN, min_size=1, max_size=3, unique=True))
    for noun, name in zip(nouns, draw(st.lists(WORDY, min_size=len(nouns), max_size=len(nouns), unique=True))):
        spec = {"class": noun, "source": draw(WORDY)}
        for key in ("dir", "category"):
            if draw(st.booleans()):
                spec[key] = draw(WORDY)
        subjects[name] = spec
    cases = []
    for case_id in draw(st.lists(ID, min_size=1, max_size=3, unique=True)):
        names = draw(st.lists(st.sampled_from(list(subjects)), min_size=1, max_size=2))
        nouns = [subjects[n]["class"] for n in names]
        predicate = draw(st.none() | WORDY)
        middle = [nouns[0], *([predicate] if predicate else []), *nouns[1:]]
        case = {"id": case_id, "kind": "single" if len(names) == 1 else "multi",
                "subjects": names[0] if len(names) == 1 and draw(st.booleans()) else names,
                "prompt": " ".join([draw(FILLER), *middle, draw(FILLER)]), "boxes": draw(boxes(len(names))),
                "seed": draw(st.integers(0, 2**32 - 1))}
        if predicate is not None:
            case["predicate"] = predicate
            if draw(st.booleans()):
                case["predicate_source"] = draw(WORDY)
        if draw(st.booleans()):
            case["relation"] = draw(WORDY)
        cases.append(case)
    data = {"suite": draw(ID), "version": draw(st.integers(1, 2**63)), "subjects": subjects, "cases": cases}
    optional = {"images_per_case": st.integers(1, 8), "description": MULTILINE, "license": MULTILINE,
                "predicates": WORDY.filter(lambda s: s != "none"),
                "relations": st.lists(st.dictionaries(LINE, LINE, max_size=2), max_size=2)}
    for key, strategy in optional.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    return data


def _slots(data, path=()) -> list[tuple]:
    """Every place in nested data a mutation can hit: each value's path, and the root."""
    out = [path]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        out.extend(_slots(value, (*path, key)))
    return out


def _set(data, path: tuple, value):
    if not path:
        return value
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE and isinstance(parent, list):
        del parent[path[-1]]
    elif value is DELETE:
        parent.pop(path[-1], None)  # an optional key that was not there
    else:
        parent[path[-1]] = value
    return data


def _get(data, path: tuple):
    """The value at `path`, or None where there is none."""
    for key in path:
        try:
            data = data[key]
        except (KeyError, IndexError, TypeError):
            return None
    return data


@st.composite
def mutated(draw, documents, extra_keys=()) -> object:
    """A valid document with one value replaced by an odd one, deleted, or added under a
    known key (`extra_keys`: (path, key) pairs of optional fields)."""
    data = draw(documents)
    extra = [(*p, k) for p, k in extra_keys if isinstance(_get(data, p), dict)]
    slot = draw(st.sampled_from(_slots(data) + extra))
    return _set(data, slot, draw(ODD | st.just(DELETE)) if slot else draw(ODD))


# -- suite files ------------------------------------------------------------------------------
def suite_data(suite: Suite) -> dict:
    """A loaded suite back as file data (what `prompts import` writes)."""
    def case_data(c):
        return {"id": c.id, "kind": c.kind, "subjects": [s.name for s in c.subjects], "prompt": c.prompt,
                "predicate": c.predicate, "predicate_source": c.predicate_source, "relation": c.relation,
                "boxes": [list(b) for b in c.boxes], "seed": c.seed}

    return {"suite": suite.name, "version": suite.version, "images_per_case": suite.images_per_case,
            "description": suite.description, "license": suite.license, "predicates": suite.predicates,
            "relations": list(suite.relations),
            "subjects": {s.name: {"class": s.class_noun, "source": s.source, "dir": s.dir, "category": s.category}
                         for s in suite.subjects.values()},
            "cases": [case_data(c) for c in suite.cases]}


def assert_round_trips(suite: Suite) -> None:
    """An accepted suite holds what the rest of the toolkit relies on; written back as the
    importer writes, it loads equal; the CLI exports its cases."""
    names = [suite.name] + [c.id for c in suite.cases]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", n) and len(n) <= 100 for n in names)
    lines = [t for c in suite.cases for t in (c.prompt, c.predicate, c.relation) if t is not None] + [
        t for s in suite.subjects.values() for t in (s.name, s.class_noun, s.source, s.dir)]
    assert all(isinstance(t, str) and text_problem(t) is None for t in lines)
    for case in suite.cases:
        assert 0 <= case.seed < 2**32 and isinstance(case.seed, int) and not isinstance(case.seed, bool)
        assert all(0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 for x0, y0, x1, y1 in case.boxes)
        assert all(type(v) is float for box in case.boxes for v in box)
    path = fresh_dir() / "again.yaml"
    write_suite(suite_data(suite), path)
    again = load_suite(path)
    assert again.cases == suite.cases
    assert (again.name, again.version, again.description, again.license, again.predicates, again.relations,
            again.subjects) == (suite.name, suite.version, suite.description, suite.license, suite.predicates,
                                suite.relations, suite.subjects)
    res = cli_run("prompts", "export", "--suite", str(path))
    assert res.exit_code == 0, res.output
    assert [json.loads(line) for line in res.output.splitlines()] == [c.as_record() for c in suite.cases]


def load_or_refuse(path: Path) -> Suite | None:
    """The suite, or None when refused with a UserError naming the file."""
    try:
        return load_suite(path)
    except UserError as exc:
        assert str(path) in str(exc)
        return None


def expected_record(case: dict, data: dict) -> dict:
    """What `prompts export` must print for a case of `data`, computed from the input."""
    names = [case["subjects"]] if isinstance(case["subjects"], str) else case["subjects"]
    return {"id": case["id"], "suite": data["suite"], "kind": case["kind"],
            "subjects": [{"name": n, "class": data["subjects"][n]["class"]} for n in names],
            "prompt": case["prompt"], "predicate": case.get("predicate"),
            "predicate_source": case.get("predicate_source"), "relation": case.get("relation"),
            "boxes": case["boxes"], "seed": case["seed"]}


@settings(max_examples=scaled(80))
@given(suites(), st.sampled_from(["yaml", "json"]))
def test_valid_suites_keep_every_string(data, form):
    folder = fresh_dir()
    path = folder / f"s.{form}"
    if form == "yaml":
        write_suite(data, path)  # the project's writer
    else:
        path.write_text(json.dumps(data))  # ASCII escapes: an emoji is a surrogate pair "\ud83d\ude00"
    suite = load_suite(path)
    assert [c.as_record() for c in suite.cases] == [expected_record(c, data) for c in data["cases"]]
    for name, spec in data["subjects"].items():
        subject = suite.subjects[name]
        assert (subject.class_noun, subject.source, subject.dir, subject.category) == (
            spec["class"], spec["source"], spec.get("dir", name), spec.get("category"))
    assert suite.description == data.get("description", "").strip() and suite.license == data.get("license")
    assert_round_trips(suite)


def _top(**override) -> dict:
    data = mini_suite_data()
    data.update(override)
    return data


@settings(max_examples=scaled(300))
@given(mutated(suites(), extra_keys=[((), k) for k in ("version", "images_per_case", "description", "license",
                                                         "predicates", "relations")]
               + [(("cases", 0), k) for k in ("predicate", "predicate_source", "relation")]))
@example(mini_suite_data(kind=["multi"]))  # was TypeError: unhashable list
@example(mini_suite_data(subjects=[["dog"], "bear"]))  # was TypeError: unhashable list
@example(mini_suite_data(boxes=[[0.05, 0.2, 0.6, 0.9], [0.4, 0.2, 10**400, 0.9]]))  # was OverflowError in float()
@example(mini_suite_data(boxes=[[True, 0.2, 0.6, 0.9], [0.4, 0.2, 0.9, 0.9]]))  # a bool read as 1.0
@example(mini_suite_data(id=7))  # `id: 007` read as 7, silently
@example(mini_suite_data(predicate=["hugging"]))  # str(list) compared with the prompt
@example(mini_suite_data(prompt="a dog hugging\ta bear plushie"))  # control character in a prompt
@example(mini_suite_data(prompt="a dog hugging \ud800 bear plushie"))  # a lone surrogate, unwritable as UTF-8
@example(_top(version=float("inf")))  # was OverflowError in int()
@example(_top(version=1.5))  # silently truncated to 1
@example(_top(relations=5))  # was TypeError in tuple()
@example(_top(relations=[{"verb": b"hug"}]))  # bytes: not writable as JSON
@example(_top(description=None))  # was the text "None"
@example(_top(suite="../escape"))  # the suite name is a results/ folder
@example(_top(subjects={1: {"class": "dog", "source": "x"}}))  # a number as a subject name
@example(_top(subjects={"dog": {"class": None, "source": "dreambench"}}))  # was the class noun "None"
@example([1, 2])  # top level not a mapping
def test_mutated_suites_load_or_refuse(data):
    path = fresh_dir() / "s.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False))  # escapes lone surrogates
    suite = load_or_refuse(path)
    if suite is not None:
        assert_round_trips(suite)


BILLION_LAUGHS = "\n".join(["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"] + [
    f"{x}: &{x} [{', '.join([f'*{prev}'] * 9)}]" for prev, x in zip("abcdefgh", "bcdefghi")]).encode()
DEEP = b"suite: " + b"[" * 100_000 + b"]" * 100_000  # segfaulted libyaml's composer


def _suite_bytes(data: dict) -> bytes:
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode()


FRAGMENTS = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\t", b"\r\n", b"\r", b"\n", b"\n  ", b"\xef\xbb\xbf",
             b"!!python/object/apply:os.system [ls] ", b"!!binary ", b"!!set ", b"!!timestamp ", b"!!bool ", b"!!int ",
             b"!!float ", b"''", b"2020-13-45 ", b"&a ", b"*a ", b"*undefined ", b"<<: *a\n", b"- ", b": ", b"? ",
             b"#", b"'", b'"', b"[", b"{", b"]", b"}", b"---\n", b"...\n", b"%YAML 1.1\n", b'"\\ud800"', b'"\\x00"',
             b"9" * 5000, b"nan", b"NaN", b"1e400", b"\\"]


@st.composite
def damaged(draw, documents) -> bytes:
    """A valid document's bytes with fragments spliced in (bad UTF-8, tags, aliases, NULs...)."""
    text = draw(documents)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(FRAGMENTS)) + text[at:]
    if draw(st.booleans()):
        text = text.replace(b"\n", b"\r\n")
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"])) + text


@settings(max_examples=scaled(300))
@given(damaged(suites().map(_suite_bytes)) | damaged(suites().map(lambda d: json.dumps(d).encode())),
       st.sampled_from([".yaml", ".json"]))
@example(BILLION_LAUGHS, ".yaml")
@example(DEEP, ".yaml")
@example(b"suite: &a [*a]\n", ".yaml")  # an alias inside its own anchor
@example(b"\xff\xfe" + "suite: x\n".encode("utf-16-le"), ".yaml")  # UTF-16
@example(b"suite: x\nsuite: y\n", ".yaml")  # duplicate key, YAML would keep the last
@example(b'{"suite": "x", "suite": "y"}', ".json")
@example(b"suite: " + b"9" * 5000, ".yaml")  # was ValueError: exceeds the limit for int digits
@example(b"suite: 2020-13-45", ".yaml")  # was ValueError: month must be in 1..12
@example(b"suite: !!bool maybe", ".yaml")  # was KeyError
@example(b"suite: !!int ''", ".yaml")  # was IndexError
@example(b"suite: !!timestamp x", ".yaml")  # was AttributeError
@example(b"suite: \xff", ".yaml")  # was UnicodeDecodeError
@example(b'{"seed": NaN}', ".json")
@example(b"\xef\xbb\xbf" + _suite_bytes(mini_suite_data()), ".yaml")  # a BOM: loads
def test_damaged_suite_files_load_or_refuse(raw, suffix):
    path = fresh_dir() / f"s{suffix}"
    path.write_bytes(raw)
    suite = load_or_refuse(path)
    if suite is not None:
        assert_round_trips(suite)


def test_alias_bomb_fails_fast_and_small():
    """A billion-laughs document is refused in well under a second, in a few MB."""
    path = fresh_dir() / "bomb.yaml"
    path.write_bytes(BILLION_LAUGHS)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than"):
        load_suite(path)
    seconds, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert seconds < 2 and peak < 20e6, (seconds, peak)
    res = cli_run("prompts", "export", "--suite", str(path))
    assert res.exit_code == 2 and "expands to more than" in res.output


def test_suite_cli_refuses_with_one_message():
    """Through the CLI: exit 2 and the message, for a few refused files."""
    folder = fresh_dir()
    for i, raw in enumerate([DEEP, b"\xff", yaml.safe_dump(mini_suite_data(kind=["multi"])).encode(), b"- 1\n"]):
        path = folder / f"s{i}.yaml"
        path.write_bytes(raw)
        res = cli_run("prompts", "export", "--suite", str(path))
        assert_clean_exit(res)
        assert res.exit_code == 2 and str(path) in res.output


# -- prompts import -----------------------------------------------------------------------------
REGISTRY_CLASSES = {"dog": "dog", "bear": "bear plushie"}  # mini_suite_data's registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("registry") / "registry.yaml"
    path.write_text(yaml.safe_dump(mini_suite_data()))
    return path


@st.composite
def case_rows(draw) -> list[dict]:
    """Rows naming the registry's subjects, each with a given predicate (no spaCy) and
    YAML- and CSV-hostile prompt text."""
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        names = draw(st.sampled_from([["dog"], ["bear"], ["dog", "bear"], ["bear", "dog"]]))
        predicate = draw(WORDY)
        nouns = [REGISTRY_CLASSES[n] for n in names]
        row = {"prompt": " ".join([draw(FILLER), nouns[0], predicate, *nouns[1:], draw(FILLER)]),
               "subjects": draw(st.sampled_from([";".join(names), ", ".join(names), json.dumps(names)]))
               if draw(st.booleans()) else names,
               "predicate": predicate}
        optional = {"id": ID, "kind": st.just("single" if len(names) == 1 else "multi"),
                    "boxes": boxes(len(names)), "seed": st.integers(0, 2**32 - 1)}
        for key, strategy in optional.items():
            if draw(st.booleans()):
                row[key] = draw(strategy)
        rows.append(row)
    ids = [r["id"] for r in rows if "id" in r]
    if len(set(ids)) != len(ids):
        for r in rows:
            r.pop("id", None)
    return rows


def to_json(value) -> str:
    """JSON as other tools write it: NaN for a NaN, lone surrogates escaped, bytes as text."""
    return json.dumps(value, default=repr)


def _cell(value) -> str:
    return value if isinstance(value, str) else to_json(value)


def render_rows(rows: list, form: str, dialect: str = "excel") -> bytes:
    """Rows as a .json (a list or {"cases": [...]}), .jsonl or .csv file."""
    if form == "json":
        return to_json(rows if len(rows) % 2 else {"cases": rows}).encode()
    if form == "jsonl":
        return "\n".join(to_json(r) for r in rows).encode()
    out = io.StringIO()
    header = sorted({k for r in rows if isinstance(r, dict) for k in r})
    writer = csv.writer(out, dialect=dialect)
    writer.writerow(header)
    for r in rows:
        writer.writerow([_cell(r.get(k, "")) for k in header] if isinstance(r, dict) else [_cell(r)])
    return out.getvalue().encode("utf-8", "surrogatepass")


def import_or_refuse(raw: bytes, form: str, registry: Path) -> tuple[Path, dict | None]:
    path = fresh_dir() / f"cases.{form}"
    path.write_bytes(raw)
    try:
        return path, import_cases(path, "imported", load_suite(registry))
    except UserError as exc:
        assert exc.path is None or str(path) in str(exc) or str(registry) in str(exc)
        return path, None


@settings(max_examples=scaled(80))
@given(case_rows(), st.sampled_from(["json", "jsonl", "csv"]), st.sampled_from(["excel", "unix"]))
def test_imported_prompts_keep_every_string(registry, rows, form, dialect):
    path, data = import_or_refuse(render_rows(rows, form, dialect), form, registry)
    assert data is not None
    out = path.with_name("imported.yaml")
    write_suite(data, out)
    suite = load_suite(out)
    assert [c.prompt for c in suite.cases] == [r["prompt"] for r in rows]
    assert [c.predicate for c in suite.cases] == [r["predicate"] for r in rows]
    assert [c.id for c in suite.cases] == [str(r.get("id", f"imported-{i:04d}")) for i, r in enumerate(rows)]
    assert all(c.seed == r["seed"] for c, r in zip(suite.cases, rows) if "seed" in r)
    res = cli_run("prompts", "import", str(path), "--name", "imported", "--subjects-from", str(registry),
                  "--out", str(out), "--force")
    assert res.exit_code == 0, res.output
    assert load_suite(out).cases == suite.cases


CSV_DAMAGE = [
    lambda t: t + "\nextra,cells,beyond,the,header,row,x,y,z\n",  # a ragged row
    lambda t: t.replace("prompt", "subjects", 1),  # a duplicate column
    lambda t: t.split("\n", 1)[-1],  # no header
    lambda t: t.replace(",", ',"line\nbreak",', 1),  # a quoted newline
    lambda t: "",  # an empty file
    lambda t: t.replace(",", "\x00,", 1),  # a NUL byte
    lambda t: t + '\n"unclosed,quote\n',
    lambda t: "\ufeff" + t,  # a BOM: read
    lambda t: t.replace("\n", "\r\n"),
]
ROWS = [{"prompt": "a dog riding a bicycle", "subjects": "dog", "predicate": "riding"},
        {"prompt": "a dog hugging a bear plushie", "subjects": ["dog", "bear"], "predicate": "hugging"}]


def _row(**override) -> list[dict]:
    return [dict(ROWS[0], **override)]


@settings(max_examples=scaled(240))
@given(mutated(case_rows(), extra_keys=[((0,), k) for k in ("id", "kind", "boxes", "seed", "predicate")]),
       st.sampled_from(["json", "jsonl", "csv"]))
@example(_row(seed="abc"), "csv")  # was ValueError from int()
@example(_row(seed=float("nan")), "json")  # json.dumps writes NaN: refused as not JSON
@example(_row(seed=1.5), "json")  # was silently truncated to 1
@example(_row(seed="9" * 5000), "csv")  # was ValueError: too many digits
@example(_row(boxes="[[0.1"), "csv")  # was JSONDecodeError
@example(_row(subjects='["dog"'), "csv")  # was JSONDecodeError
@example(_row(subjects=[["dog"]]), "json")  # a list of lists as names
@example(_row(prompt=5, predicate=None), "json")  # was TypeError inside spaCy
@example(_row(kind=["single"]), "json")  # was TypeError: unhashable list
@example(_row(id=0), "json")  # an id of 0 was replaced by the default
@example(_row(id="\ud800"), "json")  # was UnicodeEncodeError hashing the id for its seed
@example(_row(prompt="a dog riding\u2028a bicycle"), "csv")  # a line break: refused (splitlines() cut the row)
@example([5, 6], "jsonl")  # was AttributeError: rows that are not objects
@example({"cases": 5}, "json")
@example("text", "json")
@example([[[[]]]], "json")
def test_mutated_case_lists_import_or_refuse(registry, rows, form):
    raw = render_rows(rows if isinstance(rows, list) else [rows], form) if form != "json" else to_json(rows).encode()
    path, data = import_or_refuse(raw, form, registry)
    if data is not None:
        out = path.with_name("imported.yaml")
        write_suite(data, out)
        assert_round_trips(load_suite(out))
    out = path.with_name("cli.yaml")
    res = cli_run("prompts", "import", str(path), "--name", "imported", "--subjects-from", str(registry),
                  "--out", str(out))
    assert_clean_exit(res)
    assert (res.exit_code == 0) == (data is not None) == out.exists()


@settings(max_examples=scaled(200))
@given(damaged(st.builds(render_rows, case_rows(), st.sampled_from(["json", "jsonl", "csv"]))),
       st.sampled_from(["json", "jsonl", "csv"]), st.sampled_from(range(len(CSV_DAMAGE))))
@example(b"[" * 100_000 + b"]" * 100_000, "json", 0)  # was RecursionError
@example(b"prompt,subjects\n", "csv", 4)  # an empty file
@example(render_rows(ROWS, "csv"), "csv", 0)  # a ragged row: its extra cells were dropped
@example(render_rows(ROWS, "csv"), "csv", 1)  # a duplicate column: the last one was read
@example(render_rows(ROWS, "csv"), "csv", 5)  # was _csv.Error: NUL
@example(render_rows(ROWS, "csv"), "csv", 7)  # a BOM: was "needs 'prompt' and 'subjects' columns"
@example(b"\xef\xbb\xbf" + render_rows(ROWS, "json"), "json", 0)  # a BOM: was "neither JSON nor JSONL"
def test_damaged_case_lists_import_or_refuse(registry, raw, form, damage):
    if form == "csv":
        raw = CSV_DAMAGE[damage](raw.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape")
    path, data = import_or_refuse(raw, form, registry)
    res = cli_run("prompts", "import", str(path), "--name", "imported", "--subjects-from", str(registry),
                  "--out", str(path.with_name("cli.yaml")))
    assert_clean_exit(res)
    assert (res.exit_code == 0) == (data is not None)


@settings(max_examples=scaled(30))
@given(LINE | st.sampled_from(["../x", "a/b", "x" * 101, "-x", "ok.name_1"]))
@example("\ud800")  # was UnicodeEncodeError hashing the default ids
def test_import_suite_names_are_checked(registry, name):
    """--name names the suite and its results/ folder: path-safe, or exit 2."""
    src = fresh_dir() / "cases.json"
    src.write_text(json.dumps(ROWS))
    out = src.with_name("out.yaml")
    res = cli_run("prompts", "import", str(src), "--name", name, "--subjects-from", str(registry), "--out", str(out))
    assert_clean_exit(res)
    assert (res.exit_code == 0) == out.exists()
    if out.exists():
        assert load_suite(out).name == name and "/" not in name and len(name) <= 100


def test_import_bad_out_folder_is_a_user_error(registry):
    src = fresh_dir() / "cases.json"
    src.write_text(json.dumps(ROWS))
    res = cli_run("prompts", "import", str(src), "--name", "x", "--subjects-from", str(registry),
                  "--out", str(src.parent / "no" / "such" / "x.yaml"))
    assert_clean_exit(res)
    assert res.exit_code == 2 and "cannot write the suite file" in res.output


# -- method cards ------------------------------------------------------------------------------
SDXL = "relationbench.methods.sdxl:SDXLMethod"


@st.composite
def cards(draw) -> dict:
    settings_ = {"steps": draw(st.integers(1, 100)), "guidance_scale": draw(st.floats(-50, 50, allow_nan=False)),
                 "negative_prompt": draw(MULTILINE), "prompt_prefix": draw(MULTILINE),
                 "height": draw(st.none() | st.integers(1, 256).map(lambda k: 8 * k))}
    card = {"name": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-\[\]=;@ ]{0,12}", fullmatch=True)),
            "adapter": SDXL, "settings": {k: v for k, v in settings_.items() if draw(st.booleans())}}
    if draw(st.booleans()):
        card["tiny"] = {"steps": draw(st.integers(1, 4))}
    for key, strategy in {"version": st.integers(1, 2**40), "description": MULTILINE, "paper": LINE}.items():
        if draw(st.booleans()):
            card[key] = draw(strategy)
    return card


def card_or_refuse(data):
    """(card, what run.json records) or None when refused with a UserError."""
    path = fresh_dir() / "card.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=False))
    try:
        card = load_card(path)
        return card, card.describe(tiny=True)
    except UserError:
        return None


def assert_sound(described: dict) -> None:
    """What an accepted card records: finite numbers, writable text, a usable folder name,
    and JSON that reads back equal (run.json)."""
    values = described["settings"].values()
    assert all(math.isfinite(v) for v in values if isinstance(v, float))
    assert all(text_problem(v, one_line=False) is None for v in values if isinstance(v, str))
    folder = default_out("relationbench", described["name"], "tiny").name
    assert "/" not in described["name"] and len(folder.encode()) <= 200 and not CONTROL_CHARS.search(folder)
    assert json.loads(json.dumps(described)) == described


@settings(max_examples=scaled(80))
@given(cards())
def test_valid_cards_keep_every_string(data):
    card, _ = card_or_refuse(data)
    described = card.describe()
    assert card.name == data["name"] and card.version == data.get("version", 1)
    for key, value in data["settings"].items():
        assert described["settings"][key] == value and card.resolve().values[key] == value
    assert_sound(described)
    assert card.description == data.get("description", "").strip() and card.paper == data.get("paper")


def _card(**override) -> dict:
    return {"name": "c", "adapter": SDXL, "settings": {"steps": 3}, **override}


@settings(max_examples=scaled(240))
@given(mutated(cards(), extra_keys=[(("settings",), k) for k in ("steps", "guidance_scale", "negative_prompt",
                                                                 "height")]
               + [((), k) for k in ("base", "tiny", "version", "paper")]))
@example(_card(version="x"))  # was ValueError from int()
@example(_card(version=float("inf")))  # was OverflowError from int()
@example(_card(settings={1: 2, "b": 3}))  # was TypeError: sorting int and str names
@example(_card(settings=[]))  # an empty list taken for no settings
@example(_card(settings={"guidance_scale": float("nan")}))  # NaN guidance: black images
@example(_card(settings={"guidance_scale": 10**400}))  # was OverflowError in float()
@example(_card(settings={"steps": -3}))  # was accepted until build()
@example(_card(settings={"negative_prompt": "\ud800"}))  # a lone surrogate
@example(_card(name="../../x"))  # the name is the run folder
@example(_card(name=None))  # was the name "None"
@example(_card(adapter=":"))  # was ValueError: empty module name
@example(_card(adapter=["x"]))
@example(_card(description=["x"]))
def test_mutated_cards_load_or_refuse(data):
    result = card_or_refuse(data)
    if result is not None:
        assert_sound(result[1])


def test_card_base_loop_is_refused():
    folder = fresh_dir()
    (folder / "a.yaml").write_text("base: b.yaml\nsettings: {steps: 2}\n")
    (folder / "b.yaml").write_text("base: a.yaml\n")
    (folder / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(UserError, match=r"form a loop: a.yaml -> b.yaml -> a.yaml"):
        load_card(folder / "a.yaml")
    with pytest.raises(UserError, match=r"form a loop: self.yaml -> self.yaml"):
        load_card(folder / "self.yaml")
    res = cli_run("methods", "show", str(folder / "a.yaml"))
    assert_clean_exit(res)
    assert res.exit_code == 2 and "loop" in res.output


def test_card_bomb_and_damaged_bytes_are_refused():
    folder = fresh_dir()
    for i, raw in enumerate([BILLION_LAUGHS, b"name: \xff", DEEP, b"name: c\nname: d\n", b"!!python/object:os.x {}"]):
        path = folder / f"c{i}.yaml"
        path.write_bytes(raw)
        with pytest.raises(UserError):
            load_card(path)
        res = cli_run("methods", "show", str(path))
        assert_clean_exit(res)
        assert res.exit_code == 2


@settings(max_examples=scaled(100))
@given(st.sampled_from(["negative_prompt", "prompt_prefix"]), MULTILINE | st.just("\ud800"))
@example("negative_prompt", "a: b # c")
@example("negative_prompt", " leading and trailing ")
@example("prompt_prefix", "null")  # text, not None
@example("prompt_prefix", "&a [*a]")  # text, not YAML
@example("negative_prompt", "\udcff")  # a non-UTF-8 argv byte: refused
@example("negative_prompt", "x" * 300)  # was a run folder name too long for the file system: OSError
@example("prompt_prefix", "a\nb\\c/d")
def test_set_text_values_kept_exactly(key, value):
    """`--set KEY=VALUE` of a text setting keeps the value as typed, through resolve and
    describe; the variant's name (its run folder) stays one short, path-safe line."""
    try:
        card = default_registry().card("sdxl", parse_set([f"{key}={value}"]))
        described = card.describe()
    except UserError:
        assert "\ud800" in value or "\udcff" in value
        return
    assert card.resolve().values[key] == value and described["settings"][key] == value
    assert_sound(described)
    assert len(card.name) <= len("sdxl[negative_prompt=]") + VALUE_CHARS and "\\" not in card.name


def test_variant_names_of_different_values_differ():
    values = ["x" * 300, "x" * 299 + "y", "a\nb", "a_b", "a\\b"]
    names = {default_registry().card("sdxl", parse_set([f"negative_prompt={v}"])).name for v in values}
    assert len(names) == len(values)


@settings(max_examples=scaled(100))
@given(st.sampled_from(["steps", "guidance_scale", "height", "negative_prompt", "scal"]),
       tricky() | st.sampled_from(["&a [*a]", ".nan", ".inf", "1e400", "9" * 5000, "-1", "[1, 2]", "{a: 1}", "~",
                                   "!!python/object:os.system {}", "!!binary aGk=", "2020-01-01", "0x10", "7"]))
@example("steps", "&a [*a]")  # a self-referencing list
@example("guidance_scale", ".nan")  # was accepted: NaN guidance
@example("steps", "-1")  # was accepted until build()
def test_set_odd_values_are_one_user_error(key, value):
    try:
        card = default_registry().card("sdxl", parse_set([f"{key}={value}"]))
        described = card.describe()
    except UserError:
        pass
    else:
        assert_sound(described)
    res = cli_run("methods", "show", "sdxl", "--set", f"{key}={value}")
    assert_clean_exit(res)
