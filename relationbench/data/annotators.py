"""Annotator plugins of the data engine (`relbench data annotate`): who finds each object's mask
and box by its entity name, its 17 keypoints, and a caption (paper Sec. 3.3 used SAM, X-Pose
and LLaVA; none of their code was released).

Three plugin kinds, one entry-point group each. An entry point names a factory
`factory(backbone, settings, device) -> annotator` (backbone: relationbench.backbones.Backbone,
settings: AnnotateSettings, device: a torch device string):

    group                                  protocol           built in (this module)
    relationbench.mask_annotators          MaskAnnotator      owlv2-sam
    relationbench.keypoint_annotators      KeypointAnnotator  vitpose-plus
    relationbench.captioners               Captioner          qwen2.5-vl

A package plugs in X-Pose/UniPose or another detector without the core depending on it, in
its own pyproject.toml:

    [project.entry-points."relationbench.keypoint_annotators"]
    xpose = "my_package.annotators:load_xpose"

and `relbench data annotate RAW OUT --keypoint-annotator xpose` picks it.

Built in (transformers models; real weights behind weight keys of the sdxl backbone, toy-size
seeded random models with offline processors on tiny):
- owlv2-sam: OWLv2 finds boxes by the entity name (metrics/detector.py's detector, weight key
  `detector`), SAM (SamModel, weight key `segmenter`, facebook/sam-vit-base) turns each box
  into a mask. Why not SAM3 (transformers has Sam3Model): SAM3's weights (facebook/sam3) are
  gated on the hub and ~850M parameters against SAM-base's ~94M, and the project's one
  open-vocabulary detector already scores every (box, name) pair independently, which is
  what the pipeline's missing/extra/same-object rules read. A sam3 plugin fits the same
  interface.
- vitpose-plus: ViTPose+ (VitPoseForPoseEstimation, a mixture-of-experts backbone whose
  `dataset_index` picks the expert: COCO 0, AiC 1, MPII 2, AP-10K 3, APT-36K 4, COCO-WholeBody
  5) on each object's box. People (the entity's last word in `person_nouns`) use weight key
  `pose` with `person_expert`, everything else weight key `pose_animal` with `animal_expert`.
  The keypoint schema written is the one the checkpoint's head predicts, read from its
  config's id2label (joint names), never assumed: transformers' ViTPose+ checkpoints
  (usyd-community/vitpose-plus-*) keep only the COCO head (their conversion drops the other
  datasets' heads), so with them every object, animals included, gets `coco-17` points; a
  checkpoint whose head is AP-10K's (id2label naming AP-10K's joints) given as
  `--weight pose_animal=PATH` gives animals `ap10k-17` points.
- qwen2.5-vl: the VQAScore VLM (metrics/vqa.py's loader, weight key `vqa`: any transformers
  image-text-to-text model) answering `caption_prompt`, greedy.

Coordinates: boxes are normalized xyxy of the image (x0 = left edge / width); keypoints are
normalized (x, y) with pixel column c's centre at (c + 0.5) / width (triplets.py). SAM gets
its box prompt in the image's pixels (its processor rescales it to the resized input);
ViTPose's processor works in pixel-centre coordinates (column c's centre at c: its unbiased
affine crop), so a box edge e (normalized) goes in as e * width - 0.5 and a keypoint u comes
back as (u + 0.5) / width. Keypoints outside the image (ViTPose's crop pads the box by 1.25)
are clipped to [0, 1], and so are heatmap scores (a heatmap peak is not bounded by 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from ..backbones import loading_from, seeded
from ..errors import UserError
from ..metrics.detector import Box, DetectorSettings, OwlDetector, load_detector
from .triplets import KEYPOINT_SCHEMAS, N_KEYPOINTS, Keypoints

if TYPE_CHECKING:
    from PIL import Image

    from ..backbones import Backbone
    from ..metrics.vqa import VQAScorer

MASK_GROUP = "relationbench.mask_annotators"
KEYPOINT_GROUP = "relationbench.keypoint_annotators"
CAPTIONER_GROUP = "relationbench.captioners"

# the entity's last word in this list -> a person (COCO-17 expert); anything else is an animal
# or other object (AP-10K expert)
PERSON_NOUNS = ("person", "people", "man", "men", "woman", "women", "boy", "boys", "girl", "girls", "child",
                "children", "kid", "kids", "baby", "toddler", "lady", "gentleman", "guy", "human", "player",
                "dancer", "athlete", "runner", "skier", "surfer", "teenager", "adult", "couple", "friend")


@dataclass(frozen=True)
class AnnotateSettings:
    """How `relbench data annotate` finds and judges objects. The paper gives none of these
    (its annotation code is unreleased); each is our choice, said why."""

    # detection score (OWLv2: the sigmoid of the name's logit) a detection needs; above the
    # grounded metric's 0.1: a training sample needs confident objects, and a doubtful one
    # sets the sample aside instead of adding a wrong mask
    threshold: float = 0.3
    caption: bool = False  # caption the target and each reference (paper Sec. 3.3: LLaVA)
    mask_annotator: str = "owlv2-sam"  # entry-point name in relationbench.mask_annotators
    keypoint_annotator: str = "vitpose-plus"  # entry-point name in relationbench.keypoint_annotators
    captioner: str = "qwen2.5-vl"  # entry-point name in relationbench.captioners (used when caption)
    # two detections are one object when their masks overlap by this IoU or more: duplicates
    # of one label are merged, and two entities found on one object set the sample aside.
    # Masks, not boxes: two hugging animals' boxes overlap a lot, their masks hardly. > 1: off
    same_object_iou: float = 0.5
    # a sample shows more instances of a label than it names when the next detection beyond
    # the named count scores at least this fraction of the weakest one kept. > 1: off
    extra_ratio: float = 0.5
    # owlv2-sam: boxes of one name overlapping a better one by this IoU or more are dropped
    # before SAM (standard NMS 0.5; the grounded metric's 0.3 would merge hugging objects)
    nms_iou: float = 0.5
    max_detections: int = 5  # owlv2-sam: detections per name at most (2 named + 1 extra + duplicates)
    person_nouns: tuple[str, ...] = PERSON_NOUNS  # vitpose-plus: which entities are people
    person_expert: int = 0  # vitpose-plus: ViTPose+ dataset_index for people (COCO)
    animal_expert: int = 3  # vitpose-plus: dataset_index for everything else (AP-10K; REFERENCE 8)
    caption_prompt: str = "Describe this image in one sentence."  # qwen2.5-vl: the question asked
    caption_tokens: int = 60  # qwen2.5-vl: longest caption, in tokens


@dataclass(frozen=True, eq=False)
class Detection:
    """One object found by its entity name."""

    box: Box  # normalized xyxy in the image
    score: float  # the annotator's confidence, comparable with AnnotateSettings.threshold
    mask: np.ndarray  # bool [H, W], the image's size


class MaskAnnotator(Protocol):
    """Optionally `random_weights = True` (a toy model): the pipeline then skips the rules that
    compare detections, which random scores would fail for every sample."""

    name: str  # recorded in the output: what found the masks, with which weights

    def detect(self, image: "Image.Image", labels: Sequence[str]) -> list[list[Detection]]:
        """Per label, every detection above the annotator's threshold, best score first."""
        ...


