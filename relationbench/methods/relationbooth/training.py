"""RelationLoRA training on relation triplets (paper 3.4.1, 3.4.2, 4): the batches and the loss
the shared LoRA trainer (methods/lora/trainer.py) runs.

The model is MS-Diffusion as the `msdiffusion` method loads it; only the RelationLoRA on
attn2 to_q / to_k / to_v / to_out.0 trains. What stays fixed is computed once per sample
(encode_samples): the target's VAE posterior, the prompt through both SDXL text encoders,
each reference through the CLIP image encoder and the resampler (with its entity's phrase
and its object's box in x) into 16 subject tokens, and each reference's VAE latent for the
keypoint matching loss. Each micro-batch (RelationBatches) draws `batch_size` samples of one
relation, a latent from each target's posterior, noise and a uniform timestep, all from the
trainer's generator. The loss (RelationBoothLoss):

    z_t    = DDPM add_noise(z_0, eps, t)              the pipeline's scheduler as DDPMScheduler
    eps^   = UNet(z_t, t, c_t; MS-Diffusion tokens and boxes at image scale gamma)
    loss   = MSE(eps^, eps) + lambda * KML(z0^(eps^), VAE(c_i))    (eqs. 5-7, kml.py)
             [+ w * predicate attention loss]          (the authors' code only; off by default)

Samples with one and two entities mix by padding: MS-Diffusion's conditioning packs
different subject counts, and the KML masks the padded objects.

With an open_clip local encoder (ViT-L/14, EVA-CLIP-L/14: 1024-d tokens) a `local_projection`
(local_encoders.new_projection: D -> the resampler's image-token width, seeded orthogonal) trains
with the LoRA, by the same optimizer, and is saved beside it (the trainer's modules file). The
subject tokens then depend on it: per sample the resampler's inputs are kept (image tokens,
local tokens before the projection, phrases) and the frozen resampler runs at every step.

The predicate attention loss (REFERENCE 2/7 describe it; its formula is not published, this
is our reading): on the attn2 layers at 1/32 of the image side (the 32x32 layers at 1024 px),
the text attention of the predicate's prompt tokens (softmax over the 77 text tokens, mean
over heads, summed over the predicate's tokens) should fall on the objects: per layer and
sample, the share of that attention on cells outside the union of the object masks, averaged
over layers and samples (0 when all of it is on the objects).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import UserError
from ...images import read_image
from ..lora.trainer import train_lora
from ..msdiffusion.attention import level_grid
from .kml import (KMLSettings, ReferenceLatentCache, image_pixels, keypoint_matching_loss, keypoint_validity,
                  predicted_x0, timestep_weight, total_loss)
from .local_encoders import PROJECTION, new_projection
from .lora import relationlora_targets

if TYPE_CHECKING:
    from ...data.triplets import ObjectAnnotation, TripletSample
    from .method import RelationBoothMethod

PREDICATE_LEVEL = 2  # UNet level of the predicate attention loss: latent / 4 (32x32 at 1024 px)


@dataclass(frozen=True)
class Encoded:
    """One triplet sample's fixed inputs, on the training device (O objects, K = 17 keypoints).

    posterior: the VAE's distribution of the target's latent [1, C, h, w]; time_ids [6]:
    SDXL's original size, crop (0, 0) and training size; prompt_embeds [77, D], pooled [P]:
    c_t; tokens [O, 16, D]: MS-Diffusion's subject tokens of the references, or None with a
    local projection in training: then image [O, 257, E], local [O, N, D'] (before the
    projection) and phrases [O, P] are the resampler's inputs; boxes [O, 4]
    normalized xyxy in x; scales [O] (gamma); target_xy, ref_xy [O, K, 2]; score [O, K]: the
    lower of a keypoint's two scores (1 where unscored); ref_latents [O, C, h, w]:
    VAE(c_i) * scaling factor, only for the KML (None when it is off); predicate [77] (the predicate's prompt tokens) and region [cells
    at PREDICATE_LEVEL] (share of each cell inside the objects) only for the predicate loss.
    """

    id: str
    posterior: Any
    time_ids: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    tokens: torch.Tensor | None
    boxes: torch.Tensor
    scales: torch.Tensor
    target_xy: torch.Tensor
    ref_xy: torch.Tensor
    score: torch.Tensor
    ref_latents: torch.Tensor | None = None
    predicate: torch.Tensor | None = None
    region: torch.Tensor | None = None
    image: torch.Tensor | None = None
    local: torch.Tensor | None = None
    phrases: torch.Tensor | None = None

    @property
    def objects(self) -> int:
        return self.boxes.shape[0]


def _keypoint_tensors(points, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoints -> (xy [17, 2], score [17]; ones when unscored)."""
    xy = torch.tensor(points.xy, dtype=torch.float32, device=device)
    if points.score is None:
        return xy, torch.ones(len(xy), device=device)
    return xy, torch.tensor(points.score, dtype=torch.float32, device=device)


