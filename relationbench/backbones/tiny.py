"""The tiny backbone: SDXL's components at toy size with seeded random weights, built from the
configs below in about a second (no files, no network), SDXL's two tokenizers rebuilt offline,
and `seeded`, the one seeding helper every tiny model in the project is built under.

SDXL base's values are in the comments; everything else keeps the diffusers/transformers
defaults, which are SDXL's.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, TypeVar

M = TypeVar("M")


def seeded(seed: int, offset: int, make: Callable[[], M]) -> M:
    """`make()` in eval mode, its random weights drawn from torch seed `seed * 1000 + offset`.

    Each model has its own offset, so changing one model's config leaves the others' weights
    unchanged; the caller's random stream is left as it was. Offsets in use: 1-4 SDXL's
    components (here), 11-12 the metric encoders (metrics/models.py), 21-22 MS-Diffusion's
    image encoder and adapter (methods/msdiffusion/), 31 the OWLv2 detector
    (metrics/detector.py), 41 the VQAScore VLM (metrics/vqa.py), 51-52 the data engine's SAM
    and ViTPose+ (data/annotators.py), 61-62 RelationBooth's open_clip local encoders
    (methods/relationbooth/local_encoders.py).
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1000 + offset)
        return make().eval()


@dataclass(frozen=True)
class TinyConfigs:
    text_encoder: dict[str, Any]
    text_encoder_2: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]


_CLIP_TEXT_COMMON = dict(
    vocab_size=49408,
    max_position_embeddings=77,
    num_hidden_layers=2,  # SDXL: 12 / 32
    num_attention_heads=2,  # SDXL: 12 / 20
    bos_token_id=49406,
    eos_token_id=49407,
)

# SDXL base's scheduler/scheduler_config.json (EulerDiscreteScheduler)
SDXL_SCHEDULER_CONFIG: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    interpolation_type="linear",
    timestep_spacing="leading",
    steps_offset=1,
    use_karras_sigmas=False,
)

TINY = TinyConfigs(
    text_encoder=dict(  # CLIP ViT-L/14 text tower in SDXL: hidden 768, quick_gelu
        _CLIP_TEXT_COMMON, hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", pad_token_id=49407
    ),
    text_encoder_2=dict(  # OpenCLIP ViT-bigG/14 text tower: hidden 1280, projection 1280, gelu
        _CLIP_TEXT_COMMON, hidden_size=64, intermediate_size=128, projection_dim=32, hidden_act="gelu", pad_token_id=0
    ),
    unet=dict(
        sample_size=16,  # resolution / 8; SDXL: 128
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 64),  # SDXL: (320, 640, 1280)
        layers_per_block=1,  # SDXL: 2 (fewer ops: a tiny UNet's time is per-op overhead)
        attention_head_dim=(1, 2, 4),  # heads per level (diffusers' name); SDXL: (5, 10, 20)
        transformer_layers_per_block=(1, 1, 2),  # SDXL: (1, 2, 10)
        cross_attention_dim=32 + 64,  # text_encoder + text_encoder_2 hidden; SDXL: 768 + 1280
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,  # SDXL: 256
        projection_class_embeddings_input_dim=32 + 6 * 8,  # projection_dim + 6 time ids; SDXL: 2816
        norm_num_groups=8,  # SDXL: 32
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels: scale factor 8 like SDXL
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),  # SDXL: (128, 256, 512, 512)
        layers_per_block=1,  # SDXL: 2
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,  # SDXL's
        force_upcast=False,
    ),
    scheduler=SDXL_SCHEDULER_CONFIG,
)

_SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "unet": 3, "vae": 4}


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary and merges, rebuilt from the BPE file open_clip ships.

    Vocabulary order (as in CLIP): the 256 byte symbols, the same with the end-of-word mark
    "</w>", one token per merge, then <|startoftext|> and <|endoftext|>: 49408 entries.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = tuple(tuple(line.split(" ")) for line in lines[1 : 49152 - 256 - 2 + 1])  # line 0: a header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizers():
    """SDXL's two tokenizers, offline: the first pads with <|endoftext|>, the second with "!" (id 0)."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_bpe()
    common = dict(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    return CLIPTokenizer(**common), CLIPTokenizer(**common, pad_token="!")


def build_tiny_components(seed: int = 0) -> dict[str, Any]:
    """The components of a tiny SDXL pipeline, identical on every call and in every process."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_clip_tokenizers()
    return dict(
        text_encoder=seeded(seed, _SEED_OFFSETS["text_encoder"],
                            lambda: CLIPTextModel(CLIPTextConfig(**TINY.text_encoder))),
        text_encoder_2=seeded(seed, _SEED_OFFSETS["text_encoder_2"],
                              lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY.text_encoder_2))),
        unet=seeded(seed, _SEED_OFFSETS["unet"], lambda: UNet2DConditionModel(**TINY.unet)),
        vae=seeded(seed, _SEED_OFFSETS["vae"], lambda: AutoencoderKL(**TINY.vae)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**TINY.scheduler),
    )
