"""`relbench data synthesize`: relation prompts and predicates by hand; on the tiny backbone with
a mask annotator whose detections are known, the padded square crop of each entity's box is
what MS-Diffusion is conditioned on, every file is written (raw.json, synthesis.json, images),
a sample whose entity is not found is set aside, the target is reproduced from its recorded
prompt and seed; user mistakes stop before any model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.cli import cli
from relationbench.data.annotators import AnnotateSettings, Detection
from relationbench.data.synthesize import (SynthesizeSettings, MSDiffusionReferences, SDXLGenerator, ing_form,
                                           relation_predicate, relation_prompts, relation_spec, square_crop,
                                           synthesize_raw)
from relationbench.errors import UserError
from relationbench.methods import Context, default_registry
from relationbench.methods.base import Request
from relationbench.methods.msdiffusion.method import MSDiffusionMethod
from relationbench.suites.model import Case

pytestmark = pytest.mark.usefixtures("one_thread")

BOXES = {"bear": (0.1, 0.2, 0.4, 0.7), "tiger": (0.55, 0.3, 0.9, 0.8)}
# By hand, 128 px, padding 0.1 of the longer side on each side:
# bear: x 12.8-51.2, y 25.6-89.6; side round(64 x 1.2) = 77; left round((12.8 + 51.2 - 77) / 2) = -6 -> 0,
#       top round((25.6 + 89.6 - 77) / 2) = round(19.1) = 19
# tiger: x 70.4-115.2, y 38.4-102.4; side 77; left round(54.3) = 54 -> 128 - 77 = 51; top round(31.9) = 32
CROPS = {"bear": (0, 19, 77, 96), "tiger": (51, 32, 128, 109)}


def relbench(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


class FixedMasks:
    """A mask annotator with known detections: each label's BOXES box (its mask the box's
    pixels), score 0.9; in the images listed in `without_tiger` (by call order), no tiger."""

    name = "fixed"

    def __init__(self, without_tiger=()):
        self.calls, self.without_tiger = 0, set(without_tiger)

    def detect(self, image, labels):
        width, height = image.size
        found = []
        for label in labels:
            if label == "tiger" and self.calls in self.without_tiger:
                found.append([])
                continue
            x0, y0, x1, y1 = BOXES[label]
            mask = np.zeros((height, width), bool)
            mask[round(y0 * height):round(y1 * height), round(x0 * width):round(x1 * width)] = True
            found.append([Detection(BOXES[label], 0.9, mask)])
        self.calls += 1
        return found


# -- prompts, predicates, crops by hand ----------------------------------------------------------


@pytest.mark.parametrize("verb, expected", [
    ("hug", "hugging"), ("ride", "riding"), ("lie", "lying"), ("see", "seeing"), ("play", "playing"),
    ("kiss", "kissing"), ("feed", "feeding"), ("sit", "sitting"), ("box", "boxing"), ("high-five", "high-fiving"),
    ("swim", "swimming"), ("hugging", "hugging"), ("visit", "visiting"),
])
def test_ing_form(verb, expected):
    assert ing_form(verb) == expected


def test_relation_predicate_and_prompts():
    assert relation_predicate("shake_hands") == "shaking hands"
    assert relation_predicate("play_with") == "playing with"
    spec = relation_spec("hug", " bear , tiger ")
    assert (spec.entities, spec.predicate) == (("bear", "tiger"), "hugging")
    assert relation_prompts(spec, 3, ("in the snow", "on a beach")) == [
        "A photo of a bear hugging a tiger in the snow.", "A photo of a bear hugging a tiger on a beach.",
        "A photo of a bear hugging a tiger in the snow."]
    wave = relation_spec("wave", "person")
    assert relation_prompts(wave, 1, ("in a park",)) == ["A photo of a person waving in a park."]
    otter = relation_spec("shake_hands", ["otter", "elephant"], predicate="shaking hands with")
    assert relation_prompts(otter, 1, ("at home",)) == ["A photo of an otter shaking hands with an elephant at home."]


@pytest.mark.parametrize("entities", ["", "bear,", ",", "bear,tiger,lion", "bear,,tiger", "bear1"])
def test_bad_entities_are_refused(entities):
    with pytest.raises(UserError, match="entit"):
        relation_spec("hug", entities)


def test_bad_relation_and_predicate_are_refused():
    with pytest.raises(UserError, match="--relation"):
        relation_spec("../hug", "bear")
    with pytest.raises(UserError, match="--predicate"):
        relation_spec("hug", "bear,tiger", predicate="hugging!")
    assert relation_spec("hug", "bear", predicate=" shaking  hands with ").predicate == "shaking hands with"


def test_square_crop():
    assert square_crop(BOXES["bear"], (128, 128), 0.1) == CROPS["bear"]
    assert square_crop(BOXES["tiger"], (128, 128), 0.1) == CROPS["tiger"]
    # 200 x 100 image, centred box 40 x 20 px: side 40 x 1.5 = 60, centred at (100, 50)
    assert square_crop((0.4, 0.4, 0.6, 0.6), (200, 100), 0.25) == (70, 20, 130, 80)
    # a box larger than the image's shorter side: the side is the shorter side, shifted inside
    assert square_crop((0.0, 0.0, 1.0, 1.0), (200, 100), 0.1) == (50, 0, 150, 100)
    assert square_crop((0.95, 0.95, 1.0, 1.0), (100, 100), 0.0) == (95, 95, 100, 100)


# -- synthesize_raw on the tiny backbone ---------------------------------------------------------


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """Three samples, the second with no tiger found; MS-Diffusion's inputs and outputs seen."""
    root = tmp_path_factory.mktemp("synth") / "raw"
    root.mkdir()
    seen = []
    generate = MSDiffusionMethod.generate

    def spy(self, requests):
        samples = generate(self, requests)
        for r, s in zip(requests, samples):
            crop = np.asarray(Image.open(self.reference(r.case.subjects[0])).convert("RGB"))
            seen.append({"key": r.case.id, "prompt": r.case.prompt, "boxes": r.case.boxes, "seed": r.seed,
                         "entity": r.case.subjects[0].class_noun, "crop": crop, "image": np.asarray(s.image)})
        return samples

    context = Context(backbone=get_backbone("tiny"), device="cpu", dtype=torch.float32, data_root=root, quiet=True)
    settings = SynthesizeSettings(samples=3, seed=5)
    references = MSDiffusionReferences(context, settings.reference_card, settings.reference_box)
    threads = torch.get_num_threads()  # one thread, as the one_thread fixture (function-scoped) gives
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(MSDiffusionMethod, "generate", spy)
            result = synthesize_raw(root, relation_spec("hug", "bear,tiger"), settings,
                                    generator=SDXLGenerator(context), references=references,
                                    masks=FixedMasks(without_tiger={1}), rules=AnnotateSettings(), size=(128, 128),
                                    record={"note": "test"}, progress=False)
    finally:
        references.close()
        torch.set_num_threads(threads)
    return root, result, seen, context


