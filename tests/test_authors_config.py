"""The RelationBooth authors' inference config (REFERENCE 7) imported as a one-case suite
(issue 12, item 5), and the relation of a predicate (predicates.base_verb)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from relationbench.cli import cli
from relationbench.runs import RunDir
from relationbench.suites import load_suite, prompts_dir
from relationbench.suites.predicates import RULE_BASED, base_verb, predicate_backend

from .score_runs import photo
from .test_resume import score, scores

LORA = "lora-weights/hug/pytorch_lora_weights.safetensors"


def config(**changes) -> dict:
    """The authors' two-object example, with our own file names."""
    cfg = {"lora_weights": LORA, "class_names": ["cat", "plushie bear"],
           "prompt": "A cat is hugging with a plushie bear.",
           "images_path": ["assets/cat.png", "assets/bear.png"],
           "boxes": [[[0.0, 0.2, 0.55, 0.85], [0.55, 0.26, 0.95, 0.9]]],
           "phrases": [["cat", "plushie bear"]]}
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if v is not None}


@pytest.fixture
def repo(tmp_path) -> Path:
    """The authors' layout: configs in config/, images in assets/ (beside config/)."""
    (tmp_path / "repo" / "config" / "assets").mkdir(parents=True)
    for j, name in enumerate(["cat.png", "bear.png"]):
        photo(10 + j, size=40).save(tmp_path / "repo" / "config" / "assets" / name)
    return tmp_path / "repo"


def write_config(folder: Path, cfg: dict, name: str = "example.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(*args: str):
    res = CliRunner().invoke(cli, list(args))
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def test_import_makes_a_one_case_suite(repo, tmp_path):
    cfg = write_config(repo / "config", config(seed=7, scale=0.4))
    out = repo / "config" / "hug.yaml"
    res = run("prompts", "import", str(cfg), "--out", str(out))
    assert res.exit_code == 0, res.output
    written = yaml.safe_load(out.read_text())
    # images beside the suite are written relative to it
    assert written["subjects"] == {"cat": {"class": "cat", "images": ["assets/cat.png"]},
                                   "plushie_bear": {"class": "plushie bear", "images": ["assets/bear.png"]}}
    model = predicate_backend("model")
    assert written["predicates"] == model
    suite = load_suite(out)
    assert suite.name == "hug" and len(suite.cases) == 1
    case = suite.cases[0]
    assert (case.kind, [s.name for s in case.subjects], case.prompt, case.seed) == (
        "multi", ["cat", "plushie_bear"], "A cat is hugging with a plushie bear.", 7)
    assert (case.predicate, case.predicate_source, case.relation) == ("hugging with", model, "hug with")
    assert case.boxes == ((0.0, 0.2, 0.55, 0.85), (0.55, 0.26, 0.95, 0.9))
    assert [s.images for s in case.subjects] == [(str(repo / "config" / "assets" / "cat.png"),),
                                                 (str(repo / "config" / "assets" / "bear.png"),)]
    out_text = " ".join(res.output.split())
    lora = repo / "config" / LORA
    assert f"`relbench lora import {lora} --relation 'hug with'`" in out_text
    assert "`--set scale=0.4`" in out_text and "phrases" not in out_text  # the phrases are the class names
    assert LORA.split("/")[-1] in suite.description


def test_authors_layout_with_image_root_and_defaults(repo, tmp_path):
    """Their paths are relative to their repo root: --image-root. Flat boxes, one subject, no
    seed (their 42), phrases other than the class names (a note); a suite written elsewhere
    names the images by absolute path."""
    (repo / "assets").mkdir()
    photo(3, size=40).save(repo / "assets" / "dog.png")
    cfg = write_config(repo / "config", config(class_names=["dog"], prompt="a dog riding a bicycle",
                                               images_path=["assets/dog.png"], boxes=[[0.1, 0.1, 0.9, 0.9]],
                                               phrases=[["puppy"]], lora_weights=None))
    out = tmp_path / "suites" / "ride.yaml"
    out.parent.mkdir()
    res = run("prompts", "import", str(cfg), "--out", str(out))
    assert res.exit_code == 2 and "images_path[0] ('dog')" in res.output and "--image-root" in res.output
    assert not out.exists()
    res = run("prompts", "import", str(cfg), "--out", str(out), "--image-root", str(repo))
    assert res.exit_code == 0, res.output
    case = load_suite(out).cases[0]
    assert (case.kind, case.seed, case.predicate, case.relation, case.boxes) == (
        "single", 42, "riding", "ride", ((0.1, 0.1, 0.9, 0.9),))
    assert yaml.safe_load(out.read_text())["subjects"]["dog"]["images"] == [str(repo / "assets" / "dog.png")]
    assert "phrases ['puppy'] not used" in res.output and "lora import" not in res.output


@pytest.mark.parametrize("changes, message", [
    ({"images_path": ["assets/cat.png", "assets/nope.png"]}, "images_path[1] ('plushie bear'): no image file"),
    ({"images_path": ["assets/cat.png"]}, "one image file per class name (2)"),
    ({"boxes": [[[0.0, 0.2, 0.55, 0.85]]]}, "boxes: 1 box(es) for 2 class_names"),
    ({"boxes": [[0.0, 0.2, 0.55, 0.85], [0.55, 0.26, 1.5, 0.9]]}, "lies outside [0, 1]"),
    ({"class_names": ["dog", "cat", "plushie bear"],
      "images_path": ["assets/cat.png"] * 3}, "a relationbench case has 1 or 2 subjects, this config has 3"),
    ({"image_path": ["assets/cat.png"]}, "unknown field 'image_path' (did you mean 'images_path'?)"),
    ({"prompt": "A cat and a plushie bear."}, "no relation predicate found"),
    ({"prompt": "A cat is hugging a teddy."}, "'plushie bear' of subject 'plushie_bear' not found in prompt"),
    ({"seed": "42"}, "seed must be an integer"),
])
def test_bad_configs_are_refused_naming_the_file(repo, changes, message):
    cfg = write_config(repo / "config", config(**changes))
    out = repo / "out.yaml"
    res = run("prompts", "import", str(cfg), "--out", str(out))
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert message in text and str(cfg) in text
    assert not out.exists()


def test_format_is_told_by_the_file(repo, tmp_path):
    """YAML: the authors' config; JSON with class_names too; case lists keep their options."""
    as_json = repo / "config" / "example.json"
    as_json.write_text(json.dumps(config()))
    out = tmp_path / "from-json.yaml"
    assert run("prompts", "import", str(as_json), "--out", str(out)).exit_code == 0
    assert load_suite(out).cases[0].relation == "hug with"
    res = run("prompts", "import", str(as_json), "--out", str(tmp_path / "x.yaml"), "--map", "prompt=text")
    assert res.exit_code == 2 and "--map" in res.output
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "a dog riding a bicycle", "subjects": ["dog"], "predicate": "riding"}]))
    res = run("prompts", "import", str(rows), "--out", str(tmp_path / "y.yaml"), "--image-root", str(repo))
    assert res.exit_code == 2 and "--image-root" in res.output
    res = run("prompts", "import", str(rows), "--out", str(tmp_path / "rows-suite.yaml"))
    assert res.exit_code == 0, res.output
    assert load_suite(tmp_path / "rows-suite.yaml").name == "rows-suite"  # the name from --out


