"""The annotator plugins: entry-point discovery, and each model wrapper's coordinate conventions
checked against an independent computation (a bright dot, a box-shaped mask)."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.data import annotators as ann
from relationbench.data.annotators import (CAPTIONER_GROUP, KEYPOINT_GROUP, MASK_GROUP, AnnotateSettings, PoseRoute,
                                           SamSegmenter, VitPoseAnnotator, build_tiny_vitpose, head_schema,
                                           load_annotators, normalized_keypoints, pose_boxes, pose_kind, sam_processor)
from relationbench.data.triplets import mask_box
from relationbench.errors import UserError


# ---- discovery ----


def test_built_in_plugins_are_registered_as_entry_points():
    assert set(ann.installed(MASK_GROUP)) >= {"owlv2-sam"}
    assert set(ann.installed(KEYPOINT_GROUP)) >= {"vitpose-plus"}
    assert set(ann.installed(CAPTIONER_GROUP)) >= {"qwen2.5-vl"}
    assert ann.installed(MASK_GROUP)["owlv2-sam"].load() is ann.load_owlv2_sam


class _Plain:
    def __init__(self, name):
        self.name = name


def make_masks(backbone, settings, device):
    return _Plain(f"fake-masks@{settings.threshold}@{device}")


def make_points(backbone, settings, device):
    return _Plain(f"fake-points:{backbone.name}")


def _fake_entry_points(monkeypatch, extra: dict[str, list[EntryPoint]]):
    real = ann.entry_points

    def entry_points(*, group):
        return list(real(group=group)) + extra.get(group, [])

    monkeypatch.setattr(ann, "entry_points", entry_points)


def test_load_annotators_finds_plugins_by_entry_point_name(monkeypatch):
    _fake_entry_points(monkeypatch, {
        MASK_GROUP: [EntryPoint("fake", f"{__name__}:make_masks", MASK_GROUP)],
        KEYPOINT_GROUP: [EntryPoint("fake", f"{__name__}:make_points", KEYPOINT_GROUP)]})
    found = load_annotators(get_backbone("tiny"), AnnotateSettings(threshold=0.7, mask_annotator="fake",
                                                                   keypoint_annotator="fake"), device="cpu")
    assert found.masks.name == "fake-masks@0.7@cpu"
    assert found.keypoints.name == "fake-points:tiny"
    assert found.captioner is None  # caption not asked
    assert found.random_weights is False  # the plugin does not say it is random


def test_unknown_plugin_names_the_installed_ones(monkeypatch):
    _fake_entry_points(monkeypatch, {MASK_GROUP: [EntryPoint("fake", f"{__name__}:make_masks", MASK_GROUP)]})
    with pytest.raises(UserError) as err:
        load_annotators(get_backbone("tiny"), AnnotateSettings(mask_annotator="xpose"))
    assert "'xpose'" in err.value.message and "fake, owlv2-sam" in err.value.message
    assert "--mask-annotator" in err.value.hint


def test_plugin_that_cannot_be_imported_is_a_user_error(monkeypatch):
    _fake_entry_points(monkeypatch, {KEYPOINT_GROUP: [
        EntryPoint("broken", "no_such_package_here.annotators:load", KEYPOINT_GROUP)]})
    with pytest.raises(UserError, match="'broken'.*cannot be loaded"):
        ann.plugin_factory(KEYPOINT_GROUP, "broken", "--keypoint-annotator")


# ---- SAM: the box prompt in the processor's resized frame, the mask back in the image's ----


class _BoxMaskSam(torch.nn.Module):
    """A SAM stand-in: +1 inside each prompt box, -1 outside, on the low-res mask grid (the
    input frame / 4), as SAM's mask decoder lays out its logits."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values, input_boxes, multimask_output):
        side = pixel_values.shape[-1] // 4
        ys, xs = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
        inside = [(xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1) for x0, y0, x1, y1 in input_boxes[0] / 4]
        return SimpleNamespace(pred_masks=(torch.stack(inside).float() * 2 - 1)[None, :, None])


def test_sam_box_prompt_is_in_the_resized_frame_and_masks_come_back_in_the_image():
    width, height = 128, 96  # resized to 64 x 48 (longest edge 64), padded to 64 x 64
    segmenter = SamSegmenter("fake", _BoxMaskSam(), sam_processor(64))
    boxes = [(16 / 128, 8 / 96, 64 / 128, 56 / 96), (0.5, 0.25, 1.0, 1.0)]
    image = Image.new("RGB", (width, height))
    prompt = segmenter.prompt(image, boxes)
    scale = 64 / max(width, height)  # by hand: pixels of the image times the resize factor
    expected = [[b[0] * width * scale, b[1] * height * scale, b[2] * width * scale, b[3] * height * scale]
                for b in boxes]
    np.testing.assert_allclose(prompt["input_boxes"][0].numpy(), expected)
    for mask, box in zip(segmenter.masks(image, boxes), boxes):
        assert mask.shape == (height, width) and mask.dtype == bool
        np.testing.assert_allclose(mask_box(mask), box, atol=1 / height)  # the mask covers the prompt box
        c0, r0, c1, r1 = round(box[0] * width), round(box[1] * height), round(box[2] * width), round(box[3] * height)
        assert mask[r0 + 2:r1 - 2, c0 + 2:c1 - 2].all()  # bilinear upsampling rounds the corners, no more


# ---- ViTPose: boxes in, keypoints out, in the image's normalized coordinates ----