def test_every_file_and_raw_json(synthesized):
    root, result, _, _ = synthesized
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == ["0/reference0.png", "0/reference1.png", "0/target.png", "1/target.png",  # 1: set aside
                     "2/reference0.png", "2/reference1.png", "2/target.png",
                     "crops/0-0/crop.png", "crops/0-1/crop.png", "crops/2-0/crop.png", "crops/2-1/crop.png",
                     "raw.json", "synthesis.json"]
    raw = json.loads((root / "raw.json").read_text())
    assert raw == {"version": 1, "samples": [
        {"id": i, "relation": "hug", "prompt": prompt, "entities": ["bear", "tiger"], "predicate": "hugging",
         "target": f"{i}/target.png", "references": [f"{i}/reference0.png", f"{i}/reference1.png"]}
        for i, prompt in (("0", "A photo of a bear hugging a tiger in a forest."),
                          ("2", "A photo of a bear hugging a tiger in the snow."))]}
    assert result.set_aside == [("1", "target: 'tiger' found 0 time(s) scoring at least 0.3, named 1 time(s)")]
    for path in files:
        if path.endswith(".png"):
            assert Image.open(root / path).mode == "RGB"


def test_synthesis_json_records_how(synthesized):
    root, _, _, _ = synthesized
    info = json.loads((root / "synthesis.json").read_text())
    assert (info["relation"], info["entities"], info["predicate"]) == ("hug", ["bear", "tiger"], "hugging")
    assert info["note"] == "test" and info["size"] == [128, 128] and info["entity_threshold"] == 0.3
    assert info["settings"]["samples"] == 3 and info["settings"]["seed"] == 5
    assert info["generator"]["name"] == "sdxl" and info["generator"]["card"]["name"] == "sdxl"
    assert info["generator"]["card"]["settings"]["steps"] == 30
    assert info["references"]["card"]["name"] == "msdiffusion" and info["references"]["box"] == [0.15, 0.1, 0.85, 0.9]
    assert [(s["id"], s["seed"]) for s in info["samples"]] == [("0", 5), ("1", 6), ("2", 7)]
    assert info["samples"][1]["set_aside"] == "target: 'tiger' found 0 time(s) scoring at least 0.3, named 1 time(s)"
    assert "crops" not in info["samples"][1]
    assert info["set_aside"] == [
        {"id": "1", "reason": "target: 'tiger' found 0 time(s) scoring at least 0.3, named 1 time(s)"}]
    for sample in (info["samples"][0], info["samples"][2]):
        assert [(c["entity"], tuple(c["pixels"]), c["box"], c["score"]) for c in sample["crops"]] == [
            ("bear", CROPS["bear"], list(BOXES["bear"]), 0.9), ("tiger", CROPS["tiger"], list(BOXES["tiger"]), 0.9)]
        assert sample["reference_prompts"] == [
            "The photo of the same bear, standing alone, full body, plain background.",
            "The photo of the same tiger, standing alone, full body, plain background."]


