"""Pieces every diffusion adapter shares: the backbone's pipeline, per-request initial noise
and the PIL output, checked for NaN/inf before anyone can save it."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import UserError
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
    generator, an optional negative prompt, anything else (e.g. cross_attention_kwargs) passed on.

    Raises NonFiniteImages (naming the requests) if any latents or pixels hold NaN/inf."""
    shape = (pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return checked_images(
        pipe,
        [f"{r.case.id} #{r.index} (seed {r.seed})" for r in requests],
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        latents=initial_latents(requests, shape, device, pipe.unet.dtype),
        generator=request_generators(requests, device),
        **pipe_kwargs,
    )


class NonFiniteImages(UserError):
    """Sampling produced NaN/inf latents or pixels (typically fp16 overflowing in the guidance,
    the UNet or the VAE). Raised before any image of the batch is returned, so nothing of it is
    saved or counted, and the run stops with the fixes in the message."""


def checked_images(pipe, labels: Sequence[str], *, guidance_key: str = "guidance_scale", **call_kwargs) -> list:
    """`pipe(**call_kwargs).images` as PIL images, one per label (what names the image in an error);
    `guidance_key` is the method setting that sets the guidance scale, for the error's fix.

    Latents are checked after every step (a callback_on_step_end, chained after the caller's
    own) and the decoded pixels before their conversion, which is diffusers' own for
    output_type="pil", so the bytes are those the pipeline would have returned. (The pixels are
    seen after diffusers' clamp to [0, 1], which keeps NaN but turns inf into 0 or 1; an fp16
    VAE overflow shows as NaN, inf meeting its GroupNorms.)
    """
    import numpy as np
    import torch

    steps = call_kwargs["num_inference_steps"]
    watch = _LatentWatch(call_kwargs.pop("callback_on_step_end", None))
    with torch.inference_mode():
        pixels = pipe(**call_kwargs, output_type="np", callback_on_step_end=watch).images  # (B, H, W, 3) in [0, 1]
    decode_bad = ~np.isfinite(pixels.reshape(len(pixels), -1)).all(axis=1)
    first_bad = watch.first_bad_steps(len(pixels))
    if decode_bad.any() or (first_bad >= 0).any():
        raise NonFiniteImages(_non_finite_message(pipe, labels, first_bad, decode_bad, steps),
                              hint=_non_finite_fix(pipe, guidance_key))
    return pipe.image_processor.numpy_to_pil(pixels)


class _LatentWatch:
    """A callback_on_step_end that keeps, per image, the first step whose latents hold NaN/inf.

    It stays on the device (no sync per step) and runs after `inner`, the caller's own callback,
    checking the latents that callback hands back to the pipeline.
    """

    def __init__(self, inner=None):
        self.inner = inner
        self.first = None  # a (B,) long tensor, -1 while finite

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        import torch

        if self.inner is not None:
            callback_kwargs = self.inner(pipe, step, timestep, callback_kwargs)
        bad = ~torch.isfinite(callback_kwargs["latents"]).flatten(1).all(dim=1)
        if self.first is None:
            self.first = torch.full(bad.shape, -1, dtype=torch.long, device=bad.device)
        self.first = torch.where(bad & (self.first < 0), step, self.first)
        return callback_kwargs

    def first_bad_steps(self, count: int):
        """(count,) numpy array: the 0-based step where each image's latents first went non-finite, or -1."""
        import numpy as np

        return np.full(count, -1) if self.first is None else self.first.cpu().numpy()


def _non_finite_message(pipe, labels: Sequence[str], first_bad, decode_bad, steps: int) -> str:
    """Which images failed, where (latents at step k, or the VAE decode) and in which dtype."""
    from ..devices import dtype_name

    in_latents = list(dict.fromkeys(label for label, k in zip(labels, first_bad) if k >= 0))
    in_decode = list(dict.fromkeys(label for label, k, d in zip(labels, first_bad, decode_bad) if d and k < 0))
    parts = []
    if in_latents:
        step = int(min(k for k in first_bad if k >= 0)) + 1
        parts.append(f"the latents of {', '.join(in_latents)} became NaN/inf at step {step} of {steps} "
                     f"(sampling in {dtype_name(pipe.unet.dtype)})")
    if in_decode:
        parts.append(f"the VAE decode of {', '.join(in_decode)} produced NaN/inf from finite latents "
                     f"(VAE weights in {dtype_name(pipe.vae.dtype)})")
    return "numerical failure: " + "; ".join(parts) + "; nothing of this batch was saved"


def _non_finite_fix(pipe, guidance_key: str) -> str:
    """The fixes that apply: a dtype with more range or precision than the current one, an
    fp16-safe VAE for an fp16 VAE, a lower guidance scale."""
    from ..devices import dtype_name

    fixes = []
    other = {"fp16": "--dtype bf16 or --dtype fp32", "bf16": "--dtype fp32"}.get(dtype_name(pipe.unet.dtype))
    if other:
        fixes.append(f"sample in another dtype ({other})")
    if dtype_name(pipe.vae.dtype) == "fp16":
        fixes.append("load an fp16-safe VAE, on the sdxl backbone (--weight vae=madebyollin/sdxl-vae-fp16-fix)")
    fixes.append(f"lower the guidance scale (--set {guidance_key}=5)")
    return "; or ".join(fixes)


def quiet_sliced(pipe):
    """A pipeline set up for the run loop: no inner progress bar, the VAE decoding one image
    at a time (less memory at 1024 px, and the CPU's GroupNorm rounds differently with the
    batch size, so decoding alone keeps images batch-invariant)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_slicing()
    return pipe
