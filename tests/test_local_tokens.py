"""Local tokens (paper eq. 8, REFERENCE 2): the value-only last block against a plain computation,
grid pooling against a loop over boxes (and roi_align), the preprocessing against CLIP's, and
the local encoder: the stock tower without a `local_encoder` weight, an open_clip (CLIPSelf)
checkpoint loaded into transformers' tower with the same outputs, and clear errors for files
that do not fit."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.errors import UserError
from relationbench.methods.msdiffusion.encoder import TINY_IMAGE_ENCODER, build_tiny_image_encoder
from relationbench.methods.relationbooth.local_tokens import (LOCAL_TOKEN_COUNTS, LocalEncoder, clip_pixels,
                                                             dense_features, hf_to_openclip, local_encoder_from,
                                                             local_encoder_identity,
                                                             openclip_to_hf, pool_grid)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tower():
    return build_tiny_image_encoder().eval()


def pixels(side: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def picture(side: int = 512, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def plain_dense(tower, px: torch.Tensor) -> torch.Tensor:
    """Eq. 8 written out: the hidden states entering the last layer (transformers' own forward),
    then that layer with its attention replaced by out_proj(v_proj(.)), as explicit matmuls."""
    with torch.no_grad():
        h = tower(px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2]
        last = tower.vision_model.encoder.layers[-1]
        sa, mlp, d = last.self_attn, last.mlp, h.shape[-1]
        ln1 = F.layer_norm(h, (d,), last.layer_norm1.weight, last.layer_norm1.bias, last.layer_norm1.eps)
        v = ln1 @ sa.v_proj.weight.T + sa.v_proj.bias
        h = h + v @ sa.out_proj.weight.T + sa.out_proj.bias
        ln2 = F.layer_norm(h, (d,), last.layer_norm2.weight, last.layer_norm2.bias, last.layer_norm2.eps)
        h = h + F.gelu(ln2 @ mlp.fc1.weight.T + mlp.fc1.bias) @ mlp.fc2.weight.T + mlp.fc2.bias
        post = tower.vision_model.post_layernorm
        h = F.layer_norm(h[:, 1:], (d,), post.weight, post.bias, post.eps)
        h = h / h.norm(dim=-1, keepdim=True)
    side = px.shape[-1] // 14
    return h.reshape(px.shape[0], side, side, d)


@pytest.mark.parametrize("side", [224, 448])
def test_value_only_last_block_equals_a_plain_computation(tower, side):
    px = pixels(side)
    with torch.no_grad():
        got = dense_features(tower, px)
    want = plain_dense(tower, px)
    assert got.shape == (2, side // 14, side // 14, TINY_IMAGE_ENCODER["hidden_size"])  # 224 px: 16 x 16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the last layer's attention is really gone: its q projection moves the usual output, not these
    last = tower.vision_model.encoder.layers[-1].self_attn
    saved = last.q_proj.weight.clone()
    with torch.no_grad():
        usual = tower(px, interpolate_pos_encoding=True).last_hidden_state
    try:
        with torch.no_grad():
            last.q_proj.weight.mul_(3.0)
            assert torch.equal(dense_features(tower, px), got)
            assert not torch.allclose(tower(px, interpolate_pos_encoding=True).last_hidden_state, usual)
    finally:
        with torch.no_grad():
            last.q_proj.weight.copy_(saved)


def loop_pool(features: torch.Tensor, count: int) -> torch.Tensor:
    """Mean of the cells of each box of an even s x s split, boxes row by row."""
    b, h, w, d = features.shape
    s = int(round(count ** 0.5))
    out = torch.zeros(b, count, d)
    for n in range(b):
        for i in range(s):
            for j in range(s):
                cells = features[n, i * h // s:(i + 1) * h // s, j * w // s:(j + 1) * w // s]
                out[n, i * s + j] = cells.reshape(-1, d).mean(0)
    return out


def test_pool_grid_is_the_mean_over_each_box_row_major():
    from torchvision.ops import roi_align

    features = torch.randn(2, 16, 16, 5, generator=torch.Generator().manual_seed(1))
    for count in LOCAL_TOKEN_COUNTS:
        got = pool_grid(features, count)
        torch.testing.assert_close(got, loop_pool(features, count), rtol=1e-5, atol=1e-6)
        # = roi_align 1x1 aligned (CLIPSelf's call) on a grid the split divides
        s = int(round(count ** 0.5))
        edges = [16 * k / s for k in range(s + 1)]
        boxes = torch.tensor([[edges[j], edges[i], edges[j + 1], edges[i + 1]] for i in range(s) for j in range(s)])
        ra = roi_align(features.permute(0, 3, 1, 2), [boxes, boxes], output_size=1, spatial_scale=1.0,
                       sampling_ratio=-1, aligned=True).reshape(2, count, 5)
        torch.testing.assert_close(got, ra, rtol=1e-5, atol=1e-6)
    # top-left first: a bump in the bottom-right cell only moves the last of 4 tokens
    bumped = features.clone()
    bumped[:, 15, 15] += 64.0
    diff = (pool_grid(bumped, 4) - pool_grid(features, 4)).abs().amax(-1)
    assert torch.equal(diff > 0, torch.tensor([[False, False, False, True]] * 2))
    with pytest.raises(ValueError, match="one of"):
        pool_grid(features, 9)


def test_pool_grid_on_a_grid_the_split_does_not_divide():
    """3 x 3 cells into 2 x 2 boxes of 1.5 cells: 2 bilinear samples a side, at cell positions
    -0.125 (clamped to 0) and 0.625 for the first box, 1.375 and 2.125 (clamped to 2) for the
    second: weights (0.6875, 0.3125, 0) and (0, 0.3125, 0.6875) along each axis."""
    features = torch.randn(1, 3, 3, 4, generator=torch.Generator().manual_seed(2))
    w = [torch.tensor([0.6875, 0.3125, 0.0]), torch.tensor([0.0, 0.3125, 0.6875])]
    want = torch.stack([torch.einsum("r,c,rcd->d", w[i], w[j], features[0]) for i in range(2) for j in range(2)])
    torch.testing.assert_close(pool_grid(features, 4)[0], want, rtol=1e-5, atol=1e-6)


def test_clip_pixels_are_ms_diffusions_preprocessing_at_another_size():
    from transformers import CLIPImageProcessor
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    images = [picture(seed=0), picture(seed=1)]
    assert torch.equal(clip_pixels(images, 224), CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values)
    flat = Image.new("RGB", (512, 512), (200, 30, 90))
    got = clip_pixels([flat], 896)
    assert got.shape == (1, 3, 896, 896)
    want = (torch.tensor([200, 30, 90]) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(got[0].amax((1, 2)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0].amin((1, 2)), want, rtol=1e-5, atol=1e-5)


def load_local_encoder(backbone, tower, resolution: int = 224):
    """(the identity the method records, the encoder it makes of it): what RelationBooth loads."""
    identity = local_encoder_identity(backbone, resolution=resolution)
    return identity, local_encoder_from(identity, tower)


def test_without_a_local_encoder_weight_the_stock_tower_makes_the_tokens(tower):
    from transformers import CLIPImageProcessor

    for backbone in (get_backbone("tiny"), get_backbone("sdxl")):
        identity, encoder = load_local_encoder(backbone, tower)
        assert encoder.tower is tower and encoder.kind == "stock" and encoder.resolution == 224
        assert identity == {"kind": "stock", "resolution": 224}
    images = [picture(seed=3), picture(seed=4)]
    tokens = encoder.tokens(images, 16)
    px = CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 16, TINY_IMAGE_ENCODER["hidden_size"])
    torch.testing.assert_close(tokens, loop_pool(plain_dense(tower, px), 16), rtol=1e-5, atol=1e-5)
    assert "local_encoder" not in get_backbone("sdxl").describe()["weights"]
    with pytest.raises(ValueError, match="stock or clipself"):
        LocalEncoder(tower, kind="distilled")


def open_clip_tower(width: int = 48, layers: int = 3, seed: int = 5):
    """open_clip's ViT at the tiny tower's size (gelu, 2 heads, patch 14, 224 px, projection 32)."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(seed)
    c = TINY_IMAGE_ENCODER
    return VisionTransformer(image_size=c["image_size"], patch_size=c["patch_size"], width=width, layers=layers,
                             heads=c["num_attention_heads"], mlp_ratio=c["intermediate_size"] / c["hidden_size"],
                             output_dim=c["projection_dim"], act_layer=torch.nn.GELU).eval()


def save_clipself_like(path, visual) -> None:
    """A CLIPSelf training checkpoint: DDP-prefixed keys of a whole CLIP model, optimizer, epoch."""
    state = {f"module.visual.{k}": v for k, v in visual.state_dict().items()}
    state["module.logit_scale"] = torch.tensor(4.6)
    state["module.transformer.resblocks.0.ln_1.weight"] = torch.ones(32)  # the text tower: ignored
    torch.save({"epoch": 6, "name": "clipself", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
               path)


def sdxl_with(path):
    return get_backbone("sdxl", {"local_encoder": str(path)})


def test_a_clipself_checkpoint_loads_into_the_transformers_tower_with_the_same_outputs(tmp_path, tower):
    from safetensors.torch import save_file

    visual = open_clip_tower()
    path = tmp_path / "clipself_epoch_6.pt"
    save_clipself_like(path, visual)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    identity, encoder = load_local_encoder(sdxl_with(path), tower)
    assert encoder.kind == "clipself" and encoder.tower is not tower and encoder.resolution == 224
    assert identity == {"kind": "clipself", "source": str(path),
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "resolution": 224}
    px = pixels(224)
    with torch.no_grad():
        torch.testing.assert_close(encoder.tower(px).image_embeds, visual(px), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, tower.state_dict()[k]) for k, v in before.items())  # the stock tower untouched
    # and back: the open_clip state as it was, key for key
    back = hf_to_openclip(encoder.tower.state_dict())
    ref = visual.state_dict()
    assert back.keys() == {f"visual.{k}" for k in ref} and all(torch.equal(back[f"visual.{k}"], v) for k, v in ref.items())
    # a folder holding one checkpoint, and a bare visual state dict in safetensors
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k: v.contiguous() for k, v in visual.state_dict().items()}, str(bare / "visual.safetensors"))
    identity, again = load_local_encoder(sdxl_with(bare), tower)
    assert identity["source"] == str(bare / "visual.safetensors")
    assert all(torch.equal(v, encoder.tower.state_dict()[k]) for k, v in again.tower.state_dict().items())


