"""An open-vocabulary detector for grounded identity: find each subject by its class noun.

The detector is OWLv2 (transformers' Owlv2ForObjectDetection; default weights
google/owlv2-base-patch16-ensemble, weight key `detector`). Why OWLv2 over Grounding DINO and
SAM3:
  - its text tower is CLIP's, so its tokenizer is the CLIP BPE this project already rebuilds
    offline (backbones.build_clip_tokenizers): the tiny detector needs no files at all, while
    Grounding DINO needs BERT's vocabulary and SAM3 its own processor files;
  - it scores every (patch box, text query) pair independently, so "the best box for this
    class noun" and "the two best distinct boxes for a noun shared by two subjects" are read
    straight off one forward; Grounding DINO scores phrases of one caption against each other;
  - one single-stage ViT-B/16 forward (~150M parameters) per image and no mask decoder:
    faster than SAM3 (~850M) where only boxes are needed. Class nouns ("dog", "teddy bear")
    are the queries OWLv2 was trained on (LVIS/Objects365 class names).

Coordinates: OWLv2's processor pads each image at the bottom/right to a square of side
max(w, h) and resizes that; the model's boxes are (cx, cy, w, h) relative to the padded square.
`owl_boxes_to_image` maps them to xyxy relative to the image itself (x * max(w, h) / w, ...),
clipped to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..backbones import build_clip_tokenizers, loading_from, seeded
from ..devices import dtype_name

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..backbones import Backbone

Box = tuple[float, float, float, float]  # normalized xyxy, relative to the image


@dataclass(frozen=True)
class Detection:
    """One box found for a text query: normalized xyxy in [0, 1] of the image, and its score."""

    box: Box
    score: float  # sigmoid of the query logit, in (0, 1)


@dataclass(frozen=True)
class DetectorSettings:
    # OWLv2's published examples (transformers docs, the authors' colab) keep boxes above 0.1
    threshold: float = 0.1
    # two boxes for one query are distinct (two subjects of one class noun) below this IoU;
    # the NMS threshold of OWL-ViT's post-processing
    distinct_iou: float = 0.3


def box_iou(a: Box, b: Box) -> float:
    """IoU of two xyxy boxes (any common unit); 0 when either has no area."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class Detector:
    """Finds text queries in images. Subclasses implement `candidates`; `id` names the weights."""

    id: str
    settings: DetectorSettings

    def candidates(self, images: Sequence["Image.Image"], queries: Sequence[Sequence[str]],
                   k: int) -> list[list[list[Detection]]]:
        """Per image, per query: up to `k` distinct boxes (pairwise IoU below
        settings.distinct_iou) scoring at least settings.threshold, best first."""
        raise NotImplementedError

    def detect(self, images: Sequence["Image.Image"],
               queries: Sequence[Sequence[str]]) -> list[list[Detection | None]]:
        """Per image, per query: the best box above the threshold, or None."""
        return [[found[0] if found else None for found in per_image]
                for per_image in self.candidates(images, queries, 1)]


