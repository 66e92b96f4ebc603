"""The local encoder's other architectures (paper Table 5, "through open_clip"): OpenAI's CLIP
ViT-L/14 and EVA-CLIP ViT-L/14, beside the bigG tower of local_tokens.py.

    vit-l-14       open_clip ViT-L-14, pretrained "openai" (QuickGELU, as that tag asks): open_clip's
                   VisionTransformer, width 1024, 24 blocks, patch 14
    eva-clip-l-14  open_clip EVA02-L-14, pretrained "merged2b_s4b_b131k": EVA02-CLIP-L/14, the paper's
                   "EVA-CLIP-L14" (EVA01-CLIP has no L/14; CLIPSelf, whose recipe the paper follows,
                   distils EVA02-CLIP). open_clip builds it as timm's Eva (eva02_large_patch14_clip_224)
                   in a TimmModel (`visual.trunk`): width 1024, 24 blocks, patch 14, rotary positions,
                   SwiGLU MLP, a layer norm inside attention. We build that trunk with timm's
                   dynamic_img_size (the grid follows the input, as for the other towers) and read
                   open_clip's weights into it.

Dense features as for bigG (eq. 8, REFERENCE 2): every block as usual but the last, which runs
value-only (each token attends only to itself: its attention output is out_proj(v)); class token
dropped; the final layer norm (ln_post / the trunk's norm); no projection. The position
embeddings are resampled to the grid (timm's resample_abs_pos_embed, bicubic); EVA's rotary
embeddings are built for the grid by timm. Both towers read OpenAI's mean/std (their
preprocessing), through clip_pixels at `local_resolution` (896 px: a 64 x 64 grid).

Their tokens are 1024-d where MS-Diffusion's resampler reads bigG's 1664: RelationBooth maps
them with a linear `local_projection` trained with each RelationLoRA (training.py).

Weights: the backbone's `weight_key` when given (sdxl: an open_clip checkpoint file or a folder
holding one, a whole CLIP or its visual tower, "module."/"visual." prefixes allowed), else the
open_clip tag's file from the hub cache. On tiny: the same architectures at toy size, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F

from ...errors import UserError

if TYPE_CHECKING:
    from pathlib import Path

    from ...backbones import Backbone, WeightSource

TINY_EMBED_DIM = 16  # the toy CLIP's shared embedding (ViT-L/14: 768); only the trunk's EVA head reads it
TINY_TEXT = dict(context_length=77, vocab_size=49408, width=8, heads=1, layers=1)  # built with the ViT, unused


@dataclass(frozen=True)
class OpenClipArch:
    """One local encoder architecture: the open_clip model and pretrained tag it names, the
    backbone weight that replaces the tag's file, and its toy size on tiny."""

    name: str  # the `local_encoder` setting
    model: str  # open_clip architecture (open_clip/model_configs/<model>.json)
    pretrained: str  # open_clip pretrained tag
    weight_key: str  # `--weight KEY=PATH` (sdxl)
    seed_offset: int  # backbones.seeded offset of the toy tower
    tiny: Mapping[str, Any] = field(default_factory=dict)  # toy sizes (vision_cfg keys, or timm Eva arguments)

    @property
    def eva(self) -> bool:
        """open_clip builds it from a timm model (EVA) rather than its own VisionTransformer."""
        return "timm_model_name" in self.config()["vision_cfg"]

    def config(self) -> dict[str, Any]:
        """open_clip's model config (embed_dim, vision_cfg, text_cfg)."""
        import open_clip

        return open_clip.get_model_config(self.model)

    def source(self) -> "WeightSource":
        from ...backbones import WeightSource

        return WeightSource.open_clip(self.model, self.pretrained)


