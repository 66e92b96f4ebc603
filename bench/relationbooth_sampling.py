"""RelationBooth sampling against MS-Diffusion and stock SDXL, per image, in one process (issue 12, item 6).

Part `sampling`: every variant is a method card driven as `relbench generate` drives it
(build, check, load, prepare, generate, close) on one backbone, whose SDXL pipeline all of
them share; one two-subject relation case (rb-m-011, "a cat riding a dog", relation "ride"),
batch B = B samples of it, the same steps, resolution and guidance (5.0) for every variant:

  sdxl                 the `sdxl` card: text only
  msdiffusion          the `msdiffusion` card (its guidance set to 5.0, as RelationBooth samples)
  relationbooth        the `relationbooth` card: MS-Diffusion + the relation's RelationLoRA,
                       active through diffusers' adapter API (unmerged: peft's low-rank matmuls
                       in the 280 attn2 projections at every step) + 16 local tokens per reference
  relationbooth fused  the same with `fuse_lora: true`: the LoRA merged into the weights while
                       its relation samples (base weights put back exactly at close)
  relationbooth local0 local_tokens=0: the LoRA alone

The RelationLoRA is a random rank-4 file on the RelationLoRA targets, imported into a
temporary bank (as `relbench lora import` records released ones). Each round builds every
variant afresh, times `prepare` (encoding the case's 2 references: MS-Diffusion's 257 CLIP
tokens, and for relationbooth its local tokens; once per subject in a run), makes one untimed
warm-up batch, then times one `generate` batch (s/img); rounds alternate the variants, so slow
drift of a shared machine hits them alike. Figures: medians over rounds, and per round
relationbooth / msdiffusion - 1 (median, range).

Part `extraction`: the local-token extraction of one reference (what LocalEncoder.tokens runs
after preprocessing: the bigG/14 tower with its value-only last block, 16 pooled tokens) on its
own at several resolutions, next to the tower's plain 224 px pass (what MS-Diffusion reads of a
reference); both timed from prepared pixels; with FLOPs counted
on the meta device (torch's FlopCounterMode: matmuls, convolutions, attention).

Sizes: `tiny` is the tiny backbone (seconds on a CPU); `full` builds SDXL base 1.0's
architectures (UNet, both text encoders, VAE), MS-Diffusion's official resampler widths and the
CLIP ViT-bigG/14 image encoder with random weights in memory: the two weight-file loaders of the
msdiffusion method (ms_adapter.bin and the image encoder folder) are replaced by random builders,
everything else is the methods' own code. Timings do not depend on weight values.

    python bench/relationbooth_sampling.py                        # CPU: tiny, 128 px, 30 steps, batch 1 4
    python bench/relationbooth_sampling.py --parts extraction --size full --local-resolutions 224 448
    python bench/relationbooth_sampling.py --size full --resolution 1024 --steps 30 --batch 1 4 \\
        --device cuda --dtype bf16                                # the GPU figures
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASE = "rb-m-011"  # two subjects (cat, dog8), relation "ride"
GUIDANCE = 5.0  # RelationBooth's inference value (REFERENCE 7), used for every variant
LORA_RANK = 4  # paper 3.4.1
VARIANTS = ("sdxl", "msdiffusion", "relationbooth", "relationbooth fused", "relationbooth local0")

# SDXL base 1.0's text encoders and VAE (their config.json, the fields that shape them) and
# h94/IP-Adapter's sdxl_models/image_encoder (CLIP ViT-bigG/14's vision tower)
CLIP_L_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=768, intermediate_size=3072,
                   num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
BIGG_TEXT = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=1280, intermediate_size=5120,
                 num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SDXL_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=1024,
                scaling_factor=0.13025, force_upcast=True)
BIGG_VISION = dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                   image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu")


def random_full_backbone(device: str, dtype):
    """The sdxl preset whose models are SDXL base 1.0's architectures (and bigG/14's vision tower)
    with random weights built on `device` in `dtype`: no file is read (fetch answers only the
    msdiffusion checkpoint, whose loader random_weight_loaders() replaces)."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from relationbench.backbones import PRESETS, Backbone, build_clip_tokenizers
    from relationbench.backbones.presets import SDXL_UNET_CONFIG
    from relationbench.backbones.tiny import SDXL_SCHEDULER_CONFIG

    class RandomSDXL(Backbone):
        def __init__(self):
            super().__init__(PRESETS["sdxl"])
            self._pipe = None
            self._tower = None

        def sdxl_pipeline(self, device: str = device, dtype=dtype):
            if self._pipe is None:
                tokenizer, tokenizer_2 = build_clip_tokenizers()
                with built_on(device, dtype):
                    parts = dict(unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), vae=AutoencoderKL(**SDXL_VAE),
                                 text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
                                 text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**BIGG_TEXT)))
                self._pipe = StableDiffusionXLPipeline(**parts, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
                                                       scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
                                                       force_zeros_for_empty_prompt=True, add_watermarker=False)
            return self._pipe

        def image_encoder(self):
            if self._tower is None:
                self._tower = bigg_tower(device, dtype)
            return self._tower

        def fetch(self, key: str) -> Path:
            if key != "msdiffusion":
                raise ValueError(f"the random full-size backbone has no weight file {key!r}")
            return Path("random-weights")

    torch.manual_seed(0)
    return RandomSDXL()


