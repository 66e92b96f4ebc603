"""extract_predicate: both backends return every RelationBench predicate and sensible free-form ones;
suites store their predicates, and say where they came from."""

from __future__ import annotations

import importlib.util

import pytest

from relationbench.suites import SuiteError, load_suite
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
    "a dog playing with a jack-in-the-box": "playing with",  # a hyphen chain is one word
    "a landscape at dawn": None,
    "a photo of a building": None,
}


@pytest.fixture(scope="module")
def cases():
    return load_suite("relationbench").cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_is_reported(backend):
    """The id written next to what it extracted: the model's package and version."""
    name = predicate_backend(backend)
    if backend == "model":
        package, version = name.removeprefix("spacy:").rsplit("-", 1)
        assert name.startswith("spacy:") and package in MODEL_PACKAGES and version[0].isdigit()
    else:
        assert name == RULE_BASED


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


# -- stored predicates ----------------------------------------------------------------------
def test_backends_differ_on_free_form_prompts():
    """Why a suite stores its predicates: the rules miss verbs the model finds."""
    prompt, nouns = "A watercolor painting of a dog perched on a sofa.", ["dog", "sofa"]
    assert extract_predicate(prompt, nouns, backend=RULE_BASED) is None
    if HAS_MODEL:
        assert extract_predicate(prompt, nouns, backend="model") == "perched on"


def test_builtin_suites_declare_their_predicates():
    assert all(c.predicate for c in load_suite("relationbench").cases)  # every case stores one
    assert load_suite("dreambench").predicates == "none"
    cc = load_suite("customconcept101-multi")
    assert cc.predicates.startswith("spacy:en_core_web_sm")
    assert sum(bool(c.predicate) for c in cc.cases) == 767  # of 1212: the prompts with a relation


@pytest.mark.skipif(not HAS_MODEL, reason="no spaCy English model installed")
def test_customconcept101_predicates_are_the_models():
    """The stored predicates are the model's extraction (a case without one: no verb found)."""
    suite = load_suite("customconcept101-multi")
    wrong = {}
    for c in suite.cases:
        got = extract_predicate(c.prompt, [s.class_noun for s in c.subjects], backend="model")
        if got != c.predicate:
            wrong[c.id] = (c.prompt, got, c.predicate)
    assert not wrong


def test_a_suite_without_relations_has_no_predicates(write_suite):
    from .conftest import mini_suite_data

    data = {**mini_suite_data(), "predicates": "none"}
    with pytest.raises(SuiteError, match="t-s-1: has predicate 'riding', but the suite says predicates: none"):
        load_suite(write_suite(data))
    for case in data["cases"]:
        del case["predicate"]
    assert load_suite(write_suite(data)).predicates == "none"
    with pytest.raises(SuiteError, match="predicates must name"):
        load_suite(write_suite({**data, "predicates": 3}))