class KeypointAnnotator(Protocol):
    name: str

    def keypoints(self, image: "Image.Image", boxes: Sequence[Box], labels: Sequence[str]) -> list[Keypoints]:
        """17 keypoints per box (normalized xy, scores in [0, 1], a schema of
        triplets.KEYPOINT_SCHEMAS chosen per label: the same label always gets the same one)."""
        ...


class Captioner(Protocol):
    name: str

    def caption(self, image: "Image.Image") -> str:
        ...


@dataclass
class Annotators:
    """The annotators one run uses; captioner is None unless settings.caption."""

    masks: MaskAnnotator
    keypoints: KeypointAnnotator
    captioner: Captioner | None = None

    @property
    def random_weights(self) -> bool:
        """The mask annotator has random weights (its `random_weights`): its detections mean nothing."""
        return bool(getattr(self.masks, "random_weights", False))

    def names(self) -> dict[str, str | None]:
        return {"masks": self.masks.name, "keypoints": self.keypoints.name,
                "captioner": None if self.captioner is None else self.captioner.name}


# ---------------------------------------------------------------------------------------------
# discovery


def installed(group: str) -> dict[str, EntryPoint]:
    """The entry points of `group` by name (installed packages' plugins)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def plugin_factory(group: str, name: str, option: str, what: str = "annotator plugin") -> Callable[..., Any]:
    """The factory entry point `name` of `group` names (`what`: how messages call it). UserError
    when none is installed under that name (listing those that are) or it cannot be imported."""
    found = installed(group)
    if name not in found:
        raise UserError(f"no {what} named {name!r} in {group} "
                        f"(installed: {', '.join(sorted(found)) or 'none: is relationbench installed?'})",
                        hint=f"pick one of those with {option}, or install the package that provides {name!r}")
    try:
        return found[name].load()
    except (ImportError, AttributeError) as exc:
        raise UserError(f"the {what} {name!r} ({found[name].value}) cannot be loaded: {exc}",
                        hint="reinstall the package that provides it") from exc


def load_annotators(backbone: "Backbone", settings: AnnotateSettings, device: str = "cpu") -> Annotators:
    """The annotators `settings` names, looked up among the entry points and built for
    `backbone` on `device`. UserError for an unknown name or missing weights."""
    masks = load_mask_annotator(backbone, settings, device)
    keypoints = plugin_factory(KEYPOINT_GROUP, settings.keypoint_annotator, "--keypoint-annotator")(
        backbone, settings, device)
    captioner = (plugin_factory(CAPTIONER_GROUP, settings.captioner, "AnnotateSettings.captioner")(
        backbone, settings, device) if settings.caption else None)
    return Annotators(masks, keypoints, captioner)


def load_mask_annotator(backbone: "Backbone", settings: AnnotateSettings, device: str = "cpu") -> MaskAnnotator:
    """The mask annotator alone (what `relbench data synthesize --no-annotate` needs to find
    the entities), as load_annotators builds it."""
    return plugin_factory(MASK_GROUP, settings.mask_annotator, "--mask-annotator")(backbone, settings, device)


def weights_id(backbone: "Backbone", key: str) -> str:
    """A stable name for the weights of `key`: "hf:<repo>" or "local:<folder name>"."""
    source = backbone.source(key)
    return f"local:{Path(source.location).name}" if source.kind == "local" else f"hf:{source.location}"


# ---------------------------------------------------------------------------------------------
# owlv2-sam: OWLv2 boxes by name, SAM masks from the boxes


class SamSegmenter:
    """SAM prompted with boxes: one image embedding, one mask per box (single-mask output: a
    box is an unambiguous prompt)."""

    def __init__(self, id: str, model: Any, processor: Any, device: str = "cpu"):
        self.id, self.processor, self.device = id, processor, device
        self.model = model.to(device).eval()

    def prompt(self, image: "Image.Image", boxes: Sequence[Box]) -> dict[str, Any]:
        """The processor's inputs: the resized, padded image and the boxes as pixel xyxy of
        the image, which the processor rescales to the resized image (input_boxes [1, N, 4])."""
        width, height = image.size
        pixels = [[b[0] * width, b[1] * height, b[2] * width, b[3] * height] for b in boxes]
        return self.processor(images=image, input_boxes=[pixels], return_tensors="pt")

    def masks(self, image: "Image.Image", boxes: Sequence[Box]) -> list[np.ndarray]:
        """One bool [H, W] mask per box (the image's size)."""
        import torch

        if not boxes:
            return []
        inputs = self.prompt(image, boxes)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device, dtype),
                             input_boxes=inputs["input_boxes"].to(self.device, dtype), multimask_output=False)
        masks = self.processor.post_process_masks(out.pred_masks.float().cpu(), inputs["original_sizes"],
                                                  inputs["reshaped_input_sizes"])[0]  # [N, 1, H, W] bool
        return [m[0].numpy().astype(bool) for m in masks]


