"""The data engine's first half (paper Sec. 3.3): raw samples of a new relation, then annotation.

The paper made its tuning set D = (x, c_i, c_t) with DALL-E 3, asking for "the photo of the
same ..." animal so that the target x and the references c_i share identities. Here, per
sample i of `relbench data synthesize --relation hug --entities bear,tiger OUT`:

1. c_t, a relation prompt: "A photo of a bear hugging a tiger in the snow." (`relation_prompts`:
   the entities with their articles around the predicate, one scene of `SCENES` per sample);
2. x, from a text-to-image generator (`ImageGenerator`; default `sdxl`: the backbone's SDXL
   pipeline through the `sdxl` method card, 30 Euler steps), seed `seed + i`;
3. each entity found in x by the mask annotator of `relbench data annotate`, by annotate's own
   rules (`match_entities`: threshold, extra and same-object, two of one class left to right),
   so that reference k is drawn from the object annotate gives entity k; its box cropped as a
   padded square (`square_crop`);
4. c_i per entity: MS-Diffusion (the `msdiffusion` card) conditioned on that crop, prompted in
   the paper's style with a neutral pose (`REFERENCE_PROMPT`), the entity drawn in
   `reference_box`, seed `seed + i`: the same identity in another pose, never a pasted crop
   (which the paper found gives a copy-and-paste effect).

A sample whose target those rules set aside is set aside here, before its references are
drawn (synthesis.json, `set_aside`, with the reason; its target stays in <id>/ for a look, out
of raw.json), never kept with a guessed crop.
Then, unless told not to, `annotate_raw` turns OUT into the triplet format under OUT/triplets
and `check_triplets` checks it; the annotation report (annotate-report.md) lands there too.

OUT (a new or empty folder; everything but triplets/ written atomically):

    raw.json                 RAW: what `relbench data annotate` reads (below)
    synthesis.json           how it was made: relation, prompts, seeds, generator and reference
                             settings, backbone, device, dtype, versions, crops, set-aside samples
    <id>/target.png          x
    <id>/reference<k>.png    c_k, one per entity
    crops/<id>-<k>/crop.png  what MS-Diffusion saw of entity k (one image per folder: a
                             subject's reference is the first image of its folder)
    triplets/<relation>/     after annotation: the triplet format (data/triplets.py)

`raw.json` (the RAW format of data/annotate.py): {"version": 1, "samples": [{"id": "0",
"relation": "hug", "prompt": "...", "entities": ["bear", "tiger"], "predicate": "hugging",
"target": "0/target.png", "references": ["0/reference0.png", "0/reference1.png"]}]}; paths
relative to the folder, every entity and the predicate standing in the prompt as whole words.

Image generators are plugins: an entry point in the group `relationbench.image_generators`
names a factory `(context: relationbench.methods.Context) -> ImageGenerator` (a class whose
constructor takes the context will do); `sdxl` is declared there by this package. A hosted
generator fits the same interface, e.g. (not part of this package, never called by its tests):

    class DallE3:                       # [project.entry-points."relationbench.image_generators"]
        name = "dalle3"                 # dalle3 = "mypackage.generators:DallE3"
        def __init__(self, context):
            from openai import OpenAI
            self.client = OpenAI()
        def generate(self, prompts, seeds, size):   # DALL-E 3 takes no seed: record that
            images = []
            for prompt in prompts:
                data = self.client.images.generate(model="dall-e-3", prompt=prompt, size="1024x1024",
                                                   response_format="b64_json").data[0].b64_json
                images.append(read_image(base64.b64decode(data)).resize(size))
            return images
        def describe(self):
            return {"model": "dall-e-3", "seeded": False}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from ..errors import UserError
from .annotate import RAW_MANIFEST, RAW_VERSION, _Aside, detect, match_entities
from .triplets import MAX_ENTITIES, RELATION_NAME, new_folder

if TYPE_CHECKING:
    from PIL import Image

    from ..methods import Context
    from .annotate import AnnotateReport
    from .annotators import AnnotateSettings, MaskAnnotator

GENERATOR_GROUP = "relationbench.image_generators"
RECORD = "synthesis.json"
RECORD_VERSION = 1
CROPS = "crops"
TRIPLETS = "triplets"

# one per sample, in turn: varied settings and backgrounds for the same relation
SCENES = ("in a forest", "on the grass", "in the snow", "on a sandy beach", "in a sunny meadow",
          "by a river", "in a living room", "on a city street")
PROMPT = "A photo of {subjects} {scene}."
# paper Sec. 3.3 (Fig. 3): "The photo of the same ..." keeps the identity; a neutral pose
REFERENCE_PROMPT = "The photo of the same {entity}, standing alone, full body, plain background."


@dataclass(frozen=True)
class SynthesizeSettings:
    """How raw samples are made. Sample i uses seed + i for its target and its references."""

    samples: int = 6  # paper Sec. 4: 4-6 tuning samples per relation
    seed: int = 0
    generator: str = "sdxl"  # an entry point of GENERATOR_GROUP
    scenes: tuple[str, ...] = SCENES  # sample i is set in scenes[i % len(scenes)]
    reference_prompt: str = REFERENCE_PROMPT  # {entity}: its name
    reference_card: str = "msdiffusion"  # the method that draws a reference from a crop
    reference_box: tuple[float, float, float, float] = (0.15, 0.1, 0.85, 0.9)  # normalized xyxy
    crop_padding: float = 0.1  # added on each side of the crop, as a fraction of the box's longer side
    size: int | None = None  # square images of this many pixels; None: the backbone's resolution

    def __post_init__(self):
        if self.samples < 1:
            raise UserError(f"--samples must be at least 1, got {self.samples}")
        if not self.scenes:
            raise UserError("give at least one scene")
        if self.crop_padding < 0:
            raise UserError(f"crop_padding must be >= 0, got {self.crop_padding}")
        x0, y0, x1, y1 = self.reference_box
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise UserError(f"reference_box {self.reference_box} must be normalized x0 < x1, y0 < y1 in [0, 1]")
        if "{entity}" not in self.reference_prompt:
            raise UserError(f"reference_prompt {self.reference_prompt!r} must contain {{entity}}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise UserError(f"size must be a positive multiple of 8, got {self.size}")


@dataclass(frozen=True)
class RelationSpec:
    """What to synthesize: the relation (its folder name), 1 or 2 entities, the predicate as it
    will stand in every prompt."""

    relation: str
    entities: tuple[str, ...]
    predicate: str


def relation_spec(relation: str, entities: str | Sequence[str], predicate: str | None = None) -> RelationSpec:
    """Check and complete what the user asked for. `entities`: names, or one string of
    comma-separated names ("bear,tiger"); `predicate`: default the relation's words with the
    first verb in its -ing form ("hug" -> "hugging", "shake_hands" -> "shaking hands").
    Raises UserError naming the fix."""
    if not RELATION_NAME.fullmatch(relation or ""):
        raise UserError(f"--relation {relation!r} must be letters, digits, _ and - (not first): it names a "
                        "folder and a LoRA", hint="e.g. --relation hug or --relation shake_hands")
    names = [e.strip() for e in (entities.split(",") if isinstance(entities, str) else entities)]
    if not 1 <= len(names) <= MAX_ENTITIES or not all(names):
        raise UserError(f"--entities must name 1 or {MAX_ENTITIES} objects, comma-separated, got {entities!r}",
                        hint='e.g. --entities "bear,tiger" (a relation between two) or --entities person')
    bad = [e for e in names if not re.fullmatch(r"[A-Za-z][A-Za-z -]*", e)]
    if bad:
        raise UserError(f"entity {bad[0]!r} must be a class noun of letters, spaces and hyphens",
                        hint="name each object by its class noun, e.g. bear, brown bear, person")
    predicate = " ".join((predicate or relation_predicate(relation)).split())
    if not re.fullmatch(r"[A-Za-z][A-Za-z' -]*", predicate):
        raise UserError(f"--predicate {predicate!r} must be words (letters, spaces, hyphens, apostrophes)",
                        hint="the relation phrase as it stands in a prompt, e.g. 'shaking hands with'")
    return RelationSpec(relation, tuple(names), predicate)


def relation_predicate(relation: str) -> str:
    """The relation folder name as a predicate: words split at _ and spaces, the first one in
    its -ing form ("hug" -> "hugging", "shake_hands" -> "shaking hands", "high-five" ->
    "high-fiving"); a first word already ending in -ing stays."""
    first, *rest = [w for w in re.split(r"[_\s]+", relation) if w]
    return " ".join([ing_form(first), *rest])


_VOWELS = "aeiou"


def ing_form(verb: str) -> str:
    """The -ing form of an English verb by the spelling rules (of a hyphenated one, its last
    part): "ride" -> "riding", "lie" -> "lying", "see" -> "seeing", a one-syllable word ending
    consonant-vowel-consonant doubles its last letter ("hug" -> "hugging", not "play" or
    "box"). Irregular doubling of longer words ("admit") is not known: pass --predicate."""
    head, sep, word = verb.rpartition("-")
    w = word.lower()
    if w.endswith("ing") and len(w) > 4:
        return verb
    if w.endswith("ie"):
        word = word[:-2] + "y"
    elif w.endswith("e") and len(w) > 2 and not w.endswith(("ee", "ye", "oe")):
        word = word[:-1]
    elif (len(w) >= 3 and w[-1] not in _VOWELS + "wxy" and w[-2] in _VOWELS and w[-3] not in _VOWELS
          and sum(c in _VOWELS for c in w) == 1):
        word = word + word[-1]
    return f"{head}{sep}{word}ing"


def _with_article(noun: str) -> str:
    return f"{'an' if noun[0].lower() in _VOWELS else 'a'} {noun}"


def relation_prompts(spec: RelationSpec, n: int, scenes: Sequence[str] = SCENES) -> list[str]:
    """n prompts c_t: "A photo of a bear hugging a tiger in the snow." (one entity: "A photo of a
    person waving in a park."), sample i in scenes[i % len(scenes)]. The entities and the
    predicate are words (relation_spec), so each stands in the prompt as whole words."""
    first, *second = spec.entities
    subjects = " ".join([_with_article(first), spec.predicate, *map(_with_article, second)])
    return [PROMPT.format(subjects=subjects, scene=scenes[i % len(scenes)]) for i in range(n)]


def square_crop(box: Sequence[float], size: tuple[int, int], padding: float) -> tuple[int, int, int, int]:
    """Pixel box (left, top, right, bottom) of the square around `box` (normalized xyxy) in an
    image of `size` (width, height): its side is the box's longer side in pixels times (1 + 2
    padding), rounded, at least 1 and at most the image's shorter side; centred on the box and
    shifted (never shrunk) to lie inside the image."""
    width, height = size
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    side = min(max(1, round(max(x1 - x0, y1 - y0) * (1 + 2 * padding))), width, height)
    left = min(max(round((x0 + x1 - side) / 2), 0), width - side)
    top = min(max(round((y0 + y1 - side) / 2), 0), height - side)
    return left, top, left + side, top + side


# ---------------------------------------------------------------------------------------------
# generators


class ImageGenerator(Protocol):
    """A text-to-image generator of targets. `generate` returns one RGB image of `size`
    (width, height) per prompt, drawn from its seed, so that the same call gives the same
    images where the generator allows it; `describe` is what synthesis.json records to make
    it again (model, settings; say so when it takes no seed). An optional `close()` is called
    when synthesis ends (undo changes to shared models)."""

    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int]) -> list["Image.Image"]: ...

    def describe(self) -> dict[str, Any]: ...


class CardImages:
    """Images from a method card on the backbone's pipeline: one single-subject or text-only
    case per image, sampled by the method's own generate (its settings, seeds and checks)."""

    def __init__(self, context: "Context", card: str):
        from ..methods import default_registry

        self.context = context
        self.card = default_registry().card(card)
        self._methods: dict[tuple[int, int], Any] = {}

    def method(self, size: tuple[int, int]):
        """The card's method at `size` (width, height), built and loaded once."""
        if size not in self._methods:
            width, height = size
            method = self.card.with_settings({"height": height, "width": width}).build(self.context)
            method.load()
            self._methods[size] = method
        return self._methods[size]

    def images(self, cases: Sequence[Any], size: tuple[int, int]) -> list["Image.Image"]:
        from ..methods.base import Request

        return [s.image for s in self.method(size).generate([Request(c, 0, c.seed) for c in cases])]

    def describe(self) -> dict[str, Any]:
        return {"card": self.card.describe(self.context.backbone.is_tiny)}

    def close(self) -> None:
        """Undo what the methods did to the shared pipeline (attention processors)."""
        for method in self._methods.values():
            method.close()
        self._methods.clear()


