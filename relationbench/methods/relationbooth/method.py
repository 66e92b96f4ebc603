"""The `relationbooth` method: MS-Diffusion with a RelationLoRA per relation and local tokens
(paper 3.4).

Training (`relbench train`, train.py) loads the model exactly as the `msdiffusion` method
does (this class is that method, with training settings added) and trains one LoRA per
relation into a LoRA bank (training.py). Generation is MS-Diffusion's with the relation's
LoRA switched in: cases are grouped by relation (a suite's "shake hands with" is the triplet
folder and LoRA relation "shake_hands_with"), and each relation's LoRA is the bank's newest
for it on this backbone trained with these settings (selection.py). Both read each reference
as its 257 image tokens followed by `local_tokens` pooled dense tokens of the local encoder
(local_tokens.py, paper 3.4.3): the stock bigG tower (training-free) unless a CLIPSelf
checkpoint is given as `--weight local_encoder=PATH`; run.json says which.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from ...errors import UserError
from ..base import Context, Request, Sample
from ..lora.trainer import NOT_LEARNED, TrainerSettings
from ..msdiffusion import MSDiffusionMethod, MSDiffusionSettings
from ..msdiffusion.method import REFERENCE_SIZE
from .kml import KMLSettings
from .local_tokens import (LOCAL_RESOLUTION, LOCAL_TOKEN_COUNTS, WEIGHT_KEY, LocalEncoder, local_encoder_from,
                           local_encoder_identity)
from .selection import RelationLoRASampling, relation_key  # noqa: F401  (relation_key: public here too)

if TYPE_CHECKING:
    from ...data.triplets import TripletSample

LOCAL_ENCODERS = ("auto", "stock", "clipself")
BLANK = (255, 255, 255)  # the blank image prompt of the "w/o relation-aware data" ablation


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
    # local token injection (paper 3.4.3, Tables 5 and 7): in training and sampling
    local_tokens: int = 16  # pooled dense tokens per reference after its 257; 0: none (1, 4, 16, 64)
    local_resolution: int = LOCAL_RESOLUTION  # side the local encoder sees (authors' code: 64 x 64 tokens on bigG/14)
    local_encoder: str = "auto"  # auto: the CLIPSelf checkpoint if given (--weight local_encoder), else stock
    # ablation (paper Table 4): False trains on (x, c_t) with blank image prompts (and so no KML)
    relation_data: bool = True
    bank: str | None = None  # the LoRA bank generation reads (and `relbench train` writes); None: the default
    allow_base_fallback: bool = False  # a relation without a LoRA samples the base model (manifest says so)
    fuse_lora: bool = False  # merge the active LoRA into the UNet while its group samples (no per-step cost)

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
        if self.local_tokens and self.local_tokens not in LOCAL_TOKEN_COUNTS:
            raise ValueError(f"local_tokens must be 0 or one of {LOCAL_TOKEN_COUNTS}, got {self.local_tokens}")
        if self.local_resolution < 14:
            raise ValueError(f"local_resolution must be at least one patch (14 px), got {self.local_resolution}")
        if self.local_encoder not in LOCAL_ENCODERS:
            raise ValueError(f"local_encoder must be one of {LOCAL_ENCODERS}, got {self.local_encoder!r}")

    def kml(self) -> KMLSettings:
        """The keypoint matching loss as trained: none without image prompts to match."""
        on = self.kml_weight > 0 and self.relation_data
        return KMLSettings(enabled=on, weight=self.kml_weight if on else 0.0, max_timestep=self.kml_max_timestep,
                           min_score=self.kml_min_score)


# what a RelationLoRA learns from besides the trainer's settings (sampling settings are not)
TRAINING_FIELDS = ("batch_size", "scale", "subject_scales", "kml_weight", "kml_max_timestep", "kml_min_score",
                   "predicate_loss_weight", "local_tokens", "relation_data")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class RelationBoothMethod(RelationLoRASampling, MSDiffusionMethod):
    Settings = RelationBoothSettings

    def __init__(self, settings: RelationBoothSettings, context: Context):
        super().__init__(settings, context)
        self._local: LocalEncoder | None = None

    # -- local tokens ----------------------------------------------------------------------------
    @cached_property
    def local_identity(self) -> dict[str, Any] | None:
        """Which local encoder the settings use, known before loading anything: None (no local
        tokens), {"kind": "stock"} or {"kind": "clipself", "source", "sha256"}. Raises a
        UserError for local_encoder "clipself" without a checkpoint."""
        s = self.settings
        if not s.local_tokens:
            return None
        given = WEIGHT_KEY in self.context.backbone.weights
        if s.local_encoder == "clipself" and not given:
            raise UserError("local_encoder is 'clipself' but no CLIPSelf checkpoint was given",
                            hint=f"--weight {WEIGHT_KEY}=PATH (an open_clip checkpoint, e.g. from "
                                 "`relbench train-local-encoder`), or --set local_encoder=stock")
        if s.local_encoder == "stock":
            return {"kind": "stock", "resolution": s.local_resolution}
        return local_encoder_identity(self.context.backbone, resolution=s.local_resolution)

    def _load_local_encoder(self) -> None:
        """The local encoder local_identity names: the stock tower itself, or the checkpoint
        in a copy of its architecture on its device and dtype."""
        identity = self.local_identity
        if identity is None or self._local is not None:
            return
        self._local = local_encoder_from(identity, self._encoder)

    @torch.inference_mode()
    def image_tokens(self, images: Sequence) -> torch.Tensor:
        """MS-Diffusion's 257 image tokens of each reference, then its `local_tokens` local
        tokens (paper 3.4.3: plain concatenation, Table 8) -> [B, 257 + N, E]."""
        tokens = super().image_tokens(images)
        if not self.settings.local_tokens:
            return tokens
        self._load_local_encoder()
        local = self._local.tokens(list(images), self.settings.local_tokens)  # type: ignore[union-attr]
        return torch.cat([tokens, local.to(tokens.device, tokens.dtype)], dim=1)

    def run_info(self) -> dict[str, Any]:
        """run.json's record of the local encoder used, and a label for tables when it is the
        training-free stock tower (never a silent switch: REFERENCE 7)."""
        identity = self.local_identity
        if identity is None:
            return {"local_encoder": None}
        return {"local_encoder": identity, "label": {"local_encoder": identity["kind"]}}

    # -- training -------------------------------------------------------------------------------
    def resolution(self) -> int:
        """The training side in pixels: the settings' or the backbone's."""
        return self.settings.resolution or self.context.backbone.resolution

    def learned(self) -> dict[str, Any]:
        """Everything the LoRA's weights depend on, besides the data and the base model."""
        s = self.settings
        out = {k: v for k, v in asdict(TrainerSettings.of(s)).items() if k not in NOT_LEARNED}
        out.update({k: getattr(s, k) for k in TRAINING_FIELDS}, resolution=self.resolution())
        if s.local_tokens:
            out["local_encoder"] = {k: v for k, v in self.local_identity.items() if k != "source"}
        return out

    def settings_digest(self) -> str:
        """A digest of learned(), recorded with each LoRA: generation uses its own settings'."""
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
        its entity as the grounding phrase and its box [O, 4] (normalized xyxy), as in sampling;
        without relation-aware data (the ablation), of a blank image instead of each reference."""
        dtype = self.pipe.unet.dtype
        if self.settings.relation_data:
            paths = [str(p) for p in images]
            self.encode_references(paths)
            clip = torch.stack([self._embeds[p] for p in paths])
        else:
            clip = self.blank_tokens().expand(len(images), -1, -1)
        return self.adapter.subject_tokens(clip.to(dtype), self.phrase_embeds(list(entities)).to(dtype),
                                           boxes.to(dtype))

    def blank_tokens(self) -> torch.Tensor:
        """image_tokens() of a blank (white) image prompt [1, T, E], computed once."""
        if "<blank>" not in self._embeds:
            from PIL import Image

            self._embeds["<blank>"] = self.image_tokens([Image.new("RGB", (REFERENCE_SIZE,) * 2, BLANK)])[0]
        return self._embeds["<blank>"][None]

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
    def lora_digest(self) -> str:
        return self.settings_digest()

    def train_lacking(self, relations: list[str]) -> None:
        """On the tiny backbone with no bank given, train the lacking LoRAs (train_tiny_bank)."""
        if self.context.backbone.is_tiny and not self.bank_given():
            self.train_tiny_bank(relations)

    def train_tiny_bank(self, relations: Sequence[str]) -> None:
        """Train the tiny backbone's LoRAs of `relations` on example triplets (stick figures,
        data/example_triplets.py) into the default bank: seconds each, so a first run of
        `relbench generate --method relationbooth --backbone tiny` needs nothing else."""
        from ...data.example_triplets import write_example_triplets
        from ...data.triplets import load_triplets
        from ...generate import Shard
        from ...paths import cache_root
        from ...train import train_into_bank

        if not self.context.quiet:
            print(f"relationbooth: training tiny RelationLoRAs on example triplets for {', '.join(relations)}",
                  file=sys.stderr)
        root = cache_root() / "relationbooth" / "example-triplets"
        for relation in relations:
            manifest = root / relation / relation / "triplets.json"
            try:
                if not manifest.is_file():
                    write_example_triplets(root / relation, relations=[relation])
            except (UserError, OSError):  # another process (a launch, a parallel run) wrote it first
                if not manifest.is_file():
                    raise
        triplets = {r: load_triplets(root / r) for r in relations}
        self.load()
        shard = Shard()  # under `accelerate launch` the processes train each LoRA together
        for relation in relations:
            data = triplets[relation]
            digest = data.content_hash(relation)
            name = self.lora_name(relation, digest, shard.world)
            train_into_bank(self, data, root / relation, {relation: name}, [relation], shard,
                            self.context.card or "relationbooth", hashes={relation: digest},
                            quiet=self.context.quiet or not shard.main)

    def load(self) -> None:
        super().load()
        self._load_local_encoder()

    def close(self) -> None:
        """The hosts' undoing (LoRAs, processors, encoders), then the local encoder: a stock one
        is the image encoder close() let go of, a CLIPSelf one a tower of its own."""
        super().close()
        self._local = None

    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        """MS-Diffusion's images with the batch's relation LoRA active (one relation per batch)."""
        return self.with_relation_lora(requests, super().generate)
