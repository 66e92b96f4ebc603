"""NaN/inf never becomes an image: latents and decoded pixels are checked before anything is
saved (fp16 overflow in the guidance or the VAE), the run stops with the fix, nothing of the
failed batch is counted; finite samples keep the pipeline's own bytes."""

from __future__ import annotations

import json

import pytest
import torch

from relationbench.backbones import get_backbone
from relationbench.errors import UserError
from relationbench.methods import Context, Request, sampling
from relationbench.methods.sampling import NonFiniteImages, quiet_sliced, sample_sdxl, seeded_noise
from relationbench.suites import load_suite

from .test_generate import fast_card, gen, images  # noqa: F401 (fast_card is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

OVERFLOW = 100000.0  # a guidance scale whose latents overflow fp16 (max 65504) at the first step
STEPS = 4


@pytest.fixture(scope="module")
def cases():
    suite = load_suite("relationbench")
    return [suite.case("rb-s-001"), suite.case("rb-m-001")]


def requests(cases) -> list[Request]:
    """Image 0 of each case, with seeds of their own."""
    return [Request(case, 0, 100 + i) for i, case in enumerate(cases)]


def sample(pipe, reqs, guidance_scale=5.0, **kwargs) -> list:
    return sample_sdxl(pipe, reqs, [r.case.prompt for r in reqs], steps=STEPS, guidance_scale=guidance_scale,
                       negative_prompt="", height=64, width=64, device="cpu", **kwargs)


def fp16_pipe():
    """A tiny pipeline of its own (a fresh backbone: tests may change its weights)."""
    return quiet_sliced(get_backbone("tiny").sdxl_pipeline(dtype=torch.float16))


def test_finite_samples_are_the_pipelines_pil_bytes(cases):
    pipe = quiet_sliced(get_backbone("tiny").sdxl_pipeline())
    reqs = requests(cases)
    ours = sample(pipe, reqs)
    shape = (4, 8, 8)
    with torch.inference_mode():
        theirs = pipe(prompt=[r.case.prompt for r in reqs], num_inference_steps=STEPS, guidance_scale=5.0,
                      height=64, width=64, latents=seeded_noise([r.seed for r in reqs], shape, "cpu", torch.float32),
                      generator=[torch.Generator().manual_seed(r.seed) for r in reqs], output_type="pil").images
    assert [im.mode for im in ours] == ["RGB", "RGB"]
    for a, b in zip(ours, theirs):
        assert a.tobytes() == b.tobytes()


def test_callers_callback_runs_first_and_its_latents_are_checked(cases):
    pipe = quiet_sliced(get_backbone("tiny").sdxl_pipeline())
    seen = []

    def poison_second_image(pipe, step, timestep, kwargs):
        """MS-Diffusion-style: the caller's own callback; at step 3 it hands back a NaN latent."""
        seen.append(step)
        if step == 2:
            kwargs["latents"][1, 0, 0, 0] = float("nan")
        return kwargs

    reqs = requests(cases)
    with pytest.raises(NonFiniteImages) as err:
        sample(pipe, reqs, callback_on_step_end=poison_second_image)
    assert seen == list(range(STEPS))
    text = str(err.value)
    first, second = (f"{r.case.id} #{r.index} (seed {r.seed})" for r in reqs)
    assert f"the latents of {second} became NaN/inf at step 3 of {STEPS} (sampling in fp32)" in text
    assert first not in text


def first_non_finite_step(pipe, reqs, guidance_scale) -> int | None:
    """An independent record: the 1-based step where the pipeline's latents first hold NaN/inf."""
    bad = []

    def record(pipe, step, timestep, kwargs):
        if not torch.isfinite(kwargs["latents"]).all():
            bad.append(step + 1)
        return kwargs

    with torch.inference_mode():
        pipe(prompt=[r.case.prompt for r in reqs], num_inference_steps=STEPS, guidance_scale=guidance_scale,
             height=64, width=64, latents=seeded_noise([r.seed for r in reqs], (4, 8, 8), "cpu", torch.float16),
             output_type="latent", callback_on_step_end=record)
    return bad[0] if bad else None