def _case(case_id: str, prompt: str, seed: int, subjects: tuple = (), boxes: tuple = ()):
    from ..suites.model import Case

    return Case(id=case_id, suite="synthesize", kind="multi" if len(subjects) > 1 else "single",
                subjects=subjects, prompt=prompt, predicate=None, boxes=boxes, seed=seed)


class SDXLGenerator:
    """The default generator: SDXL on the backbone (the `sdxl` card: 30 Euler steps, guidance
    5.0), text only."""

    name = "sdxl"

    def __init__(self, context: "Context"):
        self._card = CardImages(context, "sdxl")

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], size: tuple[int, int]) -> list["Image.Image"]:
        return self._card.images([_case(f"target-{s}", p, s) for p, s in zip(prompts, seeds)], size)

    def describe(self) -> dict[str, Any]:
        return self._card.describe()

    def close(self) -> None:
        self._card.close()


def generator_factory(name: str):
    """The factory of generator `name` (call it with a Context). UserError when no such plugin
    is installed or it cannot be imported."""
    from .annotators import plugin_factory

    return plugin_factory(GENERATOR_GROUP, name, "--generator", what="image generator")


@dataclass(frozen=True)
class ReferenceJob:
    """One reference to draw: the crop (alone in its folder `crops/<key>/`), its entity, prompt, seed."""

    key: str
    entity: str
    prompt: str
    seed: int