def object_region(objects: Sequence["ObjectAnnotation"], size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The share of each cell of a `grid` (h, w) covered by the union of the objects (their
    masks, or their boxes where a box is given) in an image of `size` (width, height) ->
    [h * w] float32 in [0, 1]."""
    from ...data.triplets import read_mask

    w, h = size
    union = np.zeros((h, w), dtype=bool)
    for o in objects:
        if o.mask is not None:
            union |= read_mask(o.mask)
        else:
            x0, y0, x1, y1 = o.box
            union[int(np.floor(y0 * h)) : int(np.ceil(y1 * h)), int(np.floor(x0 * w)) : int(np.ceil(x1 * w))] = True
    pixels = torch.from_numpy(union).float()[None, None]
    return F.interpolate(pixels, size=grid, mode="area").flatten()


@torch.no_grad()
def encode_samples(method: "RelationBoothMethod", samples: Sequence["TripletSample"], resolution: int, *,
                   predicate: bool = False, progress: bool = True) -> list[Encoded]:
    """Every fixed input of the samples (see Encoded), computed once (references shared by
    samples are encoded once); `predicate`: also what the predicate attention loss needs.
    The references' VAE latents only when the method's settings train with the KML, their
    image tokens only with relation-aware data (else blank image prompts stand in); with a
    local projection (method.projects_local) the resampler's inputs instead of its tokens."""
    from tqdm.auto import tqdm

    pipe, device = method.pipe, method.context.device
    vae = pipe.vae
    latent_hw = (resolution // pipe.vae_scale_factor,) * 2
    references = ReferenceLatentCache(vae, resolution) if method.settings.kml().enabled else None
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    text = {p: (embeds[i], pooled[i]) for i, p in enumerate(prompts)}
    projected = method.projects_local
    if method.settings.relation_data:
        paths = [str(r.image) for s in samples for r in s.references]
        (method.encode_features if projected else method.encode_references)(paths)
    out = []
    relation = samples[0].relation if samples else ""
    for s in tqdm(samples, desc=f"inputs {relation}", unit="sample", disable=not progress, leave=False):
        width, height = read_image(s.target).size
        pixels = image_pixels(s.target, resolution)[None].to(device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        boxes = torch.tensor([o.box for o in s.objects], dtype=torch.float32, device=device)
        pairs = [(_keypoint_tensors(o.keypoints, device), _keypoint_tensors(r.keypoints, device))
                 for o, r in zip(s.objects, s.references)]
        extra = {}
        if projected:
            image, local = method.reference_inputs([r.image for r in s.references])
            extra = dict(image=image, local=local, phrases=method.phrase_embeds(s.entities))
        if predicate:
            extra.update(predicate=method.phrase_mask(s.prompt, [s.predicate])[0].to(device),
                         region=object_region(s.objects, (width, height),
                                              level_grid(latent_hw, PREDICATE_LEVEL)).to(device))
        out.append(Encoded(
            id=s.id, posterior=posterior,
            time_ids=torch.tensor([height, width, 0, 0, resolution, resolution], dtype=torch.float32, device=device),
            prompt_embeds=text[s.prompt][0], pooled=text[s.prompt][1],
            tokens=None if projected else method.reference_tokens([r.image for r in s.references], s.entities, boxes),
            boxes=boxes, scales=method.image_scales(len(s.objects)).to(device),
            target_xy=torch.stack([t[0] for t, _ in pairs]), ref_xy=torch.stack([r[0] for _, r in pairs]),
            score=torch.stack([torch.minimum(t[1], r[1]) for t, r in pairs]),
            ref_latents=(torch.stack([references.get(r.image) for r in s.references]).to(device)
                         if references is not None else None),
            **extra))
    return out


@dataclass(frozen=True)
class Batch:
    """One micro-batch: its samples, their target latents (sampled from the posteriors, times
    the VAE scaling factor) and noise [B, C, h, w] in the UNet's dtype, timesteps [B]."""

    samples: tuple[Encoded, ...]
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class RelationBatches:
    """The batch source: `batch_size` samples drawn uniformly (with replacement), then their
    latents, noise and timesteps in [0, num_train_timesteps), all from the trainer's generator."""

    samples: Sequence[Encoded]
    batch_size: int
    scaling_factor: float
    num_train_timesteps: int
    dtype: torch.dtype  # the UNet's

    def __call__(self, gen: torch.Generator) -> Batch:
        rows = [self.samples[int(i)] for i in torch.randint(len(self.samples), (self.batch_size,), generator=gen)]
        latents = torch.cat([r.posterior.sample(generator=gen) for r in rows])
        latents = (latents * self.scaling_factor).to(self.dtype)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, self.num_train_timesteps, (len(rows),), generator=gen).to(latents.device)
        return Batch(tuple(rows), latents, noise, t)


@dataclass
class PredicateAttention:
    """Forward hooks on the attn2 layers of one UNet level that compute, per call, the
    predicate attention loss of the module docstring for the rows `start` was given."""

    modules: Sequence[torch.nn.Module]
    _rows: tuple[torch.Tensor, torch.Tensor] | None = None  # predicate tokens [B, 77], region [B, cells]
    _losses: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    @contextlib.contextmanager
    def attached(cls, unet, adapter, level: int = PREDICATE_LEVEL) -> Iterator["PredicateAttention"]:
        """Hooks on `unet`'s attn2 layers at `level`, removed on leaving (the pipeline is shared)."""
        modules = [unet.get_submodule(adapter.index[k]) for k, lv in adapter.levels.items() if lv == level]
        capture = cls(modules)
        handles = [m.register_forward_hook(capture._hook, with_kwargs=True) for m in modules]
        try:
            yield capture
        finally:
            for h in handles:
                h.remove()

    def start(self, predicate: torch.Tensor, region: torch.Tensor) -> None:
        self._rows, self._losses = (predicate, region), []

    def loss(self) -> torch.Tensor:
        """The mean over the layers called since `start` (and the rows) of the off-object share.
        The rows stay set: gradient checkpointing reruns the layers in the backward pass, and the
        rerun must compute what the forward did (its results are dropped at the next start)."""
        if len(self._losses) != len(self.modules):
            raise RuntimeError(f"{len(self._losses)} of {len(self.modules)} hooked attn2 layers ran")
        return torch.stack(self._losses).mean()

    def _hook(self, attn, args, kwargs, output) -> None:
        if self._rows is None:
            return
        predicate, region = self._rows
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs["encoder_hidden_states"]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        if hidden.shape[1] != region.shape[1]:
            raise ValueError(f"an attn2 at the predicate level has {hidden.shape[1]} cells, "
                             f"the masks {region.shape[1]}")
        q, k = attn.to_q(hidden), attn.to_k(context)  # through the LoRA: the loss trains it
        b, n, _ = q.shape
        q = q.view(b, n, attn.heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], attn.heads, -1).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-2, -1)).float() * attn.scale, dim=-1).mean(1)  # [B, cells, 77]
        share = (probs @ predicate.float()[:, :, None]).squeeze(-1)  # [B, cells]
        off = (share * (1 - region)).sum(-1) / share.sum(-1).clamp(min=1e-8)
        self._losses.append(off.mean())


