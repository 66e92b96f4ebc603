"""Subjects named by image path (issue 12, item 5): `images:` in a suite's registry, resolved
against the suite file's folder, also when a run's copy of the suite is read at score time."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from relationbench import data, score as score_module
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.runs import RunDir
from relationbench.suites import Subject, SuiteError, load_suite
from relationbench.suites.importer import import_cases

from .conftest import mini_suite_data
from .score_runs import photo
from .test_generate import gen
from .test_resume import score, scores

PASTE = "name: paste\nadapter: tests.fake_methods:PasteReferences\n"


def own_subjects(folder: Path, dog_images, bear_images=("bear/",)) -> dict:
    """mini_suite_data with its two subjects named by path (relative to `folder`)."""
    suite = mini_suite_data()
    suite["subjects"] = {"dog": {"class": "dog", "images": list(dog_images)},
                         "bear": {"class": "bear plushie", "images": list(bear_images)}}
    return suite


def write(path: Path, suite: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    """A user's folder: a suite file in suites/, images beside it (a folder of three, two loose)."""
    root = tmp_path / "project"
    (root / "suites" / "bear").mkdir(parents=True)
    for j, name in enumerate(["b.png", "a.jpg", "c.webp"]):
        photo(100 + j, size=48).save(root / "suites" / "bear" / name)
    (root / "suites" / "bear" / "notes.txt").write_text("not an image")
    (root / "suites" / "bear" / ".hidden.png").write_bytes(b"")
    (root / "pics").mkdir()
    for j, name in enumerate(["rex2.png", "rex1.png"]):
        photo(200 + j, size=48).save(root / "pics" / name)
    write(root / "suites" / "mine.yaml", own_subjects(root, ["../pics/rex2.png", "../pics/rex1.png"]))
    return root


def test_images_resolve_against_the_suite_folder_in_order(project, monkeypatch):
    monkeypatch.chdir(project / "pics")  # never against the working directory
    suite = load_suite(project / "suites" / "mine.yaml")
    dog, bear = suite.subjects["dog"], suite.subjects["bear"]
    assert dog.source is None and dog.images == (str(project / "pics" / "rex2.png"), str(project / "pics" / "rex1.png"))
    # files in the order written (not sorted); a folder: its image files sorted by name
    assert data.reference_images(dog) == [project / "pics" / "rex2.png", project / "pics" / "rex1.png"]
    assert data.reference_images(bear, "/nonexistent-root") == [project / "suites" / "bear" / n
                                                                 for n in ("a.jpg", "b.png", "c.webp")]
    assert data.missing_subjects([dog, bear]) == []
    assert data.require_images([dog, bear]) == {"dog": data.reference_images(dog), "bear": data.reference_images(bear)}
    # one path as a string; a base folder given for a copy read elsewhere
    one = own_subjects(project, "rex1.png")
    one["subjects"]["dog"]["images"] = "rex1.png"
    copy = write(project / "run" / "suite.yaml", one)
    moved = load_suite(copy, base=project / "pics")
    assert data.reference_images(moved.subjects["dog"]) == [project / "pics" / "rex1.png"]
    assert data.subject_images_sha256([moved.subjects["dog"], Subject("cat", "cat", "dreambench", "cat")]) == {
        "dog": [hashlib.sha256((project / "pics" / "rex1.png").read_bytes()).hexdigest()]}


@pytest.mark.parametrize("spec, message", [
    ({"class": "dog", "images": ["a.png"], "source": "dreambench"}, "has both 'images' and 'source'"),
    ({"class": "dog", "images": ["a.png"], "dir": "dog"}, "has both 'images' and 'source'"),
    ({"class": "dog"}, "needs 'source'"),
    ({"class": "dog", "images": []}, "non-empty list of paths"),
    ({"class": "dog", "images": ["a.png", 3]}, "non-empty list of paths"),
    ({"class": "dog", "images": ["  "]}, "non-empty list of paths"),
    ({"class": "dog", "images": {"a": 1}}, "images must be a list or a string"),
])
def test_bad_images_field(tmp_path, spec, message):
    suite = own_subjects(tmp_path, ["x.png"])
    suite["subjects"]["dog"] = spec
    with pytest.raises(SuiteError) as err:
        load_suite(write(tmp_path / "s.yaml", suite))
    assert message in err.value.message and "subject 'dog'" in err.value.message


