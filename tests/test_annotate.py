"""`relbench data annotate`: the pipeline around the annotators, with a plugin whose outputs are
known (rectangles on synthetic images: every mask, box and keypoint is known), checked file by
file; the rules that set samples aside; raw.json's checks; the tiny models end to end."""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.data import annotators as ann
from relationbench.data.annotate import SetAside, annotate_raw, read_raw
from relationbench.data.annotators import (KEYPOINT_GROUP, MASK_GROUP, AnnotateSettings, Annotators, Detection,
                                           load_annotators)
from relationbench.data.triplets import Keypoints, keypoints_record, load_triplets
from relationbench.errors import UserError

W, H = 64, 48
BACKGROUND = (200, 200, 200)
COLOURS = {"bear": (120, 70, 40), "tiger": (240, 140, 30), "person": (40, 90, 200)}

# ---- the known plugin: each image's detections are registered when the test draws it ----

KNOWN: dict[str, dict[str, list[tuple[float, tuple[int, int, int, int]]]]] = {}  # image hash -> label -> (score, rect)


def _key(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()


def rect_mask(rect: tuple[int, int, int, int]) -> np.ndarray:
    """bool [H, W], True on columns c0..c1-1 and rows r0..r1-1 of rect = (c0, r0, c1, r1)."""
    mask = np.zeros((H, W), bool)
    mask[rect[1]:rect[3], rect[0]:rect[2]] = True
    return mask


def rect_box(rect) -> tuple[float, float, float, float]:
    return (rect[0] / W, rect[1] / H, rect[2] / W, rect[3] / H)


def known_points(box, label: str) -> Keypoints:
    """17 points on the box's diagonal, scores 0, 1/16, ..., 1; people in COCO order."""
    t = (np.arange(17) + 0.5) / 17
    xy = np.stack([box[0] + (box[2] - box[0]) * t, box[1] + (box[3] - box[1]) * t], axis=1)
    return Keypoints(xy=xy, score=np.arange(17) / 16, schema="coco-17" if label == "person" else "ap10k-17")


class KnownMasks:
    name = "known-masks"

    def detect(self, image, labels):
        found = KNOWN[_key(image)]
        return [[Detection(rect_box(r), s, rect_mask(r)) for s, r in sorted(found.get(label, []), reverse=True)]
                for label in labels]


class KnownKeypoints:
    name = "known-keypoints"

    def keypoints(self, image, boxes, labels):
        return [known_points(box, label) for box, label in zip(boxes, labels)]


class KnownCaptioner:
    name = "known-captioner"

    def caption(self, image):
        return f"an image of {image.size[0]}x{image.size[1]} pixels"


def known_masks(backbone, settings, device):
    return KnownMasks()


def known_keypoints(backbone, settings, device):
    return KnownKeypoints()


def draw(path: Path, objects: list[tuple[str, float, tuple[int, int, int, int]]], salt: int) -> np.ndarray:
    """An image with a rectangle per object in its label's colour (salt: a corner pixel, so that
    every image differs), registered with its known detections; its pixels."""
    pixels = np.full((H, W, 3), BACKGROUND, np.uint8)
    pixels[0, 0] = (salt, salt, salt)
    found: dict[str, list] = {}
    for label, score, rect in objects:
        pixels[rect[1]:rect[3], rect[0]:rect[2]] = COLOURS.get(label, (0, 0, 0))
        found.setdefault(label, []).append((score, rect))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    KNOWN[_key(Image.fromarray(pixels))] = found
    return pixels


BEAR, TIGER = (4, 8, 28, 44), (34, 6, 60, 40)  # c0, r0, c1, r1


def _sample(raw: Path, i: int, id: str, relation: str, prompt: str, entities: list[str], predicate: str,
            target: list, references: list[list] | None) -> dict:
    record = {"id": id, "relation": relation, "prompt": prompt, "entities": entities, "predicate": predicate,
              "target": f"{id}/x.png"}
    draw(raw / record["target"], target, salt=2 * i)
    if references is not None:
        record["references"] = [f"{id}/ref{k}.png" for k in range(len(references))]
        for k, objects in enumerate(references):
            draw(raw / record["references"][k], objects, salt=2 * i + 1 + 100 * (k + 1))
    return record


def bear_ref():
    return [("bear", 0.9, (20, 10, 44, 40))]


def tiger_ref():
    return [("tiger", 0.8, (16, 4, 50, 44))]


SAMPLES = [  # id, relation, prompt, entities, predicate, target objects, references (None: none given)
    # kept: a duplicate of the bear (same mask, lower score) merges into it; the tiger's second
    # object scores 0.35 < 0.5 x 0.9 (not an extra)
    ("good", "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging",
     [("bear", 0.9, BEAR), ("bear", 0.6, BEAR), ("tiger", 0.9, TIGER), ("tiger", 0.35, (40, 42, 50, 48))],
     [bear_ref(), tiger_ref()]),
    # kept: two bears go to the entities left to right, whatever their scores
    ("two-bears", "hug", "A bear is hugging a bear.", ["bear", "bear"], "hugging",
     [("bear", 0.7, BEAR), ("bear", 0.95, TIGER)], [bear_ref(), bear_ref()]),
    ("missing", "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging",
     [("bear", 0.9, BEAR), ("tiger", 0.2, TIGER)], [bear_ref(), tiger_ref()]),  # 0.2 < threshold 0.3
    ("extra", "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging",
     [("bear", 0.9, BEAR), ("bear", 0.8, (30, 40, 40, 48)), ("tiger", 0.9, TIGER)], [bear_ref(), tiger_ref()]),
    ("one-object", "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging",
     [("bear", 0.9, BEAR), ("tiger", 0.7, BEAR)], [bear_ref(), tiger_ref()]),
    ("no-refs", "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging",
     [("bear", 0.9, BEAR), ("tiger", 0.9, TIGER)], None),
    ("ref-missing", "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging",
     [("bear", 0.9, BEAR), ("tiger", 0.9, TIGER)], [bear_ref(), []]),
    ("wave-0", "wave", "A person waving.", ["person"], "waving",
     [("person", 0.8, (20, 2, 44, 46))], [[("person", 0.9, (10, 5, 30, 45))]]),
]
SET_ASIDE = [("missing", "missing"), ("extra", "extra"), ("one-object", "same-object"), ("no-refs", "no-references"),
             ("ref-missing", "missing")]


@pytest.fixture
def raw(tmp_path) -> Path:
    raw = tmp_path / "raw"
    records = [_sample(raw, i, *s) for i, s in enumerate(SAMPLES)]
    (raw / "raw.json").write_text(json.dumps({"version": 1, "samples": records}))
    return raw


def known_annotators(captions: bool = False) -> Annotators:
    return Annotators(KnownMasks(), KnownKeypoints(), KnownCaptioner() if captions else None)


def _expected_record(raw: Path, spec) -> dict:
    """The manifest record the pipeline must write for a kept sample, built from the known
    objects (the best object per entity; two of one label left to right)."""
    id, _, prompt, entities, predicate, target, references = spec
    rects: dict[str, list] = {}
    for label, score, rect in sorted(target, key=lambda o: -o[1]):
        if rect not in rects.setdefault(label, []):
            rects[label].append(rect)
    picked = {label: sorted(r[:entities.count(label)]) for label, r in rects.items()}
    objects = [picked[e].pop(0) for e in entities]
    return {"id": id, "prompt": prompt, "entities": entities, "predicate": predicate, "target": f"{id}/target.png",
            "objects": [{"mask": f"{id}/mask{k}.png", "keypoints": _points(rect, e)}
                        for k, (rect, e) in enumerate(zip(objects, entities))],
            "references": [{"image": f"{id}/reference{k}.png", "keypoints": _points(ref[0][2], e)}
                           for k, (ref, e) in enumerate(zip(references, entities))]}


def _points(rect, label) -> dict:
    p = known_points(rect_box(rect), label)
    return keypoints_record(p.xy, p.schema, p.score)


def test_known_annotations_are_written_exactly(raw, tmp_path):
    out = tmp_path / "out"
    report = annotate_raw(raw, out, annotators=known_annotators(), settings=AnnotateSettings(), progress=False)

    assert [(k["relation"], k["id"]) for k in report.kept] == [("hug", "good"), ("hug", "two-bears"),
                                                                ("wave", "wave-0")]
    by_id = {s[0]: s for s in SAMPLES}
    for relation, ids in (("hug", ["good", "two-bears"]), ("wave", ["wave-0"])):
        manifest = json.loads((out / relation / "triplets.json").read_text())
        assert manifest == {"format": "relationbench-triplets", "version": 1,
                            "samples": [_expected_record(raw, by_id[i]) for i in ids]}
    # every image and mask, pixel for pixel
    for relation, id in (("hug", "good"), ("hug", "two-bears"), ("wave", "wave-0")):
        folder, record = out / relation / id, _expected_record(raw, by_id[id])
        assert np.array_equal(np.asarray(Image.open(folder / "target.png")),
                              np.asarray(Image.open(raw / id / "x.png")))
        for k, ref in enumerate(record["references"]):
            assert np.array_equal(np.asarray(Image.open(out / relation / ref["image"])),
                                  np.asarray(Image.open(raw / id / f"ref{k}.png")))
    good = _expected_record(raw, by_id["good"])
    assert [o["mask"] for o in good["objects"]] == ["good/mask0.png", "good/mask1.png"]
    for k, rect in enumerate((BEAR, TIGER)):
        mask = np.asarray(Image.open(out / "hug" / "good" / f"mask{k}.png"))
        assert mask.dtype == np.uint8 and np.array_equal(mask, rect_mask(rect).astype(np.uint8) * 255)
    # two bears: the left one (BEAR, 0.7) is entity 0 though the right one scored 0.95
    assert np.array_equal(np.asarray(Image.open(out / "hug" / "two-bears" / "mask0.png")) > 0, rect_mask(BEAR))
    assert np.array_equal(np.asarray(Image.open(out / "hug" / "two-bears" / "mask1.png")) > 0, rect_mask(TIGER))

    # the loaded set: boxes are the masks' boxes, keypoints the known ones
    found = load_triplets(out)
    [good_sample, _] = found.relations["hug"]
    assert [o.box for o in good_sample.objects] == [rect_box(BEAR), rect_box(TIGER)]
    assert good_sample.objects[0].keypoints == Keypoints(
        xy=np.array(good["objects"][0]["keypoints"]["xy"]), score=np.arange(17) / 16, schema="ap10k-17")
    assert found.relations["wave"][0].objects[0].keypoints.schema == "coco-17"

    # the report: exactly the bad samples, with their reasons
    assert [(s.id, s.kind) for s in report.set_aside] == SET_ASIDE
    reasons = {s.id: s.reason for s in report.set_aside}
    assert reasons["missing"].startswith("target: 'tiger' found 0 time(s)")
    assert "target: 2 'bear' objects found for 1 named" in reasons["extra"]
    assert "'bear' and 'tiger' were found on one object (mask IoU 1.00)" in reasons["one-object"]
    assert reasons["no-refs"] == "no reference images (the triplet format needs one per entity)"
    assert reasons["ref-missing"].startswith("reference 1: 'tiger' found 0 time(s)")
    saved = json.loads((out / "annotate-report.json").read_text())
    assert [SetAside(**s) for s in saved["set_aside"]] == report.set_aside
    assert saved["annotators"] == {"masks": "known-masks", "keypoints": "known-keypoints", "captioner": None}
    assert saved["settings"]["threshold"] == 0.3 and saved["random_weights"] is False
    assert [k["id"] for k in saved["kept"]] == ["good", "two-bears", "wave-0"]
    assert saved["kept"][0]["objects"][0] == {"entity": "bear", "score": 0.9, "box": [0.0625, 0.1667, 0.4375, 0.9167],
                                              "schema": "ap10k-17"}
    markdown = (out / "annotate-report.md").read_text()
    assert all(f"| {id} | {kind} |" in markdown for id, kind in SET_ASIDE)
    assert sorted(p.name for p in out.iterdir()) == ["annotate-report.json", "annotate-report.md", "hug", "wave"]
    assert sorted(p.name for p in (out / "hug").iterdir()) == ["good", "triplets.json", "two-bears"]


def test_rule_settings_change_the_verdicts(raw, tmp_path):
    # extra_ratio 0.95: the 0.8 bear is no extra (0.8 < 0.95 x 0.9); same_object_iou 1.1 (> 1: off): one box
    # for both is kept; threshold 0.1: the 0.2 tiger is found
    report = annotate_raw(raw, tmp_path / "out", annotators=known_annotators(), progress=False,
                          settings=AnnotateSettings(extra_ratio=0.95, same_object_iou=1.1, threshold=0.1))
    assert [(s.id, s.kind) for s in report.set_aside] == [("no-refs", "no-references"), ("ref-missing", "missing")]


def test_random_weight_masks_turn_the_comparing_rules_off(raw, tmp_path):
    class RandomMasks(KnownMasks):
        random_weights = True

    out = tmp_path / "out"
    report = annotate_raw(raw, out, annotators=Annotators(RandomMasks(), KnownKeypoints()),
                          settings=AnnotateSettings(), progress=False)
    # extra and one-object are kept; the threshold and the missing references still set samples aside
    assert [(s.id, s.kind) for s in report.set_aside] == [("missing", "missing"), ("no-refs", "no-references"),
                                                          ("ref-missing", "missing")]
    assert [k["id"] for k in report.kept] == ["good", "two-bears", "extra", "one-object", "wave-0"]
    assert [o["score"] for o in report.kept[2]["objects"]] == [0.9, 0.9]  # the best bear, not the 0.8 one
    assert json.loads((out / "annotate-report.json").read_text())["random_weights"] is True
    assert report.summary()[-1].startswith("random-weight annotators (tiny backbone)")


class SchemaFlip(KnownKeypoints):
    """The known points, in the people's schema after the first call (a sample's target)."""

    def __init__(self):
        self.calls = 0

    def keypoints(self, image, boxes, labels):
        self.calls += 1
        found = super().keypoints(image, boxes, labels)
        return found if self.calls == 1 else [Keypoints(k.xy, k.score, "coco-17") for k in found]


def test_empty_masks_and_schema_mismatches_are_set_aside(tmp_path):
    def one(name: str, i: int, target: list) -> Path:
        raw = tmp_path / name
        record = _sample(raw, i, name, "hug", "A bear is hugging a tiger.", ["bear", "tiger"], "hugging", target,
                         [bear_ref(), tiger_ref()])
        (raw / "raw.json").write_text(json.dumps({"version": 1, "samples": [record]}))
        return raw

    empty = one("empty", 20, [("bear", 0.9, (10, 10, 10, 30)), ("tiger", 0.9, TIGER)])  # a zero-width bear
    report = annotate_raw(empty, tmp_path / "out-empty", annotators=known_annotators(), settings=AnnotateSettings(),
                          progress=False)
    assert report.kept == [] and report.set_aside == [
        SetAside("empty", "hug", "empty-mask", "target: the mask of 'bear' is empty")]

    flip = one("flip", 21, [("bear", 0.9, BEAR), ("tiger", 0.9, TIGER)])
    report = annotate_raw(flip, tmp_path / "out-flip", annotators=Annotators(KnownMasks(), SchemaFlip()),
                          settings=AnnotateSettings(), progress=False)
    assert report.kept == [] and report.set_aside == [
        SetAside("flip", "hug", "schema-mismatch", "'bear' got keypoint schema ap10k-17 in the target but coco-17 "
                                                   "in reference 0")]


def test_captions_are_written_per_relation(raw, tmp_path):
    out = tmp_path / "out"
    annotate_raw(raw, out, annotators=known_annotators(captions=True), settings=AnnotateSettings(caption=True),
                 progress=False)
    caption = f"an image of {W}x{H} pixels"
    assert json.loads((out / "wave" / "captions.json").read_text()) == {
        "wave-0": {"target": caption, "references": [caption]}}
    assert set(json.loads((out / "hug" / "captions.json").read_text())) == {"good", "two-bears"}


def test_malformed_plugin_output_writes_nothing(raw, tmp_path):
    class WrongSize(KnownMasks):
        def detect(self, image, labels):
            return [[Detection(d.box, d.score, d.mask[:10]) for d in per] for per in super().detect(image, labels)]

    out = tmp_path / "out"
    with pytest.raises(UserError, match="mask annotator known-masks did not return"):
        annotate_raw(raw, out, annotators=Annotators(WrongSize(), KnownKeypoints()), settings=AnnotateSettings(),
                     progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_a_non_empty_out_is_refused(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        annotate_raw(raw, out, annotators=known_annotators(), settings=AnnotateSettings(), progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_raw_json_problems_are_listed_together(tmp_path):
    raw = tmp_path / "raw"
    draw(raw / "x.png", [], salt=1)
    good = {"id": "a", "relation": "hug", "prompt": "A bear hugging a tiger.", "entities": ["bear", "tiger"],
            "predicate": "hugging", "target": "x.png"}
    samples = [
        good,
        dict(good, extra="?"),  # an unknown field; the id is used twice
        dict(good, id="b", entities=["bear", "lion"]),
        dict(good, id="c", predicate="kissing", target="../x.png"),
        dict(good, id="d", relation="hug/2", references=["x.png"]),
        {k: v for k, v in good.items() if k != "prompt"} | {"id": "e", "references": ["x.png", "nope.png"]},
    ]
    (raw / "raw.json").write_text(json.dumps({"version": 1, "samples": samples}))
    with pytest.raises(UserError) as err:
        read_raw(raw)
    message = err.value.message
    for needed in ("sample a: unknown field 'extra'", "sample a: the id is used twice",
                   "sample b: entity 'lion' is not in the prompt", "sample c: predicate 'kissing' is not in the prompt",
                   "sample c: target '../x.png' must be a file path relative to the RAW folder",
                   "sample d: relation 'hug/2' must be", "sample d: 1 references for 2 entities",
                   "sample e: missing field 'prompt'"):
        assert needed in message, needed
    assert message.startswith("8 problem(s)") and err.value.path == str(raw / "raw.json")
    (raw / "raw.json").write_text(json.dumps({"version": 1, "samples": [dict(good, references=["x.png", "no.png"])]}))
    with pytest.raises(UserError, match="reference 1 'no.png': no such file"):
        read_raw(raw)


# ---- the command ----


@pytest.fixture
def known_plugins(monkeypatch):
    real = ann.entry_points
    extra = {MASK_GROUP: [EntryPoint("known", f"{__name__}:known_masks", MASK_GROUP)],
             KEYPOINT_GROUP: [EntryPoint("known", f"{__name__}:known_keypoints", KEYPOINT_GROUP)]}
    monkeypatch.setattr(ann, "entry_points", lambda *, group: list(real(group=group)) + extra.get(group, []))


def _annotate_cli(raw, out):
    return CliRunner().invoke(cli, ["data", "annotate", str(raw), str(out), "--backbone", "tiny", "--quiet",
                                    "--mask-annotator", "known", "--keypoint-annotator", "known", "--device", "cpu"])


def test_cli_summarizes_and_exits_0_when_a_sample_is_kept(raw, tmp_path, known_plugins):
    result = _annotate_cli(raw, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "hug: 2 kept, 5 set aside" in result.output and "wave: 1 kept, 0 set aside" in result.output
    assert "set aside hug/one-object (same-object): target: 'bear' and 'tiger' were found on one object" \
        in result.output


def test_cli_exits_2_when_nothing_is_kept(tmp_path, known_plugins):
    raw = tmp_path / "raw"
    records = [_sample(raw, 0, *SAMPLES[5])]  # no references
    (raw / "raw.json").write_text(json.dumps({"version": 1, "samples": records}))
    result = _annotate_cli(raw, tmp_path / "out")
    assert result.exit_code == 2
    assert "set aside hug/no-refs (no-references)" in result.output
    assert "no sample was kept (1 set aside, reasons above)" in result.output
    assert (tmp_path / "out" / "annotate-report.md").is_file()


# ---- the tiny models end to end ----


def test_tiny_annotators_end_to_end(tmp_path, one_thread):
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    for name in ("x0", "x1", "r0", "r1", "r2"):
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(raw / f"{name}.png")
    samples = [{"id": "0", "relation": "hug", "prompt": "A bear is hugging a tiger.", "entities": ["bear", "tiger"],
                "predicate": "hugging", "target": "x0.png", "references": ["r0.png", "r1.png"]},
               {"id": "1", "relation": "wave", "prompt": "A man waving.", "entities": ["man"], "predicate": "waving",
                "target": "x1.png", "references": ["r2.png"]}]
    (raw / "raw.json").write_text(json.dumps({"version": 1, "samples": samples}))
    out = tmp_path / "out"
    annotators = load_annotators(get_backbone("tiny"), AnnotateSettings())
    report = annotate_raw(raw, out, annotators=annotators, settings=AnnotateSettings(), progress=False)
    assert report.random_weights and not report.set_aside  # random scores: the comparing rules are off
    found = load_triplets(out)  # raises when the check finds any problem
    [hug], [wave] = found.relations["hug"], found.relations["wave"]
    assert [o.keypoints.schema for o in hug.objects] == ["ap10k-17", "ap10k-17"]
    assert [r.keypoints.schema for r in hug.references] == ["ap10k-17", "ap10k-17"]
    assert wave.objects[0].keypoints.schema == "coco-17" and wave.objects[0].mask.is_file()
    assert json.loads((out / "annotate-report.json").read_text())["annotators"]["keypoints"].startswith(
        "vitpose-plus:person=tiny:vitpose-plus-coco-17-seed0@expert0/coco-17")
