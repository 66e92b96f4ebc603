"""The keypoint matching loss (paper section 3.4.2, eqs. 5-7): pure tensor functions.

The UNet's noise estimate gives a one-step estimate of the clean latent z0_hat (eq. 5); its
features at the 17 keypoints of each object of the target image x are pulled towards the
features of the VAE latent of that object's reference image c_i at the same-index keypoints
of c_i (eq. 6); the training loss is denoise + lambda * KML (eq. 7).

Keypoints are normalized (x, y) in [0, 1] of their image, x to the right, y down, with the
pixel-centre convention: pixel j of a latent of width W covers [j/W, (j+1)/W) and its centre
is at (j + 0.5)/W, so a keypoint maps to the continuous latent coordinate x*W - 0.5, clamped
to [0, W-1], and is read by bilinear interpolation between the four nearest latent pixels.
A keypoint at exactly 1.0 reads the last column/row (the authors' int(x * 128) indexes one
past the end there).

Normalization (which eq. 6 leaves open): the squared error of one keypoint is averaged over
the C latent channels (F.mse_loss's convention), then over the valid keypoints of a sample;
eq. 6 read literally (1/n_kp times the squared L2 norm over channels) is C times this value
(C = 4 on SDXL), i.e. the same loss at lambda * C. Per-sample losses are then averaged over
the batch, samples without a valid keypoint (or outside the timestep rule) counting as zero:
so a batch of B gives the same value and gradient as B batches of one averaged by gradient
accumulation, which is how the authors train (batch 1 x 4).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...images import read_image


@dataclass(frozen=True)
class KMLSettings:
    """How the keypoint matching loss enters the training loss."""

    enabled: bool = True
    weight: float = 1e-3  # lambda, paper section 4 and Table 6 (1e-2, 1e-4 worse); authors' code: 0.1
    max_timestep: int | None = None  # paper: every timestep; authors' code: 333 (t <= 333 only)
    min_score: float = 0.0  # keypoints scored below this are ignored; 0 keeps all (no scores: all kept)


def predicted_x0(z_t: torch.Tensor, eps_hat: torch.Tensor, alphas_cumprod: torch.Tensor,
                 timesteps: torch.Tensor) -> torch.Tensor:
    """Eq. 5: z0_hat = (z_t - sqrt(1 - abar_t) * eps_hat) / sqrt(abar_t), in float32.

    z_t, eps_hat: [B, C, H, W]; alphas_cumprod: [T] (the scheduler's); timesteps: [B] long.
    Returns [B, C, H, W] float32, differentiable in eps_hat (and z_t).
    """
    abar = alphas_cumprod.to(device=z_t.device, dtype=torch.float32)[timesteps.to(z_t.device).long()]
    abar = abar.view(-1, *([1] * (z_t.dim() - 1)))
    return (z_t.float() - (1 - abar).sqrt() * eps_hat.float()) / abar.sqrt()


def sample_at_keypoints(latents: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear features of `latents` [N, C, H, W] at keypoints `xy` [N, K, 2] -> [N, K, C].

    xy is normalized (x, y) in [0, 1]; the latent coordinate is x*W - 0.5 clamped to
    [0, W-1] (and likewise for y): grid_sample with align_corners=False and border padding.
    Coordinates outside [0, 1] are clamped the same way.
    """
    grid = (xy.to(latents.dtype) * 2 - 1).unsqueeze(1)  # [N, 1, K, 2] in grid_sample's [-1, 1]
    out = F.grid_sample(latents, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.squeeze(2).transpose(1, 2)  # [N, C, 1, K] -> [N, K, C]


def keypoint_matching_loss(z0_hat: torch.Tensor, ref_latents: torch.Tensor, target_xy: torch.Tensor,
                           ref_xy: torch.Tensor, valid: torch.Tensor,
                           sample_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 6 (normalized as in the module docstring): a scalar.

    z0_hat: [B, C, H, W] predicted clean latents of the targets; ref_latents: [B, O, C, H', W']
    the references' latents (object o of x pairs with reference o); target_xy, ref_xy:
    [B, O, K, 2] normalized keypoints (K = 17), paired by index; valid: [B, O, K] bool (low
    score, padded object: False); sample_weight: [B] (e.g. 1.0 where the timestep rule
    applies, else 0.0) or None for all ones. Zero, not NaN, with the graph intact when nothing
    is valid; invalid keypoints touch neither the value nor the gradient, whatever their
    coordinates or their reference latent hold (NaN included).
    """
    b, o, k, _ = target_xy.shape
    c = z0_hat.shape[1]
    valid = valid.to(torch.bool)
    safe = valid.unsqueeze(-1)
    target_xy = torch.where(safe, target_xy, torch.full_like(target_xy, 0.5))
    ref_xy = torch.where(safe, ref_xy, torch.full_like(ref_xy, 0.5))
    pred = sample_at_keypoints(z0_hat.float(), target_xy.reshape(b, o * k, 2).float()).view(b, o, k, c)
    ref = sample_at_keypoints(ref_latents.float().flatten(0, 1), ref_xy.reshape(b * o, k, 2).float()).view(b, o, k, c)
    diff = torch.where(safe, pred - ref, torch.zeros_like(pred))  # masked: 0, and so is their gradient
    err = diff.pow(2).mean(-1)  # [B, O, K]: mean over channels
    per_sample = err.sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)  # [B]
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.to(per_sample)
    return per_sample.mean()


def keypoint_validity(scores: torch.Tensor | None, objects: torch.Tensor, settings: KMLSettings,
                      num_keypoints: int = 17) -> torch.Tensor:
    """valid [B, O, K] from keypoint scores [B, O, K] (None: all scored 1) and objects [B, O]
    bool (False where an object slot is padding, e.g. a one-object sample among two-object
    ones): a keypoint counts if its object is real and its score is >= settings.min_score."""
    keep = objects.to(torch.bool).unsqueeze(-1).expand(*objects.shape, num_keypoints)
    if scores is None:
        return keep.clone()
    return keep & (scores >= settings.min_score)


def timestep_weight(timesteps: torch.Tensor, settings: KMLSettings) -> torch.Tensor | None:
    """Per-sample weight [B] (1.0 / 0.0) for the timestep rule, or None when every timestep
    counts (the paper). Per sample: in a batch, only the samples with t > max_timestep drop out."""
    if settings.max_timestep is None:
        return None
    return (timesteps <= settings.max_timestep).float()


def total_loss(denoise: torch.Tensor, kml: torch.Tensor, settings: KMLSettings) -> torch.Tensor:
    """Eq. 7: denoise + lambda * KML (just denoise when the KML is disabled)."""
    return denoise + settings.weight * kml if settings.enabled else denoise


@torch.no_grad()
def encode_reference_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE-encode(c_i) * scaling_factor for pixels [N, 3, H, W] in [-1, 1] -> [N, C, H/8, W/8]
    float32.

    The posterior mean, not a sample: the KML target is then deterministic and can be computed
    once per reference and cached (issue 11). Runs in the VAE's dtype; SDXL's VAE overflows in
    float16 (its config says force_upcast), so keep it in float32 (or use an fp16-fixed VAE).
    """
    param = next(vae.parameters())
    mean = vae.encode(pixels.to(device=param.device, dtype=param.dtype)).latent_dist.mean
    return mean.float() * vae.config.scaling_factor


def image_pixels(source: Path | bytes, size: int, *, name: Path | None = None) -> torch.Tensor:
    """An image file (path or its bytes; `name` for errors) -> [3, size, size] float32 in
    [-1, 1], resized (bicubic) without cropping, so normalized keypoints stay where they were."""
    from PIL import Image

    image = read_image(source, name=name).resize((size, size), resample=Image.Resampling.BICUBIC)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1


class ReferenceLatentCache:
    """Reference latents computed once per image content and size (in memory).

    `get(path)` reads the file once, keys it by the sha256 of its bytes (a reference shared by
    several samples, or copied under another name, is encoded once), resizes it to `size`
    square and encodes it: [C, size/8, size/8] float32 on the VAE's device. Unreadable images
    raise read_image's UserError naming the file.
    """

    def __init__(self, vae, size: int):
        self.vae, self.size = vae, size
        self._latents: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._latents)

    def get(self, path: Path) -> torch.Tensor:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read the reference image ({exc.strerror or exc})", path=path,
                            hint="check the triplet folder: every entity needs its reference image") from None
        key = hashlib.sha256(data).hexdigest()
        if key not in self._latents:
            pixels = image_pixels(data, self.size, name=Path(path)).unsqueeze(0)
            self._latents[key] = encode_reference_latents(self.vae, pixels)[0]
        return self._latents[key]