class MSDiffusionReferences:
    """References of an entity in a neutral pose: MS-Diffusion conditioned on its crop, which
    it reads as a subject's reference image from `<context.data_root>/crops/<key>/`; the
    entity is drawn in `box`."""

    def __init__(self, context: "Context", card: str, box: tuple[float, float, float, float]):
        self._card = CardImages(context, card)
        self.box = tuple(box)

    def generate(self, jobs: Sequence[ReferenceJob], size: tuple[int, int]) -> list["Image.Image"]:
        from ..suites.model import Subject

        cases = [_case(job.key, job.prompt, job.seed,
                       (Subject(name=job.key, class_noun=job.entity, source=CROPS, dir=job.key),), (self.box,))
                 for job in jobs]
        return self._card.images(cases, size)

    def describe(self) -> dict[str, Any]:
        return {**self._card.describe(), "box": list(self.box)}

    def close(self) -> None:
        self._card.close()


# ---------------------------------------------------------------------------------------------
# RAW


@dataclass
class RawResult:
    """What synthesize_raw wrote: the RAW records kept, and (id, reason) of those set aside."""

    samples: list[dict[str, Any]]
    set_aside: list[tuple[str, str]]


def synthesize_raw(root: Path, spec: RelationSpec, settings: SynthesizeSettings, *, generator: ImageGenerator,
                   references: MSDiffusionReferences, masks: "MaskAnnotator", rules: "AnnotateSettings",
                   size: tuple[int, int], record: dict[str, Any] | None = None, progress: bool = True) -> RawResult:
    """Write the raw samples into `root` (an empty folder; see the module docstring): targets,
    then the entities found in each, then their references; raw.json and synthesis.json last
    (`record`: extra facts for synthesis.json, e.g. backbone and device)."""
    from tqdm.auto import tqdm

    prompts = relation_prompts(spec, settings.samples, settings.scenes)
    made = [{"id": str(i), "prompt": prompt, "seed": settings.seed + i} for i, prompt in enumerate(prompts)]
    targets = {}
    for sample in tqdm(made, desc="targets", unit="image", disable=not progress):
        (root / sample["id"]).mkdir()
        (image,) = generator.generate([sample["prompt"]], [sample["seed"]], size)
        targets[sample["id"]] = image.convert("RGB")
        targets[sample["id"]].save(root / sample["id"] / "target.png")

    jobs: list[ReferenceJob] = []
    for sample in tqdm(made, desc="find entities", unit="image", disable=not progress):
        target = targets[sample["id"]]
        found = find_entities(masks, target, spec.entities, rules)
        if isinstance(found, str):
            sample["set_aside"] = found
            continue
        sample["crops"], sample["reference_prompts"] = [], []
        for k, (entity, detection) in enumerate(zip(spec.entities, found)):
            pixels = square_crop(detection.box, target.size, settings.crop_padding)
            key = f"{sample['id']}-{k}"
            (root / CROPS / key).mkdir(parents=True)
            target.crop(pixels).save(root / CROPS / key / "crop.png")
            sample["crops"].append({"entity": entity, "box": [float(v) for v in detection.box],
                                    "score": float(detection.score), "pixels": list(pixels),
                                    "file": f"{CROPS}/{key}/crop.png"})
            sample["reference_prompts"].append(settings.reference_prompt.format(entity=entity))
            jobs.append(ReferenceJob(key, entity, sample["reference_prompts"][-1], sample["seed"]))

    for job in tqdm(jobs, desc="references", unit="image", disable=not progress):
        sample_id, k = job.key.rsplit("-", 1)
        (image,) = references.generate([job], size)
        image.convert("RGB").save(root / sample_id / f"reference{k}.png")

    kept = [s for s in made if "crops" in s]
    samples = [{"id": s["id"], "relation": spec.relation, "prompt": s["prompt"], "entities": list(spec.entities),
                "predicate": spec.predicate, "target": f"{s['id']}/target.png",
                "references": [f"{s['id']}/reference{k}.png" for k in range(len(spec.entities))]} for s in kept]
    set_aside = [(s["id"], s["set_aside"]) for s in made if "set_aside" in s]
    _write_json(root / RECORD, {
        "version": RECORD_VERSION,
        "relation": spec.relation, "entities": list(spec.entities), "predicate": spec.predicate,
        "settings": _plain(settings), "size": list(size),
        "generator": {"name": generator.name, **generator.describe()},
        "references": references.describe(),
        "entity_threshold": rules.threshold,
        **(record or {}),
        "samples": made,
        "set_aside": [{"id": i, "reason": r} for i, r in set_aside],
    })
    _write_json(root / RAW_MANIFEST, {"version": RAW_VERSION, "samples": samples})
    return RawResult(samples, set_aside)