@contextlib.contextmanager
def built_on(device: str, dtype):
    """Modules built inside are created on `device` in `dtype` (no full-precision CPU copy)."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def bigg_tower(device: str, dtype):
    """CLIP ViT-bigG/14's vision tower with random weights (1.84 B parameters)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with built_on(device, dtype):
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**BIGG_VISION)).eval()


@contextlib.contextmanager
def random_weight_loaders(backbone):
    """The msdiffusion method's weight-file loaders replaced: its adapter keeps the random
    weights it is built with, and its image encoder is the backbone's random bigG tower."""
    module = importlib.import_module("relationbench.methods.msdiffusion.method")
    with mock.patch.object(module, "read_checkpoint", lambda path: {}), \
            mock.patch.object(module, "load_checkpoint", lambda adapter, state, path: None), \
            mock.patch.object(module, "load_image_encoder", lambda _: backbone.image_encoder()):
        yield


def random_relationlora(unet, bank_root: Path, relation: str, backbone: str) -> str:
    """A rank-4 RelationLoRA of random values on `unet`'s RelationLoRA targets (diffusers'
    lora.down / lora.up naming), imported into the bank at `bank_root` for `relation` on the
    backbone named `backbone`; its name."""
    import torch
    from safetensors.torch import save_file

    from relationbench.methods.lora.bank import LoraBank
    from relationbench.methods.relationbooth.lora import relationlora_targets

    g = torch.Generator().manual_seed(0)
    state = {}
    for name in relationlora_targets(unet):
        layer = unet.get_submodule(name)
        state[f"unet.{name}.lora.down.weight"] = torch.randn(LORA_RANK, layer.in_features, generator=g) * 0.01
        state[f"unet.{name}.lora.up.weight"] = torch.randn(layer.out_features, LORA_RANK, generator=g) * 0.01
    file = bank_root.parent / "random_lora.safetensors"
    save_file(state, str(file))
    name = f"{relation}-bench"
    LoraBank(bank_root).add_file(name, file, base={"name": backbone}, settings={"rank": LORA_RANK},
                                 info={"relation": relation})
    return name


