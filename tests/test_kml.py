"""The keypoint matching loss (paper section 3.4.2) against hand computations on small tensors:
eq. 5 inverts the scheduler's noising, bilinear sampling with the pixel-centre convention and
clamping (a keypoint at exactly 1.0 reads the last column), pairing by index per object,
masked keypoints and padded objects ignored, the authors' timestep rule per sample, zero and
not NaN when nothing is valid; reference latents are the VAE's posterior mean, cached by file
content."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.backbones.tiny import SDXL_SCHEDULER_CONFIG
from relationbench.errors import UserError
from relationbench.methods.relationbooth.kml import (
    KMLSettings,
    ReferenceLatentCache,
    encode_reference_latents,
    image_pixels,
    keypoint_matching_loss,
    keypoint_validity,
    predicted_x0,
    sample_at_keypoints,
    timestep_weight,
    total_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # a 1x1x2x2 latent: pixel centres at 0.25 and 0.75


def ddpm() -> DDPMScheduler:
    """SDXL's training noise schedule (scaled linear, 1000 steps), no clipping."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")
    return DDPMScheduler(**{k: SDXL_SCHEDULER_CONFIG[k] for k in keys}, clip_sample=False)


def bilinear_loop(latent: torch.Tensor, x: float, y: float) -> list[float]:
    """Plain per-channel bilinear read of latent [C, H, W] at normalized (x, y): centre of pixel
    j at (j + 0.5) / W, coordinates clamped to the outermost centres."""
    c, h, w = latent.shape
    px = min(max(x * w - 0.5, 0.0), w - 1.0)
    py = min(max(y * h - 0.5, 0.0), h - 1.0)
    x0, y0 = math.floor(px), math.floor(py)
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    fx, fy = px - x0, py - y0
    out = []
    for ch in range(c):
        v = latent[ch]
        top = v[y0, x0].item() * (1 - fx) + v[y0, x1].item() * fx
        bottom = v[y1, x0].item() * (1 - fx) + v[y1, x1].item() * fx
        out.append(top * (1 - fy) + bottom * fy)
    return out


# -- eq. 5 ------------------------------------------------------------------------------------
def test_predicted_x0_inverts_add_noise_and_matches_the_scheduler_step():
    sched = ddpm()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([0, 333, 999])
    z_t = sched.add_noise(z0, eps, t)
    out = predicted_x0(z_t.half(), eps.half(), sched.alphas_cumprod, t)
    assert out.dtype == torch.float32 and out.shape == z0.shape
    assert torch.allclose(predicted_x0(z_t, eps, sched.alphas_cumprod, t), z0, atol=1e-4)
    # the per-sample abar: sample 1 alone through DDPMScheduler.step's own x0 prediction
    sched.set_timesteps(1000)
    step = sched.step(eps[1:2], 333, z_t[1:2]).pred_original_sample
    assert torch.allclose(predicted_x0(z_t, eps, sched.alphas_cumprod, t)[1:2], step, atol=1e-5)
    # and by hand at t = 333
    abar = sched.alphas_cumprod[333].item()
    hand = (z_t[1, 0, 0, 0].item() - math.sqrt(1 - abar) * eps[1, 0, 0, 0].item()) / math.sqrt(abar)
    assert predicted_x0(z_t, eps, sched.alphas_cumprod, t)[1, 0, 0, 0].item() == pytest.approx(hand, rel=1e-5)


# -- sampling ---------------------------------------------------------------------------------
def test_sample_at_keypoints_by_hand():
    latent = GRID.view(1, 1, 2, 2)
    xy = torch.tensor([[[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.25, 0.75], [0.5, 0.25], [0.375, 0.5],
                        [1.0, 0.0], [1.5, -0.2]]])
    got = sample_at_keypoints(latent, xy)
    assert got.shape == (1, 8, 1)
    # centre: mean of all 4; (0,0) clamps to the first pixel; exactly (1,1) reads the last one
    # (the authors' int(1.0 * W) would index past the end); (0.25,0.75) is pixel (row 1, col 0)
    # itself; (0.5,0.25) halfway along the top row; (0.375,0.5): x a quarter of the way, y half;
    # (1,0) the top-right pixel; outside [0,1] clamps too
    assert got[0, :, 0].tolist() == pytest.approx([2.5, 1.0, 4.0, 3.0, 1.5, 2.25, 2.0, 2.0])


def test_sample_at_keypoints_matches_a_plain_loop_on_a_non_square_latent():
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(2, 3, 5, 7, generator=g)  # N=2, C=3, H=5, W=7
    xy = torch.rand(2, 6, 2, generator=g) * 1.2 - 0.1  # some outside [0, 1]
    xy[0, 0] = torch.tensor([1.0, 1.0])
    got = sample_at_keypoints(latent, xy)
    assert got.shape == (2, 6, 3)
    for n in range(2):
        for k in range(6):
            want = bilinear_loop(latent[n], xy[n, k, 0].item(), xy[n, k, 1].item())
            assert got[n, k].tolist() == pytest.approx(want, abs=1e-5)
    assert got[0, 0].tolist() == pytest.approx(latent[0, :, 4, 6].tolist())  # (1, 1): last row and column