def find_entities(masks: "MaskAnnotator", image: "Image.Image", entities: Sequence[str],
                  rules: "AnnotateSettings") -> list[Any] | str:
    """Per entity its detection by annotate's rules (match_entities; the comparing rules off
    for a random-weight annotator), the object annotate will pair with that entity's
    reference; else why not, as a sentence."""
    labels = list(dict.fromkeys(entities))
    try:
        return match_entities(entities, detect(masks, image, labels), rules, "target",
                              compare=not getattr(masks, "random_weights", False))
    except _Aside as aside:
        return aside.reason


class RememberedMasks:
    """A mask annotator that remembers each (image, labels) detection: synthesize finds the
    entities in each target, and annotate then asks for that very image again (read back from
    its lossless PNG, so the same pixels): detected once, and annotate's masks are the objects
    the references were drawn from. Other attributes are the annotator's."""

    def __init__(self, masks: "MaskAnnotator"):
        self.masks = masks
        self._seen: dict[tuple, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.masks, name)

    def detect(self, image: "Image.Image", labels: Sequence[str]):
        key = (hashlib.sha256(image.tobytes()).hexdigest(), image.size, image.mode, tuple(labels))
        if key not in self._seen:
            self._seen[key] = self.masks.detect(image, labels)
        return self._seen[key]


