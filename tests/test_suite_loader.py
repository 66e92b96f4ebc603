"""Suite validation: every bad input names the file and the case."""

from __future__ import annotations

import pytest

from relationbench.suites import SuiteError, load_suite

from .conftest import mini_suite_data


def test_valid_suite_loads(write_suite):
    suite = load_suite(write_suite(mini_suite_data()))
    assert [c.id for c in suite.cases] == ["t-s-1", "t-m-1"]
    multi = suite.case("t-m-1")
    assert multi.subjects[1].class_noun == "bear plushie"
    assert multi.boxes[1] == (0.4, 0.2, 0.95, 0.9)
    assert suite.counts() == {"single": 1, "multi": 1}


@pytest.mark.parametrize(
    "override, message",
    [
        ({"id": "t-s-1"}, "duplicate id"),
        ({"boxes": [[0.05, 0.2, 0.6, 0.9], [0.4, 0.2, 1.2, 0.9]]}, "outside [0, 1]"),
        ({"boxes": [[0.6, 0.2, 0.5, 0.9], [0.4, 0.2, 0.9, 0.9]]}, "x0 < x1"),
        ({"boxes": [[0.1, 0.1, 0.9, 0.9]]}, "needs 2 box"),
        ({"subjects": ["dog", "unicorn"]}, "unknown subject"),
        ({"predicate": "kissing"}, "predicate 'kissing' not found"),
        # an empty predicate is not a missing one (which a suite without `predicates:` extracts)
        ({"predicate": "", "prompt": "a dog, hugging a bear plushie"}, "predicate '' is empty"),
        ({"prompt": "a dog hugging a teddy"}, "class noun 'bear plushie'"),
        ({"kind": "pair"}, "kind"),
        ({"seed": -1}, "seed"),
        ({"id": "../escape"}, "id may hold only"),
        ({"subjects": ["dog"]}, "multi case has 2 subject"),
    ],
)
def test_bad_case_names_file_and_case(write_suite, override, message):
    path = write_suite(mini_suite_data(**override))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    text = str(err.value)
    assert message in text
    assert str(path) in text
    assert "case " in text


def test_missing_field_and_bad_yaml(write_suite, tmp_path):
    data = mini_suite_data()
    del data["cases"][1]["boxes"]
    with pytest.raises(SuiteError, match="t-m-1: missing field 'boxes'"):
        load_suite(write_suite(data))
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: [unclosed\n")
    with pytest.raises(SuiteError, match="not valid YAML"):
        load_suite(bad)


def test_misspelt_fields_are_refused_not_dropped(write_suite):
    """A typo'd key would silently lose its value (a case without a predicate changes CLIP-R)."""
    data = mini_suite_data()
    data["cases"][1]["predicat"] = data["cases"][1].pop("predicate")
    path = write_suite(data)
    with pytest.raises(SuiteError, match=r"t-m-1: unknown field 'predicat' \(did you mean 'predicate'\?\)") as err:
        load_suite(path)
    assert err.value.path == str(path) and "predicate_source" in err.value.hint
    data = mini_suite_data()
    data["subjects"]["dog"]["clas"] = data["subjects"]["dog"].pop("class")
    with pytest.raises(SuiteError, match="unknown field 'clas' \\(did you mean 'class'\\?\\)"):
        load_suite(write_suite(data))
    data = mini_suite_data()
    data["image_per_case"] = 2
    with pytest.raises(SuiteError, match="unknown field 'image_per_case' \\(did you mean 'images_per_case'\\?\\)"):
        load_suite(write_suite(data))


def test_unknown_suite_lists_known():
    from relationbench.errors import UserError

    with pytest.raises(UserError, match="unknown suite 'nope'"):
        load_suite("nope")


def test_personalized_prompt_puts_identifier_before_class(write_suite):
    suite = load_suite(write_suite(mini_suite_data()))
    case = suite.case("t-m-1")
    assert case.personalized_prompt(["sks", "zwx"]) == "a sks dog hugging a zwx bear plushie"
    same_class = mini_suite_data(subjects=["dog", "dog"], prompt="a dog hugging a dog")
    same_class["cases"][1]["predicate"] = "hugging"
    case = load_suite(write_suite(same_class, "same.yaml")).case("t-m-1")
    assert case.personalized_prompt(["sks", "zwx"]) == "a sks dog hugging a zwx dog"


def test_one_mention_for_two_subjects_refused(write_suite):
    data = mini_suite_data(subjects=["dog", "dog"], prompt="a dog hugging its friend")
    with pytest.raises(SuiteError, match="fewer separate class-noun mentions"):
        load_suite(write_suite(data))


def test_bad_version_and_missing_file(write_suite, tmp_path):
    from relationbench.errors import UserError

    data = mini_suite_data()
    data["version"] = "one"
    with pytest.raises(SuiteError, match="version must be an integer"):
        load_suite(write_suite(data))
    with pytest.raises(UserError, match="suite file not found"):
        load_suite(tmp_path / "absent.yaml")


def test_images_per_case(write_suite):
    data = mini_suite_data()
    assert load_suite(write_suite(data)).images_per_case == 1
    data["images_per_case"] = 4
    assert load_suite(write_suite(data, "four.yaml")).images_per_case == 4
    data["images_per_case"] = 0
    with pytest.raises(SuiteError, match="images_per_case must be a positive integer"):
        load_suite(write_suite(data, "zero.yaml"))