def test_import_generate_score(repo, tmp_path, monkeypatch, one_thread):
    """import -> generate --method msdiffusion --backbone tiny -> score: the manifest's
    references are the config's files, and CLIP-I / DINO are scored against them."""
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "empty-data-root"))
    cfg = write_config(repo / "config", config())
    suite = tmp_path / "hug.yaml"
    assert run("prompts", "import", str(cfg), "--out", str(suite)).exit_code == 0
    out = tmp_path / "results" / "hug"
    res = run("generate", "--method", "msdiffusion", "--backbone", "tiny", "--quiet",
              "--suite", str(suite), "--out", str(out))
    assert res.exit_code == 0, res.output
    (record,) = RunDir(out).records()
    assert record["case_id"] == "hug-0000"
    assert record["references"] == [str(repo / "config" / "assets" / n) for n in ("cat.png", "bear.png")]
    assert "1 image(s) scored" in score(out).output
    row = scores(out).iloc[0]
    assert (row["subject_1"], row["subject_2"], row["predicate"]) == ("cat", "plushie_bear", "hugging with")
    assert row[["clip_i_1", "clip_i_2", "dino_1", "dino_2"]].notna().all()


@pytest.mark.parametrize("backend", ["model", RULE_BASED])
def test_base_verb_gives_relationbench_relations(backend):
    """Every relation of our suite from its -ing form (the suite file lists both), and the
    third-person forms of the extractor's rules."""
    relations = load_suite(prompts_dir() / "relationbench.yaml").relations
    assert [base_verb(r["ing"], backend=backend) for r in relations] == [r["verb"] for r in relations]
    assert [base_verb(p, backend=backend) for p in ("sits on", "carries", "watches", "Hugging with", "lying next to")] \
        == ["sit on", "carry", "watch", "hug with", "lie next to"]


def test_base_verb_of_unknown_verbs():
    """A verb outside the lexicon: the model's lemma; rule-based, the spelling rules' guess."""
    assert base_verb("smiling at", backend="model") == "smile at"
    assert base_verb("smiling at", backend=RULE_BASED) == "smil at"
    assert [base_verb(w, backend=RULE_BASED) for w in ("stopping", "sniffing", "dying", "opening")] == \
        ["stop", "sniff", "die", "open"]