def clock(device: str, fn, *a) -> float:
    """Seconds of fn(*a), a CUDA device synchronized before and after."""
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn(*a)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def sampling(args, device: str, dtype, tmp: Path) -> tuple[list[list], list[str]]:
    """Part `sampling`: one row per batch size and variant; notes. `tmp`: an empty folder
    (the subjects' stand-in references and the LoRA bank)."""
    from tqdm import tqdm

    from relationbench.backbones import get_backbone
    from relationbench.data.example_subjects import write_example_subjects
    from relationbench.methods import Context, Request, default_registry
    from relationbench.methods.relationbooth.selection import relation_key
    from relationbench.runs import sample_seed
    from relationbench.suites import load_suite

    case = next(c for c in load_suite("relationbench").cases if c.id == CASE)
    write_example_subjects(tmp / "data", case.subjects)
    if args.size == "full":
        backbone = random_full_backbone(device, dtype)
        loaders = random_weight_loaders(backbone)
    else:
        backbone, loaders = get_backbone("tiny"), contextlib.nullcontext()
    context = Context(backbone, device, dtype, tmp / "data", quiet=True)
    t0 = time.perf_counter()
    pipe = backbone.sdxl_pipeline(device=device, dtype=dtype)
    build_s = time.perf_counter() - t0
    random_relationlora(pipe.unet, tmp / "bank", relation_key(case.relation), backbone.name)

    registry = default_registry()
    common = {"steps": args.steps, "guidance_scale": GUIDANCE, "height": args.resolution, "width": args.resolution}
    booth = {**common, "bank": str(tmp / "bank")}
    if args.local_resolution:
        booth["local_resolution"] = args.local_resolution
    cards = {"sdxl": registry.card("sdxl").with_settings(common),
             "msdiffusion": registry.card("msdiffusion").with_settings(common),
             "relationbooth": registry.card("relationbooth").with_settings(booth),
             "relationbooth fused": registry.card("relationbooth").with_settings({**booth, "fuse_lora": True}),
             "relationbooth local0": registry.card("relationbooth").with_settings({**booth, "local_tokens": 0})}

    rows, notes = [], [f"pipeline built in {build_s:.1f} s"]
    with loaders:
        for b in args.batch:
            requests = [Request(case, k, sample_seed(case.seed, k)) for k in range(b)]
            gen = {v: [] for v in VARIANTS}
            prep = {v: [] for v in VARIANTS}
            for _ in tqdm(range(args.repeats), desc=f"batch {b}: rounds", disable=args.quiet):
                for variant in VARIANTS:
                    method = cards[variant].build(context)
                    method.check([case])
                    method.load()
                    prep[variant].append(clock(device, method.prepare, [case]))
                    method.generate(requests)  # warm-up; activates (fused: merges) the relation's LoRA
                    gen[variant].append(clock(device, method.generate, requests) / b)
                    method.close()
            ms = gen["msdiffusion"]
            for variant in VARIANTS:
                ratio = [g / m - 1 for g, m in zip(gen[variant], ms)]
                spread = f" ({100 * min(ratio):+.1f} .. {100 * max(ratio):+.1f})" if len(ratio) > 1 else ""
                per_subject = statistics.median(prep[variant]) / len(case.subjects)
                rows.append([b, variant, f"{statistics.median(gen[variant]):.3f}",
                             "" if variant == "msdiffusion" else f"{100 * statistics.median(ratio):+.1f} %{spread}",
                             f"{per_subject:.3f}" if variant != "sdxl" else ""])
                notes.append(f"batch {b}, {variant}: s/img per round " + ", ".join(f"{t:.3f}" for t in gen[variant])
                             + "; prepare s " + ", ".join(f"{t:.3f}" for t in prep[variant]))
    return rows, notes


