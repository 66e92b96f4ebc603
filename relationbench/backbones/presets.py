"""Backbone presets: for each component key, the weights a named backbone uses.

    sdxl   SDXL base 1.0 and the weights the methods and metrics load, from the hub or
           from local folders given as overrides (`--weight sdxl=/path/to/folder`). Its
           `vae` part may be replaced too (`--weight vae=madebyollin/sdxl-vae-fp16-fix`, a
           VAE that does not overflow in fp16); without that, SDXL's own VAE. RelationBooth's
           `local_encoder` is used only when given (`--weight local_encoder=clipself.pt`), and
           `local_encoder_vit_l` / `local_encoder_eva_l` replace the open_clip weights of its
           other local encoders (methods/relationbooth/local_encoders.py) when given.
    tiny   the same architectures at toy size with seeded random weights (see tiny.py): no
           files, no network. For tests and dry runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from .sources import WeightSource


@dataclass(frozen=True)
class BackbonePreset:
    """A named set of weight sources and the default image size."""

    name: str
    description: str
    resolution: int  # default image side in pixels
    weights: Mapping[str, WeightSource] = field(default_factory=dict)
    # parts of the SDXL pipeline an override may replace; without one, the sdxl folder's own
    # are used, so they have no source here (and are in run.json's weights only when overridden)
    sdxl_parts: tuple[str, ...] = ()
    # weights used only when given (`--weight KEY=PATH`): no source here, never fetched otherwise,
    # in run.json's weights only when given
    optional: tuple[str, ...] = ()
    seed: int | None = None  # tiny only: the seed of the random weights


SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"

# SDXL base 1.0's unet/config.json: the fields that shape the network (public values), for
# checks on the meta device and benchmarks with random weights at full size.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

PRESETS: dict[str, BackbonePreset] = {
    "sdxl": BackbonePreset(
        name="sdxl",
        description="SDXL base 1.0 with the weights of MS-Diffusion, RelationLoRA and the metric encoders",
        resolution=1024,
        weights={
            "sdxl": WeightSource.hub(SDXL_REPO),
            # CLIP ViT-bigG/14 vision tower used by MS-Diffusion (REFERENCE 1)
            "image_encoder": WeightSource.hub("h94/IP-Adapter", subfolder="sdxl_models/image_encoder"),
            "msdiffusion": WeightSource.hub("doge1516/MS-Diffusion", filename="ms_adapter.bin"),
            "relationlora": WeightSource.hub("QingyuShi/DreamRelation"),
            # metric encoders of the `paper` protocol (REFERENCE 4); ViT-L/14 on request
            "clip": WeightSource.open_clip("ViT-B-32", "openai"),
            "clip_l14": WeightSource.open_clip("ViT-L-14", "openai"),
            "dino": WeightSource.hub("facebook/dino-vits16"),
            # open-vocabulary detector of the `grounded` metrics (metrics/detector.py: why OWLv2)
            "detector": WeightSource.hub("google/owlv2-base-patch16-ensemble"),
            # VLM of the `vqa` metric (metrics/vqa.py); any transformers image-text-to-text model
            "vqa": WeightSource.hub("Qwen/Qwen2.5-VL-3B-Instruct"),
            # data engine annotators (data/annotators.py): SAM masks from detector boxes, and
            # ViTPose+ keypoints for people (`pose`) and everything else (`pose_animal`)
            "segmenter": WeightSource.hub("facebook/sam-vit-base"),
            "pose": WeightSource.hub("usyd-community/vitpose-plus-base"),
            "pose_animal": WeightSource.hub("usyd-community/vitpose-plus-base"),
        },
        sdxl_parts=("vae",),
        # RelationBooth's local encoder (REFERENCE 2): a CLIPSelf-distilled CLIP ViT-bigG/14, an
        # open_clip checkpoint file (or a folder holding one; `relbench train-local-encoder`
        # writes clipself.pt); without it the stock image_encoder (the training-free variant).
        # The open_clip ViT-L/14 and EVA-CLIP-L/14 local encoders (paper Table 5) as checkpoint files;
        # without them open_clip's ViT-L-14/openai and EVA02-L-14/merged2b_s4b_b131k from the hub
        # cache (their architecture and tag live in local_encoders.py, with the model)
        optional=("local_encoder", "local_encoder_vit_l", "local_encoder_eva_l"),
    ),
    "tiny": BackbonePreset(
        name="tiny",
        description="SDXL's architectures at toy size with seeded random weights (tests, dry runs; no files)",
        resolution=128,
        weights={},
        optional=("local_encoder",),  # a CLIPSelf checkpoint of the toy tower (train-local-encoder --backbone tiny)
        seed=0,
    ),
}