def test_a_missing_image_names_the_suite_subject_and_path(project, tmp_path):
    suite_file = project / "suites" / "mine.yaml"
    (project / "pics" / "rex1.png").unlink()
    dog = load_suite(suite_file).subjects["dog"]  # loading does not look at the disk
    with pytest.raises(UserError) as err:
        data.reference_images(dog)
    assert str(err.value.path) == str(suite_file)
    assert "subject 'dog'" in err.value.message and str(project / "pics" / "rex1.png") in err.value.message
    for f in (project / "suites" / "bear").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="holds no image files"):
        data.reference_images(load_suite(suite_file).subjects["bear"])
    # generate stops before writing anything, with the same message
    card = tmp_path / "paste.yaml"
    card.write_text(PASTE)
    out = tmp_path / "run"
    res = gen("--method", str(card), "--suite", str(suite_file), "--out", str(out))
    assert res.exit_code == 2 and str(suite_file) in res.output and "subject 'dog'" in res.output
    assert not out.exists()


@pytest.fixture
def made(project, tmp_path, monkeypatch):
    """A run of the paste method (it draws each subject's first reference) on `mine.yaml`,
    generated from another working directory than the suite's."""
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    card = tmp_path / "paste.yaml"
    card.write_text(PASTE)
    run = tmp_path / "results" / "run"
    res = gen("--method", str(card), "--suite", "project/suites/mine.yaml", "--out", str(run))
    assert res.exit_code == 0, res.output
    return project / "suites" / "mine.yaml", run, card


def test_scoring_a_run_finds_the_references_generation_used(made, monkeypatch):
    suite_file, run, _ = made
    project = suite_file.parents[1]
    first = {r["case_id"]: r["references"] for r in RunDir(run).records()}
    assert first == {"t-s-1": [str(project / "pics" / "rex2.png")],
                     "t-m-1": [str(project / "pics" / "rex2.png"), str(project / "suites" / "bear" / "a.jpg")]}
    meta = json.loads((run / "run.json").read_text())
    assert meta["suite"]["images_sha256"] == {
        "dog": [hashlib.sha256((project / "pics" / n).read_bytes()).hexdigest() for n in ("rex2.png", "rex1.png")],
        "bear": [hashlib.sha256((project / "suites" / "bear" / n).read_bytes()).hexdigest()
                 for n in ("a.jpg", "b.png", "c.webp")]}
    # the scorer reads the run's copy (run/suite.yaml), whose folder holds no images
    assert (run / "suite.yaml").read_bytes() == suite_file.read_bytes()
    seen: dict[str, list[Path]] = {}
    real = score_module.reference_images

    def recording(subject, root=None):
        seen[subject.name] = real(subject, root)
        return seen[subject.name]

    monkeypatch.setattr(score_module, "reference_images", recording)
    monkeypatch.chdir(run)
    res = score(run)
    assert "2 image(s) scored" in res.output and "warning" not in res.output and "no reference" not in res.output
    assert seen == {"dog": [Path(p) for p in (project / "pics" / "rex2.png", project / "pics" / "rex1.png")],
                    "bear": [project / "suites" / "bear" / n for n in ("a.jpg", "b.png", "c.webp")]}
    assert {str(seen[name][0]) for name in seen} == {p for refs in first.values() for p in refs}
    rows = scores(run)
    assert rows[["clip_i", "dino", "clip_i_2"]].notna().sum().tolist() == [2, 2, 1]


