"""The transformers-based CLIP reference (tests/clip_reference.py) reproduces open_clip on the same weights."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")

from open_clip.model import CLIP  # noqa: E402

from tests.clip_reference import (  # noqa: E402
    UnsupportedCLIPLayout,
    hf_clip_from_open_clip,
    hf_image_features,
    hf_text_features,
)

ATOL = 1e-5

PROMPTS = [
    "",
    "a dog",
    "a photo of a dog riding a bicycle next to a bear plushie",
    "a very long prompt " + " ".join(f"word{i}" for i in range(120)),  # truncated to the 77-token context
]


def _vision_cfg(**overrides) -> dict:
    cfg = dict(image_size=224, layers=2, width=64, head_width=32, patch_size=32)
    cfg.update(overrides)
    return cfg


def _text_cfg(**overrides) -> dict:
    cfg = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    cfg.update(overrides)
    return cfg


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """open_clip init leaves LayerNorms at 1/0 and attention biases at 0: shake every parameter so a wrong
    mapping (e.g. ln_1 <-> ln_2, q/k/v order, a missing transpose) cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _make_clip(seed: int = 0, quick_gelu: bool = True, vision=None, text=None) -> CLIP:
    torch.manual_seed(seed)
    model = CLIP(embed_dim=32, vision_cfg=_vision_cfg(**(vision or {})), text_cfg=_text_cfg(**(text or {})),
                 quick_gelu=quick_gelu)
    _perturb(model, seed + 1000)
    return model.eval()


def _pixels(model: CLIP, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = model.visual.image_size[0]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def token_ids() -> torch.Tensor:
    ids = open_clip.get_tokenizer("ViT-B-32")(PROMPTS)
    assert ids.shape == (len(PROMPTS), 77)
    lengths = (ids != 0).sum(dim=1)
    assert len(set(lengths.tolist())) == len(PROMPTS)  # genuinely different lengths, one full row
    assert lengths.max() == 77
    return ids


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert isinstance(actual, torch.Tensor) and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("quick_gelu", [True, False], ids=["quick_gelu", "gelu"])
def test_reference_matches_open_clip(quick_gelu: bool, token_ids: torch.Tensor):
    model = _make_clip(seed=0 if quick_gelu else 1, quick_gelu=quick_gelu)
    hf = hf_clip_from_open_clip(model)
    expected_act = "quick_gelu" if quick_gelu else "gelu"
    assert hf.config.vision_config.hidden_act == expected_act
    assert hf.config.text_config.hidden_act == expected_act
    assert not hf.training

    pixels = _pixels(model)
    with torch.no_grad():
        want_img = model.encode_image(pixels)
        want_txt = model.encode_text(token_ids)
    got_img = hf_image_features(hf, pixels)
    got_txt = hf_text_features(hf, token_ids)
    assert got_img.shape == (3, 32) and got_txt.shape == (len(PROMPTS), 32)
    _assert_close(got_img, want_img)
    _assert_close(got_txt, want_txt)
    # the rows really differ from one another (pooling picks each row's own end-of-text token)
    assert torch.cdist(got_txt, got_txt).fill_diagonal_(1.0).min() > 1e-3
    torch.testing.assert_close(hf.logit_scale.detach(), model.logit_scale.detach().reshape(()))


def test_reference_other_geometry_and_biased_text_projection(token_ids: torch.Tensor):
    """Non-default patch/image size, mlp ratio, heads, and open_clip's nn.Linear text projection (proj_bias)."""
    model = _make_clip(seed=2, quick_gelu=False,
                       vision=dict(image_size=64, patch_size=16, width=48, head_width=16, layers=3, mlp_ratio=2.0),
                       text=dict(width=24, heads=3, layers=1, proj_bias=True))
    assert isinstance(model.text_projection, torch.nn.Linear)
    hf = hf_clip_from_open_clip(model)
    assert hf.config.vision_config.num_attention_heads == 3
    assert hf.config.vision_config.intermediate_size == 96
    pixels = _pixels(model, seed=3)
    with torch.no_grad():
        _assert_close(hf_image_features(hf, pixels), model.encode_image(pixels))
        _assert_close(hf_text_features(hf, token_ids), model.encode_text(token_ids))


def test_reference_custom_text_clip(token_ids: torch.Tensor):
    """CustomTextCLIP keeps its TextTransformer under ``.text``; the converter reads it there."""
    from open_clip.model import CustomTextCLIP

    torch.manual_seed(5)
    model = CustomTextCLIP(embed_dim=32, vision_cfg=_vision_cfg(image_size=64), text_cfg=_text_cfg(), quick_gelu=True)
    _perturb(model, 1005)
    model.eval()
    hf = hf_clip_from_open_clip(model)
    pixels = _pixels(model, seed=6)
    with torch.no_grad():
        _assert_close(hf_image_features(hf, pixels), model.encode_image(pixels))
        _assert_close(hf_text_features(hf, token_ids), model.encode_text(token_ids))


def test_wrong_mapping_is_detected(token_ids: torch.Tensor):
    """Swapping q and k in every converted layer must change both embeddings well beyond the tolerance."""
    model = _make_clip(seed=3)
    hf = hf_clip_from_open_clip(model)
    pixels = _pixels(model, seed=4)
    with torch.no_grad():
        want_img, want_txt = model.encode_image(pixels), model.encode_text(token_ids)
        _assert_close(hf_image_features(hf, pixels), want_img)
        for layer in [*hf.vision_model.encoder.layers, *hf.text_model.encoder.layers]:
            attn = layer.self_attn
            for name in ("weight", "bias"):
                q, k = getattr(attn.q_proj, name), getattr(attn.k_proj, name)
                tmp = q.detach().clone()
                q.copy_(k)
                k.copy_(tmp)
        assert (hf_image_features(hf, pixels) - want_img).abs().max() > 100 * ATOL
        assert (hf_text_features(hf, token_ids) - want_txt).abs().max() > 100 * ATOL


def test_every_parameter_is_mapped():
    model = _make_clip(seed=4)
    hf = hf_clip_from_open_clip(model)
    n_open_clip = sum(p.numel() for p in model.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == n_open_clip  # same parameter count; buffers (position_ids) excluded
    torch.testing.assert_close(hf.visual_projection.weight, model.visual.proj.t(), atol=0, rtol=0)
    q, k, v = model.transformer.resblocks[1].attn.in_proj_weight.chunk(3)
    torch.testing.assert_close(hf.text_model.encoder.layers[1].self_attn.v_proj.weight, v, atol=0, rtol=0)


@pytest.mark.parametrize("vision,text,match", [
    (dict(ls_init_value=0.1), None, "layer scale"),
    (dict(no_ln_pre=True), None, "ln_pre"),
    (dict(pool_type="avg"), None, "pools with 'avg'"),
    (dict(patch_dropout=0.5), None, "patch dropout"),
    (dict(attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2), None, "attentional pooler"),
    (None, dict(no_causal_mask=True), "not causal"),
    (None, dict(pool_type="last"), "text pooling"),
    (None, dict(qk_norm=True), "ResidualAttentionBlock"),
])
def test_unsupported_layouts_raise(vision, text, match):
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=_vision_cfg(image_size=64, **(vision or {})),
                 text_cfg=_text_cfg(**(text or {})))
    with pytest.raises(UnsupportedCLIPLayout, match=match):
        hf_clip_from_open_clip(model)
