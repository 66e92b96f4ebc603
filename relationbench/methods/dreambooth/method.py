"""The `dreambooth` method: a LoRA per subject set, trained once into a LoRA bank, then SDXL
sampling with the identifier in the prompt ("a sks dog riding a bicycle").

Cache layout ($RELBENCH_CACHE or ~/.cache/relationbench):

    dreambooth/loras/                                 a LoRA bank (index.json, <key>/...)
    dreambooth/class_images/<class>-<key>/<i>.png     prior-preservation images

A LoRA's key hashes its subjects (names and the bytes of their images), identifiers, training
settings and backbone, so it is reused across runs and retrained when any of them changes.
A file lock per key lets processes of one launch share the bank without training twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Hashable, Sequence

from ...data import reference_images, sha256_file
from ...paths import cache_root
from ..base import Context, Request, Sample
from ..lora.bank import BankAdapters, LoraBank
from ..lora.trainer import NOT_LEARNED
from ..sampling import PipelineMethod, checked_images, sample_sdxl, seeded_noise
from .training import Concept, TrainSettings, train_dreambooth


@dataclass(frozen=True)
class DreamBoothSettings(TrainSettings):
    identifiers: tuple[str, ...] = ("sks", "zwx")  # subject i of a set gets identifiers[i]
    num_class_images: int = 100  # prior-preservation images per class (diffusers' default)
    class_steps: int = 30  # sampling steps of the class images
    class_guidance_scale: float = 5.0  # the class images' guidance (SDXL's default, as diffusers' recipe)
    resolution: int | None = None  # training (and class image) side; None: the backbone's (1024 on sdxl)
    # sampling
    steps: int = 30  # Euler, as every baseline (RelationBooth appendix 6.1)
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    prompt_prefix: str = ""
    height: int | None = None  # None: the backbone's resolution
    width: int | None = None
    cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "identifiers", tuple(self.identifiers))
        if len(set(self.identifiers)) != len(self.identifiers) or len(self.identifiers) < 2:
            raise ValueError("identifiers must be at least two distinct tokens (one per subject of a pair)")
        if self.steps < 1 or self.class_steps < 1 or self.num_class_images < 0:
            raise ValueError("steps and class_steps must be at least 1, num_class_images at least 0")
        for side in (self.height, self.width, self.resolution):
            if side is not None and side % 8:
                raise ValueError(f"height, width and resolution must be multiples of 8, got {side}")

    def train(self) -> TrainSettings:
        return TrainSettings.of(self)


def _cache_root(settings: DreamBoothSettings) -> Path:
    root = Path(settings.cache_dir).expanduser() if settings.cache_dir else cache_root()
    return root / "dreambooth"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DreamBoothMethod(PipelineMethod):
    Settings = DreamBoothSettings
    weights: ClassVar[tuple[str, ...]] = ("sdxl",)
    needs_references: ClassVar[bool] = True

    def __init__(self, settings: DreamBoothSettings, context: Context):
        super().__init__(settings, context)
        self.bank = LoraBank(_cache_root(settings) / "loras")
        self._adapters: BankAdapters | None = None
        self._keys: dict[tuple, str] = {}

    def load(self) -> None:
        """The backbone's (shared, cached) SDXL pipeline; the LoRAs load per group later."""
        super().load()
        if self._adapters is None:
            self._adapters = BankAdapters(self._pipe, self.bank)

    @property
    def adapters(self) -> BankAdapters:
        self.load()
        return self._adapters  # type: ignore[return-value]

    def resolution(self) -> int:
        """The training (and class image) side."""
        return self.settings.resolution or self.context.backbone.resolution

    # -- subject sets and their LoRAs ---------------------------------------------------------------
    @staticmethod
    def subject_set(case) -> tuple:
        """The subjects a LoRA is trained on, in a fixed order (the same pair in any case order)."""
        return tuple(sorted(case.subjects, key=lambda s: s.name))

    def identifiers(self, case) -> list[str]:
        """The identifier of each of the case's subjects, in case order."""
        ordered = [s.name for s in self.subject_set(case)]
        return [self.settings.identifiers[ordered.index(s.name)] for s in case.subjects]

    def group(self, case) -> Hashable:
        """The key of the LoRA the case needs: cases of one subject set share it."""
        return self.lora_key(self.subject_set(case))

    def lora_key(self, subjects: tuple) -> str:
        if subjects not in self._keys:
            self._keys[subjects] = self._lora_key(subjects)
        return self._keys[subjects]

    def _lora_key(self, subjects: tuple) -> str:
        images = {s.name: [sha256_file(p) for p in reference_images(s, self.context.data_root)] for s in subjects}
        s = self.settings
        train = {k: v for k, v in asdict(s.train()).items() if k not in NOT_LEARNED}
        train.update(resolution=self.resolution(), identifiers=s.identifiers[: len(subjects)])
        if s.prior_preservation:  # the class images it trains on
            train.update(num_class_images=s.num_class_images, class_steps=s.class_steps,
                         class_guidance_scale=s.class_guidance_scale)
        return _digest({"subjects": [[x.name, x.class_noun] for x in subjects], "images": images, "train": train,
                        "backbone": self.context.backbone.describe(), "dtype": str(self.context.dtype)})

    def prepare(self, cases) -> None:
        """Train every LoRA the cases need that the bank does not hold (with progress)."""
        needed = list(dict.fromkeys(self.subject_set(c) for c in cases))
        for subjects in needed:
            key = self.lora_key(subjects)
            with self.bank.lock(key):
                if key not in self.bank:
                    self._train(subjects, key)

    def _train(self, subjects: tuple, key: str) -> None:
        s = self.settings
        folder = self.bank.folder(key)
        info = {"subjects": [x.name for x in subjects], "identifiers": list(s.identifiers[: len(subjects)])}
        if not folder.is_dir():  # else trained, but the index update was cut short
            self.adapters.close()  # class images and training on the base model
            concepts = []
            for ident, subject in zip(s.identifiers, subjects):
                classes = self.class_images(subject.class_noun) if s.prior_preservation else []
                concepts.append(Concept(ident, subject.class_noun,
                                        tuple(reference_images(subject, self.context.data_root)), tuple(classes)))
            train_dreambooth(self.pipe, concepts, s.train(), folder, self.resolution(), self.context.device,
                             progress=not self.context.quiet, info=info)
        self.bank.add(key, base=self.context.backbone.describe(), info=info)

    def class_images(self, class_noun: str) -> list[Path]:
        """`num_class_images` base-model images of "a <class>", generated once and cached
        (with no LoRA in the pipeline: _train closes the adapters first)."""
        from tqdm.auto import tqdm

        s = self.settings
        key = _digest({"class": class_noun, "backbone": self.context.backbone.describe(), "steps": s.class_steps,
                       "guidance": s.class_guidance_scale, "resolution": self.resolution(), "dtype": str(self.context.dtype)})
        folder = _cache_root(s) / "class_images" / f"{re.sub(r'[^a-z0-9]+', '_', class_noun.lower())}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{i:04d}.png" for i in range(s.num_class_images)]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        pipe, size = self.pipe, self.resolution()
        shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
        for start in tqdm(range(0, len(missing), 4), desc=f"class images: a {class_noun}", unit="batch",
                          disable=self.context.quiet or not missing):
            chunk = missing[start : start + 4]  # image i: seed i
            # checked for NaN/inf like every sample: a broken class image must not be cached
            images = checked_images(pipe, [f"class image {i} of 'a {class_noun}' (seed {i})" for i in chunk],
                                    prompt=[f"a {class_noun}"] * len(chunk), num_inference_steps=s.class_steps,
                                    guidance_scale=s.class_guidance_scale, height=size, width=size,
                                    latents=seeded_noise(chunk, shape, self.context.device, pipe.unet.dtype),
                                    guidance_key="class_guidance_scale")
            for i, image in zip(chunk, images):
                tmp = paths[i].with_name(f".{paths[i].name}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, paths[i])
        return paths

    # -- sampling ----------------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        """Images of one group (the run loop never mixes groups): one LoRA switch at most."""
        s = self.settings
        keys = {self.group(r.case) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"a batch must hold the cases of one LoRA, got {len(keys)}")
        key = keys.pop()
        self.adapters.activate(key)
        height, width = self.size()
        idents = [self.identifiers(r.case) for r in requests]
        prompts = [s.prompt_prefix + r.case.personalized_prompt(ids) for r, ids in zip(requests, idents)]
        images = sample_sdxl(self.pipe, requests, prompts, steps=s.steps, guidance_scale=s.guidance_scale,
                             negative_prompt=s.negative_prompt, height=height, width=width, device=self.context.device)
        extra = {"prompt_prefix": s.prompt_prefix} if s.prompt_prefix else {}
        return [Sample(image, {"prompt": prompt, "identifiers": ids, "lora": key, **extra})
                for image, prompt, ids in zip(images, prompts, idents)]

    def close(self) -> None:
        """Remove the LoRAs this method added to the shared pipeline."""
        if self._adapters is not None:
            self._adapters.close()
