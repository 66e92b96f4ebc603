"""The `relationbooth` method: MS-Diffusion with a RelationLoRA per relation (paper 3.4).

Training (`relbench train`, train.py) loads the model exactly as the `msdiffusion` method
does (this class is that method, with training settings added) and trains one LoRA per
relation into a LoRA bank (training.py). Generation is MS-Diffusion's with the relation's
LoRA switched in: cases are grouped by relation (a suite's "shake hands with" is the triplet
folder and LoRA relation "shake_hands_with"), and each relation's LoRA is the bank's newest
for it on this backbone trained with these settings, else its newest of any (local tokens
are not here yet).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Hashable, Mapping, Sequence

import torch

from ...errors import UserError
from ..base import Context, Request, Sample
from ..lora.bank import BankAdapters, BankEntry, LoraBank
from ..lora.trainer import NOT_LEARNED, TrainerSettings
from ..msdiffusion import MSDiffusionMethod, MSDiffusionSettings
from .kml import KMLSettings

if TYPE_CHECKING:
    from ...data.triplets import TripletSample


@dataclass(frozen=True)
class RelationBoothSettings(MSDiffusionSettings, TrainerSettings):
    """MS-Diffusion's sampling settings and the RelationLoRA training settings, the paper's
    values as defaults (section 4, "Implementation Details"); the authors' code's choices
    are in methods/relationbooth-authors.yaml."""

    # sampling: the RelationBooth code's inference values (REFERENCE 7)
    guidance_scale: float = 5.0
    # RelationLoRA (paper 3.4.1, 4): rank 4, alpha = rank, gaussian init come from the trainer;
    # the image scale gamma is MS-Diffusion's `scale` (0.6), used in training as in sampling
    optimizer: str = "adam"  # paper: Adam, no weight decay (code: AdamW, 1e-4)
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # paper silent: no clipping (code: 1.0)
    gradient_accumulation: int = 1  # paper: batch 8 in one step (code: 1 x 4); 1 x 8 is the low-memory mode
    batch_size: int = 8  # samples of one relation per micro-batch (per process)
    resolution: int | None = None  # training side (targets, references); None: the backbone's (1024 on sdxl)
    # keypoint matching loss (paper 3.4.2, eq. 7; Table 6)
    kml_weight: float = 1e-3  # lambda; 0: no KML (code: 0.1)
    kml_max_timestep: int | None = None  # paper: every timestep (code: 333, per sample)
    kml_min_score: float = 0.0  # keypoints scored below this are left out (0: all kept)
    # the authors' code only (REFERENCE 2/7): predicate cross-attention loss, code weight 1e-3
    predicate_loss_weight: float = 0.0
    bank: str | None = None  # the LoRA bank generation reads (and `relbench train` writes); None: the default

    def __post_init__(self):
        MSDiffusionSettings.__post_init__(self)
        TrainerSettings.__post_init__(self)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if min(self.kml_weight, self.predicate_loss_weight) < 0:
            raise ValueError("kml_weight and predicate_loss_weight must be at least 0")
        if self.kml_max_timestep is not None and self.kml_max_timestep < 0:
            raise ValueError(f"kml_max_timestep must be at least 0 or null, got {self.kml_max_timestep}")

    def kml(self) -> KMLSettings:
        return KMLSettings(enabled=self.kml_weight > 0, weight=self.kml_weight, max_timestep=self.kml_max_timestep,
                           min_score=self.kml_min_score)


# what a RelationLoRA learns from besides the trainer's settings (sampling settings are not)
TRAINING_FIELDS = ("batch_size", "scale", "subject_scales", "kml_weight", "kml_max_timestep", "kml_min_score",
                   "predicate_loss_weight")


def relation_key(relation: str) -> str:
    """The relation-triplet folder (and LoRA) name of a suite's relation: its words joined by
    "_" ("shake hands with" -> "shake_hands_with"), since a folder name has no spaces."""
    return "_".join(relation.split())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class RelationBoothMethod(MSDiffusionMethod):
    Settings = RelationBoothSettings

    def __init__(self, settings: RelationBoothSettings, context: Context):
        super().__init__(settings, context)
        self._bank: LoraBank | None = None
        self._adapters: BankAdapters | None = None
        self._loras: dict[str, str] = {}  # relation -> its LoRA's name in the bank

    @property
    def bank(self) -> LoraBank:
        if self._bank is None:
            from .lora import default_bank

            self._bank = LoraBank(Path(self.settings.bank).expanduser() if self.settings.bank else default_bank())
        return self._bank

    def use_bank(self, bank: LoraBank) -> None:
        """Train into (and generate from) `bank` instead of the settings' (`relbench train --out`)."""
        self._bank = bank
        self._loras.clear()

    # -- training -------------------------------------------------------------------------------
    def resolution(self) -> int:
        """The training side in pixels: the settings' or the backbone's."""
        return self.settings.resolution or self.context.backbone.resolution

    def learned(self) -> dict[str, Any]:
        """Everything the LoRA's weights depend on, besides the data and the base model."""
        s = self.settings
        out = {k: v for k, v in asdict(TrainerSettings.of(s)).items() if k not in NOT_LEARNED}
        out.update({k: getattr(s, k) for k in TRAINING_FIELDS}, resolution=self.resolution())
        return out

    def settings_digest(self) -> str:
        """A digest of learned(), recorded with each LoRA: generation prefers its own settings'."""
        return _digest(self.learned())

    def lora_name(self, relation: str, data_hash: str, processes: int = 1) -> str:
        """The bank name of the relation's LoRA: the relation and a digest of what it learns
        (settings, and the processes training it data-parallel: each adds a batch), from what
        (the relation's data) and on what (backbone, dtype)."""
        key = {"learned": self.learned(), "processes": processes, "data": data_hash,
               "backbone": self.context.backbone.describe(), "dtype": str(self.context.dtype)}
        return f"{relation}-{_digest(key)}"

    @torch.no_grad()
    def reference_tokens(self, images: Sequence[Path], entities: Sequence[str], boxes: torch.Tensor) -> torch.Tensor:
        """MS-Diffusion's subject tokens [O, 16, D] of one reference image per entity, each with
        its entity as the grounding phrase and its box [O, 4] (normalized xyxy), as in sampling."""
        paths = [str(p) for p in images]
        self.encode_references(paths)
        dtype = self.pipe.unet.dtype
        clip = torch.stack([self._embeds[p] for p in paths]).to(dtype)
        return self.adapter.subject_tokens(clip, self.phrase_embeds(list(entities)).to(dtype), boxes.to(dtype))

    def image_scales(self, n: int) -> torch.Tensor:
        """gamma of each of n subjects [n]: `scale`, or `subject_scales` where set."""
        return self._scales(n)

    def train_relation(self, samples: Sequence["TripletSample"], out_dir: Path, *, info: Mapping[str, Any],
                       data_parallel: bool = True) -> Path:
        """Train the RelationLoRA of one relation's samples into out_dir (the trainer's folder)."""
        from .training import train_relationlora

        return train_relationlora(self, samples, out_dir, info=info, progress=not self.context.quiet,
                                  data_parallel=data_parallel)

    # -- generation ------------------------------------------------------------------------------
    def lora_for(self, relation: str) -> str:
        """The name of the LoRA for `relation` on this backbone (by name): the newest trained
        with these settings, else the newest of any (another card's, or an imported one)."""
        if relation not in self._loras:
            backbone = self.context.backbone.name  # also the authors' released LoRAs (base "sdxl")
            found: list[BankEntry] = [e for e in self.bank.entries() if e.info.get("relation") == relation
                                      and e.base.get("name") == backbone]
            if not found:
                raise UserError(f"the LoRA bank {self.bank.root} has no RelationLoRA for the relation {relation!r} "
                                f"on the {self.context.backbone.name} backbone",
                                hint=f"train it (relbench train --data DIR --relation {relation} --backbone "
                                     f"{self.context.backbone.name}), or point `bank` at a bank that has it")
            mine = [e for e in found if e.info.get("settings_digest") == self.settings_digest()]
            self._loras[relation] = max(mine or found, key=lambda e: (e.created, e.name)).name
        return self._loras[relation]

    def check(self, cases) -> None:
        """MS-Diffusion's checks, and every case has a relation with a LoRA in the bank."""
        super().check(cases)
        missing = sorted({c.id for c in cases if not c.relation})
        if missing:
            raise UserError(f"RelationBooth generates relation cases; {len(missing)} case(s) have no relation "
                            f"(e.g. {missing[0]})", hint="choose a suite with relations, e.g. relationbench")
        for relation in sorted({self.group(c) for c in cases}):
            self.lora_for(relation)

    def group(self, case) -> Hashable:
        """The case's relation as its LoRA is named (relation_key)."""
        return relation_key(case.relation)

    def load(self) -> None:
        super().load()
        if self._adapters is None:
            self._adapters = BankAdapters(self._pipe, self.bank)

    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        """MS-Diffusion's images with the batch's relation LoRA active (one relation per batch)."""
        relations = {self.group(r.case) for r in requests}
        if len(relations) != 1:
            raise ValueError(f"a batch must hold the cases of one relation, got {len(relations)}")
        name = self.lora_for(relations.pop())
        self.load()
        self._adapters.activate(name)  # type: ignore[union-attr]
        samples = super().generate(requests)
        for sample in samples:
            sample.meta["lora"] = name
        return samples

    def close(self) -> None:
        """Remove the LoRAs from the shared pipeline, then MS-Diffusion's own undoing."""
        if self._adapters is not None:
            self._adapters.close()
            self._adapters = None
        super().close()
