"""The metric registry, `relbench metrics`, and the score driver's family files with fake scorers:
rows and values, caching by content, stale rows, the extended leaderboard and compare."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from relationbench import score as score_module
from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.metrics.registry import METRICS, parse_metrics
from relationbench.report.aggregate import compare_runs
from relationbench.runs import FAMILY_KEY_COLUMNS, RunDir

from .score_runs import make_references, make_run
from .test_leaderboard import md_table

CASES = ["rb-s-001", "rb-s-002", "rb-m-001"]


# -- the registry ---------------------------------------------------------------------------------
def test_parse_metrics():
    assert [m.name for m in parse_metrics("all")] == ["clip_t", "clip_r", "clip_i", "dino", "vqa", "grounded"]
    assert [m.name for m in parse_metrics("vqa, clip_t")] == ["clip_t", "vqa"]  # registry order
    with pytest.raises(UserError, match="'nope'") as err:
        parse_metrics("clip_t,nope")
    assert "grounded" in err.value.hint
    assert METRICS["grounded"].columns[3].name == "confused" and METRICS["grounded"].columns[3].direction == "lower"


def test_unknown_metric_exits_2(tmp_path):
    res = CliRunner().invoke(cli, ["score", "--metrics", "clip_t,vqascore", str(tmp_path)])
    assert res.exit_code == 2 and "unknown metric(s): 'vqascore'" in res.output


def test_metrics_command_lists_every_metric():
    res = CliRunner().invoke(cli, ["metrics"])
    assert res.exit_code == 0, res.output
    lines = {line.split()[0]: line for line in res.output.splitlines()[2:] if line.strip() and line[0] != "\n"}
    for name in METRICS:
        assert name in lines
    assert "confused ↓" in lines["grounded"] and "layout_iou ↑" in lines["grounded"]
    assert "vqa_t ↑, vqa_r ↑" in lines["vqa"] and "detector" in lines["grounded"]
    assert "clip_i_g_1" not in res.output.split("families:")[0]  # per-subject detail is not a table column


# -- fake family scorers --------------------------------------------------------------------------
def sha_value(sha: str, salt: str) -> float:
    """A deterministic value in [0, 1) of an image hash."""
    return int(hashlib.sha256(f"{sha}:{salt}".encode()).hexdigest()[:8], 16) / 2**32


class FakeScorer:
    def __init__(self, family: str, calls: list):
        self.family, self.id, self.calls = family, f"fake-{family}", calls
        self.columns = tuple(c.name for m in METRICS.values() if m.family == family for c in m.columns)

    def score(self, items):
        self.calls.append([it.sha256 for it in items])
        for it in items:  # the driver hands over the decoded image of the file it hashed
            assert isinstance(it.image, Image.Image) and it.image.mode == "RGB" and it.text
        return [{c: sha_value(it.sha256, c) for c in self.columns} for it in items]


@pytest.fixture
def fakes(monkeypatch):
    calls = {"vqa": [], "grounded": []}
    for family in calls:
        source = score_module.FamilySource(
            model_id=lambda backbone, opts, dtype, f=family: f"fake-{f}",
            load=lambda *args, f=family: FakeScorer(f, calls[f]),
            encoders=False,
        )
        monkeypatch.setitem(score_module.FAMILY_SOURCES, family, source)
    return calls


@pytest.fixture
def env(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("RELBENCH_DATA", str(data))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    make_references(data, CASES)
    return tmp_path / "results"


def run_score(*args):
    res = CliRunner().invoke(cli, ["score", "--quiet", "--bootstrap", "50", *map(str, args)])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert res.exit_code == 0, res.output
    return res


def family_rows(run, family) -> pd.DataFrame:
    return pd.read_csv(run / f"scores-{family}.csv", keep_default_na=False, na_values=[""])


def expected_rows(run, family) -> dict[tuple[str, int], dict]:
    """What the fake gives each current image of the run, from the files on disk."""
    out = {}
    for (case_id, index), line in RunDir(run).latest().items():
        sha = hashlib.sha256((run / line["path"]).read_bytes()).hexdigest()
        columns = FakeScorer(family, []).columns
        out[(case_id, index)] = {"image_sha256": sha, **{c: sha_value(sha, c) for c in columns}}
    return out


def test_family_files_rows_values_and_scoring_twice(env, fakes):
    run = make_run(env, "alpha@tiny", CASES, seed=1)
    res = run_score("--metrics", "vqa,grounded", run)
    assert "6 image(s) scored" in res.output and "vqa 6, grounded 6" in res.output
    assert not (run / "scores.csv").exists()  # the paper family runs only when named
    assert sum(map(len, fakes["vqa"])) == 6 and sum(map(len, fakes["grounded"])) == 6
    for family in ("vqa", "grounded"):
        df = family_rows(run, family)
        assert list(df.columns) == [*FAMILY_KEY_COLUMNS, *FakeScorer(family, []).columns]
        assert set(df["model"]) == {f"fake-{family}"} and len(df) == 6
        expected = expected_rows(run, family)
        for row in df.to_dict("records"):
            want = expected[(row["case_id"], row["index"])]
            assert row["image_sha256"] == want["image_sha256"]
            assert row["kind"] == ("multi" if row["case_id"].startswith("rb-m") else "single")
            for column in FakeScorer(family, []).columns:
                assert row[column] == pytest.approx(want[column], abs=1e-6)
    before = {f: (run / f"scores-{f}.csv").read_bytes() for f in fakes}
    fakes["vqa"].clear()
    fakes["grounded"].clear()
    res = run_score("--metrics", "vqa,grounded", run)
    assert "0 image(s) scored, 6 already scored" in res.output
    assert fakes == {"vqa": [], "grounded": []}  # nothing loaded, nothing computed
    assert {f: (run / f"scores-{f}.csv").read_bytes() for f in fakes} == before
    # rows lost (the file deleted): the values come back from the cache, the scorer is not called
    (run / "scores-vqa.csv").unlink()
    assert "6 image(s) scored" in run_score("--metrics", "vqa", run).output
    assert fakes["vqa"] == [] and (run / "scores-vqa.csv").read_bytes() == before["vqa"]


def test_a_regenerated_image_is_rescored_and_its_stale_row_dropped(env, fakes):
    run = make_run(env, "alpha@tiny", CASES, seed=1)
    run_score("--metrics", "vqa", run)
    old_sha = family_rows(run, "vqa").set_index(["case_id", "index"]).loc[("rb-s-002", 1), "image_sha256"]
    rd = RunDir(run)
    rd.append([{**rd.latest()[("rb-s-002", 1)], **rd.save_image("rb-s-002", 1, Image.new("RGB", (64, 64), (9, 80, 3)))}])
    fakes["vqa"].clear()
    res = run_score("--metrics", "vqa", run)
    assert "1 image(s) scored" in res.output and "dropped 1 score row(s)" in res.output
    new_sha = hashlib.sha256((run / "images/rb-s-002/1.png").read_bytes()).hexdigest()
    assert fakes["vqa"] == [[new_sha]]
    df = family_rows(run, "vqa")
    assert len(df) == 6 and old_sha not in set(df["image_sha256"]) and not df.duplicated(["case_id", "index"]).any()
    row = df.set_index(["case_id", "index"]).loc[("rb-s-002", 1)]
    assert row["image_sha256"] == new_sha and row["vqa_t"] == pytest.approx(sha_value(new_sha, "vqa_t"), abs=1e-6)


def test_a_stale_row_of_a_family_not_scored_now_is_dropped_too(env, fakes):
    """Scoring one family after a regeneration drops the regenerated image's rows from the other
    families' files as well (the leaderboard summarizes every file and refuses a stale row)."""
    run = make_run(env, "alpha@tiny", CASES, seed=1)
    run_score("--metrics", "clip_t,vqa", run)
    paper_before = pd.read_csv(run / "scores.csv", keep_default_na=False)
    rd = RunDir(run)
    rd.append([{**rd.latest()[("rb-s-002", 1)], **rd.save_image("rb-s-002", 1, Image.new("RGB", (64, 64), (9, 80, 3)))}])
    res = run_score("--metrics", "vqa", run)
    assert "1 image(s) scored" in res.output and "dropped 2 score row(s)" in res.output
    paper = pd.read_csv(run / "scores.csv", keep_default_na=False)
    kept = paper_before[~((paper_before["case_id"] == "rb-s-002") & (paper_before["index"] == 1))]
    assert len(paper) == 5
    pd.testing.assert_frame_equal(paper.reset_index(drop=True), kept.reset_index(drop=True))
    board = pd.read_csv(run / "leaderboard.csv")
    n = board[(board["kind"] == "all") & (board["metric"] == "clip_t")]["n_images"].item()
    assert n == 5  # the paper family counts the images it still has a current row of
    assert not (run / "scores-grounded.csv").exists()  # no file is made for a family never scored