# -- the loss ---------------------------------------------------------------------------------
def small_batch():
    """B=2 samples, O=2 objects, K=2 keypoints, C=1, 2x2 latents, values chosen for hand sums.

    Sample 0: z0_hat = GRID. Object 0's keypoints (0.5,0.5) -> 2.5 and exactly (1,1) -> 4 pair
    with reference 0 (all zeros): errors 6.25 and 16. Object 1: (0,0) -> 1 against reference 1
    (all ones): 0; its second keypoint is masked (would be (3 - 1)^2 = 4). Mean: 22.25 / 3.
    Sample 1: z0_hat = zeros, one real object: reference all 2 -> errors 4, 4; mean 4. Its
    padded object 1 has NaN coordinates and a NaN reference, never read.
    """
    z0 = torch.stack([GRID, torch.zeros(2, 2)]).unsqueeze(1)  # [2, 1, 2, 2]
    refs = torch.stack([
        torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]),
        torch.stack([torch.full((1, 2, 2), 2.0), torch.full((1, 2, 2), float("nan"))]),
    ])  # [2, 2, 1, 2, 2]
    nan = float("nan")
    target = torch.tensor([[[[0.5, 0.5], [1.0, 1.0]], [[0.0, 0.0], [0.25, 0.75]]],
                           [[[0.0, 0.0], [1.0, 1.0]], [[nan, nan], [nan, nan]]]])
    ref = torch.tensor([[[[0.0, 0.0], [0.3, 0.9]], [[0.6, 0.1], [0.2, 0.2]]],
                        [[[0.7, 0.2], [1.0, 0.0]], [[nan, nan], [nan, nan]]]])
    valid = torch.tensor([[[True, True], [True, False]], [[True, True], [False, False]]])
    return z0, refs, target, ref, valid


def test_loss_by_hand_with_a_masked_keypoint_and_a_padded_object():
    z0, refs, target, ref, valid = small_batch()
    loss = keypoint_matching_loss(z0, refs, target, ref, valid)
    assert loss.item() == pytest.approx((22.25 / 3 + 4) / 2)
    # unmasking sample 0's last keypoint adds its error (3 - 1)^2 = 4 to that sample's mean
    unmasked = valid.clone()
    unmasked[0, 1, 1] = True
    assert keypoint_matching_loss(z0, refs, target, ref, unmasked).item() == pytest.approx(((22.25 + 4) / 4 + 4) / 2)


def test_authors_timestep_rule_drops_samples_not_the_batch():
    z0, refs, target, ref, valid = small_batch()
    s = KMLSettings(weight=0.1, max_timestep=333)
    w = timestep_weight(torch.tensor([100, 500]), s)  # sample 1 is past t = 333
    assert w.tolist() == [1.0, 0.0]
    # sample 1 counts as zero in the batch mean: what batch 1 x accumulation 2 gives
    assert keypoint_matching_loss(z0, refs, target, ref, valid, w).item() == pytest.approx((22.25 / 3) / 2)
    assert timestep_weight(torch.tensor([100, 500]), KMLSettings()) is None  # paper: every timestep
    assert timestep_weight(torch.tensor([333, 334]), s).tolist() == [1.0, 0.0]


def test_a_batch_equals_the_mean_of_its_single_sample_losses():
    g = torch.Generator().manual_seed(2)
    z0, refs = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 2, 4, 6, 6, generator=g)
    target, ref = torch.rand(3, 2, 17, 2, generator=g), torch.rand(3, 2, 17, 2, generator=g)
    valid = torch.rand(3, 2, 17, generator=g) > 0.3
    valid[2, 1] = False  # a one-object sample
    whole = keypoint_matching_loss(z0, refs, target, ref, valid)
    parts = [keypoint_matching_loss(z0[i:i + 1], refs[i:i + 1], target[i:i + 1], ref[i:i + 1], valid[i:i + 1])
             for i in range(3)]
    assert whole.item() == pytest.approx(sum(p.item() for p in parts) / 3, rel=1e-6)


