"""`relbench prompts ...` in-process: list, show, export, import."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from relationbench.cli import cli
from relationbench.suites import load_suite

from .conftest import mini_suite_data


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_list_counts():
    res = run("prompts", "list")
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line.split() for line in res.output.splitlines()[2:]}
    assert lines["relationbench"][2:5] == ["200", "100", "100"]
    assert lines["dreambench"][2:5] == ["750", "750", "0"]
    assert lines["customconcept101-multi"][2:5] == ["1212", "0", "1212"]


def test_show_and_export():
    suite = load_suite("relationbench")
    first = suite.cases[0]
    res = run("prompts", "show", first.id)
    assert res.exit_code == 0
    assert yaml.safe_load(res.output) == first.as_record()
    res = run("prompts", "export", "--suite", "relationbench")
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert len(rows) == 200
    for row in rows:
        assert {"id", "suite", "kind", "subjects", "prompt", "predicate", "boxes", "seed"} <= set(row)
        assert all(set(s) == {"name", "class"} for s in row["subjects"])
    assert run("prompts", "show", "no-such-case").exit_code == 2


def test_import_csv_with_mapping(tmp_path, write_suite):
    registry = write_suite(mini_suite_data(), "registry.yaml")
    src = tmp_path / "authors.csv"
    src.write_text(
        "text,objs,rel\n"
        "a dog riding a skateboard,dog,riding\n"
        '"a dog hugging a bear plushie","dog;bear",hugging\n'
    )
    out = tmp_path / "imported.yaml"
    res = run("prompts", "import", str(src), "--name", "authors", "--map", "prompt=text", "--map", "subjects=objs",
              "--map", "predicate=rel", "--subjects-from", str(registry), "--out", str(out))
    assert res.exit_code == 0, res.output
    suite = load_suite(out)
    assert [c.kind for c in suite.cases] == ["single", "multi"]
    assert suite.cases[1].predicate == "hugging"
    assert suite.cases[0].id == "authors-0000"
    assert len(suite.cases[1].boxes) == 2
    # a second import refuses to overwrite
    res = run("prompts", "import", str(src), "--name", "authors", "--map", "prompt=text", "--map", "subjects=objs",
              "--map", "predicate=rel", "--subjects-from", str(registry), "--out", str(out))
    assert res.exit_code == 2 and "exists" in res.output


def test_import_json_predicate_by_spacy(tmp_path, write_suite):
    registry = write_suite(mini_suite_data(), "registry.yaml")
    src = tmp_path / "cases.json"
    src.write_text(json.dumps({"cases": [{"prompt": "a dog riding a bicycle", "subjects": ["dog"]}]}))
    out = tmp_path / "s.yaml"
    res = run("prompts", "import", str(src), "--name", "s", "--subjects-from", str(registry), "--out", str(out))
    assert res.exit_code == 0, res.output
    suite = load_suite(out)
    assert suite.cases[0].predicate == "riding"
    # the suite names the model that extracted its predicates
    from relationbench.suites.predicates import predicate_backend

    assert suite.predicates == predicate_backend("model") and suite.predicates.startswith("spacy:")


def test_import_marks_extracted_predicates_and_round_trips(tmp_path, write_suite):
    """Each extracted predicate carries the extractor's id for review, a given one none; the
    mark survives export -> import, and so does every field of every case."""
    from relationbench.suites.predicates import predicate_backend

    registry = write_suite(mini_suite_data(), "registry.yaml")
    src = tmp_path / "cases.json"
    src.write_text(json.dumps([
        {"prompt": "a dog hugging a bear plushie", "subjects": ["dog", "bear"], "predicate": "hugging"},
        {"prompt": "a dog lying next to a bear plushie", "subjects": "dog;bear"},
    ]))
    out = tmp_path / "s.yaml"
    res = run("prompts", "import", str(src), "--name", "s", "--subjects-from", str(registry), "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "1 predicate(s) extracted by a program, each marked `predicate_source:` for review" in res.output
    model = predicate_backend("model")
    raw = yaml.safe_load(out.read_text())["cases"]
    assert "predicate_source" not in raw[0] and raw[1]["predicate_source"] == model
    suite = load_suite(out)
    assert [(c.predicate, c.predicate_source) for c in suite.cases] == [("hugging", None), ("lying next to", model)]

    exported = tmp_path / "exported.jsonl"
    exported.write_text(run("prompts", "export", "--suite", str(out)).output)
    again = tmp_path / "again.yaml"
    res = run("prompts", "import", str(exported), "--name", "s", "--subjects-from", str(registry), "--out", str(again))
    assert res.exit_code == 0, res.output
    assert "1 predicate(s) extracted" in res.output  # the kept mark, still to review
    assert [c.as_record() for c in load_suite(again).cases] == [c.as_record() for c in suite.cases]

    reviewed = [{**json.loads(line), "predicate_source": None} for line in exported.read_text().splitlines()]
    exported.write_text("\n".join(map(json.dumps, reviewed)))
    res = run("prompts", "import", str(exported), "--name", "s", "--subjects-from", str(registry), "--out", str(again),
              "--force")
    assert res.exit_code == 0 and "predicate(s) extracted" not in res.output
    assert [c.predicate_source for c in load_suite(again).cases] == [None, None]


def test_import_refuses_the_rule_based_fallback(tmp_path, write_suite, monkeypatch):
    """Without the spaCy model, extraction would silently use other rules: refused instead."""
    from relationbench.suites import predicates

    monkeypatch.setattr(predicates, "MODEL_PACKAGES", ("no_such_model_package",))
    predicates._pipeline.cache_clear()
    registry = write_suite(mini_suite_data(), "registry.yaml")
    src = tmp_path / "cases.json"
    src.write_text(json.dumps({"cases": [{"prompt": "a dog riding a bicycle", "subjects": ["dog"]}]}))
    out = tmp_path / "s.yaml"
    try:
        res = run("prompts", "import", str(src), "--name", "s", "--subjects-from", str(registry), "--out", str(out))
    finally:
        predicates._pipeline.cache_clear()
    assert res.exit_code == 2 and "no spaCy English model installed" in res.output and not out.exists()


def test_import_errors_name_the_file(tmp_path, write_suite):
    registry = write_suite(mini_suite_data(), "registry.yaml")
    src = tmp_path / "bad.json"
    src.write_text(json.dumps([{"prompt": "a cat riding a bicycle", "subjects": ["cat"]}]))
    out = tmp_path / "s.yaml"
    res = run("prompts", "import", str(src), "--name", "s", "--subjects-from", str(registry), "--out", str(out))
    assert res.exit_code == 2
    assert str(src) in res.output and "cat" in res.output
    assert not out.exists()
    src.write_text(json.dumps([{"prompt": "a dog riding a bicycle", "subjects": ["dog"], "boxes": "[[0.5, 0, 0.2, 1]]"}]))
    res = run("prompts", "import", str(src), "--name", "s", "--subjects-from", str(registry), "--out", str(out))
    assert res.exit_code == 2 and "x0 < x1" in res.output and not out.exists()
    yaml.safe_load(registry.read_text())  # the registry file is untouched