def hand_case_means(run, family, column) -> dict[str, dict[str, float]]:
    """kind -> case -> mean over the case's images, by plain loops over the csv."""
    sums: dict[str, list] = {}
    kinds = {}
    for row in family_rows(run, family).to_dict("records"):
        sums.setdefault(row["case_id"], []).append(row[column])
        kinds[row["case_id"]] = row["kind"]
    out: dict[str, dict[str, float]] = {}
    for case, values in sums.items():
        out.setdefault(kinds[case], {})[case] = sum(values) / len(values)
    return out


def test_score_all_writes_every_family_and_the_extended_table(env, fakes):
    runs = [make_run(env, f"{name}@tiny", CASES, seed=n) for n, name in enumerate(("alpha", "beta", "gamma"))]
    run_score("--metrics", "all", env)
    for run in runs:
        assert {p.name for p in run.glob("scores*.csv")} == {"scores.csv", "scores-vqa.csv", "scores-grounded.csv"}
    md = (env / "leaderboard.md").read_text(encoding="utf-8")
    assert "RelationBench (Table 1)" in md  # the paper's table as before
    table = md_table(md, "Extended: relationbench, single-object")
    header = list(table["alpha@tiny"])
    assert header[:4] == ["CLIP-T ↑", "CLIP-R ↑", "CLIP-I ↑", "DINO ↑"]
    assert {"VQA-T ↑", "VQA-R ↑", "CLIP-I-G ↑", "Confused ↓", "Layout IoU ↑"} <= set(header)
    # values: the mean over cases of the per-case means, three decimals, with an interval
    for column, title in (("vqa_t", "VQA-T ↑"), ("confused", "Confused ↓")):
        family = "vqa" if column == "vqa_t" else "grounded"
        means = {}
        for run in runs:
            cases = hand_case_means(run, family, column)["single"]
            means[run.name] = sum(cases.values()) / len(cases)
            cell = table[run.name][title]
            assert re.fullmatch(r"(\*\*|<u>)?[0-9.]+(\*\*|</u>)? ± [0-9.]+", cell), cell
            assert float(re.sub(r"[*<u>/]", "", cell.split(" ± ")[0])) == pytest.approx(means[run.name], abs=5e-4)
        ranked = sorted(means, key=means.get, reverse=column != "confused")  # lower is better for confused
        assert table[ranked[0]][title].startswith("**") and table[ranked[1]][title].startswith("<u>")
        assert not table[ranked[2]][title].startswith(("**", "<u>"))
    tex = (env / "leaderboard.tex").read_text(encoding="utf-8")
    assert "Confused $\\downarrow$" in tex
    board = pd.read_csv(env / "leaderboard.csv", keep_default_na=False)
    assert set(board.loc[board["metric"] == "vqa_t", "model"]) == {"fake-vqa"}
    assert "clip_i_g_1" not in set(board["metric"])


