"""DreamBooth LoRA training for SDXL, the way diffusers' train_dreambooth_lora_sdxl recipe does it.

One LoRA per subject set: rank 4 on to_q/to_k/to_v/to_out.0 of every UNet attention layer
(optionally on the text encoders' attention), instance prompts "a <identifier> <class>",
prior preservation with base-model images of "a <class>" (prior loss weight 1.0), AdamW
(lr 1e-4, weight decay 1e-4), batch 1 with 4 accumulation steps, optional min-SNR
weighting. Two subjects train one LoRA jointly, each with its own identifier.

accelerate provides mixed precision, gradient accumulation and the optimizer wrapper; the
model itself is not wrapped in DDP, so processes sharing a launch (one per GPU) each train
the LoRAs of their own cases.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

ADAPTER = "dreambooth-train"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name


@dataclass(frozen=True)
class TrainSettings:
    rank: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4  # diffusers' adam_weight_decay
    train_steps: int = 500  # optimizer steps (each of gradient_accumulation micro-batches)
    batch_size: int = 1
    gradient_accumulation: int = 4
    prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    train_text_encoder: bool = False
    snr_gamma: float | None = None  # min-SNR weighting (e.g. 5.0); None: plain MSE
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (accelerate)
    gradient_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.train_steps < 1 or self.batch_size < 1 or self.gradient_accumulation < 1 or self.rank < 1:
            raise ValueError("train_steps, batch_size, gradient_accumulation and rank must be at least 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")


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

    image = Image.open(path).convert("RGB")
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


def train_lora(pipe, concepts: Sequence[Concept], settings: TrainSettings, out_dir: Path, resolution: int,
               device: str, progress: bool = True) -> Path:
    """Train one LoRA on `concepts` into out_dir (diffusers format); leaves `pipe` as it was."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler, StableDiffusionXLPipeline
    from diffusers.training_utils import cast_training_params, compute_snr
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm

    s = settings
    unet, vae = pipe.unet, pipe.vae
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    # accelerate keeps one global state per process; a new LoRA may ask for another precision,
    # so start from a fresh one (the process group of a sharded launch, PartialState, is kept)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=s.mixed_precision, gradient_accumulation_steps=s.gradient_accumulation,
                              cpu=device == "cpu")
    gen = torch.Generator("cpu").manual_seed(s.seed)
    instance, classes = examples(concepts)
    use_prior = s.prior_preservation and bool(classes)

    # frozen inputs, computed once: latent distributions of every image, prompt embeddings
    with torch.no_grad():
        dists, sizes = {}, {}
        for ex in {e.image: e for e in instance + classes}.values():
            x, sizes[ex.image] = _pixels(ex.image, resolution)
            dists[ex.image] = vae.encode(x[None].to(device, vae.dtype)).latent_dist
        prompts = sorted({e.prompt for e in instance + classes})
        if not s.train_text_encoder:
            embeds = dict(zip(prompts, zip(*_encode_prompts(pipe, prompts, device))))

    unet.requires_grad_(False)
    for enc in encoders:
        enc.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS), adapter_name=ADAPTER)
    trained = [unet]
    if s.train_text_encoder:  # peft directly: transformers' add_adapter wants a newer peft than PyPI has
        for enc in encoders:
            inject_adapter_in_model(LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian",
                                               target_modules=TEXT_TARGETS), enc, adapter_name=ADAPTER)
        trained += encoders
    if s.mixed_precision != "no" or unet.dtype != torch.float32:
        cast_training_params(trained, dtype=torch.float32)  # LoRA weights train in fp32
    if s.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    optimizer = accelerator.prepare_optimizer(
        torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in trained:
        m.train()

    def batch(pool: list[Example]) -> list[Example]:
        return [pool[int(i)] for i in torch.randint(len(pool), (s.batch_size,), generator=gen)]

    bar = tqdm(total=s.train_steps, desc=f"LoRA {' + '.join(c.identifier + ' ' + c.class_noun for c in concepts)}",
               unit="step", disable=not progress, leave=False)
    try:
        for _ in range(s.train_steps * s.gradient_accumulation):
            rows = batch(instance) + (batch(classes) if use_prior else [])
            with accelerator.accumulate(unet), accelerator.autocast():
                latents = torch.cat([dists[e.image].sample(generator=gen) for e in rows])
                latents = (latents * vae.config.scaling_factor).to(unet.dtype)
                noise = torch.randn(latents.shape, generator=gen).to(latents)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(rows),), generator=gen).to(device)
                noisy = scheduler.add_noise(latents, noise, t)
                if s.train_text_encoder:
                    hidden, pooled = _encode_prompts(pipe, [e.prompt for e in rows], device)
                else:
                    hidden = torch.stack([embeds[e.prompt][0] for e in rows])
                    pooled = torch.stack([embeds[e.prompt][1] for e in rows])
                time_ids = torch.tensor([[*sizes[e.image], 0, 0, resolution, resolution] for e in rows],
                                        device=device, dtype=hidden.dtype)
                pred = unet(noisy, t, encoder_hidden_states=hidden.to(unet.dtype),
                            added_cond_kwargs={"text_embeds": pooled.to(unet.dtype), "time_ids": time_ids}).sample
                v_pred = scheduler.config.prediction_type == "v_prediction"
                target = scheduler.get_velocity(latents, noise, t) if v_pred else noise
                weights = None
                if s.snr_gamma is not None:
                    snr = compute_snr(scheduler, t)
                    weights = torch.clamp(snr, max=s.snr_gamma) / (snr + 1 if v_pred else snr)
                loss = dreambooth_loss(pred, target, s.batch_size, s.prior_loss_weight, weights)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))}
        if s.train_text_encoder:
            for key, enc in zip(("text_encoder_lora_layers", "text_encoder_2_lora_layers"), encoders):
                layers[key] = convert_state_dict_to_diffusers(get_peft_model_state_dict(enc, adapter_name=ADAPTER))
        StableDiffusionXLPipeline.save_lora_weights(out_dir, weight_name=WEIGHT_NAME, **layers)
    finally:
        bar.close()
        if s.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        with contextlib.suppress(ValueError):
            unet.delete_adapters(ADAPTER)
        for enc in trained[1:]:
            _remove_lora_layers(enc)
        for m in trained:
            m.eval()
            m.requires_grad_(False)
    return out_dir / WEIGHT_NAME


def _remove_lora_layers(model: torch.nn.Module) -> None:
    """Put back the original layers wherever peft injected LoRA wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