def _plain(settings: Any) -> dict[str, Any]:
    """A settings dataclass as JSON values (tuples as lists, anything else as its str)."""
    return json.loads(json.dumps(dataclasses.asdict(settings), default=str))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# the command


@dataclass
class SynthesizeOptions:
    out: str | Path
    relation: str
    entities: str | Sequence[str]
    predicate: str | None = None  # None: from the relation name (relation_predicate)
    settings: SynthesizeSettings = field(default_factory=SynthesizeSettings)
    annotate: bool = True  # annotate into OUT/triplets and check it
    annotate_settings: "AnnotateSettings | None" = None  # None: AnnotateSettings()
    backbone: str = "sdxl"
    weights: dict[str, str] = field(default_factory=dict)  # backbone weight overrides
    device: str = "auto"
    dtype: str = "auto"
    quiet: bool = False


@dataclass
class SynthesizeSummary:
    out: Path
    samples: int  # kept in raw.json
    set_aside: list[tuple[str, str]]  # (id, reason)
    triplets: Path | None  # the annotated set, when annotated
    report: "AnnotateReport | None"


def synthesize(opts: SynthesizeOptions) -> SynthesizeSummary:
    """What `relbench data synthesize` does: check the request, load the annotators and the
    generator before writing, write RAW atomically into opts.out, then annotate it into
    opts.out/triplets and check that. UserError when OUT is not new or empty, when no target
    showed its entities (nothing written), or when the annotation keeps no sample (RAW stays,
    to annotate again)."""
    import torch

    from .. import __version__
    from ..backbones import get_backbone
    from ..devices import dtype_name, resolve_device, resolve_dtype
    from ..generate import cpu_reproducible_env
    from ..methods import Context, default_registry
    from .annotate import annotate_raw
    from .annotators import AnnotateSettings, load_annotators, load_mask_annotator

    spec = relation_spec(opts.relation, opts.entities, opts.predicate)
    settings = opts.settings
    annotate_settings = opts.annotate_settings or AnnotateSettings()
    make_generator = generator_factory(settings.generator)
    backbone = get_backbone(opts.backbone, opts.weights)
    backbone.check_available(dict.fromkeys(
        ("sdxl", *default_registry().card(settings.reference_card).adapter_class().weights)))
    device = resolve_device(opts.device)
    if device == "cpu":
        cpu_reproducible_env()
    dtype = resolve_dtype(opts.dtype, device)
    side = settings.size or backbone.resolution
    out = Path(opts.out).expanduser()
    progress = not opts.quiet
    record = {"backbone": backbone.describe(), "device": device, "dtype": dtype_name(dtype),
              "annotate": _plain(annotate_settings) if opts.annotate else None,
              "versions": {"relationbench": __version__, "torch": torch.__version__}}
    with new_folder(out) as tmp:  # refuses a non-empty OUT before any model loads
        context = Context(backbone=backbone, device=device, dtype=dtype, data_root=tmp, quiet=opts.quiet)
        # the keypoint annotator (and captioner) only when annotating: --no-annotate needs the masks alone
        annotators = load_annotators(backbone, annotate_settings, device=device) if opts.annotate else None
        masks = RememberedMasks(annotators.masks if annotators is not None
                                else load_mask_annotator(backbone, annotate_settings, device=device))
        if annotators is not None:
            annotators = dataclasses.replace(annotators, masks=masks)
        generator = make_generator(context)
        references = MSDiffusionReferences(context, settings.reference_card, settings.reference_box)
        with contextlib.ExitStack() as stack:
            for model in (generator, references):
                if hasattr(model, "close"):
                    stack.callback(model.close)
            raw = synthesize_raw(tmp, spec, settings, generator=generator, references=references,
                                 masks=masks, rules=annotate_settings,
                                 size=(side, side), record=record, progress=progress)
        if not raw.samples:
            reasons = "; ".join(f"sample {i}: {r}" for i, r in raw.set_aside)
            raise UserError(f"no target showed every entity, nothing kept ({reasons})",
                            hint="raise --samples, try another --seed, or lower the annotation threshold")
    if not opts.annotate:
        return SynthesizeSummary(out, len(raw.samples), raw.set_aside, None, None)
    triplets = out / TRIPLETS  # annotate_raw checks it (check_triplets) before it lands
    report = annotate_raw(out, triplets, annotators=annotators, settings=annotate_settings, progress=progress)
    if not report.kept:
        raise UserError("the annotation set every sample aside: " + "; ".join(
            f"sample {s.id}: {s.reason}" for s in report.set_aside), path=triplets,
            hint=f"the raw samples stay in {out}: annotate them again with other settings "
                 f"(relbench data annotate {out} NEW_FOLDER), or synthesize more")
    return SynthesizeSummary(out, len(raw.samples), raw.set_aside, triplets, report)


__all__ = [
    "GENERATOR_GROUP",
    "ImageGenerator",
    "MSDiffusionReferences",
    "RelationSpec",
    "SDXLGenerator",
    "SynthesizeOptions",
    "SynthesizeSettings",
    "ing_form",
    "find_entities",
    "generator_factory",
    "relation_predicate",
    "relation_prompts",
    "relation_spec",
    "square_crop",
    "synthesize",
    "synthesize_raw",
]
