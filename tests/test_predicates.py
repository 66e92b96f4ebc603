"""extract_predicate: both backends return every RelationBench predicate and sensible free-form ones."""

from __future__ import annotations

import importlib.util

import pytest

from relationbench.suites import load_suite
from relationbench.suites.predicates import (
    MODEL_PACKAGES,
    RULE_BASED,
    extract_predicate,
    predicate_backend,
)

HAS_MODEL = any(importlib.util.find_spec(p) is not None for p in MODEL_PACKAGES)

BACKENDS = [
    pytest.param(
        "model",
        marks=pytest.mark.skipif(
            not HAS_MODEL, reason=f"no spaCy English model installed ({', '.join(MODEL_PACKAGES)})"
        ),
    ),
    RULE_BASED,
]

FREE_FORM = {
    "a photo of a cat sitting on a sofa": "sitting on",
    "two dogs playing chess": "playing",
    "a man is riding a horse": "riding",
    "a cat sits on a mat": "sits on",
    "a sleeping cat hugging a dog": "hugging",
    "a man shaking hands with a woman": "shaking hands with",
    "A Dog Riding A Bicycle.": "Riding",
    "a dog lying in the grass next to a building": "lying in",
    "a teddy bear high-fiving a robot": "high-fiving",
    "a landscape at dawn": None,
    "a photo of a building": None,
}


@pytest.fixture(scope="module")
def cases():
    return load_suite("relationbench").cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_is_reported(backend):
    name = predicate_backend(backend)
    assert name in MODEL_PACKAGES if backend == "model" else name == RULE_BASED


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_relationbench_predicate(backend, cases):
    wrong = {}
    for c in cases:
        nouns = [s.class_noun for s in c.subjects]
        for got in (extract_predicate(c.prompt, backend=backend), extract_predicate(c.prompt, nouns, backend=backend)):
            if got != c.predicate:
                wrong[c.id] = (c.prompt, got, c.predicate)
    assert not wrong


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prompt", FREE_FORM)
def test_free_form_prompts(backend, prompt):
    assert extract_predicate(prompt, backend=backend) == FREE_FORM[prompt]


def test_subjects_keep_the_verb_out_of_class_nouns():
    # "boxing" would be the first -ing word; as part of the class noun it is not the verb
    assert extract_predicate("a boxing glove hugging a cat", ["boxing glove", "cat"], backend=RULE_BASED) == "hugging"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        extract_predicate("a dog riding a bicycle", backend="gpt")