def test_overflowing_guidance_in_fp16_is_refused_with_the_step_and_the_fix(cases):
    pipe = fp16_pipe()
    reqs = requests(cases)
    step = first_non_finite_step(pipe, reqs, OVERFLOW)
    assert step is not None
    with pytest.raises(NonFiniteImages) as err:
        sample(pipe, reqs, guidance_scale=OVERFLOW)
    assert isinstance(err.value, UserError)  # the CLI prints it and exits 2
    text = str(err.value)
    labels = ", ".join(f"{r.case.id} #{r.index} (seed {r.seed})" for r in reqs)
    assert f"the latents of {labels} became NaN/inf at step {step} of {STEPS} (sampling in fp16)" in text
    assert "nothing of this batch was saved" in text
    assert err.value.hint == ("sample in another dtype (--dtype bf16 or --dtype fp32); or load an "
                              "fp16-safe VAE, on the sdxl backbone (--weight vae=madebyollin/sdxl-vae-fp16-fix); "
                              "or lower the guidance scale (--set guidance_scale=5)")


def test_vae_overflow_in_fp16_is_named(cases):
    pipe = fp16_pipe()
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(3e4)  # activations past fp16's 65504 in the decoder
    reqs = requests(cases)[:1]
    assert first_non_finite_step(pipe, reqs, 5.0) is None  # the latents are fine
    with pytest.raises(NonFiniteImages) as err:
        sample(pipe, reqs)
    assert (f"the VAE decode of {reqs[0].case.id} #0 (seed {reqs[0].seed}) produced NaN/inf from finite latents "
            "(VAE weights in fp16)") in str(err.value)
    assert "latents of" not in str(err.value)


def manifest(run) -> list[dict]:
    path = run / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_generate_in_fp16_with_overflow_stops_and_counts_nothing(tmp_path, fast_card):  # noqa: F811
    out = tmp_path / "run"
    res = gen("--method", str(fast_card), "--suite", "relationbench", "--cases", "rb-s-001,rb-m-001",
              "--dtype", "fp16", "--device", "cpu", "--set", f"guidance_scale={OVERFLOW}", "--out", str(out))
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "the latents of rb-s-001 #0" in res.output and "(sampling in fp16)" in res.output
    assert "fix: sample in another dtype (--dtype bf16 or --dtype fp32)" in res.output
    assert manifest(out) == [] and images(out) == {}


def test_a_nan_batch_stops_the_run_and_keeps_the_batches_before(tmp_path, fast_card, monkeypatch):  # noqa: F811
    real = sampling.initial_latents

    def nan_for(case_id):
        def noise(reqs, shape, device, dtype):
            out = real(reqs, shape, device, dtype)
            out[[r.case.id == case_id for r in reqs]] = float("nan")
            return out
        return noise

    # suite order, batches of 2: rb-s-001 (fine), rb-s-002 (NaN noise), rb-m-001 (never reached)
    monkeypatch.setattr(sampling, "initial_latents", nan_for("rb-s-002"))
    out = tmp_path / "run"
    args = ("--method", str(fast_card), "--suite", "relationbench", "--cases", "rb-s-001,rb-s-002,rb-m-001",
            "--images-per-case", "2", "--batch-size", "2", "--out", str(out))
    res = gen(*args)
    assert res.exit_code == 2, res.output
    assert "the latents of rb-s-002 #0 (seed" in res.output and "rb-s-002 #1 (seed" in res.output
    assert "at step 1 of 4 (sampling in fp32)" in res.output
    assert "fix: lower the guidance scale (--set guidance_scale=5)" in res.output  # fp32: no dtype or VAE fix
    assert sorted((r["case_id"], r["index"]) for r in manifest(out)) == [("rb-s-001", 0), ("rb-s-001", 1)]
    kept = images(out)
    assert sorted(kept) == ["images/rb-s-001/0.png", "images/rb-s-001/1.png"]
    monkeypatch.setattr(sampling, "initial_latents", real)
    res = gen(*args)  # the lock was released; the failed batch was never counted
    assert res.exit_code == 0, res.output
    assert "4 generated, 2 already done" in res.output
    assert {k: v for k, v in images(out).items() if k in kept} == kept
    assert len(manifest(out)) == 6


def test_dreambooth_never_caches_a_nan_class_image(tmp_path):
    from relationbench.methods.dreambooth import DreamBoothMethod, DreamBoothSettings

    settings = DreamBoothSettings(num_class_images=2, class_steps=2, resolution=64, class_guidance_scale=OVERFLOW,
                                  cache_dir=str(tmp_path / "cache"))
    ctx = Context(backbone=get_backbone("tiny"), device="cpu", dtype=torch.float16, data_root=tmp_path, quiet=True)
    method = DreamBoothMethod(settings, ctx)
    with pytest.raises(NonFiniteImages) as err:
        method.class_images("dog")
    assert "class image 0 of 'a dog' (seed 0), class image 1 of 'a dog' (seed 1)" in str(err.value)
    assert err.value.hint.endswith("or lower the guidance scale (--set class_guidance_scale=5)")
    assert not list((tmp_path / "cache").rglob("*.png"))
    method.close()