class OwlSamAnnotator:
    """MaskAnnotator: OWLv2 finds up to `max_detections` distinct boxes per name above the
    threshold, SAM segments each. random_weights: built on the tiny backbone."""

    def __init__(self, detector: OwlDetector, segmenter: SamSegmenter, max_detections: int,
                 random_weights: bool = False):
        self.detector, self.segmenter, self.max_detections = detector, segmenter, max_detections
        self.random_weights = random_weights
        self.name = f"owlv2+sam:{detector.id}+{segmenter.id}"

    def detect(self, image, labels):
        found = self.detector.candidates([image], [list(labels)], self.max_detections)[0]
        masks = iter(self.segmenter.masks(image, [d.box for per_label in found for d in per_label]))
        return [[Detection(d.box, d.score, next(masks)) for d in per_label] for per_label in found]


_SAM_SEED_OFFSET = 51  # see backbones.seeded
TINY_SAM = dict(  # facebook/sam-vit-base: vision 768 x 12 at 1024 px, prompt/mask decoder 256
    vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                       patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=8),
    prompt_encoder_config=dict(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4),
    mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                             iou_head_hidden_dim=16),
)


def sam_processor(side: int):
    """SAM's processor for a `side` px model (longest edge resized to side, padded square;
    masks at side / 4), built offline."""
    from transformers import SamImageProcessor, SamProcessor

    low = side // 4
    return SamProcessor(image_processor=SamImageProcessor(
        size={"longest_edge": side}, pad_size={"height": side, "width": side},
        mask_size={"longest_edge": low}, mask_pad_size={"height": low, "width": low}))


