"""Grounded identity (issue 14; XVerseBench, PSRBench): find each subject in the generated
image by its class noun, crop it, and compare the crop (not the whole picture) with that
subject's references, so an image that draws one subject twice no longer scores well.

Per image (one row; NaN = missing):
    clip_i_g_s, dino_g_s  CLIP-I / DINO of subject s's crop against s's references, on the
                          protocol's scale; NaN when s is not found (or has no references)
    found_s               1 when the detector found subject s, else 0 (NaN: no subject s)
    clip_i_g, dino_g      the mean over the subjects that have a value
    found                 the share of the case's subjects found
    confused              multi-object only: 1 when, for either subject, its crop is closer to
                          the other subject's references than to its own, by the mean of the
                          raw CLIP-I and DINO cosines; else 0; NaN when either subject is not
                          found or has no references, and on single-object cases
    layout_iou            the mean IoU of each found subject's box with its case box; NaN for
                          methods that take no layout (ImageItem.uses_layout False)

Two subjects of one class noun ("a dog chasing a dog") are one query; its two best distinct
boxes (detector.DetectorSettings.distinct_iou) go to the subjects by the larger total IoU with
the case boxes when the method takes layouts, else by score (the best box to the subject named
first). Without layouts that order is a convention, so such a pair's per-subject values and
confusion flag say less than those of a pair of different nouns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
from PIL import Image

from .detector import Box, Detection, Detector, DetectorSettings, box_iou, load_detector
from .scores import mean_pair_cosine

if TYPE_CHECKING:
    import torch

    from ..backbones import Backbone
    from ..suites import Case, Subject
    from .encoders import ImageEncoder
    from .registry import ImageItem

Embed = Callable[[list[Image.Image]], tuple[np.ndarray, np.ndarray]]  # crops -> (clip (N, D), dino (N, D))
References = Callable[["Subject"], "tuple[np.ndarray, np.ndarray] | None"]  # -> (clip (R, D), dino (R, D))
Scale = Callable[[np.ndarray], np.ndarray]  # raw cosines -> the protocol's image scale

MAX_SUBJECTS = 2
COLUMNS = ("clip_i_g", "dino_g", "found", "confused", "layout_iou",
           *(f"{m}_{s}" for m in ("clip_i_g", "dino_g", "found") for s in range(1, MAX_SUBJECTS + 1)))
NAN = float("nan")


@dataclass(frozen=True)
class GroundedSettings:
    # crop padding on each side, as a fraction of the box's width / height; 0 = the box itself
    # (XVerseBench and PSRBench crop at the detected box)
    margin: float = 0.0


def crop_box(image: Image.Image, box: Box, margin: float = 0.0) -> Image.Image:
    """The pixels of normalized xyxy `box`, widened by `margin` x its size on each side and
    clamped to the image; edges rounded outwards to whole pixels, at least 1 x 1."""
    w, h = image.size
    bw, bh = (box[2] - box[0]) * margin, (box[3] - box[1]) * margin
    x0 = min(w - 1, max(0, math.floor((box[0] - bw) * w + 1e-6)))
    y0 = min(h - 1, max(0, math.floor((box[1] - bh) * h + 1e-6)))
    x1 = min(w, max(x0 + 1, math.ceil((box[2] + bw) * w - 1e-6)))
    y1 = min(h, max(y0 + 1, math.ceil((box[3] + bh) * h - 1e-6)))
    return image.crop((x0, y0, x1, y1))


def assign_boxes(case: "Case", found: list[list[Detection]], uses_layout: bool) -> list[Detection | None]:
    """One detection (or None) per subject of `case` from the candidates of each distinct class
    noun (`found[q]` for the q-th noun in `query_nouns(case)` order, best first)."""
    nouns = query_nouns(case)
    out: list[Detection | None] = [None] * len(case.subjects)
    for q, noun in enumerate(nouns):
        who = [s for s, subject in enumerate(case.subjects) if subject.class_noun == noun]
        dets = list(found[q][: len(who)])
        if uses_layout and len(who) == 2 and dets:
            def fit(order):
                return sum(box_iou(d.box, case.boxes[s]) for s, d in zip(order, dets))
            who = max((who, who[::-1]), key=fit)  # ties keep subject order
        for s, det in zip(who, dets):
            out[s] = det
    return out


def query_nouns(case: "Case") -> list[str]:
    """The case's distinct class nouns in subject order: the detector's queries."""
    return list(dict.fromkeys(s.class_noun for s in case.subjects))


class GroundedScorer:
    """The `grounded` family scorer (registry.FamilyScorer): detect, crop, compare."""

    family = "grounded"
    columns = COLUMNS

    def __init__(self, detector: Detector, embed: Embed, references: References, scale: Scale,
                 settings: GroundedSettings | None = None):
        self.detector, self.embed, self.references, self.scale = detector, embed, references, scale
        self.settings = settings or GroundedSettings()
        self.id = detector.id

    def score(self, items: Sequence["ImageItem"]) -> list[dict[str, float]]:
        """One row of COLUMNS per item, in order; one detector call and one embed call per batch."""
        if not items:
            return []
        k = max(max(sum(s.class_noun == n for s in it.case.subjects) for n in query_nouns(it.case)) for it in items)
        found = self.detector.candidates([it.image for it in items], [query_nouns(it.case) for it in items], k)
        picks = [assign_boxes(it.case, f, it.uses_layout) for it, f in zip(items, found)]
        crops = [crop_box(it.image, d.box, self.settings.margin)
                 for it, dets in zip(items, picks) for d in dets if d is not None]
        clip, dino = self.embed(crops) if crops else (np.zeros((0, 1)), np.zeros((0, 1)))
        embedded = iter(zip(clip, dino))  # in crop order
        refs: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray] | None] = {}
        return [self._row(it, dets, {s: next(embedded) for s, d in enumerate(dets) if d is not None}, refs)
                for it, dets in zip(items, picks)]

    def _reference(self, subject: "Subject", cache: dict) -> tuple[np.ndarray, np.ndarray] | None:
        key = subject.images_key  # a subject's images, whatever its suite calls it
        if key not in cache:
            cache[key] = self.references(subject)
        return cache[key]

    def _row(self, item: "ImageItem", dets: list[Detection | None],
             crops: dict[int, tuple[np.ndarray, np.ndarray]], cache: dict) -> dict[str, float]:
        subjects = item.case.subjects
        row = dict.fromkeys(COLUMNS, NAN)
        refs = [self._reference(s, cache) for s in subjects]
        # raw[s][t] = (CLIP, DINO) cosine of s's crop with t's references
        raw: dict[int, dict[int, tuple[float, float]]] = {}
        for s in crops:
            raw[s] = {t: (float(mean_pair_cosine(crops[s][0][None], r[0])[0]),
                          float(mean_pair_cosine(crops[s][1][None], r[1])[0]))
                      for t, r in enumerate(refs) if r is not None}
        for s in range(len(subjects)):
            row[f"found_{s + 1}"] = float(dets[s] is not None)
            if s in raw and s in raw[s]:
                c, d = raw[s][s]
                row[f"clip_i_g_{s + 1}"] = float(self.scale(np.array([c]))[0])
                row[f"dino_g_{s + 1}"] = float(self.scale(np.array([d]))[0])
        row["found"] = float(np.mean([d is not None for d in dets]))
        for col in ("clip_i_g", "dino_g"):
            values = [row[f"{col}_{s + 1}"] for s in range(len(subjects))]
            values = [v for v in values if not math.isnan(v)]
            row[col] = float(np.mean(values)) if values else NAN
        if len(subjects) == 2 and all(s in raw and len(raw[s]) == 2 for s in (0, 1)):
            closer = [np.mean(raw[s][1 - s]) > np.mean(raw[s][s]) for s in (0, 1)]
            row["confused"] = float(any(closer))
        if item.uses_layout and crops:
            row["layout_iou"] = float(np.mean([box_iou(dets[s].box, item.case.boxes[s]) for s in crops]))
        return row


def embed_with(clip: "ImageEncoder", dino: "ImageEncoder") -> Embed:
    """The `embed` of a CLIP and a DINO encoder: each with its own preprocessing (crops are
    resized like whole images: short side, centre crop)."""
    def embed(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        return tuple(e.encode_images(np.stack([e.preprocess(im) for im in images])) for e in (clip, dino))

    return embed


def load_grounded_scorer(backbone: "Backbone", embed: Embed, references: References, scale: Scale,
                         device: str = "cpu", dtype: "torch.dtype | None" = None,
                         settings: GroundedSettings | None = None,
                         detector_settings: DetectorSettings | None = None) -> GroundedScorer:
    """The grounded scorer with the backbone's detector (weight key `detector`) on `device` in
    `dtype` (float32 by default); `embed`, `references` and `scale` come from the score driver
    (embed_with(its CLIP, its DINO), the subjects' reference embeddings, the protocol's
    image_scale). Its id is the detector's; the driver adds the encoders' and the protocol's."""
    return GroundedScorer(load_detector(backbone, device, dtype, detector_settings), embed, references, scale,
                          settings)