def owl_boxes_to_image(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OWLv2 boxes (..., 4) as normalized (cx, cy, w, h) of the padded square -> normalized xyxy
    of the image of `size` (width, height), clipped to [0, 1]."""
    width, height = size
    side = max(width, height)
    cx, cy, w, h = np.moveaxis(np.asarray(boxes, dtype=np.float64), -1, 0)
    xyxy = np.stack([(cx - w / 2) * side / width, (cy - h / 2) * side / height,
                     (cx + w / 2) * side / width, (cy + h / 2) * side / height], axis=-1)
    return np.clip(xyxy, 0.0, 1.0)


def pick_distinct(scores: np.ndarray, boxes: np.ndarray, k: int, settings: DetectorSettings) -> list[Detection]:
    """Greedy: the best-scoring boxes (P,) / (P, 4) above the threshold, skipping boxes with no
    area and boxes overlapping a kept one by settings.distinct_iou or more; at most k."""
    kept: list[Detection] = []
    for p in np.argsort(-scores, kind="stable"):
        if scores[p] < settings.threshold or len(kept) == k:
            break
        box = tuple(float(v) for v in boxes[p])
        if box[2] <= box[0] or box[3] <= box[1]:
            continue
        if all(box_iou(box, d.box) < settings.distinct_iou for d in kept):
            kept.append(Detection(box, float(scores[p])))
    return kept


class OwlDetector(Detector):
    """OWLv2 through transformers: one forward per call on all images and their queries."""

    def __init__(self, id: str, model: Any, processor: Any, device: str = "cpu", dtype: "torch.dtype | None" = None,
                 settings: DetectorSettings | None = None):
        import torch

        self.id, self.processor, self.device = id, processor, device
        self.dtype = dtype or torch.float32
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.settings = settings or DetectorSettings()

    def prepare(self, images: Sequence["Image.Image"], queries: Sequence[Sequence[str]]) -> dict[str, Any]:
        """The processor's inputs on the device: pixel_values (B, 3, S, S) in the model's dtype,
        input_ids and attention_mask (B * Q, 16), queries padded to the longest list with " "."""
        # the image processor pads, blurs and resizes on `device` (transformers' torchvision backend)
        inputs = self.processor(text=[list(q) for q in queries], images=list(images), return_tensors="pt",
                                device=self.device)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs

    def forward(self, inputs: dict[str, Any]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """The raw model outputs as float32: logits (B, P, Q) and pred_boxes (B, P, 4), the boxes
        normalized (cx, cy, w, h) of the padded square."""
        import torch

        with torch.inference_mode():
            out = self.model(**inputs)
        return out.logits.float(), out.pred_boxes.float()

    def raw(self, images: Sequence["Image.Image"], queries: Sequence[Sequence[str]]):
        """`forward(prepare(images, queries))`."""
        return self.forward(self.prepare(images, queries))

    def candidates(self, images, queries, k):
        if not images:
            return []
        logits, boxes = self.raw(images, queries)
        scores = logits.sigmoid().cpu().numpy()
        boxes = boxes.cpu().numpy()
        out = []
        for i, (image, names) in enumerate(zip(images, queries)):
            xyxy = owl_boxes_to_image(boxes[i], image.size)
            out.append([pick_distinct(scores[i, :, q], xyxy, k, self.settings) for q in range(len(names))])
        return out


# ---- the model: real weights on sdxl, a seeded toy OWLv2 on tiny ----

TINY_OWL = dict(  # google/owlv2-base-patch16: text 512 x 12 layers, vision 768 x 12 at 960 px, projection 512
    text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=64, patch_size=16),  # 4 x 4 patches: 16 candidate boxes
    projection_dim=32,
)
_SEED_OFFSET = 31  # see backbones.seeded
OWL_QUERY_LENGTH = 16  # OWLv2's text length (max_position_embeddings), the processor pads to it


def offline_owl_processor(side: int):
    """OWLv2's processor for `side` px inputs with the offline CLIP tokenizer, no files needed."""
    from transformers import Owlv2ImageProcessor, Owlv2Processor

    _, tokenizer = build_clip_tokenizers()  # pads with "!" (id 0), as OWLv2's tokenizer does
    tokenizer.model_max_length = OWL_QUERY_LENGTH
    return Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": side, "width": side}),
                          tokenizer=tokenizer)


def build_tiny_owl(seed: int = 0):
    """(model, processor): OWLv2 at toy size with seeded weights and its processor, offline."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    processor = offline_owl_processor(TINY_OWL["vision_config"]["image_size"])
    model = seeded(seed, _SEED_OFFSET, lambda: Owlv2ForObjectDetection(Owlv2Config(**TINY_OWL)))
    return model, processor


def detector_id(backbone: "Backbone", dtype_name: str = "fp32") -> str:
    """A stable name for the detector's weights, "@<dtype>" appended when not fp32 (the style
    of score.encoder_ids)."""
    if backbone.is_tiny:
        name = f"tiny:owlv2-seed{backbone.preset.seed}"
    else:
        source = backbone.source("detector")
        name = f"local:{Path(source.location).name}" if source.kind == "local" else (
            f"hf:{'/'.join(p for p in (source.location, source.subfolder) if p)}")
    return name if dtype_name == "fp32" else f"{name}@{dtype_name}"


def load_detector(backbone: "Backbone", device: str = "cpu", dtype: "torch.dtype | None" = None,
                  settings: DetectorSettings | None = None) -> OwlDetector:
    """The backbone's OWLv2 on `device` in `dtype` (float32 by default; bf16 is the GPU choice)."""
    if backbone.is_tiny:
        model, processor = build_tiny_owl(backbone.preset.seed or 0)
    else:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        path = backbone.fetch("detector")
        with loading_from(path, "an OWLv2 detector", "give the folder of google/owlv2-base-patch16-ensemble "
                          "(or another OWLv2) with --weight detector=PATH"):
            processor = Owlv2Processor.from_pretrained(path, local_files_only=True)
            model = Owlv2ForObjectDetection.from_pretrained(path, local_files_only=True)
    import torch

    dtype = dtype or torch.float32
    return OwlDetector(detector_id(backbone, dtype_name(dtype)), model, processor, device, dtype, settings)