def test_squared_error_is_averaged_over_channels():
    """One keypoint, C = 2, channel errors 1 and 3: 5 (eq. 6 read literally: 10, i.e. C times)."""
    z0 = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)]).unsqueeze(0)  # [1, 2, 2, 2]
    refs = torch.zeros(1, 1, 2, 2, 2)
    xy = torch.tensor([[[[0.3, 0.6]]]])
    loss = keypoint_matching_loss(z0, refs, xy, xy, torch.ones(1, 1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(5.0)


def test_gradient_reaches_eps_hat_and_nothing_valid_gives_zero_not_nan():
    sched = ddpm()
    g = torch.Generator().manual_seed(3)
    z_t = torch.randn(2, 4, 4, 4, generator=g)
    eps = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    refs = torch.randn(2, 2, 4, 4, 4, generator=g)
    t = torch.tensor([10, 900])
    xy = torch.rand(2, 2, 17, 2, generator=g)
    refs[1, 1] = float("nan")  # a padded object with garbage in it
    valid = torch.ones(2, 2, 17, dtype=torch.bool)
    valid[1, 1] = False
    z0 = predicted_x0(z_t, eps, sched.alphas_cumprod, t)
    loss = keypoint_matching_loss(z0, refs, xy, xy, valid)
    loss.backward()
    assert loss.item() > 0 and eps.grad is not None and eps.grad.abs().sum() > 0 and eps.grad.isfinite().all()

    eps.grad = None
    nan_xy = torch.full_like(xy, float("nan"))
    z0 = predicted_x0(z_t, eps, sched.alphas_cumprod, t)
    none = keypoint_matching_loss(z0, refs, nan_xy, nan_xy, torch.zeros(2, 2, 17, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert eps.grad is not None and torch.equal(eps.grad, torch.zeros_like(eps))


def test_validity_from_scores_and_padded_objects():
    scores = torch.tensor([[[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]]])  # B=1, O=2, K=3
    objects = torch.tensor([[True, False]])
    got = keypoint_validity(scores, objects, KMLSettings(min_score=0.3), num_keypoints=3)
    assert got.tolist() == [[[True, False, True], [False, False, False]]]
    assert keypoint_validity(None, objects, KMLSettings(), num_keypoints=3).tolist() == \
        [[[True, True, True], [False, False, False]]]
    assert keypoint_validity(scores, objects, KMLSettings(), num_keypoints=3)[0, 0].all()  # default keeps all


def test_settings_defaults_and_total_loss():
    s = KMLSettings()
    assert (s.enabled, s.weight, s.max_timestep, s.min_score) == (True, 1e-3, None, 0.0)  # the paper's
    denoise, kml = torch.tensor(0.5), torch.tensor(20.0)
    assert total_loss(denoise, kml, s).item() == pytest.approx(0.52)
    assert total_loss(denoise, kml, KMLSettings(weight=0.1)).item() == pytest.approx(2.5)
    assert total_loss(denoise, kml, KMLSettings(enabled=False)).item() == pytest.approx(0.5)


# -- reference latents ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae():
    return get_backbone("tiny").sdxl_pipeline().vae


def test_reference_latents_are_the_scaled_posterior_mean(vae):
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    got = encode_reference_latents(vae, pixels)
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    assert got.shape == (2, 4, 4, 4) and got.dtype == torch.float32
    assert torch.allclose(got, dist.mean * 0.13025, atol=1e-6)  # tiny uses SDXL's scaling factor
    assert not torch.allclose(dist.sample(generator=torch.Generator().manual_seed(0)) * 0.13025, got, atol=1e-3)


def test_image_pixels_resize_without_cropping(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # right half blue
    image.save(tmp_path / "wide.png")
    px = image_pixels(tmp_path / "wide.png", 16)
    assert px.shape == (3, 16, 16)
    assert px[:, 8, 0].tolist() == pytest.approx([1.0, -1.0, -1.0])  # left edge red
    assert px[:, 8, 15].tolist() == pytest.approx([-1.0, -1.0, 1.0])  # right edge blue: not cropped away


def test_cache_encodes_each_content_once(tmp_path, vae, monkeypatch):
    for name, colour in (("a.png", (200, 10, 10)), ("copy.png", (200, 10, 10)), ("b.png", (10, 200, 10))):
        Image.new("RGB", (24, 24), colour).save(tmp_path / name)
    cache = ReferenceLatentCache(vae, size=32)
    calls = []
    real = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(x.shape) or real(x))
    a, copy, b = (cache.get(tmp_path / n) for n in ("a.png", "copy.png", "b.png"))
    assert cache.get(tmp_path / "a.png") is a
    assert len(calls) == 2 and len(cache) == 2  # the copy under another name is not encoded again
    assert a.shape == (4, 4, 4) and torch.equal(a, copy) and not torch.equal(a, b)
    want = encode_reference_latents(vae, image_pixels(tmp_path / "b.png", 32).unsqueeze(0))[0]
    assert torch.equal(b, want)


def test_cache_names_a_missing_reference(tmp_path, vae):
    with pytest.raises(UserError, match="cannot read the reference image") as err:
        ReferenceLatentCache(vae, size=32).get(tmp_path / "gone.png")
    assert "gone.png" in err.value.render()
