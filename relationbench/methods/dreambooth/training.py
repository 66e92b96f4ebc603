"""DreamBooth LoRA training for SDXL, the way diffusers' train_dreambooth_lora_sdxl recipe does it.

One LoRA per subject set: rank 4 on to_q/to_k/to_v/to_out.0 of every UNet attention layer
(optionally on the text encoders' attention), instance prompts "a <identifier> <class>",
prior preservation with base-model images of "a <class>" (prior loss weight 1.0), AdamW
(lr 1e-4, weight decay 1e-4), batch 1 with 4 accumulation steps, optional min-SNR
weighting. Two subjects train one LoRA jointly, each with its own identifier.

The loop is the generic LoRA trainer's (methods/lora/trainer.py); this module gives it
DreamBooth's batch source (instance rows, then class rows) and loss (noise MSE plus the
weighted prior loss). Processes sharing a generate launch each train the LoRAs of their own
cases (data_parallel=False); one LoRA can train data-parallel under a launch of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..lora.trainer import LoraTarget, TrainerSettings, train_lora

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class TrainSettings(TrainerSettings):
    """The trainer's settings (its defaults are the recipe's: rank 4, AdamW lr 1e-4, weight
    decay 1e-4, batch 1 x 4 accumulation, clip-norm 1.0) and DreamBooth's own."""

    batch_size: int = 1  # instance rows per micro-batch (and as many class rows)
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    snr_gamma: float | None = None  # min-SNR weighting (e.g. 5.0); None: plain MSE

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass(frozen=True)
class Concept:
    """One subject to learn: its identifier, class noun, instance images and class images."""

    identifier: str
    class_noun: str
    images: tuple[Path, ...]
    class_images: tuple[Path, ...] = ()

    @property
    def instance_prompt(self) -> str:
        return f"a {self.identifier} {self.class_noun}"

    @property
    def class_prompt(self) -> str:
        return f"a {self.class_noun}"


@dataclass(frozen=True)
class Example:
    image: Path
    prompt: str


def examples(concepts: Sequence[Concept]) -> tuple[list[Example], list[Example]]:
    """(instance examples, class examples), both interleaving the concepts so a joint LoRA
    sees each subject equally often; class example i goes with instance example i."""
    inst = [[Example(p, c.instance_prompt) for p in c.images] for c in concepts]
    prior = [[Example(p, c.class_prompt) for p in c.class_images] for c in concepts]
    n = max(len(x) for x in inst)
    instance = [inst[j][i % len(inst[j])] for i in range(n) for j in range(len(concepts))]
    m = max((len(x) for x in prior), default=0)
    classes = [prior[j][i % len(prior[j])] for i in range(m) for j in range(len(concepts)) if prior[j]]
    return instance, classes


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_weight: float,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE on the instance rows plus prior_weight x MSE on the class rows (the rows after
    n_instance); per-sample `weights` (min-SNR) scale each row's mean error."""
    per_row = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
    if weights is not None:
        per_row = per_row * weights
    loss = per_row[:n_instance].mean()
    if per_row.shape[0] > n_instance:
        loss = loss + prior_weight * per_row[n_instance:].mean()
    return loss


