"""One RelationLoRA training step (with the keypoint matching loss) against a plain LoRA step.

Both run through the project's one LoRA trainer (`train_lora`: accelerate, mixed precision,
gradient accumulation and checkpointing as configured) on one UNet instance with random
weights, in one process; the figure is the trainer's own per-step time (`loss.jsonl`
"seconds": batch drawing, forward, backward, optimizer), median over the steps after the
first (the first pays for allocation and kernel selection).

  plain          LoRA rank 4 on attn2 to_q/to_k/to_v/to_out.0 of the stock UNet (diffusers'
                 processors), noise MSE with random text conditioning: REFERENCE 5's 0.41 s
                 on an H200 at batch 8, 1024 px, bf16.
  relationbooth  the same LoRA with MS-Diffusion installed, the relation loss of
                 methods/relationbooth/training.py (RelationBoothLoss: MS-Diffusion subject
                 tokens and boxes of two objects per sample at image scale 0.6, noise MSE +
                 1e-3 x KML on 17 keypoints per object), random inputs of the real shapes.

Memory modes: `--mode fast` (batch B x accumulation 1), `--mode checkpointing` (the same with
gradient checkpointing), `--mode accumulate` (batch 1 x accumulation B, checkpointing): the
same effective batch; the target is a mode that fits 24 GB. Peak memory is reported on CUDA.

    python bench/relationlora_step.py                                   # CPU: tiny arch, 128 px, batch 8
    python bench/relationlora_step.py --arch sdxl --size 256 --batch 1 --steps 3   # CPU, full arch, reduced
    python bench/relationlora_step.py --device cuda --dtype bf16 --arch sdxl --size 1024 --batch 8 \
        --mode fast --mode checkpointing --mode accumulate                # the GPU figures
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = {  # name -> (micro-batch is the whole batch, gradient checkpointing)
    "fast": (True, False),
    "checkpointing": (True, True),
    "accumulate": (False, True),
}
OBJECTS = 2  # entities per sample (a two-object relation)
KEYPOINTS = 17


def build_unet(arch: str, device, dtype):
    """The UNet of `arch` (sdxl: SDXL base 1.0's shape; tiny: the tiny backbone's) with random
    weights drawn on the device (values do not change timings)."""
    import torch
    from diffusers import UNet2DConditionModel

    from relationbench.backbones.presets import SDXL_UNET_CONFIG
    from relationbench.backbones.tiny import TINY

    config = SDXL_UNET_CONFIG if arch == "sdxl" else TINY.unet
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype).requires_grad_(False)


def random_rows(n: int, unet, latent: int, device, dtype):
    """`n` encoded triplet samples (training.Encoded) of random values and the real shapes."""
    import torch
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from relationbench.methods.relationbooth.training import Encoded

    cfg = unet.config
    d, pooled = cfg.cross_attention_dim, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    rows = []
    for i in range(n):
        moments = torch.cat([rand(1, 4, latent, latent), torch.full((1, 4, latent, latent), -4.0, device=device)], 1)
        rows.append(Encoded(
            id=str(i), posterior=DiagonalGaussianDistribution(moments),
            time_ids=torch.tensor([latent * 8, latent * 8, 0, 0, latent * 8, latent * 8], device=device, dtype=torch.float32),
            prompt_embeds=rand(77, d).to(dtype), pooled=rand(pooled).to(dtype),
            tokens=rand(OBJECTS, 16, d).to(dtype) * 0.1,
            boxes=torch.tensor([[0.05, 0.2, 0.6, 0.9], [0.4, 0.2, 0.95, 0.9]], device=device)[:OBJECTS],
            scales=torch.full((OBJECTS,), 0.6, device=device),
            target_xy=torch.rand(OBJECTS, KEYPOINTS, 2, generator=g).to(device),
            ref_xy=torch.rand(OBJECTS, KEYPOINTS, 2, generator=g).to(device),
            score=torch.ones(OBJECTS, KEYPOINTS, device=device),
            ref_latents=rand(OBJECTS, 4, latent, latent),
        ))
    return rows


def run_mode(which: str, mode: str, unet, adapter, stock, rows, args, device, out: Path) -> dict:
    """Train `args.steps` steps of one kind in one memory mode; per-step seconds and peak memory.
    `stock`: diffusers' attention processor, put back for the plain kind."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from relationbench.backbones.tiny import SDXL_SCHEDULER_CONFIG, TINY
    from relationbench.methods.lora.trainer import TrainerSettings, train_lora
    from relationbench.methods.relationbooth.kml import KMLSettings
    from relationbench.methods.relationbooth.lora import relationlora_targets
    from relationbench.methods.relationbooth.training import RelationBatches, RelationBoothLoss

    whole, checkpointing = MODES[mode]
    micro = args.batch if whole else 1
    settings = TrainerSettings(train_steps=args.steps, gradient_accumulation=args.batch // micro, optimizer="adam",
                               weight_decay=0.0, max_grad_norm=None,
                               mixed_precision=args.dtype if device.type == "cuda" and args.dtype != "fp32" else "no",
                               gradient_checkpointing=checkpointing)
    scheduler = DDPMScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    latent = args.size // 8
    batches = RelationBatches(rows, micro, TINY.vae["scaling_factor"],  # SDXL's, which tiny shares
                              scheduler.config.num_train_timesteps, unet.dtype)
    if which == "relationbooth":
        adapter.install(unet)
        loss_fn = RelationBoothLoss(adapter, scheduler, KMLSettings(), (latent, latent))
    else:
        unet.set_attn_processor(stock)

        def loss_fn(model, batch):
            noisy = scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
            rows_ = batch.samples
            eps = model(noisy, batch.timesteps,
                        encoder_hidden_states=torch.stack([r.prompt_embeds for r in rows_]),
                        added_cond_kwargs={"text_embeds": torch.stack([r.pooled for r in rows_]),
                                           "time_ids": torch.stack([r.time_ids for r in rows_]).to(model.dtype)}).sample
            return F.mse_loss(eps.float(), batch.noise.float())

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    folder = out / f"{which}-{mode}"
    train_lora(unet, relationlora_targets(unet), batches, loss_fn, settings, folder, progress=False)
    log = [json.loads(line) for line in (folder / "loss.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in log]
    return {
        "kind": which, "mode": mode, "batch": f"{micro} x {args.batch // micro}",
        "first step s": round(seconds[0], 3),
        "s/step": round(statistics.median(seconds[1:] or seconds), 3),
        "peak GiB": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--arch", default="tiny", choices=("tiny", "sdxl"))
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8, help="effective batch (the paper: 8)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration")
    parser.add_argument("--mode", action="append", choices=tuple(MODES), help="memory modes (default: fast)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import diffusers
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.utils import logging as diffusers_logging
    from tabulate import tabulate

    from relationbench.backbones.tiny import TINY
    from relationbench.methods.msdiffusion.encoder import TINY_IMAGE_ENCODER, TINY_RESAMPLER
    from relationbench.methods.msdiffusion.model import MSAdapter
    from relationbench.methods.msdiffusion.resampler import ResamplerConfig

    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 2)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    # mixed precision on CUDA keeps the LoRA in fp32 over a half-precision base; on the CPU fp32
    weights_dtype = dtype if device.type == "cuda" else torch.float32

    t0 = time.perf_counter()
    unet = build_unet(args.arch, device, weights_dtype)
    # the msdiffusion method's resampler widths (methods/msdiffusion/method.py resampler_config)
    cfg = ResamplerConfig(output_dim=unet.config.cross_attention_dim) if args.arch == "sdxl" else ResamplerConfig(
        **TINY_RESAMPLER, embedding_dim=TINY_IMAGE_ENCODER["hidden_size"], output_dim=unet.config.cross_attention_dim,
        phrase_embeddings_dim=TINY.text_encoder["hidden_size"])
    with torch.device(device):
        adapter = MSAdapter(unet, cfg)
    adapter = adapter.to(dtype=weights_dtype)  # installed now; run_mode puts stock or ours per kind
    stock = AttnProcessor2_0()
    build_s = time.perf_counter() - t0
    rows = random_rows(max(args.batch, 4), unet, args.size // 8, device, weights_dtype)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.mode or ["fast"]:
            for which in ("plain", "relationbooth"):
                results.append(run_mode(which, mode, unet, adapter, stock, rows, args, device, Path(tmp)))
                print(results[-1], flush=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"\n{machine}; torch {torch.__version__}, diffusers {diffusers.__version__}; arch {args.arch}, "
          f"{args.size} px, effective batch {args.batch}, {args.dtype}; UNet built in {build_s:.1f} s")
    print(tabulate(results, headers="keys", tablefmt="github"))


if __name__ == "__main__":
    main()
