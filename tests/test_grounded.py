"""Grounded identity (issue 14, part 3): detection, crops, per-subject identity, confusion,
layout IoU; a fake detector with known outputs on synthetic images with known boxes, and the
tiny OWLv2 end to end with its coordinate mapping checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageDraw

from relationbench.backbones import get_backbone
from relationbench.metrics.detector import (Detection, Detector, DetectorSettings, box_iou, build_tiny_owl,
                                            detector_id, OwlDetector, pick_distinct)
from relationbench.metrics.grounded import (COLUMNS, GroundedScorer, GroundedSettings, crop_box, embed_with,
                                            load_grounded_scorer)
from relationbench.metrics.protocols import get_protocol
from relationbench.metrics.registry import METRICS, ImageItem
from relationbench.suites.model import Case, Subject

W, H = 120, 80
RED, BLUE = (200, 40, 40), (40, 60, 200)
RED_PX, BLUE_PX = (12, 8, 48, 40), (70, 30, 110, 70)  # pixel xyxy (x1, y1 exclusive)


def norm(px):
    return (px[0] / W, px[1] / H, px[2] / W, px[3] / H)


def canvas() -> Image.Image:
    """White 120 x 80 with a red rectangle and a blue ellipse inside their boxes."""
    image = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((RED_PX[0], RED_PX[1], RED_PX[2] - 1, RED_PX[3] - 1), fill=RED)
    draw.ellipse((BLUE_PX[0], BLUE_PX[1], BLUE_PX[2] - 1, BLUE_PX[3] - 1), fill=BLUE)
    return image


def reference(color, shape: str) -> Image.Image:
    """The same shape drawn elsewhere on a larger canvas, then cropped to its box."""
    image = Image.new("RGB", (200, 150), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "rect" else draw.ellipse)((100, 50, 139, 89), fill=color)
    return image.crop((100, 50, 140, 90))


def fake_embed(images):
    """A feature a hand can compute: CLIP = the mean colour, DINO = the mean squared colour."""
    arrays = [np.asarray(im, dtype=np.float64) / 255.0 for im in images]
    return (np.stack([a.reshape(-1, 3).mean(0) for a in arrays]),
            np.stack([(a.reshape(-1, 3) ** 2).mean(0) for a in arrays]))


REFS = {"red": fake_embed([reference(RED, "rect")]), "blue": fake_embed([reference(BLUE, "ellipse")])}


class FakeDetector(Detector):
    """Returns, for each query, the detections listed for it (best first), and records its calls."""

    id = "fake"

    def __init__(self, table: dict[str, list[Detection]]):
        self.table, self.settings, self.calls = table, DetectorSettings(), []

    def candidates(self, images, queries, k):
        self.calls.append(([im.size for im in images], [list(q) for q in queries], k))
        return [[self.table.get(q, [])[:k] for q in names] for names in queries]


class RecordingEmbed:
    def __init__(self):
        self.crops = []

    def __call__(self, images):
        self.crops.extend(images)
        return fake_embed(images)


def subject(name, noun):
    return Subject(name, noun, "test", name)


def multi_case(nouns=("box", "ball"), names=("red", "blue"), boxes=(norm(RED_PX), norm(BLUE_PX))) -> Case:
    return Case("c1", "t", "multi", (subject(names[0], nouns[0]), subject(names[1], nouns[1])),
                f"a {nouns[0]} next to a {nouns[1]}", "next to", boxes, 0)


def item(case, uses_layout=True, image=None) -> ImageItem:
    return ImageItem(image or canvas(), "0" * 64, case, case.prompt, case.predicate, uses_layout)


def scorer(table, embed=None, **settings) -> GroundedScorer:
    return GroundedScorer(FakeDetector(table), embed or fake_embed, lambda s: REFS.get(s.name),
                          get_protocol("paper").image_scale, GroundedSettings(**settings))


def hand_cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def crop_features(px_box, image=None):
    """The fake features of the canvas pixels inside a pixel box, with a plain loop."""
    image = image or canvas()
    pixels = [image.getpixel((x, y)) for y in range(px_box[1], px_box[3]) for x in range(px_box[0], px_box[2])]
    n = len(pixels)
    clip = [sum(p[c] / 255 for p in pixels) / n for c in range(3)]
    dino = [sum((p[c] / 255) ** 2 for p in pixels) / n for c in range(3)]
    return clip, dino


def test_columns_are_the_registrys():
    assert COLUMNS == tuple(c.name for c in METRICS["grounded"].columns)


def test_crops_are_cut_exactly_at_the_boxes():
    embed = RecordingEmbed()
    found = {"box": [Detection(norm(RED_PX), 0.9)], "ball": [Detection(norm(BLUE_PX), 0.8)]}
    scorer(found, embed).score([item(multi_case())])
    pixels = np.asarray(canvas())
    assert len(embed.crops) == 2
    for crop, (x0, y0, x1, y1) in zip(embed.crops, (RED_PX, BLUE_PX)):
        assert np.array_equal(np.asarray(crop), pixels[y0:y1, x0:x1])
    assert np.all(np.asarray(embed.crops[0]) == RED)  # the rectangle fills its box


def test_margin_widens_the_crop_and_stops_at_the_image_edge():
    box = norm((12, 8, 48, 40))  # 36 x 32 pixels
    crop = crop_box(canvas(), box, margin=0.25)  # 9 and 8 pixels more on each side, clamped at 0
    assert np.array_equal(np.asarray(crop), np.asarray(canvas())[0:48, 3:57])
    sliver = crop_box(canvas(), (1 - 1e-9, 0.5, 1.0, 0.5 + 1e-9))  # thinner than a pixel, at the edge
    assert np.array_equal(np.asarray(sliver), np.asarray(canvas())[40:41, 119:120])


def test_scores_match_a_hand_computation():
    found = {"box": [Detection(norm(RED_PX), 0.9)], "ball": [Detection(norm(BLUE_PX), 0.8)]}
    row = scorer(found).score([item(multi_case())])[0]
    expect = {}
    for s, (px, name) in enumerate(((RED_PX, "red"), (BLUE_PX, "blue")), start=1):
        clip, dino = crop_features(px)
        expect[f"clip_i_g_{s}"] = 100 * hand_cos(clip, REFS[name][0][0])
        expect[f"dino_g_{s}"] = 100 * hand_cos(dino, REFS[name][1][0])
    for key, value in expect.items():
        assert row[key] == pytest.approx(value, abs=1e-9)
    assert row["clip_i_g"] == pytest.approx((expect["clip_i_g_1"] + expect["clip_i_g_2"]) / 2)
    assert row["dino_g"] == pytest.approx((expect["dino_g_1"] + expect["dino_g_2"]) / 2)
    assert (row["found"], row["found_1"], row["found_2"], row["confused"]) == (1.0, 1.0, 1.0, 0.0)
    assert row["layout_iou"] == pytest.approx(1.0)


def test_a_missing_subject_is_missing_not_skipped():
    row = scorer({"box": [Detection(norm(RED_PX), 0.9)]}).score([item(multi_case())])[0]
    assert (row["found_1"], row["found_2"], row["found"]) == (1.0, 0.0, 0.5)
    assert math.isnan(row["clip_i_g_2"]) and math.isnan(row["dino_g_2"]) and math.isnan(row["confused"])
    assert row["clip_i_g"] == row["clip_i_g_1"] and row["dino_g"] == row["dino_g_1"]
    none = scorer({}).score([item(multi_case())])[0]
    assert none["found"] == 0.0 and all(math.isnan(none[c]) for c in ("clip_i_g", "dino_g", "layout_iou"))


def test_swapped_detections_are_flagged_as_confused():
    swapped = {"box": [Detection(norm(BLUE_PX), 0.9)], "ball": [Detection(norm(RED_PX), 0.8)]}
    row = scorer(swapped).score([item(multi_case())])[0]
    assert row["confused"] == 1.0 and row["found"] == 1.0
    # one subject drawn twice: both nouns land on the red shape; the ball's crop is red
    twice = {"box": [Detection(norm(RED_PX), 0.9)], "ball": [Detection(norm(RED_PX), 0.8)]}
    assert scorer(twice).score([item(multi_case())])[0]["confused"] == 1.0


def test_layout_iou_against_a_hand_computation():
    shifted = (16, 8, 52, 44)  # red box moved 4 px right, 4 px taller: overlap 32 x 32
    found = {"box": [Detection(norm(shifted), 0.9)], "ball": [Detection(norm(BLUE_PX), 0.8)]}
    iou_red = (32 * 32) / (36 * 32 + 36 * 36 - 32 * 32)
    row = scorer(found).score([item(multi_case())])[0]
    assert row["layout_iou"] == pytest.approx((iou_red + 1.0) / 2)
    assert math.isnan(scorer(found).score([item(multi_case(), uses_layout=False)])[0]["layout_iou"])


def test_a_pair_of_one_class_noun_is_one_query_assigned_by_layout_else_by_score():
    case = multi_case(nouns=("dog", "dog"))
    # the best-scoring box is where subject 2 (blue) was laid out
    table = {"dog": [Detection(norm(BLUE_PX), 0.9), Detection(norm(RED_PX), 0.7)]}
    fake = scorer(table)
    by_layout = fake.score([item(case)])[0]
    assert fake.detector.calls == [([(W, H)], [["dog"]], 2)]
    assert by_layout["confused"] == 0.0 and by_layout["layout_iou"] == pytest.approx(1.0)
    by_score = fake.score([item(case, uses_layout=False)])[0]
    assert by_score["confused"] == 1.0  # the best box went to subject 1: red's crop is blue
    assert by_score["clip_i_g_1"] == pytest.approx(100 * hand_cos(crop_features(BLUE_PX)[0], REFS["red"][0][0]))
    one = scorer({"dog": [Detection(norm(BLUE_PX), 0.9)]}).score([item(case)])[0]
    assert (one["found_1"], one["found_2"]) == (0.0, 1.0)  # the only box goes to the subject laid out there


def test_single_object_cases_leave_the_second_subject_and_confusion_empty():
    case = Case("s1", "t", "single", (subject("red", "box"),), "a box on a table", "on", (norm(RED_PX),), 0)
    row = scorer({"box": [Detection(norm(RED_PX), 0.9)]}).score([item(case)])[0]
    assert row["found"] == 1.0 and row["clip_i_g"] == row["clip_i_g_1"]
    assert all(math.isnan(row[c]) for c in ("clip_i_g_2", "dino_g_2", "found_2", "confused"))


def test_a_subject_without_references_is_found_but_has_no_identity_score():
    case = multi_case(names=("red", "nobody"))
    row = scorer({"box": [Detection(norm(RED_PX), 0.9)], "ball": [Detection(norm(BLUE_PX), 0.8)]}).score(
        [item(case)])[0]
    assert row["found_2"] == 1.0 and math.isnan(row["clip_i_g_2"]) and math.isnan(row["confused"])


def test_pick_distinct_keeps_the_best_non_overlapping_boxes_above_the_threshold():
    boxes = np.array([[0, 0, .5, .5], [0, 0, .5, .52], [.5, .5, 1, 1], [.2, .2, .3, .3], [.6, 0, .6, .4]])
    scores = np.array([.9, .95, .5, .05, .99])  # the last has no area; the fourth is under 0.1
    picked = pick_distinct(scores, boxes, 3, DetectorSettings(threshold=0.1, distinct_iou=0.3))
    assert [d.score for d in picked] == [.95, .5]
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)


@pytest.mark.parametrize("size", [(120, 80), (80, 120)])  # padded at the bottom / at the right
def test_tiny_owlv2_maps_its_boxes_onto_a_non_square_image(size):
    model, processor = build_tiny_owl(0)
    detector = OwlDetector("tiny", model, processor, settings=DetectorSettings(threshold=0.0))
    image = canvas().resize(size)
    (w_px, h_px), side = size, max(size)
    queries = [["box", "ball"]]
    logits, raw_boxes = detector.raw([image], queries)
    best = detector.detect([image], queries)[0]

    def by_hand(cx, cy, w, h):
        box = [(cx - w / 2) * side / w_px, (cy - h / 2) * side / h_px, (cx + w / 2) * side / w_px,
               (cy + h / 2) * side / h_px]
        return [min(1.0, max(0.0, v)) for v in box]

    for q in range(2):  # the best-scoring patch whose box, mapped by hand, keeps some area in the image
        hand = []
        for p in range(logits.shape[1]):
            box = by_hand(*(float(v) for v in raw_boxes[0, p]))
            if box[2] > box[0] and box[3] > box[1]:
                hand.append((float(logits[0, p, q]), box))
        logit, box = max(hand)
        assert best[q].box == pytest.approx(box, abs=1e-6)
        assert best[q].score == pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-6)
    # transformers' own post-processing (pixels of the padded square) agrees with the hand transform
    from transformers.models.owlv2.modeling_owlv2 import Owlv2ObjectDetectionOutput

    out = Owlv2ObjectDetectionOutput(logits=logits, pred_boxes=raw_boxes)
    hf = processor.image_processor.post_process_object_detection(out, threshold=0.0, target_sizes=[(h_px, w_px)])[0]
    p = int(logits[0].max(-1).values.argmax())
    hf_box = hf["boxes"][int(hf["scores"].argmax())].numpy() / np.array([w_px, h_px, w_px, h_px])
    assert np.clip(hf_box, 0, 1) == pytest.approx(by_hand(*raw_boxes[0, p].tolist()), abs=1e-5)


def test_tiny_grounded_scorer_runs_end_to_end():
    from relationbench.metrics.encoders import load_clip, load_dino

    embed = embed_with(load_clip(get_backbone("tiny")), load_dino(get_backbone("tiny")))
    refs = {name: embed([reference(c, s)]) for name, c, s in (("red", RED, "rect"), ("blue", BLUE, "ellipse"))}
    grounded = load_grounded_scorer(get_backbone("tiny"), embed, lambda s: refs.get(s.name),
                                    get_protocol("paper").image_scale,
                                    detector_settings=DetectorSettings(threshold=0.0))
    assert grounded.id == "tiny:owlv2-seed0" and grounded.family == "grounded"
    rows = grounded.score([item(multi_case()), item(multi_case(), uses_layout=False, image=canvas().resize((64, 96)))])
    assert [set(r) for r in rows] == [set(COLUMNS)] * 2
    for r in rows:  # threshold 0: every subject found; the tiny model's boxes are valid image boxes
        assert r["found"] == 1.0 and -100 <= r["clip_i_g"] <= 100 and r["confused"] in (0.0, 1.0)
    assert 0 <= rows[0]["layout_iou"] <= 1 and math.isnan(rows[1]["layout_iou"])
    for per_query in grounded.detector.detect([canvas()], [["box", "ball"]])[0]:
        x0, y0, x1, y1 = per_query.box
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def test_detector_ids_name_the_weights_and_dtype():
    assert detector_id(get_backbone("tiny")) == "tiny:owlv2-seed0"
    assert detector_id(get_backbone("sdxl"), "bf16") == "hf:google/owlv2-base-patch16-ensemble@bf16"
    assert detector_id(get_backbone("sdxl", {"detector": "me/owl"})) == "hf:me/owl"


def test_a_batch_is_one_detector_call_and_its_rows_follow_the_items():
    single = Case("s1", "t", "single", (subject("blue", "ball"),), "a ball on a table", "on", (norm(BLUE_PX),), 0)
    found = {"box": [Detection(norm(RED_PX), 0.9)], "ball": [Detection(norm(BLUE_PX), 0.8)]}
    batch = scorer(found)
    rows = batch.score([item(multi_case()), item(single)])
    assert len(batch.detector.calls) == 1 and batch.detector.calls[0][1] == [["box", "ball"], ["ball"]]
    alone = [scorer(found).score([item(c)])[0] for c in (multi_case(), single)]
    assert [{k: v for k, v in r.items() if not math.isnan(v)} for r in rows] == \
        [{k: v for k, v in r.items() if not math.isnan(v)} for r in alone]
    assert rows[1]["clip_i_g"] == pytest.approx(100 * hand_cos(crop_features(BLUE_PX)[0], REFS["blue"][0][0]))
