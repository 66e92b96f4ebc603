"""What our MS-Diffusion processors add to plain SDXL sampling, per image, in one process.

One full-size SDXL UNet (the base model's architecture, random weights) runs the same Euler
loop with classifier-free guidance (batch doubled; random prompt embeddings, pooled embeddings
and time ids; denoising only: no text encoders, no VAE decode) three ways per batch size:

  stock   diffusers' own processors (AttnProcessor2_0, what StableDiffusionXLPipeline uses);
  ours    `MSAdapter(unet, ResamplerConfig())` installed (MSCrossAttnProcessor on every attn2,
          SelfAttnProcessor on every attn1), the conditioning passed as
          cross_attention_kwargs={"ms": cond} for 2 subjects per row with overlapping boxes;
  stock   again, after removing the adapter's processors (brackets drift over the run);
  fused + compiled (with --compile BACKEND; default on cuda: inductor): after all the above,
          `adapter.fuse_projections(unet)` and `unet.compile(backend=BACKEND, fullgraph=True)`,
          compiled in a one-step warm-up per batch size (its time reported), then timed against
          that batch size's median stock loop (no bracketing: the UNet stays fused).

Each configuration (batch, stock/ours) is warmed up with a one-step loop first; then, per batch
size, stock, ours, stock, ours, ..., stock: the overhead is the median over the ours loops of
ours / (mean of the two stock loops either side) - 1, which cancels drift linear in time, and
the s/img figures are medians over loops (on this project's shared 2-core VM single loops run
up to 5x slower when another process is busy). The subject tokens (`adapter.subject_tokens`,
the grounding resampler on [2B, 257, 1664] image embeddings) are a per-call cost, not a
per-step one, and are timed on their own. The same UNet instance
serves all three (no second 10 GB copy); the adapter is built when first needed.

    python bench/msdiffusion_overhead.py                       # CPU: 128 px, 2 steps, fp32, 3 repeats
    python bench/msdiffusion_overhead.py --device cuda --dtype bf16 --size 1024 --steps 30
    python bench/msdiffusion_overhead.py --size 64 --steps 2 --batches 1 --compile eager   # CPU smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BOXES = ([0.05, 0.2, 0.6, 0.9], [0.4, 0.2, 0.95, 0.9])  # two subjects per row, overlapping
SUBJECT_SCALE = 0.6  # MSDiffusionSettings.scale
GUIDANCE = 5.0  # REFERENCE 5's stock SDXL figures


def busy_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of all processes on all cores, stolen seconds) from /proc/stat; None off Linux."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    tck = os.sysconf("SC_CLK_TCK")
    busy = f[0] + f[1] + f[2] + f[5] + f[6]  # user nice system irq softirq
    return busy / tck, (f[7] if len(f) > 7 else 0) / tck


def own_seconds() -> float:
    t = os.times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: fp32 on cpu, bf16 otherwise")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default: 128 on cpu, 1024 otherwise)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps (default: 2 on cpu, 30 otherwise)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed loops of ours per batch, alternating with stock, which gets one more "
                             "(before, between, after) (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on cpu (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="add a fused + compiled row with this torch.compile backend (default: inductor "
                             "on cuda, none on cpu, where inductor takes minutes on a full-size UNet); 'none': no row")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    size = args.size or (128 if cpu else 1024)
    steps = args.steps or (2 if cpu else 30)
    dtype_name = args.dtype or ("fp32" if cpu else "bf16")
    repeats = args.repeats or 3
    backend = args.compile or ("none" if cpu else "inductor")
    if size % 8:
        parser.error("--size must be a multiple of 8")
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    t_start = time.perf_counter()
    busy_start, own_start = busy_seconds(), own_seconds()

    import diffusers
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging as diffusers_logging
    from tabulate import tabulate

    from relationbench.backbones.presets import SDXL_UNET_CONFIG
    from relationbench.backbones.tiny import SDXL_SCHEDULER_CONFIG
    from relationbench.methods.msdiffusion.model import MSAdapter
    from relationbench.methods.msdiffusion.resampler import ResamplerConfig

    diffusers_logging.set_verbosity_error()  # the note on casting a model built without from_pretrained
    if cpu:
        torch.set_num_threads(args.threads or 2)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    latent = size // 8

    def sync():
        if is_cuda:
            torch.cuda.synchronize(device)

    # 1. the UNet: full SDXL architecture, random weights (built on the device, then cast)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet = unet.to(dtype=dtype).eval().requires_grad_(False)
    sync()
    unet_build = time.perf_counter() - t0
    unet_params = sum(p.numel() for p in unet.parameters())
    stock_proc = AttnProcessor2_0()
    unet.set_attn_processor(stock_proc)

    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG)
    adapter: MSAdapter | None = None
    ours_procs: dict = {}
    adapter_build = float("nan")
    adapter_params = 0

    def install_ours() -> None:
        nonlocal adapter, ours_procs, adapter_build, adapter_params
        if adapter is None:
            t = time.perf_counter()
            with torch.device(device):
                adapter = MSAdapter(unet, ResamplerConfig())  # installs its processors
            adapter = adapter.to(device=device, dtype=dtype).eval().requires_grad_(False)
            sync()
            adapter_build = time.perf_counter() - t
            adapter_params = sum(p.numel() for p in adapter.parameters())
            ours_procs = dict(unet.attn_processors)
        else:
            unet.set_attn_processor(dict(ours_procs))  # set_attn_processor pops from the dict

    def install_stock() -> None:
        unet.set_attn_processor(stock_proc)

    def inputs(b: int):
        g = torch.Generator(device="cpu").manual_seed(args.seed + b)
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        prompt = rnd(2 * b, 77, 2048)
        pooled = rnd(2 * b, 1280)
        time_ids = torch.tensor([size, size, 0, 0, size, size], dtype=dtype, device=device).repeat(2 * b, 1)
        noise = rnd(b, 4, latent, latent)
        image_embeds = rnd(2 * b, 257, 1664)  # [subjects, tokens, CLIP ViT-bigG/14 width]
        phrase_embeds = rnd(2 * b, 768)
        boxes = torch.tensor(BOXES, dtype=torch.float32, device=device).repeat(b, 1)  # [2B, 4]
        return prompt, pooled, time_ids, noise, image_embeds, phrase_embeds, boxes

    def subject_tokens(b, image_embeds, phrase_embeds, boxes):
        return adapter.subject_tokens(image_embeds, phrase_embeds, boxes.to(dtype))

    def conditioning(b, tokens, boxes):
        rows = tokens.view(b, 2, *tokens.shape[1:])
        box_rows = boxes.view(b, 2, 4)
        scales = [torch.full((2,), SUBJECT_SCALE, device=device) for _ in range(b)]
        return adapter.conditioning(list(rows), list(box_rows), scales, (latent, latent), guidance=True)

    def sample(b, n_steps, prompt, pooled, time_ids, noise, ms_inputs=None) -> torch.Tensor:
        """The pipeline's denoising loop (Euler, CFG); `ms_inputs` = subject tokens and boxes."""
        kwargs = None
        if ms_inputs is not None:  # per call, as MSDiffusionMethod.generate builds it
            kwargs = {"ms": conditioning(b, *ms_inputs)}
        scheduler.set_timesteps(n_steps, device=device)
        latents = noise * scheduler.init_noise_sigma
        added = {"text_embeds": pooled, "time_ids": time_ids}
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(x, t, encoder_hidden_states=prompt, added_cond_kwargs=added,
                       cross_attention_kwargs=kwargs, return_dict=False)[0]
            uncond, cond = eps.chunk(2)
            eps = uncond + GUIDANCE * (cond - uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        return latents

    def timed(fn, *a, **kw):
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t = time.perf_counter()
        out = fn(*a, **kw)
        sync()
        dt = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda else float("nan")
        return out, dt, peak

    rows, notes = [], []
    stock_medians: dict[int, float] = {}
    finite = True
    with torch.inference_mode():
        for b in args.batches:
            prompt, pooled, time_ids, noise, image_embeds, phrase_embeds, boxes = inputs(b)
            loop = (prompt, pooled, time_ids, noise)
            stock_t, ours_t, tok_t, stock_peak, ours_peak = [], [], [], [], []

            def run_stock():
                install_stock()
                out, dt, peak = timed(sample, b, steps, *loop)
                stock_t.append(dt)
                stock_peak.append(peak)
                return out

            def run_ours():
                install_ours()
                tokens, dt, _ = timed(subject_tokens, b, image_embeds, phrase_embeds, boxes)
                tok_t.append(dt)
                out, dt, peak = timed(sample, b, steps, *loop, ms_inputs=(tokens, boxes))
                ours_t.append(dt)
                ours_peak.append(peak)
                return out

            install_stock()
            sample(b, 1, *loop)  # warm-up: stock
            out = run_stock()
            install_ours()
            tokens = subject_tokens(b, image_embeds, phrase_embeds, boxes)  # warm-up: resampler
            sample(b, 1, *loop, ms_inputs=(tokens, boxes))  # warm-up: ours
            for _ in range(repeats):
                out_ours = run_ours()
                out = run_stock()
            finite &= bool(out.isfinite().all()) and bool(out_ours.isfinite().all())

            # Each ours loop against the mean of the stock loops either side: cancels drift that is
            # linear in time.
            ratios = [o / ((s0 + s1) / 2) - 1 for o, s0, s1 in zip(ours_t, stock_t, stock_t[1:])]
            ratios_tok = [(o + k) / ((s0 + s1) / 2) - 1 for o, k, s0, s1 in zip(ours_t, tok_t, stock_t, stock_t[1:])]
            # Medians: a burst from another process on the shared VM spoils one loop, not the figure.
            stock, ours, tok = (statistics.median(v) / b for v in (stock_t, ours_t, tok_t))
            over, over_tok = statistics.median(ratios), statistics.median(ratios_tok)
            spread = f" ({100 * min(ratios):+.1f} .. {100 * max(ratios):+.1f})" if len(ratios) > 1 else ""
            row = [b, f"{stock:.3f}", f"{stock_t[0] / b:.3f} / {stock_t[-1] / b:.3f}", f"{ours:.3f}",
                   f"{100 * over:+.1f} %{spread}", f"{tok:.3f}", f"{100 * over_tok:+.1f} %"]
            if is_cuda:
                row += [f"{max(stock_peak):.1f}", f"{max(ours_peak):.1f}"]
            rows.append(row)
            stock_medians[b] = statistics.median(stock_t)
            notes.append(f"batch {b}: stock loops (s/img) " + ", ".join(f"{t / b:.3f}" for t in stock_t)
                         + "; ours " + ", ".join(f"{t / b:.3f}" for t in ours_t))

        if backend != "none":  # last: fusion and compilation stay on the UNet
            install_ours()
            adapter.fuse_projections(unet)
            unet.compile(backend=backend, fullgraph=True)
            for b in args.batches:
                prompt, pooled, time_ids, noise, image_embeds, phrase_embeds, boxes = inputs(b)
                loop = (prompt, pooled, time_ids, noise)
                tokens = subject_tokens(b, image_embeds, phrase_embeds, boxes)
                _, compile_s, _ = timed(sample, b, 1, *loop, ms_inputs=(tokens, boxes))  # compiles
                fc_t = [timed(sample, b, steps, *loop, ms_inputs=(tokens, boxes))[1] for _ in range(repeats)]
                fc = statistics.median(fc_t)
                rows.append([f"{b} fused + compiled ({backend})", f"{stock_medians[b] / b:.3f}", "", f"{fc / b:.3f}",
                             f"{100 * (fc / stock_medians[b] - 1):+.1f} % vs stock median", "", ""]
                            + (["", ""] if is_cuda else []))
                notes.append(f"batch {b}: fused + compiled ({backend}): compile + first step {compile_s:.1f} s; "
                             "loops (s/img) " + ", ".join(f"{t / b:.3f}" for t in fc_t))

    wall = time.perf_counter() - t_start
    busy_end = busy_seconds()
    if busy_start is not None and busy_end is not None:
        others = (busy_end[0] - busy_start[0] - (own_seconds() - own_start)) / wall
        stolen = (busy_end[1] - busy_start[1]) / wall
        load = f"other processes used {max(others, 0):.2f} cores on average, {stolen:.2f} cores stolen"
    else:
        load = "load of other processes unknown"
    gpu = torch.cuda.get_device_name(device) if is_cuda else "no GPU used"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), diffusers {diffusers.__version__}; device {device}, {dtype_name}")
    print(f"SDXL UNet full size, random weights ({unet_params / 1e9:.3f} B params, built in {unet_build:.1f} s); "
          f"MSAdapter with ResamplerConfig() ({adapter_params / 1e6:.0f} M params, built in {adapter_build:.1f} s)")
    print(f"{size} x {size} px (latent {latent} x {latent}), {steps} Euler steps, CFG {GUIDANCE} (UNet batch 2B), "
          f"2 subjects per row, overlapping boxes; denoising only; {repeats} loops of ours between "
          f"{repeats + 1} of stock; latents finite: {finite}")
    print(f"wall {wall:.0f} s, peak RSS {rss:.1f} GiB; {load}")
    print()
    headers = ["batch", "stock s/img", "stock first / last", "ours s/img", "overhead (range)", "tokens s/img",
               "overhead incl. tokens"]
    if is_cuda:
        headers += ["stock peak GiB", "ours peak GiB"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print()
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
