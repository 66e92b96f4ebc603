"""MS-Diffusion's image encoder (REFERENCE 1): the CLIP ViT-bigG/14 vision tower that encodes
the subjects, loaded from the backbone's `image_encoder` weights on sdxl and built at toy size
on tiny, with the tiny resampler widths that go with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...backbones import loading_from, seeded

if TYPE_CHECKING:
    from ...backbones import Backbone

# MS-Diffusion at toy size: its image encoder (CLIP ViT-bigG/14 vision tower on sdxl: hidden
# 1664, 48 layers, 16 heads, patch 14, 224 px -> 257 tokens) and its resampler's own widths
# (sdxl: dim 1280, depth 4, 20 heads of 64); the other resampler dims follow the components.
TINY_IMAGE_ENCODER = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
    image_size=224, patch_size=14, projection_dim=32, hidden_act="gelu",
)
TINY_RESAMPLER = dict(dim=64, depth=2, dim_head=16, heads=4)
_SEED_OFFSET = 21  # see backbones.seeded
ADAPTER_SEED_OFFSET = 22  # the MSAdapter's random weights (method.py)


def build_tiny_image_encoder(seed: int = 0):
    """CLIPVisionModelWithProjection at toy size (257 tokens like bigG/14), seeded."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return seeded(seed, _SEED_OFFSET,
                  lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)))


def load_image_encoder(backbone: "Backbone"):
    """The CLIP vision tower MS-Diffusion encodes subjects with, float32 on the CPU."""
    if backbone.is_tiny:
        return build_tiny_image_encoder(backbone.preset.seed or 0)
    from transformers import CLIPVisionModelWithProjection

    path = backbone.fetch("image_encoder")
    with loading_from(path, "a CLIP vision model", "give the folder of CLIP ViT-bigG/14's vision tower "
                      "(h94/IP-Adapter sdxl_models/image_encoder) with --weight image_encoder=PATH"):
        return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True).eval()