def test_extended_table_leaves_out_columns_no_run_has(env, fakes):
    run = make_run(env, "alpha@tiny", CASES, seed=1)
    run_score("--metrics", "vqa", run)
    md = (run / "leaderboard.md").read_text(encoding="utf-8")
    assert list(md_table(md, "Extended: relationbench, multi-object")["alpha@tiny"]) == ["VQA-T ↑", "VQA-R ↑"]


def test_compare_on_a_family_column(env, fakes):
    a = make_run(env, "alpha@tiny", CASES, seed=1)
    b = make_run(env, "beta@tiny", CASES, seed=2)
    run_score("--metrics", "vqa,grounded", env)
    out = compare_runs(a, b, n_boot=50)
    row = out[(out["kind"] == "all") & (out["metric"] == "vqa_r")].iloc[0]
    ca, cb = (hand_case_means(r, "vqa", "vqa_r") for r in (a, b))
    diffs = [ca[k][c] - cb[k][c] for k in ca for c in ca[k]]
    assert row["n_cases"] == 3 and row["diff"] == pytest.approx(sum(diffs) / 3, abs=1e-6)
    assert row["direction"] == "higher" and row["scored_with"] == "fake-vqa"
    assert out[out["metric"] == "confused"]["direction"].eq("lower").all()
    res = CliRunner().invoke(cli, ["compare", str(a), str(b), "--bootstrap", "50"])
    assert res.exit_code == 0 and "vqa_t" in res.output and "lower" in res.output
    assert np.isfinite(out[out["metric"] == "vqa_t"]["diff"]).all()


