"""CLIPSelf self-distillation of the local encoder (paper appendix 6.1, REFERENCE 2; Wu et al.,
ICLR 2024): what `relbench train-local-encoder --images DIR` runs.

The student is the image encoder itself, the teacher a frozen copy of it. Per image, a random
m x n grid of regions (m, n uniform in 1..max_split). The student's region token is the mean of
its dense features inside the region (local_tokens.dense_features, unnormalized: value-only last
block, post_layernorm; pooled as pool_grid pools) passed through visual_projection; the
teacher's is its image embedding (class token, post_layernorm, projection) of the region cropped
and resized to its native size (224 px). Both live in the projected space, where CLIP aligns
images with text: CLIPSelf compares them there, since region-language alignment is what it
improves. Loss: the mean over all regions of the batch of 1 - cosine. Images go through
clip_pixels at `resolution` (a non-square one resized by its short side and centre-cropped).

What trains: the last `trainable_blocks` encoder layers, all of each except the last layer's
q_proj and k_proj (its value-only run never uses them). Embeddings, pre_layrnorm, the earlier
layers, post_layernorm and visual_projection stay bit-identical, so student and teacher share
their head. Adam with decoupled weight decay (AdamW), constant learning rate.

Under `accelerate launch` every process trains on its own slice of each step's images and the
gradients are averaged at each step (the LoRA trainer's collectives), so all processes hold the
same weights and only the main one writes. Output folder:

    clipself.pt          {"state_dict": {"visual.*": ...}}: the open_clip layout, written last
                         and atomically; use it with --weight local_encoder=OUT/clipself.pt
    clipself.json        settings, steps, the tower and images it was distilled from
    loss.jsonl           one line per step: step, loss, lr, seconds
    checkpoints/step-N   while training (the LoRA trainer's checkpoint format), removed at the end
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...images import read_image
from ..lora.files import LOSS_LOG_NAME, write_loss_log
from ..lora.trainer import Checkpoints, Processes, average_gradients, rank_seed
from .local_tokens import (LOCAL_RESOLUTION, WEIGHT_KEY, clip_pixels, dense_features, grid_boxes, hf_to_openclip,
                           pool_boxes, vision_body)

if TYPE_CHECKING:
    from ...backbones import Backbone

CHECKPOINT_NAME = "clipself.pt"
RECORD_NAME = "clipself.json"
CHECKPOINTS = "checkpoints"
MIXED_PRECISION = ("no", "fp16", "bf16")
# on the tiny backbone: its tower's native 224 px (a 16 x 16 grid) and the last 2 of its 3 layers
# (about half, as 24 of bigG's 48), so some layers stay frozen there too
TINY_SCHEDULE = {"resolution": 224, "trainable_blocks": 2}


@dataclass(frozen=True)
class CLIPSelfSettings:
    """The paper's values (appendix 6.1) where it gives them, CLIPSelf's otherwise. Not done
    here: CLIPSelf's code also warms the learning rate up over 1000 steps, then decays it, and
    draws only grids of at most 2:1 aspect (its dataset's default max_split: 16)."""

    epochs: int = 6  # appendix 6.1: six epochs (of COCO train2017)
    steps: int | None = None  # optimizer steps; None: `epochs` passes over the images
    batch_size: int = 2  # images per step and process (appendix 6.1: 2 per GPU, 8 GPUs)
    learning_rate: float = 1e-5  # appendix 6.1
    weight_decay: float = 0.1  # appendix 6.1 ("Adam ... weight decay 0.1"; decoupled, as CLIPSelf's AdamW)
    trainable_blocks: int = 24  # REFERENCE 2: the last 24 of bigG's 48 blocks
    resolution: int = LOCAL_RESOLUTION  # the student's input side (a multiple of the patch; CLIPSelf: 1024)
    max_split: int = 4  # regions per image: an m x n grid, m and n uniform in 1..max_split
    seed: int = 0  # image order and region grids
    checkpoint_every: int = 500  # steps between checkpoints; 0: none
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: bf16 on a GPU, no on the CPU

    def __post_init__(self):
        if min(self.epochs, self.batch_size, self.trainable_blocks, self.max_split, self.resolution) < 1:
            raise ValueError("epochs, batch_size, trainable_blocks, max_split and resolution must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be at least 1 or null, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be at least 0, got {self.checkpoint_every}")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)} or null, "
                             f"got {self.mixed_precision!r}")