@dataclass(frozen=True)
class LossParts:
    """The terms of one micro-batch's loss (scalars): total = denoise + kml_weight * kml
    (+ predicate_weight * predicate)."""

    denoise: torch.Tensor
    kml: torch.Tensor
    predicate: torch.Tensor
    total: torch.Tensor


@dataclass
class RelationBoothLoss:
    """The training loss of the module docstring for one micro-batch (the trainer's loss_fn)."""

    adapter: Any  # the MSAdapter installed on the UNet
    scheduler: Any  # DDPMScheduler (epsilon prediction)
    kml: KMLSettings
    latent_hw: tuple[int, int]
    predicate_weight: float = 0.0
    predicate: PredicateAttention | None = None  # required when predicate_weight > 0
    join: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # a sample's image and local
    # tokens -> the resampler's input (method.join_local: through the trained projection); needed
    # for samples that keep those instead of fixed tokens
    _checked: bool = False

    def __call__(self, unet: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return self.parts(unet, batch).total

    def parts(self, unet: torch.nn.Module, batch: Batch) -> LossParts:
        rows, t, dtype = batch.samples, batch.timesteps, unet.dtype
        noisy = self.scheduler.add_noise(batch.latents, batch.noise, t)
        ms = self.adapter.conditioning([self.subject_tokens(r, dtype) for r in rows], [r.boxes for r in rows],
                                       [r.scales for r in rows], self.latent_hw, False)
        if self.predicate_weight:
            self.predicate.start(torch.stack([r.predicate for r in rows]), torch.stack([r.region for r in rows]))
        eps = unet(noisy, t, encoder_hidden_states=torch.stack([r.prompt_embeds for r in rows]).to(dtype),
                   added_cond_kwargs={"text_embeds": torch.stack([r.pooled for r in rows]).to(dtype),
                                      "time_ids": torch.stack([r.time_ids for r in rows]).to(dtype)},
                   cross_attention_kwargs={"ms": ms}).sample
        if not self._checked:  # once: every attn2 ran MS-Diffusion's processor with these tokens
            self.adapter.check_installed(unet, ms)
            self._checked = True
        denoise = F.mse_loss(eps.float(), batch.noise.float())
        zero = denoise.new_zeros(())
        kml = self.keypoint_loss(noisy, eps, batch) if self.kml.enabled else zero
        predicate = self.predicate.loss() if self.predicate_weight else zero
        total = total_loss(denoise, kml, self.kml) + self.predicate_weight * predicate
        return LossParts(denoise, kml, predicate, total)

    def subject_tokens(self, row: Encoded, dtype: torch.dtype) -> torch.Tensor:
        """A sample's subject tokens [O, 16, D]: its fixed ones, or the resampler's of its image
        and local tokens joined through the projection (gradients reach the projection)."""
        if row.tokens is not None:
            return row.tokens.to(dtype)
        return self.adapter.subject_tokens(self.join(row.image, row.local).to(dtype), row.phrases.to(dtype),
                                           row.boxes.to(dtype))

    def keypoint_loss(self, noisy: torch.Tensor, eps: torch.Tensor, batch: Batch) -> torch.Tensor:
        """KML of the batch, its objects padded to the widest sample (padding masked)."""
        rows, t = batch.samples, batch.timesteps
        z0 = predicted_x0(noisy, eps, self.scheduler.alphas_cumprod, t)
        width = max(r.objects for r in rows)
        objects = torch.stack([torch.arange(width, device=z0.device) < r.objects for r in rows])
        valid = keypoint_validity(_pad_objects([r.score for r in rows], width), objects, self.kml)
        return keypoint_matching_loss(z0, _pad_objects([r.ref_latents for r in rows], width),
                                      _pad_objects([r.target_xy for r in rows], width),
                                      _pad_objects([r.ref_xy for r in rows], width), valid,
                                      timestep_weight(t, self.kml))


def _pad_objects(tensors: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Per-sample tensors [O_i, ...] -> [B, width, ...], zero after each sample's objects."""
    return torch.stack([torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])]) for x in tensors])


