"""`relbench data import-triplets`: the authors' layout (DreamRelation_Data) into our format.

Each test builds a small tree in their layout (64 px images, .pth files from torch.save),
including a single-object relation, and breaks one thing at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.data.authors import import_authors_triplets
from relationbench.data.triplets import MANIFEST, check_triplets, load_triplets
from relationbench.errors import UserError

SIZE = 64
HAS_SPACY_MODEL = True
try:
    from relationbench.suites import predicate_backend

    predicate_backend("model")
except UserError:
    HAS_SPACY_MODEL = False


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _points(seed: int, n: int) -> torch.Tensor:
    return torch.rand(n, 17, 2, generator=torch.Generator().manual_seed(seed))


def _mask(path: Path, box: tuple[int, int, int, int], size: int = SIZE) -> None:
    """A soft-edged mask: 200 inside box (x0, y0, x1, y1 exclusive), 100 on a 2-pixel ring
    around it (below the authors' 0.5 threshold)."""
    grey = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    grey[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = 100
    grey[y0:y1, x0:x1] = 200
    Image.fromarray(grey).save(path)


def _image(path: Path, colour, size: int = SIZE) -> None:
    Image.new("RGB", (size, size), colour).save(path)


@pytest.fixture
def authors(tmp_path) -> Path:
    """Their layout: `hug` (two objects, one sample without a predicate, one with a list) and
    `jump` (single-object samples, both spellings of the single-object file names)."""
    root = tmp_path / "DreamRelation_Data"
    hug = root / "hug"
    prompts = {
        "0": {"prompt": "A bear is hugging a tiger.", "entities": ["bear", "tiger"], "predicate": "hugging"},
        "1": {"prompt": "A wolf shakes hands with a leopard.", "entities": ["wolf", "leopard"]},
        "2": {"prompt": "A polar bear is shaking hands with a lion.", "entities": ["polar bear", "lion"],
              "predicate": ["shaking", "hands"], "caption": "ignored"},
    }
    for i, sid in enumerate(prompts):
        video, masks = hug / "videos" / sid, hug / "masks" / sid
        video.mkdir(parents=True)
        masks.mkdir(parents=True)
        _image(video / "motion.png", (10 * i, 20, 30))
        _image(video / "concept0.png", (200, 10 * i, 0))
        _image(video / "concept1.png", (0, 10 * i, 200))
        _image(video / "pred.jpg", (1, 2, 3))
        torch.save(_points(10 * i, 2), video / "motion_keyposes.pth")
        torch.save(_points(10 * i + 1, 1), video / "concept_keyposes_one.pth")
        torch.save(_points(10 * i + 2, 1), video / "concept_keyposes_two.pth")
        _mask(masks / "motion0.png", (4, 8, 30, 60))
        _mask(masks / "motion1.png", (34 + i, 6, 62, 50))
    (hug / "prompts.json").write_text(json.dumps(prompts, indent=4))

    jump = root / "jump"
    prompts = {"0": {"prompt": "A dog jumping over a fence.", "entity": "dog", "predicate": "jumping over"},
               "1": {"prompt": "A cat jumping.", "entity": ["cat"], "predicate": "jumping"}}
    for i, sid in enumerate(prompts):
        video, masks = jump / "videos" / sid, jump / "masks" / sid
        video.mkdir(parents=True)
        masks.mkdir(parents=True)
        _image(video / "motion.png", (5, 5, 10 * i))
        _image(video / "concept.png", (9, 9, 10 * i))
        torch.save(_points(100 + i, 1), video / "motion_keyposes.pth")
        # their code reads concept_keyposes.pth and masks/<id>/motion.png; the other spellings too
        torch.save(_points(200 + i, 1), video / ("concept_keyposes.pth" if i == 0 else "concept_keyposes_one.pth"))
        _mask(masks / ("motion.png" if i == 0 else "motion0.png"), (10, 10, 20 + i, 40))
    (jump / "prompts.json").write_text(json.dumps(prompts))
    return root


@pytest.mark.skipif(not HAS_SPACY_MODEL, reason="no spaCy English model installed (pip install -e .[dev])")
def test_import_converts_everything(authors, tmp_path):
    out = tmp_path / "out"
    found = import_authors_triplets(authors, out, quiet=True)
    assert check_triplets(out) == []
    assert load_triplets(out).relations == found.relations  # the returned set is the one on disk
    hug, jump = found.relations["hug"], found.relations["jump"]
    assert [s.id for s in hug] == ["0", "1", "2"] and [s.id for s in jump] == ["0", "1"]

    s0, s1, s2 = hug
    assert (s0.predicate, s0.predicate_source) == ("hugging", None)
    assert s1.predicate == "shakes hands with" and s1.predicate_source.startswith("spacy:")  # extracted, marked
    assert s2.predicate == "shaking hands" and s2.entities == ("polar bear", "lion")  # a list, joined
    for i, s in enumerate(hug):
        video = authors / "hug" / "videos" / s.id
        assert s.target.read_bytes() == (video / "motion.png").read_bytes()
        assert [r.image.read_bytes() for r in s.references] == [(video / f"concept{k}.png").read_bytes()
                                                               for k in range(2)]
        motion = torch.load(video / "motion_keyposes.pth").numpy()
        for k, o in enumerate(s.objects):
            assert o.entity == s.entities[k] and o.keypoints.schema == "ap10k-17" and o.keypoints.score is None
            assert np.array_equal(o.keypoints.xy, motion[k])  # float32, exactly
        for k, name in enumerate(("concept_keyposes_one.pth", "concept_keyposes_two.pth")):
            assert np.array_equal(s.references[k].keypoints.xy, torch.load(video / name).numpy()[0])
        # boxes from the binarized masks: the 200 block only, not the 100 ring
        assert s.objects[0].box == (4 / SIZE, 8 / SIZE, 30 / SIZE, 60 / SIZE)
        assert s.objects[1].box == ((34 + i) / SIZE, 6 / SIZE, 62 / SIZE, 50 / SIZE)
        assert set(np.unique(np.asarray(Image.open(s.objects[0].mask)))) == {0, 255}

    for i, s in enumerate(jump):
        video = authors / "jump" / "videos" / s.id
        assert len(s.entities) == len(s.objects) == len(s.references) == 1
        assert s.references[0].image.read_bytes() == (video / "concept.png").read_bytes()
        name = "concept_keyposes.pth" if i == 0 else "concept_keyposes_one.pth"
        assert np.array_equal(s.references[0].keypoints.xy, torch.load(video / name).numpy()[0])
        assert s.objects[0].box == (10 / SIZE, 10 / SIZE, (20 + i) / SIZE, 40 / SIZE)
    assert jump[0].entities == ("dog",) and jump[0].predicate == "jumping over" and jump[1].entities == ("cat",)
    assert not (out / "hug" / "0" / "pred.jpg").exists()


def test_import_one_relation_and_a_relation_folder(authors, tmp_path):
    found = import_authors_triplets(authors, tmp_path / "a", ["jump"], quiet=True)
    assert list(found.relations) == ["jump"] and [p.name for p in (tmp_path / "a").iterdir()] == ["jump"]
    found = import_authors_triplets(authors / "jump", tmp_path / "b", quiet=True)  # DIR = one relation
    assert list(found.relations) == ["jump"] and len(found.relations["jump"]) == 2


class _Evil:
    """A pickle that runs code when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _break(root: Path, case: str, marker: Path) -> tuple[str, str]:
    """Break one thing; returns (the file to be named, relative to root, and the message start)."""
    hug_video, jump_video = root / "hug" / "videos", root / "jump" / "videos"
    if case == "missing keypoint file":
        (hug_video / "2" / "motion_keyposes.pth").unlink()
        return "hug/videos/2/motion_keyposes.pth", "sample 2: missing the target keypoints file"
    if case == "mask of the wrong size":
        _mask(root / "hug" / "masks" / "1" / "motion1.png", (2, 2, 20, 20), size=32)
        return "hug/masks/1/motion1.png", "sample 1: object 1 (leopard): the mask is 32x32 pixels but its target"
    if case == "entity without a reference":
        (hug_video / "0" / "concept1.png").unlink()
        return "hug/videos/0/concept1.png", "sample 0: missing the reference image of 'tiger'"
    if case == "pth of the wrong shape":
        torch.save(torch.rand(17, 2), hug_video / "0" / "concept_keyposes_two.pth")
        return ("hug/videos/0/concept_keyposes_two.pth",
                "sample 0: the reference keypoints of 'tiger': shape [17, 2], expected [1, 17, 2]")
    if case == "one object too few":
        torch.save(torch.rand(1, 17, 2), hug_video / "1" / "motion_keyposes.pth")
        return "hug/videos/1/motion_keyposes.pth", "sample 1: the target keypoints: shape [1, 17, 2], expected [2, 17, 2]"
    if case == "pth outside [0, 1]":
        torch.save(torch.full((1, 17, 2), 0.5).index_fill_(1, torch.tensor([3]), 1.25), jump_video / "1" / "motion_keyposes.pth")
        return "jump/videos/1/motion_keyposes.pth", "sample 1: the target keypoints: values must be normalized to [0, 1], got 0.5 .. 1.25"
    if case == "pth with NaN":
        torch.save(torch.full((1, 17, 2), float("nan")), jump_video / "0" / "concept_keyposes.pth")
        return "jump/videos/0/concept_keyposes.pth", "sample 0: the reference keypoints of 'dog': values must be normalized to [0, 1], got NaN or inf"
    if case == "integer pth":
        torch.save(torch.zeros(1, 17, 2, dtype=torch.int64), jump_video / "0" / "concept_keyposes.pth")
        return "jump/videos/0/concept_keyposes.pth", "sample 0: the reference keypoints of 'dog': must hold one floating-point tensor, got a torch.int64 tensor"
    if case == "pth with code":
        torch.save(_Evil(marker), hug_video / "2" / "concept_keyposes_one.pth")
        return ("hug/videos/2/concept_keyposes_one.pth",
                "sample 2: the reference keypoints of 'polar bear': holds Python objects other than tensors")
    if case == "pth holding a dict":
        torch.save({"xy": torch.rand(1, 17, 2)}, hug_video / "2" / "concept_keyposes_one.pth")
        return "hug/videos/2/concept_keyposes_one.pth", "sample 2: the reference keypoints of 'polar bear': must hold one floating-point tensor, got a dict"
    if case == "damaged pth":
        (hug_video / "0" / "motion_keyposes.pth").write_bytes(b"PK\x03\x04 cut")
        return "hug/videos/0/motion_keyposes.pth", "sample 0: the target keypoints: not a tensor file"
    if case == "damaged image":
        (jump_video / "1" / "motion.png").write_bytes(b"\x89PNG\r\n")
        return "jump/videos/1/motion.png", "sample 1: target image: not an image PIL can read"
    if case == "empty mask":
        _mask(root / "jump" / "masks" / "0" / "motion.png", (0, 0, 0, 0))  # only the ring, below 128
        return "jump/masks/0/motion.png", "sample 0: object 0 (dog): the mask is empty (all black)"
    prompts = root / "hug" / "prompts.json"
    data = json.loads(prompts.read_text())
    if case == "predicate not in the prompt":
        data["0"]["predicate"] = "kissing"
        message = "sample 0: predicate 'kissing' is not in the prompt"
    elif case == "entity not in the prompt":
        data["2"]["entities"] = ["panda", "lion"]
        message = "sample 2: entity 'panda' is not in the prompt"
    elif case == "folder without a record":
        del data["1"]
        prompts.write_text(json.dumps(data))
        return "hug/videos/1", "sample folder without a record in prompts.json"
    elif case == "entity and entities":
        data["0"]["entity"] = "bear"
        message = "sample 0: has both 'entity' and 'entities'"
    else:
        raise AssertionError(case)
    prompts.write_text(json.dumps(data))
    return "hug/prompts.json", message


CASES = ["missing keypoint file", "mask of the wrong size", "entity without a reference", "pth of the wrong shape",
         "one object too few", "pth outside [0, 1]", "pth with NaN", "integer pth", "pth with code",
         "pth holding a dict", "damaged pth", "damaged image", "empty mask", "predicate not in the prompt",
         "entity not in the prompt", "folder without a record", "entity and entities"]


@pytest.mark.skipif(not HAS_SPACY_MODEL, reason="no spaCy English model installed (pip install -e .[dev])")
@pytest.mark.parametrize("case", CASES)
def test_each_source_problem_is_named_and_nothing_written(authors, tmp_path, case):
    marker = tmp_path / "code-ran"
    file, message = _break(authors, case, marker)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        import_authors_triplets(authors, out, quiet=True)
    lines = err.value.message.splitlines()
    assert lines[0] == "1 problem(s) in the relation triplets:", err.value.message
    assert lines[1].startswith(f"  {authors / file}: {message}"), lines[1]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["DreamRelation_Data"]
    assert not marker.exists()


@pytest.mark.skipif(not HAS_SPACY_MODEL, reason="no spaCy English model installed (pip install -e .[dev])")
def test_all_source_problems_at_once(authors, tmp_path):
    cases = ["missing keypoint file", "mask of the wrong size", "entity without a reference", "pth with NaN",
             "damaged image"]
    expected = [_break(authors, case, tmp_path / "marker") for case in cases]
    with pytest.raises(UserError) as err:
        import_authors_triplets(authors, tmp_path / "out", quiet=True)
    text = err.value.message
    assert text.startswith(f"{len(cases)} problem(s)")
    for file, message in expected:
        assert f"  {authors / file}: {message}" in text
    assert not (tmp_path / "out").exists()


def test_refusals(authors, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("")
    with pytest.raises(UserError, match="not an empty folder"):
        import_authors_triplets(authors, out, ["jump"], quiet=True)
    with pytest.raises(UserError, match="no such folder"):
        import_authors_triplets(tmp_path / "nothing", tmp_path / "o2", quiet=True)
    with pytest.raises(UserError, match="unknown keypoint schema"):
        import_authors_triplets(authors, tmp_path / "o2", schema="horse", quiet=True)
    with pytest.raises(UserError) as err:
        import_authors_triplets(authors, tmp_path / "o2", ["ride"], quiet=True)
    assert f"{authors / 'ride'}: no relation 'ride' here (found: hug, jump)" in err.value.message
    (authors / "notes").mkdir()
    with pytest.raises(UserError) as err:
        import_authors_triplets(authors, tmp_path / "o2", quiet=True)
    assert f"{authors / 'notes'}: no prompts.json: not a relation folder" in err.value.message
    assert not (tmp_path / "o2").exists()


@pytest.mark.skipif(not HAS_SPACY_MODEL, reason="no spaCy English model installed (pip install -e .[dev])")
def test_cli_import_triplets(authors, tmp_path):
    out = tmp_path / "out"
    res = run("data", "import-triplets", authors, out, "--quiet")
    assert res.exit_code == 0, res.output
    assert "hug: 3 samples, 6 objects, keypoints ap10k-17" in res.output
    assert "1 predicate(s) were extracted" in res.output
    assert json.loads((out / "hug" / MANIFEST).read_text())["samples"][1]["predicate_source"].startswith("spacy:")
    assert run("data", "check", out, "--quiet").exit_code == 0
    assert run("data", "import-triplets", authors, out, "--quiet").exit_code == 2  # OUT not empty

    (authors / "jump" / "videos" / "1" / "concept_keyposes_one.pth").unlink()
    res = run("data", "import-triplets", authors, tmp_path / "again", "--quiet")
    assert res.exit_code == 2
    assert f"{authors / 'jump' / 'videos' / '1' / 'concept_keyposes.pth'}: sample 1: missing" in res.output
    assert not (tmp_path / "again").exists()