class _BrightestPose(torch.nn.Module):
    """A ViTPose stand-in whose 17 heatmaps are the crop's brightness at the crop's resolution:
    every keypoint lands on the brightest pixel in the box."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))
        self.experts = []

    def forward(self, pixel_values, dataset_index):
        self.experts.append(dataset_index.tolist())
        bright = pixel_values.mean(1, keepdim=True)
        bright = bright - bright.amin(dim=(2, 3), keepdim=True)  # peaks positive (ViTPose drops max <= 0)
        return SimpleNamespace(heatmaps=bright.expand(-1, 17, -1, -1).clone())


def test_vitpose_keypoints_land_on_the_dot_in_normalized_image_coordinates():
    _, processor = build_tiny_vitpose()
    person, animal = _BrightestPose(), _BrightestPose()
    annotator = VitPoseAnnotator({"person": PoseRoute("p", person, processor, 0, "coco-17"),
                                  "animal": PoseRoute("a", animal, processor, 3, "ap10k-17")}, ("man",))
    width, height = 160, 120  # dots far apart: each padded crop (1.25 x the box) holds one
    cases = [((20, 30), (0.05, 0.1, 0.2, 0.4), "bear"), ((140, 20), (0.8, 0.05, 0.95, 0.3), "man"),
             ((81, 100), (0.4, 0.7, 0.6, 0.95), "tiger")]
    image = np.zeros((height, width, 3), np.uint8)
    for (col, row), _, _ in cases:
        image[row, col] = 255
    # each box holds one dot; the triplet format puts pixel column c's centre at (c + 0.5) / width
    found = annotator.keypoints(Image.fromarray(image), [box for _, box, _ in cases], [label for *_, label in cases])
    for ((col, row), _, label), points in zip(cases, found):
        np.testing.assert_allclose(points.xy, np.tile([(col + 0.5) / width, (row + 0.5) / height], (17, 1)),
                                   atol=0.35 / width)
        assert points.schema == ("coco-17" if label == "man" else "ap10k-17")
        assert points.score.shape == (17,) and ((points.score >= 0) & (points.score <= 1)).all()
    assert person.experts == [[0]] and animal.experts == [[3, 3]]  # one forward per route, its expert


def test_pose_box_and_keypoint_conversions_by_hand():
    # an 8 x 4 image: the box's left edge 0.25 * 8 = 2 is 1.5 in pixel-centre coordinates
    np.testing.assert_allclose(pose_boxes([(0.25, 0.5, 0.75, 1.0)], (8, 4)), [[1.5, 1.5, 4.0, 2.0]])
    # pixel centre 0 -> 0.5 / 8; points outside the image clip to its edges
    np.testing.assert_allclose(normalized_keypoints([[0.0, 1.0], [-3.0, 9.0]], (8, 4)), [[1 / 16, 3 / 8], [0.0, 1.0]])


def test_head_schema_is_read_from_the_checkpoint_joint_names():
    coco, _ = build_tiny_vitpose(0, "coco-17")  # names as transformers' ViTPose conversion writes them
    animal, _ = build_tiny_vitpose(0, "ap10k-17")
    assert head_schema(coco.config, "x") == "coco-17"
    assert head_schema(animal.config, "x") == "ap10k-17"
    unnamed = SimpleNamespace(id2label={i: f"LABEL_{i}" for i in range(17)})
    with pytest.raises(UserError, match="LABEL_0") as err:
        head_schema(unnamed, "/models/pose")
    assert err.value.path == "/models/pose"


def test_pose_kind_reads_the_last_word():
    people = ann.PERSON_NOUNS
    assert pose_kind("young woman", people) == "person" and pose_kind("Man", people) == "person"
    assert pose_kind("teddy bear", people) == "animal" and pose_kind("tiger", people) == "animal"


def test_expert_out_of_range_is_refused():
    with pytest.raises(UserError, match="expert 6 asked.*6 expert"):
        ann.load_vitpose_plus(get_backbone("tiny"), AnnotateSettings(animal_expert=6))


# ---- real weights: the loaders' clear errors ----


@pytest.mark.parametrize("key, load", [
    ("segmenter", lambda b: ann.load_segmenter(b)),
    ("pose", lambda b: ann.load_vitpose_plus(b, AnnotateSettings())),
])
def test_a_weight_folder_without_the_model_is_a_user_error(tmp_path, key, load):
    backbone = get_backbone("sdxl", {"pose": str(tmp_path), "pose_animal": str(tmp_path), "segmenter": str(tmp_path)})
    with pytest.raises(UserError, match="cannot load") as err:
        load(backbone)
    assert err.value.path == str(tmp_path) and f"--weight {key}=PATH" in err.value.hint


def test_missing_weights_offline_name_the_key():
    with pytest.raises(UserError, match="'segmenter'"):
        ann.load_segmenter(get_backbone("sdxl", {"segmenter": "someone/not-downloaded-sam"}))


# ---- the tiny models: every built-in at toy size ----


def test_tiny_annotators_run_at_toy_size(one_thread):
    found = load_annotators(get_backbone("tiny"), AnnotateSettings(caption=True, caption_tokens=4))
    assert found.random_weights and found.names()["masks"] == "owlv2+sam:tiny:owlv2-seed0+tiny:sam-seed0"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 80, 3), dtype=np.uint8))
    detections = found.masks.detect(image, ["bear", "man"])
    assert len(detections) == 2 and all(d.mask.shape == (48, 80) and d.mask.dtype == bool
                                        for per in detections for d in per)
    boxes = [(0.1, 0.1, 0.5, 0.9), (0.4, 0.2, 0.9, 0.8)]
    bear, man = found.keypoints.keypoints(image, boxes, ["bear", "man"])
    assert (bear.schema, man.schema) == ("ap10k-17", "coco-17")
    assert bear.xy.shape == (17, 2) and ((bear.xy >= 0) & (bear.xy <= 1)).all()
    assert isinstance(found.captioner.caption(image), str)
