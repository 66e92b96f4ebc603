"""The DreamBench and CustomConcept101 suites in prompts/: counts, contents, licence, rebuild."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import pytest

from relationbench.suites import load_suite

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}


def builder(name: str):
    path = REPO / "prompts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dreambench_suite():
    suite = load_suite("dreambench")
    assert suite.name == "dreambench" and suite.version == 1
    assert len(suite.cases) == 750 and suite.counts() == {"single": 750, "multi": 0}
    assert len(suite.subjects) == 30
    assert {n for n, s in suite.subjects.items() if s.category == "live"} == LIVE
    assert all(s.source == "dreambench" and s.dir == n for n, s in suite.subjects.items())
    per_subject = collections.Counter(c.subjects[0].name for c in suite.cases)
    assert set(per_subject.values()) == {25} and len(per_subject) == 30
    ids = [c.id for c in suite.cases]
    assert len(set(ids)) == 750 and len({c.seed for c in suite.cases}) == 750
    assert all(c.predicate is None and c.boxes == ((0.1, 0.1, 0.9, 0.9),) for c in suite.cases)
    assert suite.case("db-dog-00").prompt == "a dog in the jungle"
    assert suite.case("db-bear_plushie-01").prompt == "a stuffed animal in the snow"
    assert suite.case("db-dog-10").prompt == "a dog wearing a red hat"  # live list
    assert suite.case("db-backpack-10").prompt == "a backpack with a wheat field in the background"  # object list
    assert suite.case("db-rc_car-24").prompt == "a cube shaped toy"
    assert "CC BY 4.0" in suite.license


def test_customconcept101_suite():
    suite = load_suite("customconcept101-multi")
    assert len(suite.cases) == 1212 and suite.counts() == {"single": 0, "multi": 1212}
    assert len({c.id for c in suite.cases}) == 1212 and len({c.seed for c in suite.cases}) == 1212
    pairs = collections.Counter(c.id.split("-")[1] for c in suite.cases)
    assert len(pairs) == 101 and set(pairs.values()) == {12}
    assert all(len(c.subjects) == 2 and len(c.boxes) == 2 for c in suite.cases)
    assert all(s.source == "customconcept101" for s in suite.subjects.values())
    # upstream quirks: chair3 is a chair (the pair file says sofa); the scene_pet typo is fixed
    assert suite.subjects["furniture_chair3"].class_noun == "chair"
    assert suite.subjects["plushie_dice"].class_noun == "dice plushie"
    assert suite.subjects["wearable_sunglasses2"].class_noun == "sunglasses"
    sleeping = [c for c in suite.cases if "sleeping peacefully" in c.prompt]
    assert sleeping and all(c.subjects[1].class_noun in c.prompt for c in sleeping)
    # the licence travels with the file
    assert "ADOBE RESEARCH LICENSE" in suite.license and "noncommercial research" in suite.license
    assert "disclaim" in suite.license.lower()
    head = (REPO / "prompts" / "customconcept101-multi.yaml").read_text(encoding="utf-8").splitlines()[:10]
    assert any("NONCOMMERCIAL" in line and line.startswith("#") for line in head)


@pytest.mark.skipif(not (SHARED / "dreambench" / "prompts_and_classes.txt").is_file(), reason="shared DreamBench copy absent")
def test_dreambench_rebuild_matches(tmp_path):
    out = tmp_path / "dreambench.yaml"
    builder("build_dreambench").main(["--src", str(SHARED / "dreambench" / "prompts_and_classes.txt"), "--out", str(out)])
    assert out.read_bytes() == (REPO / "prompts" / "dreambench.yaml").read_bytes()


@pytest.mark.skipif(not (SHARED / "customconcept101" / "dataset.json").is_file(), reason="shared CustomConcept101 copy absent")
def test_customconcept101_rebuild_matches(tmp_path):
    out = tmp_path / "cc.yaml"
    builder("build_customconcept101").main(["--src", str(SHARED / "customconcept101"), "--out", str(out)])
    assert out.read_bytes() == (REPO / "prompts" / "customconcept101-multi.yaml").read_bytes()
