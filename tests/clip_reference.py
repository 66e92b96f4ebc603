"""Independent CLIP reference for tests: the same weights, run through transformers' ``CLIPModel``.

``hf_clip_from_open_clip`` converts a standard open_clip ViT CLIP (``open_clip.model.CLIP``, or a
``CustomTextCLIP`` whose text tower is an open_clip ``TextTransformer``) into a ``transformers.CLIPModel``
holding exactly the same parameters, so a test can recompute image/text embeddings with a second,
independently written forward pass and compare.

Supported layout only: ViT image tower with a class token, learned (or fixed sin-cos) positional embedding,
``ln_pre``, default pre-norm residual blocks (no layer scale, no qk-norm / custom blocks), token pooling,
no attentional pooler, no patch dropout; causal text tower pooled at the end-of-text token, with a
projection. Anything else raises ``UnsupportedCLIPLayout``.

Caveats:
* HF pools the text at the first ``eos_token_id`` (49407) in each row; open_clip's ``argmax`` pooling picks
  the first maximal id. They agree for ids from open_clip's CLIP tokenizer (49407 is the largest id and
  every row contains it); they may differ for hand-made ids with no 49407 or with larger ids.
* The HF model is float32 regardless of the open_clip model's dtype, and uses the "eager" attention
  implementation by default (plain matmul/softmax), independent of open_clip's ``nn.MultiheadAttention``.
* ``logit_bias`` (SigLIP-style) has no place in ``CLIPModel`` and is not carried over; it does not affect
  the embeddings.
* An open_clip text projection with a bias (``proj_bias=True`` -> ``nn.Linear``) is carried over by giving
  the HF model a biased ``text_projection`` Linear (the stock one has no bias).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    import open_clip
    import transformers

CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_PAD_ID = 0


class UnsupportedCLIPLayout(ValueError):
    """The open_clip model is not the standard ViT/TextTransformer CLIP layout this converter handles."""


# --------------------------------------------------------------------------------------------- helpers


def _fail(msg: str) -> None:
    raise UnsupportedCLIPLayout(f"hf_clip_from_open_clip: {msg}")


def _square(value, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or value[0] != value[1]:
            _fail(f"non-square {what} {tuple(value)} is not supported by transformers' CLIPVisionConfig")
        return int(value[0])
    return int(value)


def _activation_name(act: nn.Module) -> str:
    from open_clip.transformer import QuickGELU

    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if type(act) is nn.GELU:
        if act.approximate == "none":
            return "gelu"
        if act.approximate == "tanh":
            return "gelu_pytorch_tanh"
    _fail(f"unsupported MLP activation {act!r} (only QuickGELU and nn.GELU are mapped)")
    raise AssertionError  # unreachable


def _check_tower(transformer: nn.Module, name: str) -> tuple[int, int, int, str, float]:
    """Validate the residual blocks; return (width, layers, heads, hidden_act, eps) of the transformer."""
    from open_clip.transformer import ResidualAttentionBlock

    blocks = list(transformer.resblocks)
    if not blocks:
        _fail(f"{name} transformer has no blocks")
    width = transformer.width
    acts, heads, eps = set(), set(), set()
    for i, blk in enumerate(blocks):
        where = f"{name} block {i}"
        if type(blk) is not ResidualAttentionBlock:
            _fail(f"{where} is {type(blk).__name__}; only the default ResidualAttentionBlock is supported")
        if not isinstance(blk.ls_1, nn.Identity) or not isinstance(blk.ls_2, nn.Identity):
            _fail(f"{where} uses layer scale (ls_init_value); CLIPModel has no layer scale")
        if hasattr(blk, "ln_1_kv"):
            _fail(f"{where} is a cross-attention block")
        attn = blk.attn
        if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
            _fail(f"{where} attention is not a packed-qkv nn.MultiheadAttention")
        if attn.in_proj_bias is None or attn.out_proj.bias is None or attn.bias_k is not None \
                or attn.add_zero_attn:
            _fail(f"{where} attention has a non-standard bias layout")
        if attn.embed_dim != width:
            _fail(f"{where} attention width {attn.embed_dim} != transformer width {width}")
        heads.add(attn.num_heads)
        if set(blk.mlp._modules) != {"c_fc", "gelu", "c_proj"}:
            _fail(f"{where} MLP has layout {list(blk.mlp._modules)}, expected c_fc/gelu/c_proj")
        acts.add(_activation_name(blk.mlp.gelu))
        for ln in (blk.ln_1, blk.ln_2):
            if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine or ln.bias is None:
                _fail(f"{where} norm {ln!r} is not an affine LayerNorm")
            eps.add(ln.eps)
    if len(heads) != 1 or len(acts) != 1:
        _fail(f"{name} blocks disagree on heads {heads} or activation {acts}")
    if len(eps) != 1:
        _fail(f"{name} LayerNorms disagree on eps: {sorted(eps)}")
    return width, len(blocks), heads.pop(), acts.pop(), eps.pop()


def _check_ln(ln: nn.Module, eps: float, what: str) -> None:
    if not isinstance(ln, nn.LayerNorm) or not ln.elementwise_affine or ln.bias is None:
        _fail(f"{what} {ln!r} is not an affine LayerNorm (CLIPModel always has one here)")
    if ln.eps != eps:
        _fail(f"{what} eps {ln.eps} differs from the blocks' eps {eps}; CLIPModel uses one eps per tower")


def _block_weights(prefix: str, blk: nn.Module) -> dict[str, torch.Tensor]:
    q_w, k_w, v_w = blk.attn.in_proj_weight.detach().chunk(3, dim=0)
    q_b, k_b, v_b = blk.attn.in_proj_bias.detach().chunk(3, dim=0)
    pairs = {
        "layer_norm1.weight": blk.ln_1.weight, "layer_norm1.bias": blk.ln_1.bias,
        "self_attn.q_proj.weight": q_w, "self_attn.q_proj.bias": q_b,
        "self_attn.k_proj.weight": k_w, "self_attn.k_proj.bias": k_b,
        "self_attn.v_proj.weight": v_w, "self_attn.v_proj.bias": v_b,
        "self_attn.out_proj.weight": blk.attn.out_proj.weight, "self_attn.out_proj.bias": blk.attn.out_proj.bias,
        "layer_norm2.weight": blk.ln_2.weight, "layer_norm2.bias": blk.ln_2.bias,
        "mlp.fc1.weight": blk.mlp.c_fc.weight, "mlp.fc1.bias": blk.mlp.c_fc.bias,
        "mlp.fc2.weight": blk.mlp.c_proj.weight, "mlp.fc2.bias": blk.mlp.c_proj.bias,
    }
    return {f"{prefix}.{k}": v for k, v in pairs.items()}


# ------------------------------------------------------------------------------------------ converter


def hf_clip_from_open_clip(model: "open_clip.model.CLIP", attn_implementation: str = "eager"
                           ) -> "transformers.CLIPModel":
    """A ``transformers.CLIPModel`` (float32, eval mode, on the open_clip model's device) with the same weights."""
    from open_clip.transformer import PatchDropout, TextTransformer, VisionTransformer
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    # ---- image tower
    visual = getattr(model, "visual", None)
    if type(visual) is not VisionTransformer:
        _fail(f"image tower is {type(visual).__name__}; only open_clip's VisionTransformer is supported")
    if visual.attn_pool is not None:
        _fail("image tower uses an attentional pooler")
    if visual.pool_type != "tok":
        _fail(f"image tower pools with {visual.pool_type!r}; only class-token pooling ('tok') is supported")
    if isinstance(visual.patch_dropout, PatchDropout) or not isinstance(visual.patch_dropout, nn.Identity):
        _fail("image tower has patch dropout")
    if visual.proj is None:
        _fail("image tower has no projection")
    if getattr(visual.transformer, "batch_first", True) is not True:
        _fail("image transformer is not batch-first")
    v_width, v_layers, v_heads, v_act, v_eps = _check_tower(visual.transformer, "vision")
    _check_ln(visual.ln_pre, v_eps, "vision ln_pre")  # no_ln_pre=True gives nn.Identity -> rejected here
    _check_ln(visual.ln_post, v_eps, "vision ln_post")
    image_size = _square(visual.image_size, "image size")
    patch_size = _square(visual.patch_size, "patch size")
    if visual.conv1.bias is not None:
        _fail("patch embedding conv has a bias")
    if visual.positional_embedding.shape[0] != (image_size // patch_size) ** 2 + 1:
        _fail("vision positional embedding does not match one class token + grid**2 patches")
    embed_dim = visual.proj.shape[1]

    # ---- text tower: attributes live on CLIP itself, or on .text for CustomTextCLIP
    text = getattr(model, "text", None)
    if text is not None:
        if type(text) is not TextTransformer:
            _fail(f"text tower is {type(text).__name__}; only open_clip's TextTransformer is supported")
        pool_type, eos_id, attn_mask = text.pool_type, text.eos_id, text.attn_mask
        if text.cls_emb is not None:
            _fail("text tower appends a class token (CoCa layout)")
        if text.use_pad_mask:
            _fail("text tower uses a padding mask")
    else:
        text = model
        pool_type = getattr(model, "text_pool_type", "argmax")
        eos_id = getattr(model, "text_eos_id", None)
        attn_mask = getattr(model, "attn_mask", None)
    if attn_mask is None:
        _fail("text tower is not causal (no_causal_mask=True); CLIPTextModel always masks causally")
    if pool_type == "argmax":
        hf_eos = CLIP_EOS_ID
    elif pool_type == "eos" and eos_id is not None and eos_id != 2:
        hf_eos = int(eos_id)  # (eos_token_id == 2 switches HF to legacy argmax pooling)
    else:
        _fail(f"text pooling {pool_type!r} (eos_id={eos_id}) cannot be reproduced by CLIPTextModel")
    t_width, t_layers, t_heads, t_act, t_eps = _check_tower(text.transformer, "text")
    _check_ln(text.ln_final, t_eps, "text ln_final")
    proj = text.text_projection
    if proj is None:
        _fail("text tower has no projection")
    if isinstance(proj, nn.Linear):
        text_proj_w, text_proj_b = proj.weight.detach(), proj.bias
    elif isinstance(proj, nn.Parameter) or isinstance(proj, torch.Tensor):
        text_proj_w, text_proj_b = proj.detach().t(), None  # open_clip: x @ P, P is [width, embed]
    else:
        _fail(f"text projection {type(proj).__name__} is neither an nn.Parameter nor an nn.Linear")
    if text_proj_w.shape[0] != embed_dim:
        _fail(f"text projection dim {text_proj_w.shape[0]} != image projection dim {embed_dim}")
    vocab_size, context_length = text.token_embedding.weight.shape[0], text.positional_embedding.shape[0]

    # ---- config
    text_cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=t_width,
        intermediate_size=text.transformer.resblocks[0].mlp.c_fc.out_features,
        projection_dim=embed_dim, num_hidden_layers=t_layers, num_attention_heads=t_heads,
        max_position_embeddings=context_length, hidden_act=t_act, layer_norm_eps=t_eps, attention_dropout=0.0,
        pad_token_id=CLIP_PAD_ID, bos_token_id=CLIP_BOS_ID, eos_token_id=hf_eos,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=visual.transformer.resblocks[0].mlp.c_fc.out_features,
        projection_dim=embed_dim, num_hidden_layers=v_layers, num_attention_heads=v_heads, num_channels=3,
        image_size=image_size, patch_size=patch_size, hidden_act=v_act, layer_norm_eps=v_eps, attention_dropout=0.0,
    )
    config = CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(),
                       projection_dim=embed_dim)
    hf = CLIPModel._from_config(config, attn_implementation=attn_implementation)
    if text_proj_b is not None:
        hf.text_projection = nn.Linear(t_width, embed_dim, bias=True)

    # ---- weights
    sd: dict[str, torch.Tensor] = {
        "vision_model.embeddings.patch_embedding.weight": visual.conv1.weight,
        "vision_model.embeddings.class_embedding": visual.class_embedding,
        "vision_model.embeddings.position_embedding.weight": visual.positional_embedding,
        "vision_model.pre_layrnorm.weight": visual.ln_pre.weight,
        "vision_model.pre_layrnorm.bias": visual.ln_pre.bias,
        "vision_model.post_layernorm.weight": visual.ln_post.weight,
        "vision_model.post_layernorm.bias": visual.ln_post.bias,
        "visual_projection.weight": visual.proj.detach().t(),
        "text_model.embeddings.token_embedding.weight": text.token_embedding.weight,
        "text_model.embeddings.position_embedding.weight": text.positional_embedding,
        "text_model.final_layer_norm.weight": text.ln_final.weight,
        "text_model.final_layer_norm.bias": text.ln_final.bias,
        "text_projection.weight": text_proj_w,
    }
    if text_proj_b is not None:
        sd["text_projection.bias"] = text_proj_b
    for i, blk in enumerate(visual.transformer.resblocks):
        sd.update(_block_weights(f"vision_model.encoder.layers.{i}", blk))
    for i, blk in enumerate(text.transformer.resblocks):
        sd.update(_block_weights(f"text_model.encoder.layers.{i}", blk))
    logit_scale = getattr(model, "logit_scale", None)
    if logit_scale is None or logit_scale.numel() != 1:
        _fail("model has no scalar logit_scale")
    sd["logit_scale"] = logit_scale.detach().reshape(hf.logit_scale.shape)

    sd = {k: v.detach().to(device="cpu", dtype=torch.float32).clone() for k, v in sd.items()}
    hf_params = dict(hf.named_parameters())
    for k, v in sd.items():
        if k not in hf_params:
            _fail(f"internal error: {k} is not a CLIPModel parameter")
        if hf_params[k].shape != v.shape:
            _fail(f"internal error: shape of {k}: open_clip {tuple(v.shape)} vs CLIPModel {tuple(hf_params[k].shape)}")
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    buffers = {name for name, _ in hf.named_buffers()}
    missing_params = [k for k in missing if k not in buffers]
    if missing_params or unexpected:
        _fail(f"incomplete mapping: missing {missing_params}, unexpected {unexpected}")
    if set(sd) != set(hf_params):
        _fail(f"parameters left unmapped: {sorted(set(hf_params) - set(sd))}")

    device = visual.conv1.weight.device
    return hf.to(device=device, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------------------- features


def _as_tensor(out) -> torch.Tensor:
    """transformers < 5 returns the projected tensor; 5.x returns a ModelOutput whose pooler_output is it."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and len(out) > 1 and isinstance(out[1], torch.Tensor):
        return out[1]  # return_dict=False: (last_hidden_state, pooler_output, ...)
    raise TypeError(f"cannot find projected features in {type(out).__name__}")


def _param_device(hf_model) -> torch.device:
    return next(hf_model.parameters()).device


@torch.no_grad()
def hf_image_features(hf_model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) image embeddings, [B, embed_dim], like open_clip ``encode_image``."""
    x = pixel_values.to(device=_param_device(hf_model), dtype=torch.float32)
    return _as_tensor(hf_model.get_image_features(pixel_values=x))


@torch.no_grad()
def hf_text_features(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    """Projected (unnormalised) text embeddings, [B, embed_dim], like open_clip ``encode_text``.

    No attention mask is passed: CLIP's text tower is causal only and pools at the end-of-text token,
    so padding after it never influences the result (as in open_clip).
    """
    ids = input_ids.to(device=_param_device(hf_model), dtype=torch.long)
    return _as_tensor(hf_model.get_text_features(input_ids=ids))