class CLIPSelf:
    """The distillation as a method card sees it: cards.py resolves its `Settings` from --set
    (types, unknown names with the near ones) and the tiny schedule, as for `relbench train`."""

    Settings = CLIPSelfSettings


@dataclass(frozen=True)
class DistillResult:
    checkpoint: Path  # OUT/clipself.pt
    steps: int
    first_loss: float | None  # of the loss log (None on the processes that do not write)
    last_loss: float | None
    seconds: float  # this run's
    main: bool = True  # this process wrote the output (False on the other processes of a launch)


def resolve_settings(set_values: Sequence[str] = (), *, tiny: bool = False, steps: int | None = None) -> CLIPSelfSettings:
    """Defaults, then TINY_SCHEDULE on the tiny backbone, then `--set KEY=VALUE`, then `--steps`.
    A wrong name, type or value is a UserError."""
    from ..cards import MethodCard, parse_set

    card = MethodCard(name="clipself", adapter=f"{__name__}:CLIPSelf", tiny=TINY_SCHEDULE)
    card = card.with_settings(parse_set(set_values))
    if steps is not None:
        card = card.with_settings({"steps": steps}, source="--steps")
    return card.settings(card.resolve(tiny).values)


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under `folder` (by suffix, hidden ones left out), sorted, absolute;
    UserError for a missing folder or one without images."""
    from ...data import IMAGE_SUFFIXES, is_image

    folder = Path(folder).expanduser().absolute()
    hint = "give a folder of training images with --images (the paper distils on COCO train2017)"
    if not folder.is_dir():
        raise UserError("no such folder", path=folder, hint=hint)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image(p)
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise UserError(f"the folder holds no image files ({', '.join(IMAGE_SUFFIXES)})", path=folder, hint=hint)
    return files


# -- the loss ------------------------------------------------------------------------------------
def region_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over regions of 1 - cosine(student token, teacher token); both [R, P]."""
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def draw_regions(generator: torch.Generator, max_split: int, size: int) -> torch.Tensor:
    """A random m x n grid over a size x size image (m, n uniform in 1..max_split) -> [m * n, 4]
    boxes (x0, y0, x1, y1) on whole pixels, row-major."""
    rows, cols = torch.randint(1, max_split + 1, (2,), generator=generator).tolist()
    return grid_boxes(rows, cols, size, size).round()


