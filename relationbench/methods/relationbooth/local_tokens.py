"""RelationBooth's local tokens (paper 3.4.3, eq. 8; REFERENCE 2): dense features of a CLIP vision
tower, pooled over an evenly split grid, appended after MS-Diffusion's 257 image tokens.

    dense_features   the tower with its last block run value-only (MaskCLIP style), class token
                     dropped, post-layernorm, L2-normalized, no projection -> [B, h, w, D]
    pool_grid        an s x s grid of boxes (s = sqrt(count)), roi_align 1x1 -> [B, count, D]
    LocalEncoder     a tower (the stock one, a CLIPSelf-distilled one, or an open_clip ViT-L / EVA
                     of local_encoders.py) + preprocessing
    local_encoder_identity / local_encoder_from   which tower (run.json records the identity): the
                     backbone's `local_encoder` weight when given, else the stock tower (the
                     training-free variant); never a silent switch
    openclip_to_hf / hf_to_openclip   the visual tower's weights between open_clip's layout
                     (CLIPSelf's checkpoints) and transformers' CLIPVisionModelWithProjection

The bigG towers are transformers CLIPVisionModel or CLIPVisionModelWithProjection (bigG/14 on
sdxl: width 1664, 48 layers, patch 14; toy size on tiny); local_encoders.py adds paper Table 5's
other towers.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ...errors import UserError

if TYPE_CHECKING:
    from PIL import Image

    from ...backbones import Backbone

LOCAL_TOKEN_COUNTS = (1, 4, 16, 64)  # paper Table 7 (16 is best)
LOCAL_RESOLUTION = 896  # the authors' code: references at 896 px, a 64 x 64 grid on bigG/14
WEIGHT_KEY = "local_encoder"  # the backbone weight naming a CLIPSelf checkpoint (presets.py)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


# -- dense features and pooling ---------------------------------------------------------------
def vision_body(tower: torch.nn.Module) -> torch.nn.Module:
    """The transformer of a tower: `.vision_model` of CLIPVisionModelWithProjection (and of
    CLIPVisionModel before transformers 5), else the CLIPVisionModel itself."""
    return getattr(tower, "vision_model", tower)


def value_only_block(layer: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A CLIP encoder layer without attention (paper eq. 8): each token attends only to itself,
    so the attention output is its value projection.

    h = h' + out_proj(v_proj(layer_norm1(h'))); h = h + mlp(layer_norm2(h)). Shapes [B, N, D].
    """
    attn = layer.self_attn
    h = h + attn.out_proj(attn.v_proj(layer.layer_norm1(h)))
    return h + layer.mlp(layer.layer_norm2(h))