def extraction(args, device: str, dtype) -> tuple[list[list], list[str]]:
    """Part `extraction`: per resolution, s per subject (one reference) and counted GFLOP; notes."""
    import torch
    from PIL import Image
    from torch.utils.flop_counter import FlopCounterMode

    from relationbench.methods.msdiffusion.encoder import build_tiny_image_encoder
    from relationbench.methods.relationbooth.local_tokens import clip_pixels, dense_features, pool_grid

    full = args.size == "full"
    t0 = time.perf_counter()
    tower = bigg_tower(device, dtype) if full else build_tiny_image_encoder().to(device, dtype)
    build_s = time.perf_counter() - t0
    meta = bigg_tower("meta", dtype) if full else build_tiny_image_encoder().to("meta")
    image = Image.new("RGB", (512, 512), (180, 120, 60))

    def gflop(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    def timed(fn) -> float:
        return statistics.median(clock(device, fn) for _ in range(args.extract_repeats))

    pixels = clip_pixels([image], 224).to(device, dtype)
    rows = []
    with torch.inference_mode():
        plain = lambda: tower(pixels, output_hidden_states=True)  # noqa: E731  (what MS-Diffusion reads)
        plain()  # warm-up
        rows.append(["MS-Diffusion image tokens (tower, 257 tokens)", 224, f"{timed(plain):.3f}",
                     f"{gflop(lambda: meta(torch.empty(1, 3, 224, 224, device='meta'), output_hidden_states=True)):.3f}"])
        for res in args.local_resolutions:
            grid = res // 14
            count = gflop(lambda: pool_grid(dense_features(meta, torch.empty(1, 3, res, res, device="meta")), 16))
            # as the image tokens' row: pixels prepared beforehand, the tower and the pooling timed
            px = clip_pixels([image], res).to(device, dtype)
            seconds = (f"{timed(lambda: pool_grid(dense_features(tower, px), 16)):.3f}"
                       if res in args.time_resolutions else "not measured")
            rows.append([f"local tokens (value-only last block, {grid} x {grid} grid -> 16)", res, seconds,
                         f"{count:.3f}"])
    return rows, [f"tower built in {build_s:.1f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sampling", "extraction"], choices=("sampling", "extraction"))
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"), help="default: fp32 on cpu, bf16 otherwise")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: 128 tiny, 1024 full)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3, help="sampling rounds (each variant once per round)")
    parser.add_argument("--local-resolution", type=int, default=None,
                        help="relationbooth's local_resolution (default: the card's: 896; 224 on tiny)")
    parser.add_argument("--local-resolutions", type=int, nargs="+", default=[224, 448, 896],
                        help="extraction: resolutions whose FLOPs are counted")
    parser.add_argument("--time-resolutions", type=int, nargs="+", default=None,
                        help="extraction: the resolutions also timed (default: all on cuda, 224 448 on cpu)")
    parser.add_argument("--extract-repeats", type=int, default=None, help="timed passes (default: 5 cuda, 1 cpu)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on cpu")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.resolution = args.resolution or (1024 if args.size == "full" else 128)
    args.time_resolutions = args.time_resolutions or (args.local_resolutions if not cpu else [224, 448])
    args.extract_repeats = args.extract_repeats or (1 if cpu else 5)
    dtype_name = args.dtype or ("fp32" if cpu else "bf16")

    import diffusers
    import torch
    from diffusers.utils import logging as diffusers_logging
    from tabulate import tabulate

    from msdiffusion_overhead import busy_seconds, own_seconds  # bench/ is the script's folder

    diffusers_logging.set_verbosity_error()
    if cpu:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    start, busy0, own0 = time.perf_counter(), busy_seconds(), own_seconds()

    tables = []
    if "sampling" in args.parts:
        with tempfile.TemporaryDirectory(prefix="rb-sampling-") as tmp:
            rows, notes = sampling(args, args.device, dtype, Path(tmp))
        tables.append((f"sampling: {args.size} size, {args.resolution} px, {args.steps} Euler steps, guidance "
                       f"{GUIDANCE}, case {CASE} (2 subjects), medians of {args.repeats} rounds",
                       ["batch", "variant", "s/img", "vs msdiffusion (range)", "prepare s/subject"], rows, notes))
    if "extraction" in args.parts:
        rows, notes = extraction(args, args.device, dtype)
        tables.append((f"extraction per subject (one reference), {args.size} tower, median of {args.extract_repeats}",
                       ["what", "px", "s/subject", "GFLOP (counted)"], rows, notes))

    wall = time.perf_counter() - start
    busy1 = busy_seconds()
    load = ("load of other processes unknown" if busy0 is None or busy1 is None else
            f"other processes used {max((busy1[0] - busy0[0] - (own_seconds() - own0)) / wall, 0):.2f} cores on average")
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"\n{machine}; torch {torch.__version__}, diffusers {diffusers.__version__}; device {args.device}, "
          f"{dtype_name}; wall {wall:.0f} s; {load}")
    for title, headers, rows, notes in tables:
        print(f"\n{title}\n")
        print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
        for n in notes:
            print(n)


if __name__ == "__main__":
    main()