def crop_regions(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """The boxes (whole pixels) of one image [3, H, W], each resized to size x size (bicubic,
    antialiased) -> [N, 3, size, size]."""
    crops = [pixels[None, :, y0:y1, x0:x1] for x0, y0, x1, y1 in boxes.int().tolist()]
    return torch.cat([F.interpolate(c, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
                      for c in crops])


def distillation_loss(student: torch.nn.Module, teacher: torch.nn.Module, pixels: torch.Tensor,
                      regions: Sequence[torch.Tensor]) -> torch.Tensor:
    """CLIPSelf's loss for a batch: pixels [B, 3, R, R] (clip_pixels), regions one [N_i, 4]
    tensor of whole-pixel boxes per image. Both towers are CLIPVisionModelWithProjection."""
    patch = vision_body(student).embeddings.patch_size
    features = dense_features(student, pixels, normalize=False)
    tokens = student.visual_projection(pool_boxes(features, regions, scale=1 / patch))
    size = teacher.config.image_size
    crops = torch.cat([crop_regions(image, boxes, size) for image, boxes in zip(pixels, regions)])
    with torch.no_grad():
        target = teacher(pixel_values=crops).image_embeds
    return region_loss(tokens, target)


def trainable_parameters(tower: torch.nn.Module, blocks: int) -> dict[str, torch.nn.Parameter]:
    """Make the last `blocks` encoder layers trainable (less the last one's q and k projections,
    unused by its value-only run) and everything else frozen; returns them by name."""
    layers = vision_body(tower).encoder.layers
    if blocks > len(layers):
        raise UserError(f"trainable_blocks is {blocks} but the image encoder has {len(layers)} layers",
                        hint=f"--set trainable_blocks=N with N at most {len(layers)}")
    tower.requires_grad_(False)
    for layer in layers[len(layers) - blocks:]:
        layer.requires_grad_(True)
    layers[-1].self_attn.q_proj.requires_grad_(False)
    layers[-1].self_attn.k_proj.requires_grad_(False)
    return {name: p for name, p in tower.named_parameters() if p.requires_grad}


# -- the data order ----------------------------------------------------------------------------
def batch_indices(step: int, count: int, batch_size: int, processes: int, rank: int, seed: int) -> list[int]:
    """The images (indices into `count`) of process `rank` at `step` (from 1): consecutive places
    in an endless run of shuffled passes over the images, pass e shuffled by (seed, e). Every
    pass sees each image once, processes take disjoint slices of a step, and a resumed run
    finds its images from the step number alone."""
    first = ((step - 1) * processes + rank) * batch_size
    return [_shuffled(count, seed, epoch)[k] for epoch, k in (divmod(p, count) for p in range(first, first + batch_size))]


@lru_cache(maxsize=4)
def _shuffled(count: int, seed: int, epoch: int) -> tuple[int, ...]:
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:pass:{epoch}".encode()).digest()[:8], "little") >> 1
    return tuple(torch.randperm(count, generator=torch.Generator().manual_seed(mixed)).tolist())


# -- training ----------------------------------------------------------------------------------
def distill(tower: torch.nn.Module, images: Sequence[Path], out_dir: Path, settings: CLIPSelfSettings, *,
            device: str = "cpu", info: Mapping[str, Any] | None = None, resume: bool = False,
            progress: bool = True) -> DistillResult:
    """Distil `tower` (a CLIPVisionModelWithProjection, trained in place: it becomes the student)
    on `images` into out_dir (module docstring). `device` "cpu", or "cuda" (each process of a
    launch its own GPU). `info` (JSON) is recorded, and a resume must match it and the settings.

    UserError: out_dir already holds clipself.pt; checkpoints are there but not `resume`;
    settings that do not fit the tower (trainable_blocks, resolution).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    s = settings
    out_dir = Path(out_dir)
    final = out_dir / CHECKPOINT_NAME
    if final.exists():
        raise UserError("this folder already holds a distilled local encoder", path=final,
                        hint="choose another --out, or delete the file to distil again")
    patch = vision_body(tower).embeddings.patch_size
    if s.resolution % patch or s.resolution < patch * s.max_split:
        raise UserError(f"resolution {s.resolution} must be a multiple of the image encoder's patch size {patch} "
                        f"and at least max_split ({s.max_split}) patches",
                        hint=f"--set resolution=N with N a multiple of {patch} (896 = 64 x 14 on bigG/14)")
    if not images:
        raise ValueError("no images to distil on")
    if not hasattr(tower, "visual_projection"):
        raise ValueError("CLIPSelf needs a CLIPVisionModelWithProjection (its projection compares the tokens)")
    root = out_dir / CHECKPOINTS
    if not resume and root.is_dir() and any(root.iterdir()):
        raise UserError("an interrupted distillation left checkpoints here", path=root,
                        hint="continue it with --resume, or delete the folder to start over")

    # accelerate keeps one global state per process; start from a fresh one (as the LoRA trainer)
    AcceleratorState._reset_state(reset_partial_state=False)
    mixed = s.mixed_precision or ("no" if device == "cpu" else "bf16")
    accelerator = Accelerator(mixed_precision=mixed, cpu=device == "cpu")
    group = Processes(accelerator, data_parallel=True)
    student = tower.to(accelerator.device, torch.float32).train()
    params = trainable_parameters(student, s.trainable_blocks)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    total = s.steps or math.ceil(s.epochs * len(images) / (s.batch_size * group.count))
    record = json.loads(json.dumps({"settings": asdict(s), "steps": total, "info": dict(info or {})}))
    checkpoints = Checkpoints(root, record, group)
    generator = torch.Generator().manual_seed(rank_seed(s.seed, group.rank))
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(list(params.values()), lr=s.learning_rate, weight_decay=s.weight_decay))
    start, log = checkpoints.resume(params, optimizer, generator)

    began = time.perf_counter()
    bar = tqdm(total=total, initial=start, desc="CLIPSelf", unit="step", disable=not progress or not group.main,
               leave=False)
    with bar:
        for step in range(start + 1, total + 1):
            t0 = time.perf_counter()
            paths = [images[i] for i in batch_indices(step, len(images), s.batch_size, group.count, group.rank, s.seed)]
            pixels = clip_pixels([read_image(p) for p in paths], s.resolution).to(accelerator.device)
            regions = [draw_regions(generator, s.max_split, s.resolution) for _ in paths]
            with accelerator.autocast():
                loss = distillation_loss(student, teacher, pixels, regions)
            accelerator.backward(loss)
            average_gradients(group, list(params.values()))
            optimizer.step()
            optimizer.zero_grad()
            mean = group.mean(loss.detach().float()).item()
            log.append({"step": step, "loss": mean, "lr": optimizer.param_groups[0]["lr"],
                        "seconds": round(time.perf_counter() - t0, 4)})
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}")
            if s.checkpoint_every and step % s.checkpoint_every == 0 and step < total:
                checkpoints.save(step, params, optimizer, generator, log)
    if group.main:
        _save_final(student, out_dir, record, log)
        checkpoints.remove()
    group.wait()
    first, last = (log[0]["loss"], log[-1]["loss"]) if group.main and log else (None, None)
    return DistillResult(final, total, first, last, time.perf_counter() - began, group.main)


def _save_final(student: torch.nn.Module, out_dir: Path, record: dict, log: list[dict]) -> None:
    """clipself.json and loss.jsonl, then clipself.pt by rename: present means complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    write_loss_log(out_dir / LOSS_LOG_NAME, log)
    state = hf_to_openclip({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()})
    tmp = out_dir / f".{CHECKPOINT_NAME}.tmp-{os.getpid()}"
    torch.save({"state_dict": state}, tmp)
    os.replace(tmp, out_dir / CHECKPOINT_NAME)


def default_out(backbone: "Backbone") -> Path:
    """$RELBENCH_CACHE/relationbooth/local-encoder/<backbone>."""
    from ...paths import cache_root

    return cache_root() / "relationbooth" / "local-encoder" / backbone.name


def train_local_encoder(images: str | Path, *, backbone: str = "sdxl", weights: Mapping[str, str] | None = None,
                        out: str | Path | None = None, steps: int | None = None, set_values: Sequence[str] = (),
                        resume: bool = False, device: str = "auto", quiet: bool = False) -> DistillResult:
    """`relbench train-local-encoder`: check the images, settings and weights, load the
    backbone's image encoder and distil it into `out` (default: default_out)."""
    from ...backbones import get_backbone
    from ...devices import resolve_device
    from ..msdiffusion.encoder import load_image_encoder

    bb = get_backbone(backbone, weights or {})
    if WEIGHT_KEY in bb.weights:
        raise UserError(f"train-local-encoder distils the image encoder; --weight {WEIGHT_KEY} has no use here",
                        hint=f"drop --weight {WEIGHT_KEY} (give the tower to distil with --weight image_encoder=PATH)")
    settings = resolve_settings(set_values, tiny=bb.is_tiny, steps=steps)
    files = image_files(images)
    bb.check_available(() if bb.is_tiny else ("image_encoder",))
    out_dir = Path(out).expanduser() if out is not None else default_out(bb)
    root = Path(images).expanduser().absolute()
    listing = "\n".join(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}" for p in files)
    tower = {"random_seed": bb.preset.seed} if bb.is_tiny else bb.source("image_encoder").to_dict()
    info = {"backbone": bb.name, "image_encoder": tower,
            "images": {"folder": str(root), "count": len(files), "sha256": hashlib.sha256(listing.encode()).hexdigest()}}
    return distill(load_image_encoder(bb), files, out_dir, settings, device=resolve_device(device), info=info,
                   resume=resume, progress=not quiet)
