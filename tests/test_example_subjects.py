"""`relbench data example-subjects`: drawn stand-ins for subject images in a separate data root,
in the datasets' layout, the same on every call, never in the default root."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.data import DEFAULT_ROOT, reference_images, require_images
from relationbench.data.example_subjects import IMAGES_PER_SUBJECT, NOTE, SIZE, write_example_subjects
from relationbench.errors import UserError
from relationbench.generate import select_cases
from relationbench.suites import load_suite

CASES = ["rb-s-001", "rb-m-011", "rb-m-001"]  # cat; cat (again) + dog8; pet_cat5 (customconcept101) + dog7


def test_writes_each_subject_once_in_the_layout_generate_reads(tmp_path):
    cases = select_cases(load_suite("relationbench"), CASES)
    subjects = {s.name: s for c in cases for s in c.subjects}
    out = tmp_path / "data"
    folders = write_example_subjects(out, [s for c in cases for s in c.subjects])
    assert sorted(folders) == sorted(out / s.source / s.dir for s in subjects.values())
    found = require_images(subjects.values(), out)  # what generate and score check first
    for name, files in found.items():
        assert [p.name for p in files] == [f"{i:02d}.png" for i in range(IMAGES_PER_SUBJECT)], name
        assert all(Image.open(p).size == (SIZE, SIZE) for p in files)
    assert (out / "NOTE.txt").read_text() == NOTE
    # the same call draws the same images; two subjects differ; a subject's two images differ
    again = write_example_subjects(tmp_path / "again", subjects.values())
    cat = reference_images(subjects["cat"], out)
    assert cat[0].read_bytes() == (again[[f.name for f in again].index("cat")] / "00.png").read_bytes()
    pixels = {n: np.asarray(Image.open(reference_images(s, out)[0])) for n, s in subjects.items()}
    assert not np.array_equal(pixels["cat"], pixels["dog8"])
    assert not np.array_equal(np.asarray(Image.open(cat[0])), np.asarray(Image.open(cat[1])))


def test_refuses_the_default_root_and_a_used_folder(tmp_path, monkeypatch):
    subject = load_suite("relationbench").case("rb-s-001").subjects[0]
    with pytest.raises(UserError, match="data root in use"):
        write_example_subjects(DEFAULT_ROOT, [subject])
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "mydata"))  # the root generate and score read
    with pytest.raises(UserError, match="data root in use"):
        write_example_subjects(tmp_path / "mydata", [subject])
    assert not (tmp_path / "mydata").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        write_example_subjects(tmp_path / "used", [subject])
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["x.txt"]


def test_cli(tmp_path):
    ok = CliRunner().invoke(cli, ["data", "example-subjects", str(tmp_path / "d"), "--cases", "rb-s-001,rb-m-011"])
    assert ok.exit_code == 0 and "2 stand-in subject(s)" in ok.output, ok.output
    bad = CliRunner().invoke(cli, ["data", "example-subjects", str(tmp_path / "e"), "--cases", "nope"])
    assert bad.exit_code == 2 and "no case(s) nope" in bad.output and not (tmp_path / "e").exists()