def test_checkpoints_that_do_not_fit_are_user_errors_naming_the_file(tmp_path, tower):
    cases = {}
    for name, visual in (("wide.pt", open_clip_tower(width=64)), ("shallow.pt", open_clip_tower(layers=2))):
        save_clipself_like(tmp_path / name, visual)
        cases[name] = "does not fit the image encoder"
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    cases["notes.pt"] = "cannot read"
    torch.save({"state_dict": {"module.transformer.resblocks.0.ln_1.weight": torch.ones(3)}}, tmp_path / "text.pt")
    cases["text.pt"] = "not an open_clip visual tower"
    torch.save({"visual.conv1.weight": torch.ones(48, 3, 14, 14), "visual.attn_pool.query": torch.ones(3)},
               tmp_path / "pooled.pt")
    cases["pooled.pt"] = "attn_pool"
    torch.save(Image.new("RGB", (2, 2)), tmp_path / "pickled.pt")  # code to unpickle: refused
    cases["pickled.pt"] = "cannot read"
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            load_local_encoder(sdxl_with(tmp_path / name), tower)
        assert caught.value.path == str(tmp_path / name) and "--weight local_encoder" in caught.value.hint
    with pytest.raises(UserError, match="width 64, 3 layers.*width 48, 3 layers"):
        load_local_encoder(sdxl_with(tmp_path / "wide.pt"), tower)
    with pytest.raises(UserError, match="holds 6 checkpoint files"):
        load_local_encoder(sdxl_with(tmp_path), tower)
    with pytest.raises(UserError, match="only local_encoder may be given"):  # tiny's one optional weight
        get_backbone("tiny", {"vae": str(tmp_path / "wide.pt")})


def test_conversion_refuses_keys_it_cannot_place():
    state = {f"visual.{k}": v for k, v in open_clip_tower().state_dict().items()}
    hf = openclip_to_hf(state)
    assert len(hf) == len(state) + 3 * 2 * 2  # 3 layers: in_proj weight and bias each become q, k, v
    with pytest.raises(ValueError, match="no counterpart"):
        hf_to_openclip({**hf, "vision_model.encoder.layers.0.self_attn.extra.weight": torch.ones(1)})
    del hf["vision_model.encoder.layers.1.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="layer 1"):
        hf_to_openclip(hf)


def test_bigg_at_896_px_gives_a_64_by_64_grid_and_16_tokens_of_width_1664():
    """The full-size tower (h94/IP-Adapter's image_encoder config: CLIP ViT-bigG/14) on the meta
    device: shapes only, no weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=1280, hidden_act="gelu")
    with torch.device("meta"):
        tower = CLIPVisionModelWithProjection(config)
        features = dense_features(tower, torch.empty(1, 3, 896, 896))
        assert features.shape == (1, 64, 64, 1664)
        assert pool_grid(features, 16).shape == (1, 16, 1664)