OPEN_CLIP_ENCODERS: dict[str, OpenClipArch] = {
    a.name: a for a in (
        # paper Table 5's CLIP-ViT-L14 and EVA-CLIP-L14; toy: 64 / 32 wide, 3 blocks, 2 heads
        OpenClipArch("vit-l-14", "ViT-L-14", "openai", "local_encoder_vit_l", 61,
                     tiny=dict(width=64, layers=3, head_width=32)),
        OpenClipArch("eva-clip-l-14", "EVA02-L-14", "merged2b_s4b_b131k", "local_encoder_eva_l", 62,
                     tiny=dict(embed_dim=32, depth=3, num_heads=2)),
    )
}


# -- the towers ----------------------------------------------------------------------------------
def build_tower(arch: OpenClipArch, *, toy: bool = False) -> torch.nn.Module:
    """The architecture's vision tower with fresh random weights (the caller seeds, or builds it
    under accelerate's init_empty_weights to load a checkpoint into): open_clip's
    VisionTransformer for ViT-L, the timm Eva open_clip wraps as visual.trunk for EVA. `toy`:
    the tiny backbone's sizes (OpenClipArch.tiny), patch 14 and 224 px as the real ones."""
    cfg = arch.config()
    embed_dim = TINY_EMBED_DIM if toy else cfg["embed_dim"]
    if arch.eva:
        import timm

        vision = cfg["vision_cfg"]
        if vision.get("timm_proj") not in (None, "none"):
            raise ValueError(f"{arch.model}: a timm tower with a projection head of its own is not supported")
        # as open_clip's TimmModel (proj None: the trunk's classifier is the projection), any input size
        return timm.create_model(vision["timm_model_name"], pretrained=False, num_classes=embed_dim,
                                 global_pool=vision["timm_pool"], dynamic_img_size=True,
                                 **(arch.tiny if toy else {}))
    import open_clip
    from open_clip.model import CLIP

    quick_gelu = bool((open_clip.get_pretrained_cfg(arch.model, arch.pretrained) or {}).get("quick_gelu"))
    if toy:
        cfg = dict(embed_dim=embed_dim, vision_cfg=dict(cfg["vision_cfg"], **arch.tiny), text_cfg=TINY_TEXT)
    return CLIP(**cfg, quick_gelu=quick_gelu).visual


def is_open_clip_tower(tower: torch.nn.Module) -> bool:
    from open_clip.transformer import VisionTransformer
    from timm.models.eva import Eva

    return isinstance(tower, (VisionTransformer, Eva))


def tower_width(tower: torch.nn.Module) -> int:
    """The width of a tower's dense features: open_clip's ViT, timm's Eva, or transformers' CLIP."""
    from open_clip.transformer import VisionTransformer
    from timm.models.eva import Eva

    if isinstance(tower, VisionTransformer):
        return tower.transformer.width
    if isinstance(tower, Eva):
        return tower.embed_dim
    return tower.config.hidden_size


def tower_state(arch: OpenClipArch, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip checkpoint's weights in build_tower's naming: "module." (DDP) dropped; of a
    whole CLIP only visual.* (its text tower ignored); for EVA the TimmModel's "trunk." dropped."""
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in plain):
        plain = {k.removeprefix("visual."): v for k, v in plain.items() if k.startswith("visual.")}
    if arch.eva:
        plain = {k.removeprefix("trunk."): v for k, v in plain.items()}
    return plain


