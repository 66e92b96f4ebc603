"""The metric encoders' models (REFERENCE 4): open_clip CLIP and DINO ViT-S/16, real or tiny.

On sdxl the weights come from the backbone (`fetch`); on tiny they are the real layouts at
toy width and depth with seeded random weights, at the real input size (224) so that
preprocessing is the same. Each model has an id naming its weights, written next to scores.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..backbones import loading_from, seeded
from ..errors import UserError

if TYPE_CHECKING:
    from ..backbones import Backbone

# `--clip` architecture -> the weight key that holds it (REFERENCE 4: B/32 is the paper's)
CLIP_KEYS = {"ViT-B-32": "clip", "ViT-L-14": "clip_l14"}

TINY_CLIP = dict(
    embed_dim=32,  # ViT-B/32: 512
    vision_cfg=dict(image_size=224, layers=2, width=64, head_width=32),  # B/32: 12 layers, width 768
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),  # B/32: 12 x 512
)
TINY_DINO = dict(  # facebook/dino-vits16: hidden 384, 12 layers, 6 heads, mlp 1536
    hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
    image_size=224, patch_size=16, qkv_bias=True,
)
_SEED_OFFSETS = {"clip": 11, "dino": 12}  # see backbones.seeded


def _patch_size(arch: str) -> int:
    match = re.search(r"-(\d+)$", arch)
    if not match:
        raise ValueError(f"cannot read the patch size from the architecture name {arch!r}")
    return int(match.group(1))


def build_tiny_clip(arch: str = "ViT-B-32", seed: int = 0):
    """open_clip's CLIP at toy size with `arch`'s patch size, seeded (QuickGELU, like OpenAI's)."""
    from open_clip.model import CLIP

    cfg = dict(TINY_CLIP, vision_cfg=dict(TINY_CLIP["vision_cfg"], patch_size=_patch_size(arch)))
    return seeded(seed, _SEED_OFFSETS["clip"], lambda: CLIP(**cfg, quick_gelu=True))


def build_tiny_dino(seed: int = 0):
    """transformers' ViTModel (DINO's architecture) at toy size, seeded, without the pooler."""
    from transformers import ViTConfig, ViTModel

    return seeded(seed, _SEED_OFFSETS["dino"], lambda: ViTModel(ViTConfig(**TINY_DINO), add_pooling_layer=False))


def clip_key(arch: str) -> str:
    """The backbone weight key holding CLIP `arch`."""
    if arch not in CLIP_KEYS:
        raise UserError(f"unknown CLIP architecture {arch!r}; choose one of {', '.join(CLIP_KEYS)}")
    return CLIP_KEYS[arch]


def clip_id(backbone: "Backbone", arch: str = "ViT-B-32") -> str:
    """A stable name for the CLIP model `load_clip_model(backbone, arch)` loads."""
    if backbone.is_tiny:
        return f"tiny:clip-{arch}-seed{backbone.preset.seed}"
    source = backbone.source(clip_key(arch))
    if source.kind == "open_clip":
        return f"open_clip:{source.model}/{source.location}"
    return f"open_clip:{arch}/local:{Path(source.location).name}"


def dino_id(backbone: "Backbone") -> str:
    """A stable name for the DINO model `load_dino_model(backbone)` loads."""
    if backbone.is_tiny:
        return f"tiny:dino-vits16-seed{backbone.preset.seed}"
    source = backbone.source("dino")
    if source.kind == "local":
        return f"local:{Path(source.location).name}"
    return f"hf:{'/'.join(p for p in (source.location, source.subfolder) if p)}"


def load_clip_model(backbone: "Backbone", arch: str = "ViT-B-32"):
    """The open_clip CLIP model (image and text towers), float32 on the CPU, in eval mode.

    Local checkpoint files are read as OpenAI-trained weights (QuickGELU), the weights
    every protocol here uses.
    """
    if backbone.is_tiny:
        return build_tiny_clip(arch, backbone.preset.seed or 0)
    import open_clip

    key = clip_key(arch)
    source, path = backbone.source(key), backbone.fetch(key)
    cfg = open_clip.get_pretrained_cfg(arch, source.location) if source.kind == "open_clip" else {}
    try:
        model = open_clip.create_model(arch, pretrained=str(path), force_quick_gelu=cfg.get("quick_gelu", True))
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise UserError(
            f"cannot load {arch} weights from this file: {exc}",
            path=path,
            hint=f"pass an open_clip {arch} checkpoint with --weight {key}=FILE",
        ) from exc
    return model.eval()


def load_dino_model(backbone: "Backbone"):
    """DINO ViT-S/16 as a transformers ViTModel without the pooler, float32 on the CPU."""
    if backbone.is_tiny:
        return build_tiny_dino(backbone.preset.seed or 0)
    from transformers import ViTModel

    path = backbone.fetch("dino")
    with loading_from(path, "a ViT (DINO) model",
                      "give the folder of facebook/dino-vits16 (config.json and weights) with --weight dino=PATH"):
        return ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).eval()
