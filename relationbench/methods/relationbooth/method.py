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
checkpoint is given as `--weight local_encoder=PATH`, or (`local_encoder`, paper Table 5)
open_clip's ViT-L/14 or EVA-CLIP-L/14 (local_encoders.py), whose 1024-d tokens reach the
resampler through a `local_projection` trained with each RelationLoRA and switched with it;
run.json says which.
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
from .local_encoders import (OPEN_CLIP_ENCODERS, PROJECTION, PROJECTION_INIT, load_open_clip_tower,
                             open_clip_identity, projection_from)
from .local_tokens import (LOCAL_RESOLUTION, LOCAL_TOKEN_COUNTS, WEIGHT_KEY, LocalEncoder, local_encoder_from,
                           local_encoder_identity)
from .selection import RelationLoRASampling, relation_key  # noqa: F401  (relation_key: public here too)

if TYPE_CHECKING:
    from ...data.triplets import TripletSample

LOCAL_ENCODERS = ("auto", "stock", "clipself", *OPEN_CLIP_ENCODERS)  # + "vit-l-14", "eva-clip-l-14"
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
    local_encoder: str = "auto"  # auto: the CLIPSelf checkpoint if given (--weight local_encoder), else stock;
    # Table 5: vit-l-14, eva-clip-l-14 (open_clip; --weight local_encoder_vit_l / local_encoder_eva_l)
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
        # an open_clip local encoder: its tokens' projection (None: none, the base model's
        # group), the LoRA it came with, and each file's features before it (encode_features)
        self._projection: torch.nn.Module | None = None
        self._projection_lora: str | None = None
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # the base-model group of allow_base_fallback: no LoRA, so no local tokens (MS-Diffusion alone)
        self._local_off = False

    # -- local tokens ----------------------------------------------------------------------------
    @cached_property
    def local_identity(self) -> dict[str, Any] | None:
        """Which local encoder the settings use, known before loading anything: None (no local
        tokens), {"kind": "stock"}, {"kind": "clipself", "source", "sha256"} or an open_clip
        architecture's (open_clip_identity), each with its "resolution". Raises a UserError
        for local_encoder "clipself" without a checkpoint, or open_clip weights not to be had."""
        s = self.settings
        if not s.local_tokens:
            return None
        if s.local_encoder in OPEN_CLIP_ENCODERS:
            return open_clip_identity(OPEN_CLIP_ENCODERS[s.local_encoder], self.context.backbone, s.local_resolution)
        given = WEIGHT_KEY in self.context.backbone.weights
        if s.local_encoder == "clipself" and not given:
            raise UserError("local_encoder is 'clipself' but no CLIPSelf checkpoint was given",
                            hint=f"--weight {WEIGHT_KEY}=PATH (an open_clip checkpoint, e.g. from "
                                 "`relbench train-local-encoder`), or --set local_encoder=stock")
        if s.local_encoder == "stock":
            return {"kind": "stock", "resolution": s.local_resolution}
        return local_encoder_identity(self.context.backbone, resolution=s.local_resolution)

    @property
    def projects_local(self) -> bool:
        """The local tokens reach the resampler through a trained `local_projection`: an
        open_clip encoder (1024-d tokens; bigG's 1664 fit as they are)."""
        identity = self.local_identity
        return identity is not None and identity["kind"] in OPEN_CLIP_ENCODERS

    def _load_local_encoder(self) -> None:
        """The local encoder local_identity names: the stock tower itself, the checkpoint in a
        copy of its architecture on its device and dtype, or an open_clip tower on the
        method's device in the UNet's dtype."""
        identity = self.local_identity
        if identity is None or self._local is not None:
            return
        if not self.projects_local:
            self._local = local_encoder_from(identity, self._encoder)
            return
        tower = load_open_clip_tower(identity, self.context.backbone)
        self._local = LocalEncoder(tower.to(self.context.device, self.pipe.unet.dtype), kind=identity["kind"],
                                   resolution=identity["resolution"])

    def local_width(self) -> int:
        """D of the local encoder's tokens (loads it)."""
        self._load_local_encoder()
        return self._local.width  # type: ignore[union-attr]

    @torch.inference_mode()
    def reference_features(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MS-Diffusion's 257 image tokens of each reference [B, 257, E] and its `local_tokens`
        local tokens as the encoder gives them [B, N, D] (None without local tokens)."""
        tokens = super().image_tokens(images)
        if not self.settings.local_tokens:
            return tokens, None
        self._load_local_encoder()
        return tokens, self._local.tokens(list(images), self.settings.local_tokens)  # type: ignore[union-attr]

    @torch.inference_mode()
    def image_tokens(self, images: Sequence) -> torch.Tensor:
        """MS-Diffusion's 257 image tokens of each reference, then its `local_tokens` local
        tokens (paper 3.4.3: plain concatenation, Table 8) -> [B, 257 + N, E]."""
        return self.join_local(*self.reference_features(images))

    def join_local(self, tokens: torch.Tensor, local: torch.Tensor | None) -> torch.Tensor:
        """Image tokens [B, 257, E] and local tokens [B, N, D] -> [B, 257 + N, E]: the local ones
        through the active projection for an open_clip encoder, as they are otherwise. In the
        base-model group (allow_base_fallback) the image tokens alone: MS-Diffusion as it is."""
        if local is None or self._local_off:
            return tokens
        if self.projects_local:
            if self._projection is None:
                raise RuntimeError("an open_clip local encoder's tokens need a projection: use_projection first")
            weight = self._projection.weight
            local = self._projection(local.to(weight.device, weight.dtype))
        return torch.cat([tokens, local.to(tokens.device, tokens.dtype)], dim=1)

    def use_projection(self, projection: torch.nn.Module | None, lora: str | None = None) -> None:
        """Make `projection` (the `local_projection` of LoRA `lora`; None: no local tokens) the
        one join_local applies. Cached image tokens were joined through the previous one: they
        are dropped, and rejoined from the kept features (encode_references)."""
        if projection is not self._projection or lora != self._projection_lora:
            self._embeds.clear()
        self._projection, self._projection_lora = projection, lora

    def use_lora_modules(self, name: str | None, modules: dict) -> None:
        """The relation's LoRA `name` is active (None: the base model, whose group gets no local
        tokens); an open_clip encoder's `local_projection` becomes the LoRA's. UserError for a
        LoRA without one, or with one of another width."""
        self._use_local(name is not None)
        if not self.projects_local or name is None or name == self._projection_lora:
            return
        weight = modules.get(f"{PROJECTION}.weight")
        want = (self.adapter.cfg.embedding_dim, self.local_width())
        if weight is None or tuple(weight.shape) != want:
            what = ("has no local projection" if weight is None
                    else f"has a local projection of shape {tuple(weight.shape)}")
            raise UserError(f"the RelationLoRA {name} {what}; the {self.settings.local_encoder} encoder needs one of "
                            f"shape {want}", path=self.bank.folder(name),
                            hint=f"train it again: relbench train --set local_encoder={self.settings.local_encoder}")
        self.use_projection(projection_from(weight).to(self.context.device), name)

    def _use_local(self, on: bool) -> None:
        """Local tokens on (a LoRA's group, training) or off (the base-model group)."""
        if on == self._local_off:
            self._local_off = not on
            self._embeds.clear()  # joined with or without local tokens: joined again from _features

    def accepts_imported(self) -> bool:
        """Imported LoRAs carry no local projection: an open_clip encoder never samples with them."""
        return not self.projects_local

    @torch.inference_mode()
    def encode_references(self, paths: Sequence[str]) -> None:
        """MS-Diffusion's without local tokens; with them, each file's features encoded once
        (encode_features) and joined into its image tokens, so switching LoRAs (another
        projection, or the base-model group) joins them again without encoding anything."""
        if not self.settings.local_tokens:
            return super().encode_references(paths)
        self.encode_features(paths)
        if self.projects_local and not self._local_off and self._projection is None:
            return  # before any relation's LoRA (prepare): the tokens wait for its projection
        for p in dict.fromkeys(paths):
            if p not in self._embeds:
                tokens, local = self._features[p]
                self._embeds[p] = self.join_local(tokens[None], local[None])[0]

    @torch.inference_mode()
    def encode_features(self, paths: Sequence[str]) -> None:
        """reference_features of each reference file, once per file, kept in `_features`."""
        self.encode_files(paths, self._features, lambda images: list(zip(*self.reference_features(images))))

    def blank_features(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """reference_features of a blank (white) image prompt, computed once: the "w/o
        relation-aware data" ablation's image prompt."""
        if "<blank>" not in self._features:
            from PIL import Image

            tokens, local = self.reference_features([Image.new("RGB", (REFERENCE_SIZE,) * 2, BLANK)])
            self._features["<blank>"] = (tokens[0], None if local is None else local[0])
        return self._features["<blank>"]

    def reference_inputs(self, images: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Training with an open_clip encoder: what join_local reads of one reference per entity,
        before the (trained) projection: image tokens [O, 257, E] and local tokens [O, N, D], each
        file encoded once; without relation-aware data (the ablation), of a blank image."""
        if self.settings.relation_data:
            paths = [str(p) for p in images]
            self.encode_features(paths)
            features = [self._features[p] for p in paths]
        else:
            features = [self.blank_features()] * len(images)
        return torch.stack([f[0] for f in features]), torch.stack([f[1] for f in features])

    def run_info(self) -> dict[str, Any]:
        """run.json's record of the local encoder used, and a label naming it for tables (the
        training-free stock tower is never a silent switch: REFERENCE 7)."""
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
        if self.projects_local:
            out["local_projection"] = PROJECTION_INIT
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
        """image_tokens() of a blank (white) image prompt [1, T, E]: blank_features, joined."""
        tokens, local = self.blank_features()
        return self.join_local(tokens[None], None if local is None else local[None])

    def image_scales(self, n: int) -> torch.Tensor:
        """gamma of each of n subjects [n]: `scale`, or `subject_scales` where set."""
        return self._scales(n)

    def train_relation(self, samples: Sequence["TripletSample"], out_dir: Path, *, info: Mapping[str, Any],
                       data_parallel: bool = True) -> Path:
        """Train the RelationLoRA of one relation's samples into out_dir (the trainer's folder)."""
        from .training import train_relationlora

        self._use_local(True)  # a LoRA always trains with the local tokens it samples with
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
        from ...data.example_triplets import cached_example_triplets
        from ...data.triplets import load_triplets
        from ...generate import Shard
        from ...train import train_into_bank

        if not self.context.quiet:
            print(f"relationbooth: training tiny RelationLoRAs on example triplets for {', '.join(relations)}",
                  file=sys.stderr)
        folders = {r: cached_example_triplets(r) for r in relations}
        triplets = {r: load_triplets(folders[r]) for r in relations}
        self.load()
        shard = Shard()  # under `accelerate launch` the processes train each LoRA together
        for relation in relations:
            data = triplets[relation]
            digest = data.content_hash(relation)
            name = self.lora_name(relation, digest, shard.world)
            train_into_bank(self, data, folders[relation], {relation: name}, [relation], shard,
                            self.context.card or "relationbooth", hashes={relation: digest},
                            quiet=self.context.quiet or not shard.main)

    def load(self) -> None:
        super().load()
        self._load_local_encoder()

    def close(self) -> None:
        """The hosts' undoing (LoRAs, processors, encoders), then the local encoder: a stock one
        is the image encoder close() let go of, a CLIPSelf or open_clip one a tower of its own."""
        super().close()
        self._local = None
        self._projection, self._projection_lora = None, None
        self._features.clear()
        self._local_off = False

    def generate(self, requests: Sequence[Request]) -> list[Sample]:
        """MS-Diffusion's images with the batch's relation LoRA active (one relation per batch)."""
        return self.with_relation_lora(requests, super().generate)