def training_scheduler(pipe):
    """The pipeline's noise schedule as the DDPM scheduler training adds noise with; refuses a
    model that does not predict the noise (the KML's eq. 5 reads eps^ as noise)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if scheduler.config.prediction_type != "epsilon":
        raise UserError(f"RelationBooth trains a noise-predicting UNet (SDXL's epsilon); this model's scheduler "
                        f"predicts {scheduler.config.prediction_type!r}",
                        hint="use SDXL base (or a model fine-tuned from it with epsilon prediction)")
    return scheduler


def train_relationlora(method: "RelationBoothMethod", samples: Sequence["TripletSample"], out_dir: Path, *,
                       info: Mapping[str, Any], progress: bool = True, data_parallel: bool = True) -> Path:
    """Train one relation's RelationLoRA on `samples` into out_dir (the trainer's diffusers
    folder with settings and loss log); the pipeline is left as it was."""
    s = method.settings
    if s.fuse_projections:
        raise UserError("training needs the attention projections unfused (a fused copy would bypass the LoRA)",
                        hint="--set fuse_projections=false")
    if not samples:
        raise ValueError("no samples to train on")
    pipe = method.pipe
    resolution = method.resolution()
    scheduler = training_scheduler(pipe)
    inputs = encode_samples(method, samples, resolution, predicate=s.predicate_loss_weight > 0, progress=progress)
    latent_hw = (resolution // pipe.vae_scale_factor,) * 2
    batches = RelationBatches(inputs, s.batch_size, pipe.vae.config.scaling_factor,
                              scheduler.config.num_train_timesteps, pipe.unet.dtype)
    relation = samples[0].relation
    record = {"resolution": resolution, "batch_size": s.batch_size, "image_scale": s.scale,
              "kml": {"weight": s.kml().weight, "max_timestep": s.kml_max_timestep, "min_score": s.kml_min_score},
              "predicate_loss_weight": s.predicate_loss_weight, "relation_data": s.relation_data,
              "local_tokens": s.local_tokens, "local_encoder": method.local_identity, **info}
    modules = {}
    with contextlib.ExitStack() as stack:
        if method.projects_local:
            modules[PROJECTION] = new_projection(method.local_width(), method.adapter.cfg.embedding_dim,
                                                 s.seed).to(method.context.device)
            method.use_projection(modules[PROJECTION])
            stack.callback(method.use_projection, None)  # sampling switches in each LoRA's own
            stack.enter_context(_frozen(method.adapter))  # the resampler runs per step, its weights fixed
        capture = (stack.enter_context(PredicateAttention.attached(pipe.unet, method.adapter))
                   if s.predicate_loss_weight else None)
        loss = RelationBoothLoss(method.adapter, scheduler, s.kml(), latent_hw, s.predicate_loss_weight, capture,
                                 join=method.join_local)
        return train_lora(pipe.unet, relationlora_targets(pipe.unet), batches, loss, s, out_dir, info=record,
                          modules=modules, data_parallel=data_parallel, progress=progress, desc=f"relation {relation}")


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """`module`'s parameters without gradients inside, their requires_grad as before after."""
    saved = {n: p.requires_grad for n, p in module.named_parameters()}
    module.requires_grad_(False)
    try:
        yield
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(saved[n])