def _pixels(path: Path, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Resize the short side to `size`, centre crop, scale to [-1, 1]; also the original (h, w)."""
    import numpy as np
    from PIL import Image

    from ...images import read_image

    image = read_image(path)
    original = (image.height, image.width)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return x, original


def _encode_prompts(pipe, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: penultimate hidden states of both text encoders side by side, and
    the second encoder's pooled projection."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # text_encoder_2: text_embeds (the pooled projection)
    return torch.cat(hidden, dim=-1), pooled


@dataclass(frozen=True)
class Batch:
    """One micro-batch: its rows (instance rows first), their scaled latents, noise and
    timesteps; latents and noise [rows, 4, h/8, w/8] in the UNet's dtype, timesteps [rows]."""

    rows: list[Example]
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


@dataclass
class DreamBoothBatches:
    """The batch source: `batch_size` random instance rows, then as many class rows when
    prior preservation is on; each row's latent drawn from its image's VAE distribution."""

    instance: list[Example]
    classes: list[Example]
    dists: Mapping[Path, Any]  # image -> the VAE's latent distribution of it
    batch_size: int
    scaling_factor: float
    num_train_timesteps: int
    dtype: torch.dtype  # the UNet's

    def _pick(self, pool: list[Example], gen: torch.Generator) -> list[Example]:
        return [pool[int(i)] for i in torch.randint(len(pool), (self.batch_size,), generator=gen)]

    def __call__(self, gen: torch.Generator) -> Batch:
        rows = self._pick(self.instance, gen) + (self._pick(self.classes, gen) if self.classes else [])
        latents = torch.cat([self.dists[e.image].sample(generator=gen) for e in rows])
        latents = (latents * self.scaling_factor).to(self.dtype)
        noise = torch.randn(latents.shape, generator=gen).to(latents)
        t = torch.randint(0, self.num_train_timesteps, (len(rows),), generator=gen).to(latents.device)
        return Batch(rows, latents, noise, t)


@dataclass
class DreamBoothLoss:
    """Noise (or velocity) MSE on the instance rows plus prior_loss_weight x that on the class
    rows, optionally min-SNR weighted; SDXL conditioning from the frozen prompt embeddings, or
    from the text encoders each step when they train too."""

    pipe: Any
    scheduler: Any  # the DDPM training scheduler
    settings: TrainSettings
    sizes: Mapping[Path, tuple[int, int]]  # image -> original (h, w), for SDXL's time ids
    resolution: int
    embeds: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None  # prompt -> (hidden, pooled)

    def __call__(self, unet: torch.nn.Module, batch: Batch) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        s, device = self.settings, batch.latents.device
        noisy = self.scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        if self.embeds is None:
            hidden, pooled = _encode_prompts(self.pipe, [e.prompt for e in batch.rows], device)
        else:
            hidden = torch.stack([self.embeds[e.prompt][0] for e in batch.rows])
            pooled = torch.stack([self.embeds[e.prompt][1] for e in batch.rows])
        size = self.resolution
        time_ids = torch.tensor([[*self.sizes[e.image], 0, 0, size, size] for e in batch.rows],
                                device=device, dtype=hidden.dtype)
        pred = unet(noisy, batch.timesteps, encoder_hidden_states=hidden.to(unet.dtype),
                    added_cond_kwargs={"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids}).sample
        v_pred = self.scheduler.config.prediction_type == "v_prediction"
        target = self.scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps) if v_pred else batch.noise
        weights = None
        if s.snr_gamma is not None:
            snr = compute_snr(self.scheduler, batch.timesteps)
            weights = torch.clamp(snr, max=s.snr_gamma) / (snr + 1 if v_pred else snr)
        return dreambooth_loss(pred, target, s.batch_size, s.prior_loss_weight, weights)


def train_dreambooth(pipe, concepts: Sequence[Concept], settings: TrainSettings, out_dir: Path, resolution: int,
                     device: str, progress: bool = True, info: Mapping[str, Any] | None = None,
                     data_parallel: bool = False) -> Path:
    """Train one LoRA on `concepts` into out_dir (diffusers format, via the generic trainer);
    leaves `pipe` as it was. data_parallel=False: this process alone, also under a launch
    (the processes of a sharded generate each train the LoRAs of their own cases)."""
    from diffusers import DDPMScheduler

    s, vae = settings, pipe.vae
    instance, classes = examples(concepts)
    if not s.prior_preservation:
        classes = []
    # frozen inputs, computed once: latent distributions of every image, prompt embeddings
    with torch.no_grad():
        dists, sizes = {}, {}
        for ex in {e.image: e for e in instance + classes}.values():
            x, sizes[ex.image] = _pixels(ex.image, resolution)
            dists[ex.image] = vae.encode(x[None].to(device, vae.dtype)).latent_dist
        prompts = sorted({e.prompt for e in instance + classes})
        embeds = None if s.train_text_encoder else dict(zip(prompts, zip(*_encode_prompts(pipe, prompts, device))))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    batches = DreamBoothBatches(instance, classes, dists, s.batch_size, vae.config.scaling_factor,
                                scheduler.config.num_train_timesteps, pipe.unet.dtype)
    loss = DreamBoothLoss(pipe, scheduler, s, sizes, resolution, embeds)
    encoders = [LoraTarget(pipe.text_encoder, TEXT_TARGETS, "text_encoder"),
                LoraTarget(pipe.text_encoder_2, TEXT_TARGETS, "text_encoder_2")] if s.train_text_encoder else []
    names = " + ".join(f"{c.identifier} {c.class_noun}" for c in concepts)
    return train_lora(pipe.unet, UNET_TARGETS, batches, loss, s, out_dir, also=encoders,
                      info={"batch_size": s.batch_size, "prior_preservation": s.prior_preservation,
                            "prior_loss_weight": s.prior_loss_weight, "snr_gamma": s.snr_gamma,
                            "resolution": resolution, **(info or {})},
                      data_parallel=data_parallel, progress=progress, desc=f"LoRA {names}")
