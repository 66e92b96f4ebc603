"""Relation triplets: the format's checks (each with its file and message), loading, the bank
hash, the synthetic example set against its own drawings, and `relbench data check /
example-triplets`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from relationbench.cli import cli
from relationbench.data import example_triplets, triplets
from relationbench.data.example_triplets import RELATIONS, SIZE, write_example_triplets
from relationbench.data.triplets import (KEYPOINT_SCHEMAS, MANIFEST, Keypoints, Problem, check_triplets,
                                         load_triplets, mask_box, read_mask)
from relationbench.errors import UserError

from .test_properties import mutated, scaled


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def example_master(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example") / "set"
    write_example_triplets(out)
    return out


@pytest.fixture
def example(example_master, tmp_path) -> Path:
    """A fresh copy of the example set, for one test to break."""
    out = tmp_path / "set"
    shutil.copytree(example_master, out)
    return out


def edit(root: Path, relation: str, change) -> Path:
    """Apply change(manifest data) to a relation's triplets.json."""
    path = root / relation / MANIFEST
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------------------------------------
# the example set


def test_example_passes_and_loads(example_master):
    assert check_triplets(example_master) == []
    found = load_triplets(example_master)
    assert list(found.relations) == ["hug", "wave"]
    for relation, samples in found.relations.items():
        assert 4 <= len(samples) <= 6  # the paper's tuning-set size
        spec = RELATIONS[relation]
        for s in samples:
            assert s.relation == relation and s.predicate == spec.predicate
            assert s.entities == tuple(f.entity for f in spec.figures)
            assert len(s.objects) == len(s.references) == len(s.entities)
            assert [o.entity for o in s.objects] == [r.entity for r in s.references] == list(s.entities)
            assert Image.open(s.target).size == (SIZE, SIZE)
    assert {o.keypoints.schema for s in found.relations["hug"] for o in s.objects} == {"ap10k-17"}
    assert {o.keypoints.schema for s in found.relations["wave"] for o in s.objects} == {"coco-17"}
    assert all(o.keypoints.score is not None for s in found.relations["wave"] for o in s.objects)


def test_example_keypoints_lie_on_their_drawings(example_master):
    """Every keypoint's pixel has its figure's colour, lies in its own mask and in no other."""
    found = load_triplets(example_master)
    checked = 0
    for relation, samples in found.relations.items():
        colours = [f.colour for f in RELATIONS[relation].figures]
        for s in samples:
            target = np.asarray(Image.open(s.target).convert("RGB"))
            masks = [np.asarray(Image.open(o.mask)) > 0 for o in s.objects]
            for k, o in enumerate(s.objects):
                assert o.keypoints.xy.shape == (17, 2) and o.keypoints.xy.dtype == np.float32
                for x, y in o.keypoints.xy:
                    col, row = int(x * SIZE), int(y * SIZE)
                    assert x * SIZE - col == 0.5 and y * SIZE - row == 0.5  # pixel centres, exactly
                    assert tuple(target[row, col]) == colours[k]
                    assert masks[k][row, col]
                    assert not any(m[row, col] for j, m in enumerate(masks) if j != k)
                    checked += 1
                # the box comes from the mask: a plain loop over its pixels
                rows = [r for r in range(SIZE) if masks[k][r].any()]
                cols = [c for c in range(SIZE) if masks[k][:, c].any()]
                assert o.box == (cols[0] / SIZE, rows[0] / SIZE, (cols[-1] + 1) / SIZE, (rows[-1] + 1) / SIZE)
            for k, r in enumerate(s.references):
                reference = np.asarray(Image.open(r.image).convert("RGB"))
                for x, y in r.keypoints.xy:
                    assert tuple(reference[int(y * SIZE), int(x * SIZE)]) == colours[k]
                    checked += 1
    assert checked == 17 * (5 * 2 * 2 + 5 * 1 * 2)


def test_example_is_deterministic(example_master, tmp_path):
    again = tmp_path / "again"
    write_example_triplets(again)
    first, second = load_triplets(example_master), load_triplets(again)
    for relation in first.relations:
        assert first.content_hash(relation) == second.content_hash(relation)