def test_references_come_from_the_crops(synthesized):
    root, _, seen, _ = synthesized
    assert [s["key"] for s in seen] == ["0-0", "0-1", "2-0", "2-1"]
    for s in seen:
        sample_id, k = s["key"].split("-")
        entity = ("bear", "tiger")[int(k)]
        target = Image.open(root / sample_id / "target.png")
        crop = np.asarray(target.crop(CROPS[entity]))
        assert crop.shape == (77, 77, 3)
        assert np.array_equal(np.asarray(Image.open(root / "crops" / s["key"] / "crop.png")), crop)
        assert np.array_equal(s["crop"], crop)  # what MS-Diffusion was conditioned on
        assert s["entity"] == entity and s["seed"] == 5 + int(sample_id)
        assert s["prompt"] == f"The photo of the same {entity}, standing alone, full body, plain background."
        assert s["boxes"] == ((0.15, 0.1, 0.85, 0.9),)
        assert np.array_equal(np.asarray(Image.open(root / sample_id / f"reference{k}.png")), s["image"])


def test_target_is_reproduced_from_its_prompt_and_seed(synthesized):
    root, _, _, context = synthesized
    info = json.loads((root / "synthesis.json").read_text())
    sample = info["samples"][2]
    method = default_registry().card("sdxl").with_settings({"height": 128, "width": 128}).build(context)
    case = Case(id="again", suite="x", kind="single", subjects=(), prompt=sample["prompt"], predicate=None, boxes=(),
                seed=sample["seed"])
    (again,) = method.generate([Request(case, 0, sample["seed"])])
    assert np.array_equal(np.asarray(again.image), np.asarray(Image.open(root / "2" / "target.png")))


# -- the command: mistakes stop before any model loads --------------------------------------------