def load_tower_weights(tower: torch.nn.Module, arch: OpenClipArch, path: "Path") -> torch.nn.Module:
    """`tower` (build_tower, e.g. on the meta device) holding the open_clip checkpoint at `path`,
    strictly (every key, every shape); returns it. UserError naming the file otherwise."""
    from .local_tokens import read_checkpoint

    hint = (f"give an open_clip {arch.model} checkpoint (a whole CLIP or its visual tower) with "
            f"--weight {arch.weight_key}=PATH, or drop it to use open_clip's {arch.model}/{arch.pretrained}")
    state = tower_state(arch, read_checkpoint(path, hint))
    want = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
        parts = [f"{label} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                 for label, keys in (("missing", missing), ("unexpected", extra), ("misshapen", shapes)) if keys]
        raise UserError(f"this checkpoint does not fit open_clip's {arch.model} vision tower: {'; '.join(parts)}",
                        path=path, hint=hint)
    tower.load_state_dict(state, strict=True, assign=True)
    return tower


# -- which weights ------------------------------------------------------------------------------------
def _with_default(backbone: "Backbone", arch: OpenClipArch) -> "Backbone":
    """The backbone with the architecture's open_clip tag as its `weight_key` unless one was given
    (an optional weight has no source of its own in the preset)."""
    from ...backbones import Backbone

    return Backbone(backbone.preset, {arch.weight_key: arch.source(), **backbone.overrides})


def open_clip_identity(arch: OpenClipArch, backbone: "Backbone", resolution: int) -> dict[str, Any]:
    """Which tower and weights `arch` on `backbone` names, known before loading anything:
    {"kind", "model", "weights", "resolution"} with weights "tiny:seed<N>" (toy, seeded),
    "open_clip:<tag>", "hub:<repo>", or "file" (then "source", its path, and "sha256").
    Checks that the weights can be had (UserError with the download command otherwise)."""
    out = {"kind": arch.name, "model": arch.model, "resolution": resolution}
    if backbone.is_tiny:
        return {**out, "weights": f"tiny:seed{backbone.preset.seed}"}
    full = _with_default(backbone, arch)
    source = full.source(arch.weight_key)
    if source.kind == "local":
        from ...data import sha256_file
        from .local_tokens import checkpoint_file

        path = checkpoint_file(full.fetch(arch.weight_key))
        return {**out, "weights": "file", "source": str(path), "sha256": sha256_file(path)}
    full.check_available([arch.weight_key])
    return {**out, "weights": f"open_clip:{source.location}" if source.kind == "open_clip" else f"hub:{source}"}


def load_open_clip_tower(identity: Mapping[str, Any], backbone: "Backbone") -> torch.nn.Module:
    """The tower an identity (open_clip_identity) names, float32 on the CPU, in eval mode: the
    toy one seeded on tiny, else the architecture with the weights' file loaded."""
    from accelerate import init_empty_weights

    from ...backbones import seeded
    from .local_tokens import checkpoint_file

    arch = OPEN_CLIP_ENCODERS[identity["kind"]]
    if backbone.is_tiny:
        return seeded(backbone.preset.seed or 0, arch.seed_offset, lambda: build_tower(arch, toy=True))
    path = checkpoint_file(_with_default(backbone, arch).fetch(arch.weight_key))
    with init_empty_weights():  # parameters on the meta device; the checkpoint's replace them
        tower = build_tower(arch)
    return load_tower_weights(tower, arch, path).float().eval()


# -- dense features (eq. 8) -------------------------------------------------------------------------
def open_clip_dense(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Unnormalized dense features of an open_clip VisionTransformer or a timm Eva for pixels
    [B, 3, H, W] (any multiple of the patch) -> [B, H / patch, W / patch, D]: the usual blocks,
    the last one value-only, class token dropped, the final layer norm, no projection."""
    from timm.models.eva import Eva

    if isinstance(tower, Eva):
        return _eva_dense(tower, pixels)
    return _vit_dense(tower, pixels)


def _vit_dense(visual, pixels: torch.Tensor) -> torch.Tensor:
    from open_clip.transformer import ResidualAttentionBlock
    from timm.layers import resample_abs_pos_embed

    *blocks, last = visual.transformer.resblocks
    if not isinstance(last, ResidualAttentionBlock) or not visual.transformer.batch_first:
        raise ValueError("dense features need open_clip's default (batch-first) attention blocks")
    x = visual.conv1(pixels)  # [B, D, gh, gw]
    grid = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    pos = resample_abs_pos_embed(visual.positional_embedding[None], new_size=list(grid), num_prefix_tokens=1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
    for block in blocks:
        x = block(x)
    x = visual.ln_post(value_only_resblock(last, x[:, 1:]))  # value-only: the class token changes nothing
    return x.reshape(x.shape[0], *grid, x.shape[-1])


def value_only_resblock(block, h: torch.Tensor) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock without attention (eq. 8): h + ls_1(out_proj(v)), v the
    value third of nn.MultiheadAttention's packed in_proj, then the MLP as usual. [B, N, D]."""
    attn = block.attn
    d = h.shape[-1]
    v = F.linear(block.ln_1(h), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
    h = h + block.ls_1(attn.out_proj(v))
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def _eva_dense(trunk, pixels: torch.Tensor) -> torch.Tensor:
    from timm.models.eva import EvaAttention, EvaBlock

    last = trunk.blocks[-1]
    if type(last) is not EvaBlock or type(last.attn) is not EvaAttention or not trunk.dynamic_img_size:
        raise ValueError("dense features need timm's pre-norm EvaBlock with EvaAttention, built with dynamic_img_size")
    # the hidden states entering the last block, patch tokens only (timm: positions for this grid)
    (x,) = trunk.forward_intermediates(pixels, indices=[len(trunk.blocks) - 2], stop_early=True, output_fmt="NLC",
                                       intermediates_only=True)
    x = trunk.norm(value_only_eva_block(last, x))
    grid = trunk.patch_embed.dynamic_feat_size(pixels.shape[-2:])
    return x.reshape(x.shape[0], *grid, x.shape[-1])


def value_only_eva_block(block, h: torch.Tensor) -> torch.Tensor:
    """timm's EvaBlock without attention (eq. 8): attention to itself alone gives each token its
    value, so the attention branch is proj(norm(v)) (the inner layer norm; rotary positions touch
    only q and k), gated and layer-scaled where the block is. [B, N, D]."""
    attn = block.attn
    x = block.norm1(h)
    if attn.qkv is not None:  # fused q, k, v: v is the last third of the output
        dim = attn.qkv.weight.shape[0] // 3
        v = F.linear(x, attn.qkv.weight[2 * dim:], attn.v_bias)
    else:
        v = attn.v_proj(x)
    v = attn.norm(v)
    if attn.gate is not None:
        v = v * attn.gate(x).sigmoid()
    out = attn.proj(v)
    h = h + (out if block.gamma_1 is None else block.gamma_1 * out)
    mlp = block.mlp(block.norm2(h))
    return h + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)


# -- the projection to the image tokens' width -------------------------------------------------------
PROJECTION = "local_projection"  # its module name in a LoRA's modules file (the trainer's MODULES_NAME)
PROJECTION_INIT = "orthogonal"  # recorded in what a RelationLoRA learns (method.learned)


def new_projection(in_dim: int, out_dim: int, seed: int) -> torch.nn.Linear:
    """The `local_projection` a RelationLoRA trains from: Linear(in_dim -> out_dim), no bias,
    float32 on the CPU, a random (semi-)orthogonal matrix drawn from torch seed `seed`.

    Why orthogonal: the dense features are L2-normalized, and bigG's local tokens (what the
    resampler was shown in the paper) are unit vectors too; a matrix with orthonormal columns
    (in_dim <= out_dim: 1024 -> 1664) keeps every token's norm and the angles between tokens, so
    training starts from tokens as distinct and as large as bigG's, spread over all of the
    resampler's input dimensions (a zero-padded identity would use 1024 of the 1664 only; a zero
    init would start with no local information at all)."""
    layer = torch.nn.Linear(in_dim, out_dim, bias=False)
    with torch.no_grad():
        torch.nn.init.orthogonal_(layer.weight, generator=torch.Generator().manual_seed(seed))
    return layer


def projection_from(weight: torch.Tensor) -> torch.nn.Linear:
    """A trained `local_projection` from its weight [out_dim, in_dim] (float32, CPU)."""
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer.eval().requires_grad_(False)