def dense_features(tower: torch.nn.Module, pixels: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """Dense features of `pixels` [B, 3, H, W] (CLIP-normalized, any size: the position
    embeddings are interpolated to the grid) -> [B, H // patch, W // patch, D].

    Every encoder layer but the last runs as usual, the last value-only; the class token is
    dropped and post_layernorm applied; no projection. `normalize`: L2 over D, as the local
    tokens use them (REFERENCE 2); CLIPSelf's student pools them unnormalized (clipself.py).
    The tower: transformers' CLIP (bigG), or open_clip's ViT-L / EVA (local_encoders.py).
    """
    from .local_encoders import is_open_clip_tower, open_clip_dense

    h = open_clip_dense(tower, pixels) if is_open_clip_tower(tower) else _clip_dense(tower, pixels)
    return F.normalize(h, dim=-1) if normalize else h


def _clip_dense(tower: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """dense_features of a transformers CLIP vision tower, unnormalized."""
    body = vision_body(tower)
    patch = body.embeddings.patch_size
    h = body.pre_layrnorm(body.embeddings(pixels, interpolate_pos_encoding=True))
    *layers, last = body.encoder.layers
    for layer in layers:
        out = layer(h, None, causal_attention_mask=None)
        h = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
    h = body.post_layernorm(value_only_block(last, h)[:, 1:])
    return h.reshape(h.shape[0], pixels.shape[-2] // patch, pixels.shape[-1] // patch, h.shape[-1])


def grid_boxes(rows: int, cols: int, height: float, width: float) -> torch.Tensor:
    """An evenly split rows x cols grid over a height x width area -> [rows * cols, 4] boxes
    (x0, y0, x1, y1), row-major (top-left first), float32."""
    ys = torch.linspace(0, height, rows + 1)
    xs = torch.linspace(0, width, cols + 1)
    return torch.stack([torch.stack([xs[j], ys[i], xs[j + 1], ys[i + 1]]) for i in range(rows) for j in range(cols)])


def pool_boxes(features: torch.Tensor, boxes: Sequence[torch.Tensor], *, scale: float = 1.0) -> torch.Tensor:
    """Average of `features` [B, h, w, D] inside boxes: one [N_i, 4] tensor (x0, y0, x1, y1)
    per image, in units of 1 / scale cells -> [sum N_i, D].

    torchvision's roi_align with a 1x1 output, aligned=True (a cell's centre at its index
    + 0.5) and sampling_ratio=0 (ceil(box side) bilinear samples per side, as CLIPSelf's -1):
    on box edges at whole cells the samples fall on cell centres, so the result is the plain
    mean of the cells inside; otherwise a bilinear blend of the cells the samples fall between.
    Computed in float32 (torchvision has no half-precision kernel on the CPU), returned in
    `features`' dtype.
    """
    from torchvision.ops import roi_align

    grid = features.permute(0, 3, 1, 2).float()
    rois = [b.to(device=grid.device, dtype=grid.dtype) for b in boxes]
    pooled = roi_align(grid, rois, output_size=1, spatial_scale=scale, sampling_ratio=0, aligned=True).flatten(1)
    return pooled.to(features.dtype)


def pool_grid(features: torch.Tensor, count: int) -> torch.Tensor:
    """`count` local tokens per image: features [B, h, w, D] averaged over an evenly split
    sqrt(count) x sqrt(count) grid of boxes (pool_boxes), row-major -> [B, count, D]."""
    if count not in LOCAL_TOKEN_COUNTS:
        raise ValueError(f"the local token count must be one of {LOCAL_TOKEN_COUNTS}, got {count}")
    side = math.isqrt(count)
    batch, height, width, _ = features.shape
    boxes = grid_boxes(side, side, height, width)
    return pool_boxes(features, [boxes] * batch).reshape(batch, count, -1)


def clip_pixels(images: Sequence["Image.Image"], size: int) -> torch.Tensor:
    """PIL RGB images -> [B, 3, size, size] float32 through CLIPImageProcessor at `size`: the
    preprocessing of MS-Diffusion's image tokens (encode_references) at another size. A square
    image is resized to exactly size x size (bicubic) and CLIP-normalized; another is resized
    by its short side and centre-cropped."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return processor(images=list(images), return_tensors="pt").pixel_values


# -- the encoder -----------------------------------------------------------------------------
class LocalEncoder:
    """A vision tower that turns reference images into local tokens.

    kind "stock": MS-Diffusion's own image encoder with the value-only last block (the
    training-free variant); "clipself": a CLIPSelf-distilled tower read from `source`; or an
    open_clip architecture of local_encoders.OPEN_CLIP_ENCODERS ("vit-l-14", "eva-clip-l-14").
    """

    def __init__(self, tower: torch.nn.Module, *, kind: str, resolution: int = LOCAL_RESOLUTION):
        from .local_encoders import OPEN_CLIP_ENCODERS

        if kind not in ("stock", "clipself", *OPEN_CLIP_ENCODERS):
            raise ValueError(f"kind must be stock or clipself, or an open_clip architecture "
                             f"({', '.join(OPEN_CLIP_ENCODERS)}), got {kind!r}")
        self.tower, self.kind, self.resolution = tower, kind, resolution

    @property
    def width(self) -> int:
        """D of the tokens: the tower's width (1664 for bigG, 1024 for ViT-L and EVA-L)."""
        from .local_encoders import tower_width

        return tower_width(self.tower)

    @torch.inference_mode()
    def tokens(self, images: Sequence["Image.Image"], count: int) -> torch.Tensor:
        """`count` local tokens of each image (square: the references are 512 x 512) -> [B, count,
        D] float32 on the tower's device; images go through clip_pixels at `resolution`."""
        weight = next(self.tower.parameters())
        pixels = clip_pixels(images, self.resolution).to(weight.device, weight.dtype)
        return pool_grid(dense_features(self.tower, pixels), count).float()


def local_encoder_identity(backbone: "Backbone", *, resolution: int = LOCAL_RESOLUTION) -> dict[str, Any]:
    """Which local encoder the backbone's weights name, known before loading anything:
    {"kind": "clipself", "source", "sha256", "resolution"} for the CLIPSelf checkpoint of its
    `local_encoder` weight (a file, or a folder holding one: checkpoint_file), else
    {"kind": "stock", "resolution"}. The checkpoint is hashed here, once per call."""
    if WEIGHT_KEY not in backbone.weights:
        return {"kind": "stock", "resolution": resolution}
    from ...data import sha256_file

    path = checkpoint_file(backbone.fetch(WEIGHT_KEY))
    return {"kind": "clipself", "source": str(path), "sha256": sha256_file(path), "resolution": resolution}


def local_encoder_from(identity: Mapping[str, Any], stock_tower: torch.nn.Module) -> LocalEncoder:
    """The LocalEncoder an identity (local_encoder_identity) names: `stock_tower` itself, or
    its checkpoint loaded into a copy of `stock_tower`'s architecture, on its device and dtype.

    Raises UserError naming the file for one that cannot be read, is not an open_clip visual
    state dict, or does not fit the stock tower's architecture.
    """
    if identity["kind"] == "stock":
        return LocalEncoder(stock_tower, kind="stock", resolution=identity["resolution"])
    weight = next(stock_tower.parameters())
    tower = tower_from_checkpoint(Path(identity["source"]), stock_tower.config).to(weight.device, weight.dtype).eval()
    return LocalEncoder(tower, kind="clipself", resolution=identity["resolution"])


def checkpoint_file(path: Path) -> Path:
    """`path` itself, or the one checkpoint file (CHECKPOINT_SUFFIXES) in the folder `path`."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
    if len(found) != 1:
        what = f"{len(found)} checkpoint files ({', '.join(p.name for p in found)})" if found else "no checkpoint file"
        raise UserError(f"the local encoder folder holds {what}; it must hold exactly one "
                        f"({', '.join(CHECKPOINT_SUFFIXES)})", path=path,
                        hint=f"pass the file itself: --weight {WEIGHT_KEY}=/path/to/clipself.pt")
    return found[0]


def tower_from_checkpoint(path: Path, config) -> torch.nn.Module:
    """A CLIPVisionModelWithProjection of `config` holding the open_clip checkpoint at `path`
    (CPU, the checkpoint's dtype). UserError for a file that does not fit."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModelWithProjection

    hint = (f"give a CLIPSelf checkpoint of the image encoder's architecture in the open_clip layout (e.g. "
            f"clipself.pt of `relbench train-local-encoder`) with --weight {WEIGHT_KEY}=PATH, or drop it to use "
            "the stock tower")
    state = read_checkpoint(path, hint)
    try:
        hf = openclip_to_hf(state)
    except ValueError as exc:
        raise UserError(f"not an open_clip visual tower: {exc}", path=path, hint=hint) from None
    with init_empty_weights():  # parameters on the meta device; the checkpoint's replace them
        tower = CLIPVisionModelWithProjection(copy.deepcopy(config))
    want = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in hf.items()}
    if want != have:
        raise UserError(f"this checkpoint's visual tower ({_shape_summary(have)}) does not fit the image encoder "
                        f"({_shape_summary(want)})", path=path, hint=hint)
    tower.load_state_dict(hf, strict=True, assign=True)
    return tower


def read_checkpoint(path: Path, hint: str) -> Mapping[str, torch.Tensor]:
    """A state dict from a safetensors file, or a torch file read with weights_only (no code
    is unpickled); a {"state_dict": ...} wrapper (CLIPSelf's training checkpoints) is opened."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unpickling refused, not a zip/safetensors file, truncated, unreadable...
        raise UserError(f"cannot read the local encoder checkpoint ({type(exc).__name__}: {exc})",
                        path=path, hint=hint) from None
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UserError("the local encoder checkpoint is not a state dict (names -> tensors)", path=path, hint=hint)
    return data


def _shape_summary(state: Mapping[str, tuple[int, ...]]) -> str:
    """'width W, L layers, patch P, N positions, projection P' of an HF-layout state (shapes)."""
    layers = {m.group(1) for k in state if (m := _HF_LAYER.fullmatch(k))}
    patch = state.get("vision_model.embeddings.patch_embedding.weight", (0, 0, 0, 0))
    positions = state.get("vision_model.embeddings.position_embedding.weight", (0,))
    projection = state.get("visual_projection.weight", (0,))
    return (f"width {patch[0]}, {len(layers)} layers, patch {patch[-1]}, {positions[0]} positions, "
            f"projection {projection[0]}")


# -- open_clip <-> transformers -----------------------------------------------------------------
# open_clip visual key -> HF key; per layer: the key after "transformer.resblocks.{i}." -> after
# "vision_model.encoder.layers.{i}."; open_clip packs q, k, v into one in_proj (this order, as
# nn.MultiheadAttention), and its proj [D, P] is HF's visual_projection.weight [P, D] transposed
_GLOBAL = {
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_LAYER = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_OC_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")
_HF_QKV = re.compile(r"self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")
_OC_PROJ, _HF_PROJ = "proj", "visual_projection.weight"


def openclip_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip visual tower's weights -> CLIPVisionModelWithProjection's state dict.

    Keys may carry "module." (DDP) and "visual." (a whole CLIP model: only visual.* is read,
    the text tower ignored); without "visual." keys the state must be the visual tower alone.
    Raises ValueError for a state without a patch embedding, or with keys that have no place
    in transformers' CLIP (attention pooling, layer scale, ...).
    """
    plain = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in plain):
        plain = {k.removeprefix("visual."): v for k, v in plain.items() if k.startswith("visual.")}
    if "conv1.weight" not in plain:
        raise ValueError("no visual.conv1.weight (the patch embedding) among its keys")
    out: dict[str, torch.Tensor] = {}
    for key, value in plain.items():
        layer = _OC_LAYER.fullmatch(key)
        rest = layer.group(2) if layer else None
        prefix = f"vision_model.encoder.layers.{layer.group(1)}." if layer else ""
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
        elif key == _OC_PROJ:
            out[_HF_PROJ] = value.t().contiguous()
        elif rest in _LAYER:
            out[prefix + _LAYER[rest]] = value
        elif rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
        else:
            raise ValueError(f"key {key!r} has no counterpart in transformers' CLIP vision model")
    return out


def hf_to_openclip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPVisionModelWithProjection's state dict -> open_clip's visual tower, keys "visual.*"
    (the visual half of an open_clip CLIP state dict). ValueError for keys with no open_clip
    counterpart, or a layer missing one of its q, k, v projections."""
    to_oc = {hf: oc for oc, hf in _GLOBAL.items()}
    layer_to_oc = {hf: oc for oc, hf in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    packed: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> q/k/v parts
    for key, value in state.items():
        layer = _HF_LAYER.fullmatch(key)
        rest = layer.group(2) if layer else ""
        qkv = _HF_QKV.fullmatch(rest)
        if key in to_oc:
            out["visual." + to_oc[key]] = value
        elif key == _HF_PROJ:
            out["visual." + _OC_PROJ] = value.t().contiguous()
        elif rest in layer_to_oc:
            out[f"visual.transformer.resblocks.{layer.group(1)}.{layer_to_oc[rest]}"] = value
        elif qkv is not None:
            packed.setdefault((layer.group(1), qkv.group(2)), {})[qkv.group(1)] = value
        else:
            raise ValueError(f"key {key!r} has no counterpart in open_clip's vision transformer")
    for (i, kind), parts in packed.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"layer {i}: its q, k and v projections' {kind} must all be given")
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV]).contiguous()
    return out