def build_tiny_sam(seed: int = 0):
    """(model, processor): SAM at toy size with seeded weights, offline."""
    from transformers import SamConfig, SamModel

    processor = sam_processor(TINY_SAM["vision_config"]["image_size"])
    return seeded(seed, _SAM_SEED_OFFSET, lambda: SamModel(SamConfig(**TINY_SAM))), processor


def load_segmenter(backbone: "Backbone", device: str = "cpu") -> SamSegmenter:
    """The backbone's SAM (weight key `segmenter`; the tiny SAM on tiny), float32."""
    if backbone.is_tiny:
        model, processor = build_tiny_sam(backbone.preset.seed or 0)
        return SamSegmenter(f"tiny:sam-seed{backbone.preset.seed}", model, processor, device)
    from transformers import SamModel, SamProcessor

    path = backbone.fetch("segmenter")
    with loading_from(path, "a SAM model and its processor", "give the folder of facebook/sam-vit-base (or another "
                      "transformers SAM) with --weight segmenter=PATH"):
        processor = SamProcessor.from_pretrained(path, local_files_only=True)
        model = SamModel.from_pretrained(path, local_files_only=True)
    return SamSegmenter(weights_id(backbone, "segmenter"), model, processor, device)


def load_owlv2_sam(backbone: "Backbone", settings: AnnotateSettings, device: str = "cpu") -> OwlSamAnnotator:
    """Entry point `owlv2-sam`: OWLv2 (weight key `detector`) + SAM (`segmenter`)."""
    detector = load_detector(backbone, device, settings=DetectorSettings(threshold=settings.threshold,
                                                                         distinct_iou=settings.nms_iou))
    return OwlSamAnnotator(detector, load_segmenter(backbone, device), settings.max_detections,
                           random_weights=backbone.is_tiny)


# ---------------------------------------------------------------------------------------------
# vitpose-plus: ViTPose+ keypoints in each box, the expert chosen per label


def pose_kind(label: str, person_nouns: Sequence[str]) -> str:
    """"person" when the label's last word is a person noun, else "animal" (animals and
    other objects)."""
    words = label.lower().split()
    return "person" if words and words[-1] in person_nouns else "animal"


_JOINT_ALIASES = {"root of tail": "tail root", "f paw": "front paw", "b paw": "back paw"}


def _joint_name(name: str) -> str:
    """A checkpoint's joint label in KEYPOINT_SCHEMAS' words: "L_Eye" -> "left eye",
    "L_F_Paw" -> "left front paw", "Root_of_tail" -> "tail root"."""
    name = " ".join(name.lower().replace("_", " ").split())
    name = re.sub(r"^l ", "left ", re.sub(r"^r ", "right ", name))
    for short, long in _JOINT_ALIASES.items():
        name = name.replace(short, long)
    return name


def head_schema(config: Any, where: str | Path) -> str:
    """The keypoint schema a ViTPose checkpoint's head predicts, from its config's id2label.
    UserError when its 17 joint names are not one of KEYPOINT_SCHEMAS."""
    labels = getattr(config, "id2label", None) or {}
    names = [str(labels[i]) for i in sorted(labels)]
    for schema, joints in KEYPOINT_SCHEMAS.items():
        if tuple(map(_joint_name, names)) == joints:
            return schema
    raise UserError(f"this pose model predicts {len(names)} joints named {', '.join(names) or '(none)'}; "
                    f"the triplets need 17 in one of the orders {', '.join(KEYPOINT_SCHEMAS)}", path=where,
                    hint="give a ViTPose checkpoint whose head predicts COCO-17 or AP-10K-17 points, its "
                         "config.json's id2label naming them (e.g. 'L_Eye' or 'left eye')")