def test_changed_images_are_not_scored_or_resumed_silently(made):
    suite_file, run, card = made
    rex1 = suite_file.parents[1] / "pics" / "rex1.png"
    before = rex1.read_bytes()
    photo(999, size=48).save(rex1)  # a subject image replaced after generation
    res = score(run, ok=False)
    assert "subject(s) dog changed after the run was generated" in " ".join(res.output.split())
    assert not (run / "scores.csv").exists()
    res = gen("--method", str(card), "--suite", str(suite_file), "--out", str(run))
    assert res.exit_code == 2 and "subject(s) dog changed after the run was generated" in " ".join(res.output.split())
    rex1.write_bytes(before)


def test_a_run_of_some_cases_records_and_needs_only_their_subjects(project, tmp_path):
    """The bear's images missing do not stop a run of the dog's case; the run records the dog's
    images only, and a later run of the bear's case adds the bear's."""
    suite_file = project / "suites" / "mine.yaml"
    bear = project / "suites" / "bear"
    kept = {f.name: f.read_bytes() for f in bear.iterdir()}
    for f in bear.iterdir():
        f.unlink()
    card = tmp_path / "paste.yaml"
    card.write_text(PASTE)
    run = tmp_path / "run"
    res = gen("--method", str(card), "--suite", str(suite_file), "--cases", "t-s-1", "--out", str(run))
    assert res.exit_code == 0, res.output
    sha = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in
           [(n, project / "pics" / n) for n in ("rex2.png", "rex1.png")]}
    meta = json.loads((run / "run.json").read_text())
    assert meta["suite"]["images_sha256"] == {"dog": [sha["rex2.png"], sha["rex1.png"]]}
    assert "1 image(s) scored" in score(run).output  # the bear's missing images are not looked at
    for name, data_ in kept.items():
        (bear / name).write_bytes(data_)
    res = gen("--method", str(card), "--suite", str(suite_file), "--out", str(run))
    assert res.exit_code == 0, res.output
    images = json.loads((run / "run.json").read_text())["suite"]["images_sha256"]
    assert images == {"dog": [sha["rex2.png"], sha["rex1.png"]],
                      "bear": [hashlib.sha256((bear / n).read_bytes()).hexdigest() for n in ("a.jpg", "b.png", "c.webp")]}
    assert "1 image(s) scored, 1 already scored" in score(run).output  # the bear's, with its references


def test_same_subject_name_other_images_in_one_scoring(made, tmp_path):
    """Two runs whose suites call different images 'dog', scored in one call: each with its own
    references (the scorer's per-call memo is keyed by the images, not by the name)."""
    suite_file, run, card = made
    other = tmp_path / "other"
    shutil.copytree(suite_file.parents[1], other)
    for j, name in enumerate(["rex2.png", "rex1.png"]):
        photo(300 + j, size=48).save(other / "pics" / name)
    run_b = tmp_path / "results" / "run-b"
    res = gen("--method", str(card), "--suite", str(other / "suites" / "mine.yaml"), "--out", str(run_b))
    assert res.exit_code == 0, res.output
    alone = tmp_path / "alone"
    shutil.copytree(run_b, alone)
    score(alone)
    res = CliRunner().invoke(cli, ["score", "--quiet", "--bootstrap", "20", str(run.parent)])  # both runs
    assert res.exit_code == 0, res.output
    cols = ["case_id", "clip_i_1", "dino_1"]
    assert scores(run_b)[cols].sort_values("case_id").values.tolist() == \
        scores(alone)[cols].sort_values("case_id").values.tolist()
    assert scores(run_b)["clip_i_1"].tolist() != scores(run)["clip_i_1"].tolist()


def test_import_keeps_path_subjects(project, tmp_path):
    """A case list naming subjects of a registry with path subjects: the new suite, written
    elsewhere, names the same files (absolute)."""
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "a dog hugging a bear plushie", "subjects": ["dog", "bear"],
                                 "predicate": "hugging"}]))
    registry = load_suite(project / "suites" / "mine.yaml")
    suite = import_cases(rows, "again", registry)
    out = write(tmp_path / "elsewhere" / "again.yaml", suite)
    again = load_suite(out)
    for name in ("dog", "bear"):
        assert data.reference_images(again.subjects[name]) == data.reference_images(registry.subjects[name])
    assert all(os.path.isabs(p) for s in suite["subjects"].values() for p in s["images"])
