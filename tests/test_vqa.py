"""VQAScore (issue 14, part 2): the scorer against a plain transformers forward on the tiny
random Qwen2.5-VL, batching with left padding, the relation question, missing weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from relationbench.backbones import get_backbone
from relationbench.errors import UserError
from relationbench.metrics.registry import METRICS, ImageItem
from relationbench.metrics.vqa import VQAScorer, VQASettings, load_vqa_scorer, relation_text, vqa_id
from relationbench.suites.model import Case, Subject

QUESTION = 'Does this figure show "{}"? Please answer yes or no.'


def subject(name: str, noun: str) -> Subject:
    return Subject(name, noun, "dreambench", name)


def case(prompt: str, predicate: str | None, *nouns: str) -> Case:
    subjects = tuple(subject(f"s{k}", noun) for k, noun in enumerate(nouns))
    return Case(id="c", suite="t", kind="single" if len(nouns) == 1 else "multi", subjects=subjects,
                prompt=prompt, predicate=predicate, boxes=tuple((0.1, 0.1, 0.9, 0.9) for _ in nouns), seed=0)


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def scorer():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more on a shared machine (see one_thread)
    yield load_vqa_scorer(get_backbone("tiny"))
    torch.set_num_threads(threads)


def plain_probabilities(model, processor, image: Image.Image, text: str, side: int) -> tuple[float, float]:
    """P(Yes), P(No): one image and question through the processor, model(**inputs).logits[0, -1], softmax."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION.format(text)}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image.resize((side, side), Image.BICUBIC)], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**inputs).logits[0, -1].double(), dim=-1)
    tok = processor.tokenizer
    return probs[tok.convert_tokens_to_ids("Yes")].item(), probs[tok.convert_tokens_to_ids("No")].item()


ITEMS = [  # images of different sizes (resized to the tiny's 56), prompts of different lengths
    (noise(56, 56, 1), case("a cat hugging a big pillow", "hugging", "cat")),
    (noise(80, 64, 2), case("a dog riding a bicycle next to a cat, at dawn", "riding", "dog", "cat")),
    (noise(40, 90, 3), case("a teapot on a table", None, "teapot")),
]


def items() -> list[ImageItem]:
    return [ImageItem(image=im, sha256=f"h{k}", case=c, text=c.prompt, predicate=c.predicate, uses_layout=False)
            for k, (im, c) in enumerate(ITEMS)]


def test_scores_equal_a_plain_forward_in_one_left_padded_batch(scorer):
    assert scorer.family == "vqa" and scorer.columns == tuple(c.name for c in METRICS["vqa"].columns)
    assert scorer.settings.batch_size >= 5  # the 5 questions below go through one padded batch
    rows = scorer.score(items())
    side = scorer.settings.image_size
    expected = []
    for (image, c), row in zip(ITEMS, rows):
        t_yes, _ = plain_probabilities(scorer.model, scorer.processor, image, c.prompt, side)
        assert row["vqa_t"] == pytest.approx(t_yes, abs=1e-5)
        expected.append(t_yes)
        if c.predicate is None:
            assert math.isnan(row["vqa_r"])
        else:
            r_yes, _ = plain_probabilities(scorer.model, scorer.processor, image, relation_text(c, c.predicate), side)
            assert row["vqa_r"] == pytest.approx(r_yes, abs=1e-5)
            expected.append(r_yes)
    # the random model tells the inputs apart by far more than the tolerance
    assert max(expected) - min(expected) > 1e-4


def test_small_batches_prepared_ahead_give_the_same_rows(scorer):
    """5 questions in batches of 2, three prepared ahead by two threads: each value lands in its row."""
    whole = scorer.score(items())
    small = VQAScorer(scorer.model, scorer.processor, scorer.id,
                      settings=VQASettings(image_size=scorer.settings.image_size, batch_size=2, workers=2))
    for a, b in zip(whole, small.score(items())):
        assert a.keys() == b.keys()
        for column in a:
            assert (math.isnan(a[column]) and math.isnan(b[column])) or a[column] == pytest.approx(b[column], abs=1e-5)


def test_yes_no_renormalisation_option(scorer):
    image, c = ITEMS[0]
    other = VQAScorer(scorer.model, scorer.processor, scorer.id,
                      settings=VQASettings(image_size=scorer.settings.image_size, normalize="yes_no"))
    yes, no = plain_probabilities(scorer.model, scorer.processor, image, c.prompt, scorer.settings.image_size)
    assert other.yes_probability([image], [c.prompt])[0] == pytest.approx(yes / (yes + no), abs=1e-6)


def test_the_answer_token_is_yes_without_a_leading_space(scorer):
    tok = scorer.processor.tokenizer
    assert tok.encode("Yes", add_special_tokens=False) == [tok.convert_tokens_to_ids("Yes")]
    assert tok.encode(" Yes", add_special_tokens=False) != tok.encode("Yes", add_special_tokens=False)
    assert scorer.answer_id == tok.convert_tokens_to_ids("Yes")
    assert scorer.negative_id == tok.convert_tokens_to_ids("No")


@pytest.mark.parametrize("prompt, predicate, nouns, expected", [
    ("a sloth plushie hugging a tree, in the snow", "hugging", ("sloth plushie",), "a sloth plushie hugging a tree"),
    ("a cat hugging a dog on the beach", "hugging", ("cat", "dog"), "a cat hugging a dog"),
    ("on the beach, a dog is chased by a cat", "chased by", ("cat", "dog"), "a dog chased by a cat"),
    ("an elephant plushie riding a dog", "riding", ("elephant plushie", "dog"), "an elephant plushie riding a dog"),
    ("The sofa and chair in front of windows overlooking a cityscape.", "overlooking", ("sofa", "chair"),
     "a chair overlooking a cityscape"),
    ("a dog with a hat", "jumping", ("dog",), "a dog jumping"),
    ("a teapot on a table", None, ("teapot",), None),
])
def test_relation_text(prompt, predicate, nouns, expected):
    assert relation_text(case(prompt, predicate, *nouns), predicate) == expected


def test_ids_name_the_model_and_dtype():
    assert vqa_id(get_backbone("tiny")) == "tiny:qwen2.5-vl-seed0"
    sdxl = get_backbone("sdxl")
    assert vqa_id(sdxl) == "hf:Qwen/Qwen2.5-VL-3B-Instruct"
    assert vqa_id(sdxl, torch.bfloat16) == "hf:Qwen/Qwen2.5-VL-3B-Instruct@bf16"


def test_missing_weights_are_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        load_vqa_scorer(get_backbone("sdxl"))
    assert "'vqa'" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as err:
        load_vqa_scorer(get_backbone("sdxl", {"vqa": str(empty)}))
    assert "--weight vqa=" in str(err.value.hint)