@dataclass
class PoseRoute:
    """One ViTPose model serving one kind of label: its expert and the schema its head predicts."""

    id: str
    model: Any
    processor: Any
    expert: int
    schema: str


def pose_boxes(boxes: Sequence[Box], size: tuple[int, int]) -> np.ndarray:
    """Normalized xyxy boxes -> ViTPose's (x, y, w, h) in pixel-centre coordinates [N, 4]."""
    width, height = size
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0] * width - 0.5, b[:, 1] * height - 0.5,
                     (b[:, 2] - b[:, 0]) * width, (b[:, 3] - b[:, 1]) * height], axis=1)


def normalized_keypoints(xy: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """ViTPose's keypoints [..., 2] in pixel-centre coordinates -> normalized, clipped to [0, 1]."""
    width, height = size
    return np.clip((np.asarray(xy, dtype=np.float64) + 0.5) / np.array([width, height]), 0.0, 1.0)


class VitPoseAnnotator:
    """KeypointAnnotator: ViTPose+ top-down in each box, one forward per route."""

    def __init__(self, routes: Mapping[str, PoseRoute], person_nouns: Sequence[str], device: str = "cpu"):
        self.routes, self.person_nouns, self.device = dict(routes), tuple(person_nouns), device
        for route in self.routes.values():
            route.model.to(device).eval()
        self.name = "vitpose-plus:" + ",".join(f"{kind}={r.id}@expert{r.expert}/{r.schema}"
                                               for kind, r in self.routes.items())

    def keypoints(self, image, boxes, labels):
        import torch

        out: list[Keypoints | None] = [None] * len(boxes)
        for kind, route in self.routes.items():
            picked = [i for i, label in enumerate(labels) if pose_kind(label, self.person_nouns) == kind]
            if not picked:
                continue
            xywh = pose_boxes([boxes[i] for i in picked], image.size)
            inputs = route.processor(image, boxes=[xywh], return_tensors="pt")
            dtype = next(route.model.parameters()).dtype
            with torch.inference_mode():
                result = route.model(pixel_values=inputs["pixel_values"].to(self.device, dtype),
                                     dataset_index=torch.full((len(picked),), route.expert, device=self.device))
            result.heatmaps = result.heatmaps.float().cpu()
            poses = route.processor.post_process_pose_estimation(result, boxes=[xywh])[0]
            for i, pose in zip(picked, poses):
                out[i] = Keypoints(xy=normalized_keypoints(pose["keypoints"].numpy(), image.size),
                                   score=np.clip(pose["scores"].numpy().reshape(-1), 0.0, 1.0), schema=route.schema)
        return out


_POSE_SEED_OFFSET = 52  # see backbones.seeded
# ViTPose+ base: 768 x 12 layers, 6 experts with 192 part features each, input 256 x 192, patch 16
TINY_VITPOSE = dict(image_size=[64, 48], patch_size=[16, 16], hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, mlp_ratio=2, num_experts=6, part_features=8, out_indices=[2])
_HEAD_LABELS = {  # id2label as transformers' ViTPose conversion writes it (COCO); AP-10K's joint names
    "coco-17": ("Nose", "L_Eye", "R_Eye", "L_Ear", "R_Ear", "L_Shoulder", "R_Shoulder", "L_Elbow", "R_Elbow",
                "L_Wrist", "R_Wrist", "L_Hip", "R_Hip", "L_Knee", "R_Knee", "L_Ankle", "R_Ankle"),
    "ap10k-17": ("L_Eye", "R_Eye", "Nose", "Neck", "Root_of_tail", "L_Shoulder", "L_Elbow", "L_F_Paw", "R_Shoulder",
                 "R_Elbow", "R_F_Paw", "L_Hip", "L_Knee", "L_B_Paw", "R_Hip", "R_Knee", "R_B_Paw"),
}


def build_tiny_vitpose(seed: int = 0, schema: str = "coco-17"):
    """(model, processor): ViTPose+ at toy size with seeded weights, its head's joints named as
    `schema`'s, and its image processor, offline."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation, VitPoseImageProcessor

    config = VitPoseConfig(backbone_config=VitPoseBackboneConfig(**TINY_VITPOSE), num_labels=N_KEYPOINTS,
                           id2label=dict(enumerate(_HEAD_LABELS[schema])))
    height, width = TINY_VITPOSE["image_size"]
    processor = VitPoseImageProcessor(size={"height": height, "width": width})
    return seeded(seed, _POSE_SEED_OFFSET, lambda: VitPoseForPoseEstimation(config)), processor


def load_vitpose_plus(backbone: "Backbone", settings: AnnotateSettings, device: str = "cpu") -> VitPoseAnnotator:
    """Entry point `vitpose-plus`: people on weight key `pose` with settings.person_expert,
    the rest on `pose_animal` with settings.animal_expert (one model when both name the same
    folder). On tiny: toy models whose heads predict coco-17 (people) and ap10k-17 (the rest)."""
    routes, loaded = {}, {}
    for kind, key, expert in (("person", "pose", settings.person_expert),
                              ("animal", "pose_animal", settings.animal_expert)):
        if backbone.is_tiny:
            schema = "coco-17" if kind == "person" else "ap10k-17"
            model, processor = build_tiny_vitpose(backbone.preset.seed or 0, schema)
            id, where = f"tiny:vitpose-plus-{schema}-seed{backbone.preset.seed}", f"tiny {key}"
        else:
            from transformers import VitPoseForPoseEstimation, VitPoseImageProcessor

            where = backbone.fetch(key)
            if where not in loaded:
                with loading_from(where, "a ViTPose model and its image processor", "give the folder of "
                                  f"usyd-community/vitpose-plus-base (or another ViTPose) with --weight {key}=PATH"):
                    loaded[where] = (VitPoseForPoseEstimation.from_pretrained(where, local_files_only=True),
                                     VitPoseImageProcessor.from_pretrained(where, local_files_only=True))
            (model, processor), id = loaded[where], weights_id(backbone, key)
        experts = model.config.backbone_config.num_experts
        if not 0 <= expert < experts:
            raise UserError(f"{kind} expert {expert} asked, but this pose model has {experts} expert(s) "
                            "(ViTPose+: COCO 0, AiC 1, MPII 2, AP-10K 3, APT-36K 4, COCO-WholeBody 5)", path=where,
                            hint="set person_expert / animal_expert within range (0 for a plain ViTPose)")
        routes[kind] = PoseRoute(id, model, processor, expert, head_schema(model.config, where))
    return VitPoseAnnotator(routes, settings.person_nouns, device)


# ---------------------------------------------------------------------------------------------
# qwen2.5-vl: a caption from the VQAScore VLM


class VlmCaptioner:
    """Captioner: the VLM answers `prompt` about the image, greedy, at most `max_new_tokens`."""

    def __init__(self, scorer: "VQAScorer", prompt: str, max_new_tokens: int):
        self.scorer, self.prompt, self.max_new_tokens = scorer, prompt, max_new_tokens
        self.name = f"vlm:{scorer.id}"

    def caption(self, image):
        import torch

        inputs = self.scorer.prepare([image], [self.prompt])  # the question template is "{text}"
        with torch.inference_mode():
            ids = self.scorer.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = ids[:, inputs["input_ids"].shape[1]:]
        return self.scorer.processor.batch_decode(new, skip_special_tokens=True)[0].strip()


def load_vlm_captioner(backbone: "Backbone", settings: AnnotateSettings, device: str = "cpu") -> VlmCaptioner:
    """Entry point `qwen2.5-vl`: the VQAScore VLM (weight key `vqa`; the tiny Qwen2.5-VL on tiny)."""
    from ..metrics.vqa import VQASettings, load_vqa_scorer

    scorer = load_vqa_scorer(backbone, device, settings=VQASettings(question="{text}", batch_size=1, workers=1))
    return VlmCaptioner(scorer, settings.caption_prompt, settings.caption_tokens)


__all__ = [
    "AnnotateSettings",
    "Annotators",
    "CAPTIONER_GROUP",
    "Captioner",
    "Detection",
    "KEYPOINT_GROUP",
    "KeypointAnnotator",
    "MASK_GROUP",
    "MaskAnnotator",
    "OwlSamAnnotator",
    "SamSegmenter",
    "VitPoseAnnotator",
    "VlmCaptioner",
    "build_tiny_sam",
    "build_tiny_vitpose",
    "head_schema",
    "installed",
    "load_annotators",
    "load_mask_annotator",
    "load_owlv2_sam",
    "load_segmenter",
    "load_vitpose_plus",
    "load_vlm_captioner",
    "normalized_keypoints",
    "plugin_factory",
    "pose_boxes",
    "pose_kind",
]
