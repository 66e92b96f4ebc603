"""The `dreambooth` method: a LoRA per subject set, trained once and cached, then SDXL sampling
with the identifier in the prompt ("a sks dog riding a bicycle").

Cache layout ($RELBENCH_CACHE or ~/.cache/relationbench):

    dreambooth/loras/<key>/pytorch_lora_weights.safetensors + lora.json
    dreambooth/class_images/<class>-<key>/<i>.png        prior-preservation images

A LoRA's key hashes its subjects (names and the bytes of their images), identifiers, training
settings and backbone, so it is reused across runs and retrained when any of them changes.
A file lock per key lets processes of one launch share the cache without training twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import ClassVar, Sequence

from ...data import reference_images, sha256_file
from ...errors import UserError
from ..base import Context, Request, Sample
from ..sampling import quiet_sliced, sample_sdxl, seeded_noise
from .training import WEIGHT_NAME, Concept, TrainSettings, train_lora

LORA_ADAPTER = "dreambooth"


@dataclass(frozen=True)
class DreamBoothSettings(TrainSettings):
    identifiers: tuple[str, ...] = ("sks", "zwx")  # subject i of a set gets identifiers[i]
    num_class_images: int = 100  # prior-preservation images per class (diffusers' default)
    class_steps: int = 30  # sampling steps of the class images
    sample_steps: int = 30  # Euler, as every baseline (RelationBooth appendix 6.1)
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    resolution: int | None = None  # training and sampling side; None: the backbone's (1024 on sdxl)
    cache_dir: str | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "identifiers", tuple(self.identifiers))
        if len(set(self.identifiers)) != len(self.identifiers) or len(self.identifiers) < 2:
            raise ValueError("identifiers must be at least two distinct tokens (one per subject of a pair)")

    def train(self) -> TrainSettings:
        return TrainSettings(**{f.name: getattr(self, f.name) for f in fields(TrainSettings)})


def _cache_root(settings: DreamBoothSettings) -> Path:
    root = settings.cache_dir or os.environ.get("RELBENCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "relationbench")
    return Path(root).expanduser() / "dreambooth"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DreamBoothMethod:
    Settings = DreamBoothSettings
    needs_references: ClassVar[bool] = True

    def __init__(self, settings: DreamBoothSettings, context: Context):
        self.settings = settings
        self.context = context
        self._pipe = None
        self._loaded: str | None = None  # key of the LoRA now in the pipeline
        self._keys: dict[tuple, str] = {}

    @property
    def pipe(self):
        if self._pipe is None:
            ctx = self.context
            self._pipe = quiet_sliced(ctx.backbone.sdxl_pipeline(device=ctx.device, dtype=ctx.dtype))
        return self._pipe

    def resolution(self) -> int:
        return self.settings.resolution or self.context.backbone.resolution

    # -- subject sets and their LoRAs ---------------------------------------------------------------
    @staticmethod
    def subject_set(case) -> tuple:
        """The subjects a LoRA is trained on, in a fixed order (the same pair in any case order)."""
        return tuple(sorted(case.subjects, key=lambda s: s.name))

    def identifiers(self, case) -> list[str]:
        """The identifier of each of the case's subjects, in case order."""
        ordered = [s.name for s in self.subject_set(case)]
        if len(ordered) > len(self.settings.identifiers):
            raise UserError(f"case {case.id} has {len(ordered)} subjects but only "
                            f"{len(self.settings.identifiers)} identifiers are set")
        return [self.settings.identifiers[ordered.index(s.name)] for s in case.subjects]

    def lora_key(self, subjects: tuple) -> str:
        if subjects not in self._keys:
            self._keys[subjects] = self._lora_key(subjects)
        return self._keys[subjects]

    def _lora_key(self, subjects: tuple) -> str:
        images = {s.name: [sha256_file(p) for p in reference_images(s, self.context.data_root)] for s in subjects}
        train = asdict(self.settings.train())
        train.update(num_class_images=self.settings.num_class_images, class_steps=self.settings.class_steps,
                     resolution=self.resolution(), identifiers=self.settings.identifiers[: len(subjects)])
        return _digest({"subjects": [[s.name, s.class_noun] for s in subjects], "images": images, "train": train,
                        "backbone": self.context.backbone.describe(), "dtype": str(self.context.dtype)})

    def lora_dir(self, subjects: tuple) -> Path:
        return _cache_root(self.settings) / "loras" / self.lora_key(subjects)

    def prepare(self, cases) -> None:
        """Train every LoRA the cases need that the cache does not hold (with progress)."""
        from filelock import FileLock

        needed = list(dict.fromkeys(self.subject_set(c) for c in cases))
        for subjects in needed:
            folder = self.lora_dir(subjects)
            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder) + ".lock"):
                if (folder / WEIGHT_NAME).is_file():
                    continue
                self._train(subjects, folder)

    def _train(self, subjects: tuple, folder: Path) -> None:
        s = self.settings
        concepts = []
        for ident, subject in zip(s.identifiers, subjects):
            classes = self.class_images(subject.class_noun) if s.prior_preservation else []
            concepts.append(Concept(ident, subject.class_noun, tuple(reference_images(subject, self.context.data_root)),
                                    tuple(classes)))
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self._unload()
        train_lora(self.pipe, concepts, s.train(), tmp, self.resolution(), self.context.device,
                   progress=not self.context.quiet)
        (tmp / "lora.json").write_text(json.dumps({
            "subjects": [x.name for x in subjects], "identifiers": list(s.identifiers[: len(subjects)]),
            "train": asdict(s.train()), "resolution": self.resolution(), "backbone": self.context.backbone.name,
        }, indent=2) + "\n")
        os.replace(tmp, folder)  # complete or absent: never a half-written LoRA in the cache

    def class_images(self, class_noun: str) -> list[Path]:
        """`num_class_images` base-model images of "a <class>", generated once and cached."""
        import torch
        from tqdm.auto import tqdm

        s = self.settings
        key = _digest({"class": class_noun, "backbone": self.context.backbone.describe(), "steps": s.class_steps,
                       "guidance": s.guidance_scale, "resolution": self.resolution(), "dtype": str(self.context.dtype)})
        folder = _cache_root(s) / "class_images" / f"{re.sub(r'[^a-z0-9]+', '_', class_noun.lower())}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"{i:04d}.png" for i in range(s.num_class_images)]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        self._unload()
        pipe, size = self.pipe, self.resolution()
        for start in tqdm(range(0, len(missing), 4), desc=f"class images: a {class_noun}", unit="batch",
                          disable=self.context.quiet or not missing):
            chunk = missing[start : start + 4]  # image i: seed i
            shape = (pipe.unet.config.in_channels, size // pipe.vae_scale_factor, size // pipe.vae_scale_factor)
            with torch.inference_mode():
                images = pipe(prompt=[f"a {class_noun}"] * len(chunk), num_inference_steps=s.class_steps,
                              guidance_scale=s.guidance_scale, height=size, width=size,
                              latents=seeded_noise(chunk, shape, self.context.device, pipe.unet.dtype),
                              output_type="pil").images
            for i, image in zip(chunk, images):
                tmp = paths[i].with_name(f".{paths[i].name}.tmp")
                image.save(tmp, format="PNG")
                os.replace(tmp, paths[i])
        return paths

    # -- sampling ----------------------------------------------------------------------------------------
    def _unload(self) -> None:
        if self._loaded is not None:
            self.pipe.delete_adapters(LORA_ADAPTER)
            self._loaded = None

    def _load(self, subjects: tuple) -> None:
        folder = self.lora_dir(subjects)
        if self._loaded == folder.name:
            return
        if not (folder / WEIGHT_NAME).is_file():
            raise RuntimeError(f"no trained LoRA for {[s.name for s in subjects]}: prepare() first")
        from diffusers.utils import logging as diffusers_logging

        self._unload()
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # not "no text-encoder keys" for every UNet-only LoRA
        try:
            self.pipe.load_lora_weights(str(folder), weight_name=WEIGHT_NAME, adapter_name=LORA_ADAPTER)
        finally:
            diffusers_logging.set_verbosity(level)
        self._loaded = folder.name

    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        s, pipe = self.settings, self.pipe
        size = self.resolution()
        out: list[Sample | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.subject_set(r.case), []).append(i)
        for subjects, idx in groups.items():
            self._load(subjects)
            reqs = [requests[i] for i in idx]
            idents = [self.identifiers(r.case) for r in reqs]
            prompts = [r.case.personalized_prompt(ids) for r, ids in zip(reqs, idents)]
            images = sample_sdxl(pipe, reqs, prompts, steps=s.sample_steps, guidance_scale=s.guidance_scale,
                                 negative_prompt=s.negative_prompt, height=size, width=size, device=self.context.device)
            for i, image, prompt, ids in zip(idx, images, prompts, idents):
                out[i] = Sample(image, {"prompt": prompt, "identifiers": ids, "lora": self._loaded})
        return out  # type: ignore[return-value]
