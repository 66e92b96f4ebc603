"""Metric formulas, preprocessing and encoders against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relationbench.backbones import get_backbone
from relationbench.metrics import PROTOCOLS, clip_score, cosine, mean_pair_cosine
from relationbench.metrics.cache import EmbeddingCache, cache_file
from relationbench.metrics.encoders import load_clip, load_dino
from relationbench.metrics.models import clip_id, dino_id
from relationbench.metrics.preprocess import CLIP_PREPROCESS, DINO_PREPROCESS
from relationbench.score import case_predicate, scoring_text
from relationbench.suites import load_suite

from .score_runs import photo

RNG = np.random.default_rng(0)


# -- formulas ---------------------------------------------------------------------------------
def test_clip_score_is_per_sample_cosine():
    a, b = RNG.normal(size=(5, 7)), RNG.normal(size=(5, 7))
    expected = [float(a[i] @ b[i] / (np.linalg.norm(a[i]) * np.linalg.norm(b[i]))) for i in range(5)]
    np.testing.assert_allclose(clip_score(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(cosine(a, 3 * a), 1.0, atol=1e-12)


def test_mean_pair_cosine_is_mean_over_all_pairs():
    gen, refs = RNG.normal(size=(4, 6)), RNG.normal(size=(3, 6))
    for i in range(4):
        pairs = [gen[i] @ r / (np.linalg.norm(gen[i]) * np.linalg.norm(r)) for r in refs]
        assert mean_pair_cosine(gen, refs)[i] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    # averaged over a subject's images it is the mean over every (generated, reference) pair
    all_pairs = [g @ r / (np.linalg.norm(g) * np.linalg.norm(r)) for g in gen for r in refs]
    assert mean_pair_cosine(gen, refs).mean() == pytest.approx(np.mean(all_pairs), abs=1e-12)


def test_protocol_scales():
    cos = np.array([-0.2, 0.0, 0.31])
    paper, cd = PROTOCOLS["paper"], PROTOCOLS["customdiffusion"]
    np.testing.assert_allclose(paper.text_scale(cos), [-20.0, 0.0, 31.0])
    np.testing.assert_allclose(paper.image_scale(cos), [-20.0, 0.0, 31.0])
    np.testing.assert_allclose(cd.text_scale(cos), [0.0, 0.0, 0.775])  # clamped per sample, not the mean
    np.testing.assert_allclose(cd.image_scale(cos), cos)


# -- preprocessing ------------------------------------------------------------------------------
SIZES = [(96, 96), (300, 180), (150, 400), (224, 224), (1024, 1024)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_clip_preprocess_equals_open_clip(size, mode):
    import open_clip

    image = photo(size[0] + size[1], size=max(size)).resize(size).convert(mode)
    expected = open_clip.image_transform(224, is_train=False)(image).numpy()
    np.testing.assert_allclose(CLIP_PREPROCESS(image), expected, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
def test_dino_preprocess_equals_torchvision(size):
    from torchvision import transforms as T

    image = photo(size[0] * 3 + size[1], size=max(size)).resize(size)
    expected = T.Compose([
        T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])(image).numpy()
    np.testing.assert_allclose(DINO_PREPROCESS(image), expected, atol=1e-6)


# -- encoders -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return get_backbone("tiny")


def test_dino_feature_is_cls_after_final_layernorm(tiny):
    enc = load_dino(tiny)
    images = [photo(i, 128) for i in range(3)]
    pixels = np.stack([DINO_PREPROCESS(im) for im in images])
    with torch.no_grad():
        hidden = enc.model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-1]
        cls = enc.model.layernorm(hidden)[:, 0]
    expected = torch.nn.functional.normalize(cls, dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_images(pixels), expected, atol=1e-6)


def test_encoder_ids_name_the_weights(tiny):
    sdxl = get_backbone("sdxl")
    assert clip_id(sdxl) == "open_clip:ViT-B-32/openai"
    assert clip_id(sdxl, "ViT-L-14") == "open_clip:ViT-L-14/openai"
    assert dino_id(sdxl) == "hf:facebook/dino-vits16"
    assert clip_id(tiny) != clip_id(tiny, "ViT-L-14")
    assert load_clip(tiny, "ViT-L-14").model.visual.patch_size == (14, 14)


def test_encoders_are_batch_independent(tiny):
    enc = load_clip(tiny)
    pixels = np.stack([CLIP_PREPROCESS(photo(i)) for i in range(4)])
    np.testing.assert_allclose(enc.encode_images(pixels)[2:3], enc.encode_images(pixels[2:3]), atol=1e-5)
    texts = ["a dog", "a cat hugging a bear plushie"]
    np.testing.assert_allclose(enc.encode_texts(texts)[1:], enc.encode_texts(texts[1:]), atol=1e-5)


# -- what is scored -------------------------------------------------------------------------------
def test_scoring_text_removes_identifiers_and_prefix():
    case = load_suite("relationbench").case("rb-m-001")
    ident = case.personalized_prompt(["sks", "zwx"])
    record = {"prompt": "best quality, " + ident, "prompt_prefix": "best quality, ", "identifiers": ["sks", "zwx"]}
    assert scoring_text(case, record) == case.prompt
    assert scoring_text(case, {}) == case.prompt


def test_case_predicate_comes_from_the_suite():
    """Stored: "suite"; a suite that declares its predicates (DreamBench: none) is never
    extracted from. Score-time extraction: tests/test_score.py."""
    rb = load_suite("relationbench")
    assert case_predicate(rb.case("rb-s-001"), rb) == (rb.case("rb-s-001").predicate, "suite")
    db = load_suite("dreambench")
    assert case_predicate(db.case("db-dog-10"), db) == (None, "")  # "a dog wearing a red hat"


def test_embedding_cache_round_trip(tmp_path):
    path = cache_file(tmp_path, "open_clip:ViT-B-32/openai", "fp32")
    cache = EmbeddingCache(path)
    cache.put("a" * 64, np.arange(4, dtype=np.float32))
    cache.save()
    again = EmbeddingCache(path)
    assert "a" * 64 in again and len(again) == 1
    np.testing.assert_array_equal(again.get("a" * 64), np.arange(4))
    path.write_bytes(b"broken")
    assert len(EmbeddingCache(path)) == 0  # a damaged cache only costs time
    assert cache_file(tmp_path, "x", "fp32") != cache_file(tmp_path, "x", "bf16")



@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-L-14"])
def test_trimmed_text_encoding_equals_open_clip(tiny, arch):
    """Encoding only up to the end-of-text token gives open_clip's full-length embeddings."""
    enc = load_clip(tiny, arch)
    texts = ["", "a dog", "a cat hugging a bear plushie in the snow",
             "a very long prompt " + " ".join(f"word{i}" for i in range(120))]  # truncated at 77
    ids = enc.tokenizer(texts)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(enc.model.encode_text(ids), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_texts(texts), expected, atol=1e-5)