def test_example_refuses_a_non_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        write_example_triplets(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    (out / "keep.txt").unlink()
    write_example_triplets(out)  # an empty folder is fine
    assert check_triplets(out) == []


def test_example_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(folder, samples):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError("disk full")
        return triplets.write_manifest(folder, samples)

    monkeypatch.setattr(example_triplets, "write_manifest", failing)
    with pytest.raises(OSError, match="disk full"):
        write_example_triplets(tmp_path / "new" / "out")
    assert list(tmp_path.iterdir()) == []  # neither the half-written set nor the folder made for it


# ---------------------------------------------------------------------------------------------
# every check: one broken thing -> one problem naming the right file


BROKEN = {
    "unknown field": ("hug", lambda d: d["samples"][0].update(colour="red"), MANIFEST,
                      "sample 0: unknown field 'colour'"),
    "missing field": ("hug", lambda d: d["samples"][1].pop("predicate"), MANIFEST,
                      "sample 1: missing field 'predicate'"),
    "wrong type": ("hug", lambda d: d["samples"][0].update(entities="bear"), MANIFEST,
                   "sample 0: entities must be a list, got 'bear'"),
    "number as prompt": ("hug", lambda d: d["samples"][0].update(prompt=7), MANIFEST,
                         "sample 0: prompt must be a string, got 7"),
    "unknown top field": ("hug", lambda d: d.update(notes="x"), MANIFEST, "unknown field 'notes'"),
    "wrong format": ("hug", lambda d: d.update(format="other"), MANIFEST, "format must be 'relationbench-triplets'"),
    "no samples": ("hug", lambda d: d.update(samples=[]), MANIFEST, "no samples"),
    "duplicate id": ("hug", lambda d: d["samples"][2].update(id="1"), MANIFEST,
                     "sample 1: the id is used twice (samples #1 and #2)"),
    "three entities": ("hug", lambda d: d["samples"][0].update(entities=["bear", "tiger", "cat"]), MANIFEST,
                       "sample 0: entities must name 1 to 2 objects, got 3"),
    "entity without a reference": ("hug", lambda d: d["samples"][0]["references"].pop(), MANIFEST,
                                   "sample 0: 1 references for 2 entities (bear, tiger)"),
    "object missing": ("wave", lambda d: d["samples"][3]["objects"].pop(), MANIFEST,
                       "sample 3: 0 objects for 1 entity (person)"),
    "predicate not in prompt": ("hug", lambda d: d["samples"][0].update(predicate="riding"), MANIFEST,
                                "sample 0: predicate 'riding' is not in the prompt"),
    "part of a word is not the predicate": ("wave", lambda d: d["samples"][0].update(predicate="wav"), MANIFEST,
                                            "sample 0: predicate 'wav' is not in the prompt"),
    "entity not in prompt": ("hug", lambda d: d["samples"][0].update(entities=["bear", "lion"]), MANIFEST,
                             "sample 0: entity 'lion' is not in the prompt"),
    "path leaves the folder": ("hug", lambda d: d["samples"][0].update(target="../wave/0/target.png"), MANIFEST,
                               "sample 0: target '../wave/0/target.png' must be a file path relative"),
    "absolute path": ("hug", lambda d: d["samples"][0]["references"][1].update(image="/etc/passwd"), MANIFEST,
                      "sample 0: reference 1 (tiger): image '/etc/passwd' must be a file path relative"),
    "mask and box": ("hug", lambda d: d["samples"][0]["objects"][0].update(box=[0, 0, 1, 1]), MANIFEST,
                     "sample 0: object 0 (bear): give a 'mask' or a 'box' (not both"),
    "box outside": ("hug", lambda d: d["samples"][0]["objects"][0].update(box=[0.1, 0.1, 1.2, 0.5], mask=None)
                    or d["samples"][0]["objects"][0].pop("mask"), MANIFEST,
                    "sample 0: object 0 (bear): box [0.1, 0.1, 1.2, 0.5] is outside [0, 1]"),
    "box reversed": ("hug", lambda d: d["samples"][0]["objects"][1].update(box=[0.6, 0.1, 0.6, 0.5])
                     or d["samples"][0]["objects"][1].pop("mask"), MANIFEST,
                     "sample 0: object 1 (tiger): box [0.6, 0.1, 0.6, 0.5] needs x0 < x1 and y0 < y1"),
    "16 keypoints": ("hug", lambda d: d["samples"][0]["objects"][1]["keypoints"]["xy"].pop(), MANIFEST,
                     "sample 0: object 1 (tiger): keypoints xy must be 17 (x, y) pairs"),
    "keypoint with 3 values": ("hug", lambda d: d["samples"][0]["objects"][1]["keypoints"]["xy"][4].append(0.5),
                               MANIFEST, "sample 0: object 1 (tiger): keypoints xy must be 17 (x, y) pairs"),
    "keypoint outside": ("wave", lambda d: d["samples"][2]["references"][0]["keypoints"]["xy"][3].__setitem__(0, 1.5),
                         MANIFEST, "sample 2: reference 0 (person): keypoints xy must lie in [0, 1] (normalized), "
                                   "got 1.5"),
    "keypoint not a number": ("wave", lambda d: d["samples"][2]["objects"][0]["keypoints"]["xy"][3].__setitem__(1, "0.5"),
                              MANIFEST, "sample 2: object 0 (person): keypoints xy must hold numbers, got '0.5'"),
    "unknown schema": ("hug", lambda d: d["samples"][4]["objects"][0]["keypoints"].update(schema="horse-22"), MANIFEST,
                       "sample 4: object 0 (bear): keypoints schema 'horse-22' is unknown"),
    "schema differs from reference": (
        "hug", lambda d: d["samples"][4]["objects"][0]["keypoints"].update(schema="coco-17"), MANIFEST,
        "sample 4: object 0 uses keypoint schema coco-17 but its reference ap10k-17"),
    "score outside": ("wave", lambda d: d["samples"][1]["objects"][0]["keypoints"]["score"].__setitem__(5, 1.01),
                      MANIFEST, "sample 1: object 0 (person): keypoints score must lie in [0, 1] (normalized), got 1.01"),
    "score count": ("wave", lambda d: d["samples"][1]["objects"][0]["keypoints"]["score"].pop(), MANIFEST,
                    "sample 1: object 0 (person): keypoints score must hold 17 values, got 16"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_manifest_problem_is_named(example, case):
    relation, change, file, message = BROKEN[case]
    edit(example, relation, change)
    problems = check_triplets(example)
    assert len(problems) == 1, problems
    assert problems[0].path == example / relation / file
    assert problems[0].message.startswith(message), problems[0].message
    with pytest.raises(UserError) as err:
        load_triplets(example)
    assert str(problems[0]) in err.value.message


@pytest.fixture(scope="module")
def one_sample(example_master, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the example set for property tests to overwrite hug's manifest in, and that
    manifest cut to its first sample."""
    root = tmp_path_factory.mktemp("property") / "set"
    shutil.copytree(example_master, root)
    data = json.loads((root / "hug" / MANIFEST).read_text())
    data["samples"] = data["samples"][:1]
    return root, data


_FIRST = ("samples", 0)
_OBJECT = (*_FIRST, "objects", 0)


@settings(max_examples=scaled(150))
@given(data=st.data())
def test_mutated_manifests_are_checked_never_crash(one_sample, data):
    """Any one odd value anywhere in a manifest is a Problem (or accepted), never an exception."""
    root, valid = one_sample
    fresh = st.builds(lambda: json.loads(json.dumps(valid)))  # mutated() changes its document in place
    document = data.draw(mutated(fresh, extra_keys=[(_FIRST, "predicate_source"), (_OBJECT, "box"),
                                                             ((*_OBJECT, "keypoints"), "score"), ((), "version")]))
    (root / "hug" / MANIFEST).write_text(json.dumps(document, default=str))
    problems = check_triplets(root, ["hug"])
    assert all(isinstance(p, Problem) and p.path.is_relative_to(root) for p in problems)
    if problems:
        with pytest.raises(UserError):
            load_triplets(root, ["hug"])
    else:
        sample = load_triplets(root, ["hug"]).relations["hug"][0]
        assert all(0 <= v <= 1 for o in sample.objects for v in o.box)
        assert all(o.keypoints.xy.shape == (17, 2) for o in (*sample.objects, *sample.references))


@pytest.mark.parametrize("value", [10**400, -1, 2, 1.0000001, True, None, "0.5", [0.5], float("inf")])
def test_odd_numbers_in_boxes_and_keypoints(one_sample, value):
    root, valid = one_sample
    document = json.loads(json.dumps(valid))
    obj = document["samples"][0]["objects"][0]
    obj.pop("mask")
    obj["box"] = [0.1, 0.1, value, 0.9]
    document["samples"][0]["references"][1]["keypoints"]["xy"][0][1] = value
    (root / "hug" / MANIFEST).write_text(json.dumps(document))
    problems = check_triplets(root, ["hug"])
    # the box and the keypoint each (inf: the file, refused whole)
    assert len(problems) == (1 if value == float("inf") else 2), problems
    assert all(p.path == root / "hug" / MANIFEST for p in problems)


def test_nan_and_non_json_manifests(example):
    (example / "hug" / MANIFEST).write_text('{"samples": [{"id": "0", "score": NaN}]}')
    (example / "wave" / MANIFEST).write_text('{"samples": [}')
    problems = check_triplets(example)
    assert [p.path for p in problems] == [example / "hug" / MANIFEST, example / "wave" / MANIFEST]
    assert "NaN is not a number JSON allows" in problems[0].message
    assert problems[1].message.startswith("not valid JSON")


def test_file_problems_name_the_file(example):
    (example / "hug" / "1" / "target.png").write_bytes(b"not a png")
    Image.new("L", (64, 64), 255).save(example / "hug" / "2" / "mask1.png")  # wrong size
    Image.new("L", (SIZE, SIZE), 0).save(example / "wave" / "0" / "mask0.png")  # empty
    (example / "wave" / "4" / "reference0.png").unlink()
    problems = {p.path.relative_to(example).as_posix(): p.message for p in check_triplets(example)}
    assert set(problems) == {"hug/1/target.png", "hug/2/mask1.png", "wave/0/mask0.png", "wave/4/reference0.png"}
    assert problems["hug/1/target.png"].startswith("sample 1: target image: not an image")
    assert problems["hug/2/mask1.png"] == ("sample 2: object 1 (tiger): the mask is 64x64 pixels but its target "
                                           "image is 128x128")
    assert problems["wave/0/mask0.png"] == "sample 0: object 0 (person): the mask is empty (all black)"
    assert problems["wave/4/reference0.png"].startswith("sample 4: reference 0 (person): image: cannot read the image file")


def test_every_problem_at_once(example):
    edit(example, "hug", lambda d: (d["samples"][0].update(predicate="riding"),
                                   d["samples"][3]["objects"][1]["keypoints"].update(schema="nope")))
    edit(example, "wave", lambda d: d["samples"][4].update(entities=["robot"]))
    (example / "hug" / "2" / "reference1.png").write_bytes(b"")
    problems = check_triplets(example)
    assert [(p.path.relative_to(example).as_posix(), p.message.split(":")[0]) for p in problems] == [
        ("hug/triplets.json", "sample 0"),
        ("hug/2/reference1.png", "sample 2"),
        ("hug/triplets.json", "sample 3"),
        ("wave/triplets.json", "sample 4"),
    ]
    with pytest.raises(UserError) as err:
        load_triplets(example)
    assert err.value.message.startswith("4 problem(s)")
    assert all(str(p) in err.value.message for p in problems)


def test_relation_folders(example):
    (example / "bad name").mkdir()
    (example / "bad name" / MANIFEST).write_text("{}")
    (example / "notes").mkdir()
    (example / ".cache").mkdir()  # hidden: ignored
    problems = check_triplets(example)
    assert [(p.path.name, p.message) for p in problems] == [
        ("bad name", "relation name 'bad name' must be letters, digits, _ and - (not first): it names a LoRA"),
        ("notes", "no triplets.json: every folder here must be a relation"),
    ]
    # naming relations checks only those; an unknown one is a problem
    assert check_triplets(example, ["wave"]) == []
    assert list(load_triplets(example, ["wave"]).relations) == ["wave"]
    assert check_triplets(example, ["wave", "ride"]) == [
        Problem(example / "ride", "no relation 'ride' here (found: bad name, hug, notes, wave)")]
    assert check_triplets(example / "missing") == [Problem(example / "missing", "no such folder")]
    assert check_triplets(example / "notes") == [Problem(example / "notes", "no relation folders "
                                                                            "(<relation>/triplets.json) here")]


def test_box_instead_of_mask_and_loaded_values(example):
    def change(d):
        obj = d["samples"][0]["objects"][0]
        obj.pop("mask")
        obj["box"] = [0.25, 0, 0.5, 1]
        d["samples"][0]["objects"][1]["keypoints"]["score"] = [0] * 16 + [1]
        d["samples"][0]["objects"][1]["keypoints"]["xy"][16] = [1, 0]

    edit(example, "hug", change)
    sample = load_triplets(example, ["hug"]).relations["hug"][0]
    assert sample.objects[0].box == (0.25, 0.0, 0.5, 1.0) and sample.objects[0].mask is None
    kp = sample.objects[1].keypoints
    assert kp.xy.dtype == np.float32 and kp.score.dtype == np.float32
    assert kp.score.tolist() == [0.0] * 16 + [1.0]
    assert kp.xy[16].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        kp.xy[0, 0] = 0.5  # read-only


def test_mask_box_by_hand(tmp_path):
    mask = np.zeros((10, 8), dtype=bool)
    mask[2:5, 3:7] = True  # rows 2..4, columns 3..6
    assert mask_box(mask) == (3 / 8, 2 / 10, 7 / 8, 5 / 10)
    with pytest.raises(ValueError):
        mask_box(np.zeros((4, 4), dtype=bool))
    grey = np.zeros((10, 8), dtype=np.uint8)
    grey[2:5, 3:7] = 1  # "not black" is the object, however dark
    Image.fromarray(grey).save(tmp_path / "m.png")
    assert (read_mask(tmp_path / "m.png") == mask).all()
    # a cut-out with alpha: flattened onto white, its transparent background would be object
    rgba = np.zeros((10, 8, 4), dtype=np.uint8)
    rgba[2:5, 3:7] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    with pytest.raises(UserError, match="alpha channel") as err:
        read_mask(tmp_path / "cutout.png")
    assert err.value.path == str(tmp_path / "cutout.png")


def test_content_hash_follows_the_data(example):
    def digest():
        return load_triplets(example).content_hash("hug")

    before, wave = digest(), load_triplets(example).content_hash("wave")
    assert before == digest()
    image = example / "hug" / "3" / "reference1.png"
    pixels = np.asarray(Image.open(image)).copy()
    pixels[0, 0] = (0, 0, 0)
    Image.fromarray(pixels).save(image)
    changed = digest()
    assert changed != before
    edit(example, "hug", lambda d: d["samples"][0].update(prompt="A bear is hugging a tiger!"))
    assert digest() not in (before, changed)
    assert load_triplets(example).content_hash("wave") == wave  # another relation's files do not count


def test_keypoint_schemas():
    assert set(KEYPOINT_SCHEMAS) == {"ap10k-17", "coco-17"}
    assert all(len(names) == 17 == len(set(names)) for names in KEYPOINT_SCHEMAS.values())
    assert KEYPOINT_SCHEMAS["ap10k-17"][4] == "tail root" and KEYPOINT_SCHEMAS["coco-17"][0] == "nose"
    a = Keypoints(xy=np.zeros((17, 2)), score=None, schema="coco-17")
    assert a == Keypoints(xy=np.zeros((17, 2), dtype=np.float32), score=None, schema="coco-17")
    assert a != Keypoints(xy=np.zeros((17, 2)), score=np.ones(17), schema="coco-17")


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_check_and_example(tmp_path):
    out = tmp_path / "ex"
    res = run("data", "example-triplets", out)
    assert res.exit_code == 0, res.output
    assert "hug: 5 samples, 10 objects, keypoints ap10k-17" in res.output
    res = run("data", "check", out, "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == ["hug: 5 samples, 10 objects, keypoints ap10k-17",
                                       "wave: 5 samples, 5 objects, keypoints coco-17"]
    res = run("data", "check", out, "--relation", "wave", "--quiet")
    assert res.exit_code == 0 and res.output.splitlines() == ["wave: 5 samples, 5 objects, keypoints coco-17"]

    assert run("data", "example-triplets", out).exit_code == 2  # not empty

    edit(out, "wave", lambda d: d["samples"][0].update(predicate="jumping"))
    (out / "hug" / "0" / "mask1.png").unlink()
    res = run("data", "check", out, "--quiet")
    assert res.exit_code == 2
    lines = res.output.splitlines()
    assert lines[0] == (f"{out / 'hug' / '0' / 'mask1.png'}: sample 0: object 1 (tiger): mask: cannot read the "
                        "image file (No such file or directory)")
    assert lines[1].startswith(f"{out / 'wave' / MANIFEST}: sample 0: predicate 'jumping' is not in the prompt")
    assert "2 problem(s) in the relation triplets" in res.output
    assert run("data", "check", out, "--relation", "nope").exit_code == 2


def test_example_triplets_of_any_relation(tmp_path):
    """Any relation folder name gets a set (what relationbooth's tiny bank trains on): the
    format's check passes, the name's words are the predicate, each name draws its own pose,
    the same name the same files, and a known name RELATIONS' own set."""
    from relationbench.data.example_triplets import example_relation

    found = write_example_triplets(tmp_path / "a", relations=["lean_on", "high-five", "hug"])
    assert sorted(found.relations) == ["high-five", "hug", "lean_on"]
    for s in found.relations["lean_on"]:
        assert s.predicate == "lean on" and "lean on" in s.prompt and s.entities == ("bear", "tiger")
        for o in s.objects:  # every keypoint inside its own object's mask
            mask = np.asarray(Image.open(o.mask)) > 0
            assert all(mask[int(y * SIZE), int(x * SIZE)] for x, y in o.keypoints.xy)
    assert example_relation("hug") is RELATIONS["hug"]
    assert example_relation("lean_on").figures[0].pose != example_relation("high-five").figures[0].pose
    again = write_example_triplets(tmp_path / "b", relations=["lean_on"])
    first, second = found.relations["lean_on"][2], again.relations["lean_on"][2]
    assert first.target.read_bytes() == second.target.read_bytes()
