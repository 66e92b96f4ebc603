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

# Relation phrases, whole: (prompt, class nouns, the predicate as it stands in the prompt).
# Single verbs, verb + preposition, light objects, phrasal verbs with particles, multi-word
# prepositions, verb + particle + preposition; gerunds, third person, is/are; one and two subjects.
RELATION_PHRASES = [
    ("a dog riding a skateboard", ["dog"], "riding"),
    ("a cat hugs a dog", ["cat", "dog"], "hugs"),
    ("a dog chasing a cat", ["dog", "cat"], "chasing"),
    ("a person is carrying a cat", ["person", "cat"], "carrying"),
    ("a dog follows a cat", ["dog", "cat"], "follows"),
    ("a person giving a bone to a dog", ["person", "dog"], "giving"),  # the phrase is contiguous
    ("a dog jumping over a cat", ["dog", "cat"], "jumping over"),
    ("a dog running after a cat", ["dog", "cat"], "running after"),
    ("a person looking after a dog", ["person", "dog"], "looking after"),
    ("a cat sleeping beside a dog", ["cat", "dog"], "sleeping beside"),
    ("a cat is leaning against a dog", ["cat", "dog"], "leaning against"),
    ("a monster toy hiding behind a teddy bear", ["monster toy", "teddy bear"], "hiding behind"),
    ("a dog walking towards a cat", ["dog", "cat"], "walking towards"),
    ("a person reaching for a cat", ["person", "cat"], "reaching for"),
    ("a dog is waiting for a cat", ["dog", "cat"], "waiting for"),
    ("a cat sitting in the grass", ["cat"], "sitting in"),  # "in" alone: no multi-word preposition
    ("a person shaking hands with a robot toy", ["person", "robot toy"], "shaking hands with"),
    ("a dog and a cat are playing with a ball", ["dog", "cat"], "playing with"),
    ("a person making friends with a dog", ["person", "dog"], "making friends with"),
    ("a cat taking care of a teddy bear", ["cat", "teddy bear"], "taking care of"),
    ("a dog takes care of a cat", ["dog", "cat"], "takes care of"),
    ("a person picking up a cat", ["person", "cat"], "picking up"),
    ("a cat picks up a toy", ["cat"], "picks up"),
    ("a cat climbing up a tree", ["cat"], "climbing up"),
    ("a cat looking up at a dog", ["cat", "dog"], "looking up at"),
    ("a dog looks up at a cat", ["dog", "cat"], "looks up at"),
    ("a cat stares up at a dog", ["cat", "dog"], "stares up at"),
    ("a dog running away from a cat", ["dog", "cat"], "running away from"),
    ("a cat curls up on a dog", ["cat", "dog"], "curls up on"),
    ("a teddy bear leaning back against a dog", ["teddy bear", "dog"], "leaning back against"),
    ("a duck toy jumping out of a box", ["duck toy"], "jumping out of"),
    ("a cat is looking out of a window", ["cat"], "looking out of"),
    ("a cat peeking out from behind a dog", ["cat", "dog"], "peeking out from behind"),
    ("a cat looking from inside a box", ["cat"], "looking from inside"),
    ("a cat hiding inside of a box", ["cat"], "hiding inside of"),
    ("a dog sitting in front of a cat", ["dog", "cat"], "sitting in front of"),
    ("a dog sits in front of a cat", ["dog", "cat"], "sits in front of"),
    ("a bear plushie lying next to a dog", ["bear plushie", "dog"], "lying next to"),
    ("a dog lies next to a cat", ["dog", "cat"], "lies next to"),
    ("a robot toy playing next to a cat", ["robot toy", "cat"], "playing next to"),
    ("a dog is lying down next to a cat", ["dog", "cat"], "lying down next to"),
    ("a cat sits on top of a dog", ["cat", "dog"], "sits on top of"),
    ("a sloth plushie sitting on the back of a dog", ["sloth plushie", "dog"], "sitting on the back of"),
    ("a cat is sleeping in the middle of a sofa", ["cat"], "sleeping in the middle of"),
    ("a dog standing in between a cat and a person", ["dog", "cat", "person"], "standing in between"),
    ("a dog standing close to a cat", ["dog", "cat"], "standing close to"),
    ("a cat sitting far from a dog", ["cat", "dog"], "sitting far from"),
    ("a teddy bear sitting on the left of a robot toy", ["teddy bear", "robot toy"], "sitting on the left of"),
    ("a robot toy standing to the right of a teddy bear", ["robot toy", "teddy bear"], "standing to the right of"),
    ("a cat sitting across from a dog", ["cat", "dog"], "sitting across from"),
    ("a dog walking together with a person", ["dog", "person"], "walking together with"),
    ("a dog swimming along with a duck toy", ["dog", "duck toy"], "swimming along with"),
    ("a dog walking ahead of a person", ["dog", "person"], "walking ahead of"),
    ("A Dog Sitting In Front Of A Cat.", ["dog", "cat"], "Sitting In Front Of"),  # as written
]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("prompt", "nouns", "predicate"), RELATION_PHRASES, ids=[p for p, *_ in RELATION_PHRASES])
def test_relation_phrases_are_whole(backend, prompt, nouns, predicate):
    """Particles and multi-word prepositions stay in the phrase ("sitting in front of" is not
    "sitting in", another relation), with or without the class nouns."""
    assert extract_predicate(prompt, nouns, backend=backend) == predicate
    assert extract_predicate(prompt, backend=backend) == predicate


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_phrase_stops_at_a_class_noun(backend):
    # "down" would be a particle ("lying down"); here it starts the class noun "down jacket"
    assert extract_predicate("a person wearing down jacket", ["person", "down jacket"], backend=backend) == "wearing"
    assert extract_predicate("a person wearing down jacket", backend=RULE_BASED) == "wearing down"


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
    with pytest.raises(SuiteError, match="predicates must be a string, got 3"):
        load_suite(write_suite({**data, "predicates": 3}))
    with pytest.raises(SuiteError, match="predicates must name"):
        load_suite(write_suite({**data, "predicates": " "}))


def test_a_case_marks_an_extracted_predicate_for_review(write_suite):
    from .conftest import mini_suite_data

    suite = load_suite(write_suite(mini_suite_data(predicate_source="spacy:en_core_web_sm-3.8.0")))
    assert [c.predicate_source for c in suite.cases] == [None, "spacy:en_core_web_sm-3.8.0"]
    assert suite.cases[1].as_record()["predicate_source"] == "spacy:en_core_web_sm-3.8.0"
    for bad in ("", " "):
        with pytest.raises(SuiteError, match="t-m-1: predicate_source must name the extractor"):
            load_suite(write_suite(mini_suite_data(predicate_source=bad)))
    with pytest.raises(SuiteError, match="t-m-1: predicate_source must be a string, got 3"):
        load_suite(write_suite(mini_suite_data(predicate_source=3)))
    data = mini_suite_data(predicate_source="rule-based")
    del data["cases"][1]["predicate"]
    with pytest.raises(SuiteError, match="t-m-1: predicate_source 'rule-based' marks a predicate, but the case has none"):
        load_suite(write_suite(data))