@pytest.mark.parametrize("entities, message", [("", "--entities"), ("bear,tiger,lion", "--entities")])
def test_cli_refuses_bad_entities(tmp_path, entities, message):
    result = relbench("data", "synthesize", tmp_path / "out", "--relation", "hug", "--entities", entities,
                      "--backbone", "tiny", ok=False)
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_out_and_an_unknown_generator(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = relbench("data", "synthesize", out, "--relation", "hug", "--entities", "bear,tiger", "--backbone", "tiny",
                      ok=False)
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    result = relbench("data", "synthesize", tmp_path / "new" / "out", "--relation", "hug", "--entities", "bear",
                      "--generator", "nope", "--backbone", "tiny", ok=False)
    assert result.exit_code == 2 and "no image generator named 'nope'" in result.output and "sdxl" in result.output
    assert not (tmp_path / "new").exists()

    result = relbench("data", "synthesize", tmp_path / "out2", "--relation", "hug", "--entities", "bear",
                      "--samples", "0", "--backbone", "tiny", ok=False)
    assert result.exit_code == 2 and "--samples" in result.output


# -- the documented path: synthesize -> annotate -> check -> train, with known annotators ------------


MASKS: list[FixedMasks] = []  # each fixed_masks instance, in load order


def fixed_masks(backbone, settings, device):
    """Entry point factory of the `fixed` mask annotator (FixedMasks, every entity found)."""
    MASKS.append(FixedMasks())
    return MASKS[-1]


class FixedKeypoints:
    """17 AP-10K keypoints on a 4 x 5 grid inside each box, all scored 1."""

    name = "fixed-keypoints"

    def keypoints(self, image, boxes, labels):
        from relationbench.data.triplets import Keypoints

        grid = np.array([(x, y) for y in (0.2, 0.4, 0.6, 0.8) for x in (0.1, 0.3, 0.5, 0.7, 0.9)][:17])
        return [Keypoints(xy=np.asarray(b[:2]) + grid * (np.asarray(b[2:]) - np.asarray(b[:2])), score=np.ones(17),
                          schema="ap10k-17") for b in boxes]


KEYPOINT_LOADS: list[str] = []  # the backbone of each fixed_keypoints call


def fixed_keypoints(backbone, settings, device):
    KEYPOINT_LOADS.append(backbone.name)
    return FixedKeypoints()


@pytest.fixture
def fixed_annotators(monkeypatch):
    """The `fixed` mask and keypoint annotators installed as entry points."""
    from importlib.metadata import EntryPoint

    from relationbench.data import annotators

    plugins = {annotators.MASK_GROUP: EntryPoint("fixed", f"{__name__}:fixed_masks", annotators.MASK_GROUP),
               annotators.KEYPOINT_GROUP: EntryPoint("fixed", f"{__name__}:fixed_keypoints", annotators.KEYPOINT_GROUP)}
    installed = annotators.installed
    monkeypatch.setattr(annotators, "installed",
                        lambda group: {**installed(group), **({"fixed": plugins[group]} if group in plugins else {})})
    return ["--mask-annotator", "fixed", "--keypoint-annotator", "fixed"]


def test_synthesize_annotate_check_train(tmp_path, fixed_annotators):
    out, bank = tmp_path / "hug-data", tmp_path / "bank"
    KEYPOINT_LOADS.clear()
    said = relbench("data", "synthesize", out, "--relation", "hug", "--entities", "bear,tiger", "--samples", 2,
                    "--backbone", "tiny", "--no-annotate", "--quiet", *fixed_annotators).output
    assert "2 raw sample(s) written" in said and f"relbench data annotate {out}" in said
    assert not (out / "triplets").exists() and KEYPOINT_LOADS == []  # --no-annotate: the masks alone
    relbench("data", "annotate", out, out / "triplets", "--backbone", "tiny", "--quiet", *fixed_annotators)
    assert KEYPOINT_LOADS == ["tiny"]
    assert "hug: 2 samples, 4 objects, keypoints ap10k-17" in relbench("data", "check", out / "triplets").output
    # the known annotations came through: each target mask is its entity's fixed box
    manifest = json.loads((out / "triplets" / "hug" / "triplets.json").read_text())
    for sample in manifest["samples"]:
        for obj, entity in zip(sample["objects"], ("bear", "tiger")):
            mask = np.asarray(Image.open(out / "triplets" / "hug" / obj["mask"])) > 0
            x0, y0, x1, y1 = BOXES[entity]
            assert mask.sum() == (round(y1 * 128) - round(y0 * 128)) * (round(x1 * 128) - round(x0 * 128))
            assert mask[round(y0 * 128), round(x0 * 128)] and not mask[round(y0 * 128) - 1, round(x0 * 128)]
    trained = relbench("train", "--method", "relationbooth", "--data", out / "triplets", "--backbone", "tiny",
                       "--out", bank, "--quiet", "--set", "resolution=64", "--set", "batch_size=2").output
    assert "hug: trained" in trained
    relbench("data", "show", out / "triplets", "--out", tmp_path / "sheet.png", "--quiet")
    assert Image.open(tmp_path / "sheet.png").size == (800, 8 + 2 * 294)


def test_synthesize_annotates_by_default(tmp_path, fixed_annotators):
    out = tmp_path / "hug-data"
    KEYPOINT_LOADS.clear()
    said = relbench("data", "synthesize", out, "--relation", "hug", "--entities", "bear,tiger", "--samples", 1,
                    "--seed", 3, "--backbone", "tiny", "--quiet", *fixed_annotators).output
    assert "hug: 1 kept, 0 set aside" in said and "relbench data show" in said
    assert KEYPOINT_LOADS == ["tiny"]  # loaded once, for synthesize and its annotation
    # the target detected once (synthesize's finding is annotate's), then each of the two references
    assert MASKS[-1].calls == 1 + 2
    assert sorted(p.name for p in out.iterdir()) == ["0", "crops", "raw.json", "synthesis.json", "triplets"]
    assert json.loads((out / "synthesis.json").read_text())["annotate"]["mask_annotator"] == "fixed"
    sample, = json.loads((out / "triplets" / "hug" / "triplets.json").read_text())["samples"]
    assert sample["prompt"] == "A photo of a bear hugging a tiger in a forest."
    for k in range(2):  # the references annotate wrote are the ones synthesize drew
        assert np.array_equal(np.asarray(Image.open(out / "triplets" / "hug" / sample["references"][k]["image"])),
                              np.asarray(Image.open(out / "0" / f"reference{k}.png")))


class Listed:
    """A mask annotator answering each label with the detections listed for it."""

    name = "listed"

    def __init__(self, found):
        self.found, self.asked = found, []

    def detect(self, image, labels):
        self.asked.append(list(labels))
        return [self.found.get(label, []) for label in labels]


def _box_detection(box, score) -> Detection:
    """A detection in an 8 x 8 image whose mask is its box's pixels."""
    mask = np.zeros((8, 8), bool)
    mask[round(box[1] * 8):round(box[3] * 8), round(box[0] * 8):round(box[2] * 8)] = True
    return Detection(box, score, mask)


def test_find_entities_uses_the_annotation_rules():
    from relationbench.data import synthesize

    def find_entities(*args):  # the detections as (box, score): their masks are checked copies
        found = synthesize.find_entities(*args)
        return found if isinstance(found, str) else [(d.box, d.score) for d in found]

    image, rules = Image.new("RGB", (8, 8)), AnnotateSettings()  # threshold 0.3, extra 0.5, same object 0.5
    left = _box_detection((0.0, 0.0, 0.5, 0.5), 0.8)
    right = _box_detection((0.5, 0.5, 1.0, 1.0), 0.9)
    weak = _box_detection((0.5, 0.0, 1.0, 0.5), 0.2)
    assert find_entities(Listed({"bear": [left], "tiger": [right]}), image, ["bear", "tiger"], rules) == [(left.box, left.score), (right.box, right.score)]
    assert find_entities(Listed({"bear": [left], "tiger": [weak]}), image, ["bear", "tiger"], rules) == \
        "target: 'tiger' found 0 time(s) scoring at least 0.3, named 1 time(s)"
    # two dogs: asked once; entity 0 is the left one though the right one scores higher, as annotate
    # pairs them (reference k is drawn from the crop of the object annotate gives entity k)
    dogs = Listed({"dog": [right, left]})
    assert find_entities(dogs, image, ["dog", "dog"], rules) == [(left.box, left.score), (right.box, right.score)] and dogs.asked == [["dog"]]
    assert find_entities(Listed({"dog": [right]}), image, ["dog", "dog"], rules) == \
        "target: 'dog' found 1 time(s) scoring at least 0.3, named 2 time(s)"
    # a second bear scoring 0.8 >= 0.5 x 0.9: the target shows more bears than named
    assert find_entities(Listed({"bear": [right, left]}), image, ["bear"], rules).startswith(
        "target: 2 'bear' objects found for 1 named")
    # the tiger answered only with the bear's object: one object for two entities
    same = _box_detection(left.box, 0.7)
    assert find_entities(Listed({"bear": [left], "tiger": [same]}), image, ["bear", "tiger"], rules) == \
        "target: 'bear' and 'tiger' were found on one object (mask IoU 1.00)"
    # a random-weight annotator (the tiny backbone): the comparing rules are off, as in annotate
    class RandomListed(Listed):
        random_weights = True

    assert find_entities(RandomListed({"bear": [left], "tiger": [same]}), image, ["bear", "tiger"], rules) == \
        [(left.box, left.score), (same.box, same.score)]
