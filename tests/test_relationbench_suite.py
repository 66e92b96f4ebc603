"""The RelationBench suite file: the paper's counts, coverage, sane boxes, and in sync with its script."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from relationbench.data import get_spec
from relationbench.suites import load_suite

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "prompts" / "build_relationbench.py"
CATEGORIES = {"pets", "plushies", "toys", "people", "cartoons"}


@pytest.fixture(scope="module")
def suite():
    return load_suite("relationbench")


def _by_kind(suite, kind):
    return [c for c in suite.cases if c.kind == kind]


def test_counts_match_the_paper(suite):
    assert suite.name == "relationbench" and suite.version == 1
    assert suite.counts() == {"single": 100, "multi": 100}
    assert len(suite.subjects) == 44
    assert len(suite.relations) == 25
    assert suite.license and "noncommercial" in suite.license


def test_subjects_come_from_the_named_datasets(suite):
    assert {s.category for s in suite.subjects.values()} == CATEGORIES
    for s in suite.subjects.values():
        assert s.source in ("dreambench", "customconcept101")
        assert s.dir in get_spec(s.source).subjects, f"{s.name}: no folder {s.dir!r} in {s.source}"


def test_every_subject_used_and_spread_evenly(suite):
    usage = Counter(s.name for c in suite.cases for s in c.subjects)
    assert set(usage) == set(suite.subjects)
    assert min(usage.values()) >= 5 and max(usage.values()) <= 9, usage


def test_every_relation_used_where_it_fits(suite):
    for rel in suite.relations:
        assert set(rel) == {"verb", "ing", "single", "multi"}
        assert rel["single"] or rel["multi"]
        for kind in ("single", "multi"):
            cases = [c for c in _by_kind(suite, kind) if c.relation == rel["verb"]]
            assert bool(cases) == rel[kind], (rel["verb"], kind)
            assert all(c.predicate == rel["ing"] for c in cases)
    assert {c.relation for c in suite.cases} == {r["verb"] for r in suite.relations}


def test_ids_seeds_and_prompts_are_unique(suite):
    for kind, prefix in (("single", "rb-s"), ("multi", "rb-m")):
        ids = [c.id for c in _by_kind(suite, kind)]
        assert ids == [f"{prefix}-{i:03d}" for i in range(1, 101)]
    assert len({c.seed for c in suite.cases}) == 200
    assert len({c.prompt for c in suite.cases}) == 200


def test_multi_cases_name_two_distinguishable_subjects(suite):
    for c in _by_kind(suite, "multi"):
        a, b = (s.class_noun for s in c.subjects)
        assert not re.search(rf"\b{a}\b", b) and not re.search(rf"\b{b}\b", a), c.id
        assert c.class_spans()[0][0] < c.prompt.index(c.predicate) < c.class_spans()[1][0], c.id


def _area(b):
    return (b[2] - b[0]) * (b[3] - b[1])


def _overlap(a, b):
    """Intersection area over the smaller box's area."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0) / min(_area(a), _area(b))


def _above(a, b):
    return (a[1] + a[3]) / 2 < (b[1] + b[3]) / 2


# relation -> test on (agent box, patient box)
MULTI_LAYOUTS = {
    "hug": lambda a, b: _overlap(a, b) >= 0.3,
    "kiss": lambda a, b: _overlap(a, b) >= 0.3,
    "dance with": lambda a, b: _overlap(a, b) >= 0.3,
    "lick": lambda a, b: _overlap(a, b) >= 0.3,
    "shake hands with": lambda a, b: 0 < _overlap(a, b) < 0.15,
    "high-five": lambda a, b: 0 < _overlap(a, b) < 0.15,
    "chase": lambda a, b: _overlap(a, b) == 0,
    "wave at": lambda a, b: _overlap(a, b) == 0,
    "ride": lambda a, b: _above(a, b) and _overlap(a, b) > 0,
    "sit on": lambda a, b: _above(a, b) and _overlap(a, b) > 0,
    "lie on": lambda a, b: _above(a, b) and _overlap(a, b) > 0,
    "jump over": lambda a, b: _above(a, b) and _overlap(a, b) == 0,
    "carry": lambda a, b: _overlap(a, b) == 1.0 and _area(a) > _area(b),
    "hold": lambda a, b: _overlap(a, b) == 1.0 and _area(a) > _area(b),
}


def test_multi_boxes_follow_the_relation(suite):
    for c in _by_kind(suite, "multi"):
        a, b = c.boxes
        assert _overlap(a, b) < 1.0 or c.relation in ("carry", "hold"), c.id
        check = MULTI_LAYOUTS.get(c.relation, lambda a, b: 0 < _overlap(a, b) < 0.5)
        assert check(a, b), (c.id, c.relation, c.boxes)


def test_single_boxes_are_large_and_central(suite):
    for c in _by_kind(suite, "single"):
        (box,) = c.boxes
        assert _area(box) >= 0.3, c.id
        assert 0.4 <= (box[0] + box[2]) / 2 <= 0.6, c.id


def test_committed_file_is_what_the_script_builds(tmp_path):
    out = tmp_path / "relationbench.yaml"
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], check=True, capture_output=True)
    committed = (ROOT / "prompts" / "relationbench.yaml").read_text(encoding="utf-8")
    assert out.read_text(encoding="utf-8") == committed, "run: python prompts/build_relationbench.py"