def test_family_models_take_their_own_dtype():
    """--model-dtype sets the VLM's and the detector's precision (their ids say it); --dtype stays
    CLIP's and DINO's, also inside the grounded id."""
    from relationbench.backbones import get_backbone
    from relationbench.score import ScoreOptions, _grounded_id, _vqa_id

    tiny = get_backbone("tiny")
    auto = ScoreOptions(paths=[], device="cpu")  # auto on the CPU: fp32, no suffix
    assert _vqa_id(tiny, auto, "fp32").split(" + ")[0] == "tiny:qwen2.5-vl-seed0"
    half = ScoreOptions(paths=[], device="cpu", model_dtype="bf16")
    assert _vqa_id(tiny, half, "fp32").split(" + ")[0] == "tiny:qwen2.5-vl-seed0@bf16"
    detector, clip, dino, protocol, _ = _grounded_id(tiny, half, "fp32").split(" + ")
    assert detector.endswith("@bf16") and not clip.endswith("@bf16") and not dino.endswith("@bf16")
    assert protocol == "paper"


def test_family_score_groups_change_with_the_scorer_settings(monkeypatch):
    """Values computed with another VQA question, detector threshold or crop margin are never
    taken as done: the settings are part of the family's score group (its model id)."""
    import dataclasses

    import relationbench.metrics.detector as detector
    import relationbench.metrics.grounded as grounded
    import relationbench.metrics.vqa as vqa
    from relationbench.backbones import get_backbone
    from relationbench.score import ScoreOptions, _grounded_id, _vqa_id, settings_tag

    tiny, opts = get_backbone("tiny"), ScoreOptions(paths=[], device="cpu")
    vqa_before, grounded_before = _vqa_id(tiny, opts, "fp32"), _grounded_id(tiny, opts, "fp32")
    assert vqa_before == f"tiny:qwen2.5-vl-seed0 + {settings_tag(vqa.VQASettings())}"
    # speed settings do not count
    assert settings_tag(vqa.VQASettings()) == settings_tag(vqa.VQASettings(batch_size=1, workers=0))
    for module, cls, change in ((vqa, "VQASettings", {"question": "Is it {text}?"}),
                                (detector, "DetectorSettings", {"threshold": 0.2}),
                                (grounded, "GroundedSettings", {"margin": 0.1})):
        with monkeypatch.context() as m:
            original = getattr(module, cls)
            m.setattr(module, cls, lambda original=original, change=change: dataclasses.replace(original(), **change))
            after = (_vqa_id(tiny, opts, "fp32"), _grounded_id(tiny, opts, "fp32"))
        assert after != (vqa_before, grounded_before)
        assert (after[0] == vqa_before) == (cls != "VQASettings")


def test_family_scorers_see_whether_the_run_took_the_case_boxes(env, fakes, monkeypatch):
    """ImageItem.uses_layout (grounded's layout IoU and box assignment) comes from the adapter
    run.json records: msdiffusion and relationbooth take the case boxes, sdxl does not; the
    scorer gets each case's scoring text and predicate."""
    import json

    from relationbench.suites import load_suite

    adapters = {"ms": "relationbench.methods.msdiffusion:MSDiffusionMethod",
                "rb": "relationbench.methods.relationbooth:RelationBoothMethod",
                "plain": "relationbench.methods.sdxl:SDXLMethod"}
    runs = {}
    for n, (name, adapter) in enumerate(adapters.items()):
        runs[name] = make_run(env, f"{name}@tiny", ["rb-m-001"], per_case=1, seed=n)
        meta = json.loads((runs[name] / "run.json").read_text())
        meta["method"]["adapter"] = adapter
        (runs[name] / "run.json").write_text(json.dumps(meta))
    seen = {}
    real = FakeScorer.score

    def recording(self, items):
        seen.update({it.sha256: (it.uses_layout, it.text, it.predicate) for it in items})
        return real(self, items)

    monkeypatch.setattr(FakeScorer, "score", recording)
    run_score("--metrics", "grounded", env)
    case = load_suite("relationbench").case("rb-m-001")
    got = {name: seen[family_rows(run, "grounded")["image_sha256"].item()] for name, run in runs.items()}
    assert got == {"ms": (True, case.prompt, case.predicate), "rb": (True, case.prompt, case.predicate),
                   "plain": (False, case.prompt, case.predicate)}
