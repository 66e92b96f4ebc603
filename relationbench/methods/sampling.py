"""Pieces every diffusion adapter shares: the backbone's pipeline, per-request initial noise
and the PIL output."""

from __future__ import annotations

from typing import Any, Sequence

from .base import Context, MethodBase, Request


class PipelineMethod(MethodBase):
    """A method that samples with the backbone's SDXL pipeline.

    load() builds the pipeline (the backbone caches it per device and dtype, so methods of
    one process share it: whatever a method changes on it, close() must undo). `pipe` loads
    on first use too, for code that drives a method without the run loop.
    """

    def __init__(self, settings: Any, context: Context):
        self.settings = settings
        self.context = context
        self._pipe = None

    def load(self) -> None:
        if self._pipe is None:
            ctx = self.context
            self._pipe = quiet_sliced(ctx.backbone.sdxl_pipeline(device=ctx.device, dtype=ctx.dtype))

    @property
    def pipe(self):
        if self._pipe is None:
            self.load()
        return self._pipe

    def size(self) -> tuple[int, int]:
        """(height, width) in pixels: the settings' or, where unset, the backbone's."""
        res = self.context.backbone.resolution
        return (getattr(self.settings, "height", None) or res, getattr(self.settings, "width", None) or res)


def initial_latents(requests: Sequence[Request], shape: tuple[int, ...], device, dtype):
    """Initial noise, drawn per request on the CPU from the request's own seed.

    Each image's noise depends only on its seed, never on the batch it lands in or the
    device, so batch size, order and sharding never change an image.
    """
    return seeded_noise([r.seed for r in requests], shape, device, dtype)


def seeded_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype):
    """One standard-normal tensor of `shape` per seed, drawn on the CPU, stacked."""
    import torch

    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def request_generators(requests: Sequence[Request], device) -> list:
    """One generator per request (for schedulers that draw noise during sampling)."""
    import torch

    gen_device = "cpu" if str(device).startswith("mps") else device
    return [torch.Generator(gen_device).manual_seed(r.seed) for r in requests]


def sample_sdxl(pipe, requests: Sequence[Request], prompts: Sequence[str], *, steps: int, guidance_scale: float,
                negative_prompt: str, height: int, width: int, device, **pipe_kwargs) -> list:
    """One PIL image per request from an SDXL pipeline: the request's own initial noise and
    generator, an optional negative prompt, anything else (e.g. cross_attention_kwargs) passed on."""
    import torch

    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    with torch.inference_mode():
        return pipe(
            prompt=list(prompts),
            negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            latents=initial_latents(requests, shape, device, pipe.unet.dtype),
            generator=request_generators(requests, device),
            output_type="pil",
            **pipe_kwargs,
        ).images


def quiet_sliced(pipe):
    """A pipeline set up for the run loop: no inner progress bar, the VAE decoding one image
    at a time (less memory at 1024 px, and the CPU's GroupNorm rounds differently with the
    batch size, so decoding alone keeps images batch-invariant)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    return pipe
