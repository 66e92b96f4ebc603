"""Case-level aggregation and bootstrap CIs: checked against sums done by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from relationbench.errors import UserError
from relationbench.report.aggregate import (
    SUMMARY_COLUMNS,
    bootstrap_ci,
    case_means,
    compare,
    load_run_scores,
    load_scores,
    summarize,
)
from relationbench.runs import SCORE_COLUMNS

PAPER = ("paper", "open_clip:ViT-B-32/openai", "dinov2:vits14")
TINY = ("paper", "tiny:clip-seed0", "tiny:dino-seed0")


def image_row(case_id: str, index: int, kind: str = "single", group=PAPER, **metrics) -> dict:
    row = {c: "" for c in SCORE_COLUMNS}
    row.update(case_id=case_id, index=index, kind=kind, subject_1="dog",
               subject_2="bear" if kind == "multi" else "", text="a dog", predicate="riding", predicate_source="suite",
               protocol=group[0], clip_encoder=group[1], dino_encoder=group[2], image_sha256="0" * 64)
    for m in ("clip_t", "clip_r", "clip_i", "dino", "clip_i_1", "clip_i_2", "dino_1", "dino_2"):
        row[m] = float(metrics.get(m, math.nan))
    return row


def frame(rows: list[dict], run: str = "r1", suite: str = "relationbench") -> pd.DataFrame:
    df = pd.DataFrame(rows)
    return df.assign(run=run, run_dir=f"results/{suite}/{run}", suite=suite, method="sdxl", backbone="tiny")


def cell(summary: pd.DataFrame, kind: str, metric: str, run: str = "r1") -> pd.Series:
    hit = summary[(summary["run"] == run) & (summary["kind"] == kind) & (summary["metric"] == metric)]
    assert len(hit) == 1
    return hit.iloc[0]


def loop_bootstrap(values, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """The textbook bootstrap, one resample at a time, drawing from the same generator."""
    x = [v for v in values if not math.isnan(v)]
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        picks = rng.integers(0, len(x), size=len(x))
        means.append(sum(x[i] for i in picks) / len(x))
    alpha = (1 - level) / 2
    return float(np.percentile(means, 100 * alpha)), float(np.percentile(means, 100 * (1 - alpha)))


# -- bootstrap_ci -----------------------------------------------------------------------------
def test_bootstrap_ci_matches_plain_loop():
    values = [0.31, 0.27, math.nan, 0.35, 0.29, 0.33, 0.24, 0.30]
    for seed, level in ((0, 0.95), (7, 0.9)):
        assert bootstrap_ci(values, n_boot=300, seed=seed, level=level) == pytest.approx(
            loop_bootstrap(values, 300, seed, level), abs=1e-12)


def test_bootstrap_ci_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small, large = rng.normal(30, 5, 10), rng.normal(30, 5, 400)
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_bootstrap_ci_needs_two_values_and_is_deterministic():
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, math.nan]))
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([1.0, 2.0, 4.0], seed=3) == bootstrap_ci([1.0, 2.0, 4.0], seed=3)


# -- case_means / summarize -------------------------------------------------------------------
def two_kind_run() -> pd.DataFrame:
    return frame([
        # s1: three images, s2: one image; a mean over images would weigh s1 three times
        image_row("s1", 0, clip_t=10, clip_r=1, clip_i=50, dino=40),
        image_row("s1", 1, clip_t=20, clip_r=3, clip_i=60, dino=math.nan),
        image_row("s1", 2, clip_t=30, clip_r=5, clip_i=70, dino=60),
        image_row("s2", 0, clip_t=40, clip_i=80, dino=70),  # no predicate: clip_r missing
        image_row("m1", 0, "multi", clip_t=12, clip_r=2, clip_i=30, dino=20),
        image_row("m1", 1, "multi", clip_t=14, clip_r=4, clip_i=32, dino=22),
        image_row("m2", 0, "multi", clip_t=22, clip_r=6, clip_i=40, dino=30),
    ])


def test_case_means_average_over_each_case_images():
    cases = case_means(two_kind_run()).set_index("case_id")
    assert cases.loc["s1", "clip_t"] == pytest.approx(20.0)
    assert cases.loc["s1", "dino"] == pytest.approx(50.0)  # NaN image skipped
    assert math.isnan(cases.loc["s2", "clip_r"])
    assert cases["n_images"].to_dict() == {"m1": 2, "m2": 1, "s1": 3, "s2": 1}


def test_summarize_means_are_over_cases():
    summary = summarize(two_kind_run(), n_boot=200)
    assert list(summary.columns) == list(SUMMARY_COLUMNS)
    single_t = cell(summary, "single", "clip_t")
    assert single_t["mean"] == pytest.approx((20 + 40) / 2)  # not (10+20+30+40)/4 = 25
    assert (single_t["n_cases"], single_t["n_images"]) == (2, 4)
    multi_t = cell(summary, "multi", "clip_t")
    assert multi_t["mean"] == pytest.approx((13 + 22) / 2)
    assert (multi_t["n_cases"], multi_t["n_images"]) == (2, 3)
    all_t = cell(summary, "all", "clip_t")
    assert all_t["mean"] == pytest.approx((20 + 40 + 13 + 22) / 4)
    assert (all_t["n_cases"], all_t["n_images"]) == (4, 7)
    assert all_t["ci_low"] <= all_t["mean"] <= all_t["ci_high"]


def test_summarize_drops_nan_cases_and_images():
    summary = summarize(two_kind_run(), n_boot=200)
    single_r = cell(summary, "single", "clip_r")
    assert single_r["mean"] == pytest.approx(3.0)  # only s1 has a predicate
    assert (single_r["n_cases"], single_r["n_images"]) == (1, 3)
    assert math.isnan(single_r["ci_low"]) and math.isnan(single_r["ci_high"])  # one case: no CI
    single_dino = cell(summary, "single", "dino")
    assert single_dino["mean"] == pytest.approx((50 + 70) / 2)
    assert single_dino["n_images"] == 3
    all_r = cell(summary, "all", "clip_r")
    assert all_r["mean"] == pytest.approx((3 + 3 + 6) / 3) and all_r["n_cases"] == 3


def test_summarize_keeps_runs_and_groups_apart_and_is_deterministic():
    a = two_kind_run()
    b = frame([image_row("s1", 0, group=TINY, clip_t=1.0), image_row("s2", 0, group=TINY, clip_t=3.0)])
    c = frame([image_row("s1", 0, clip_t=5.0), image_row("s2", 0, clip_t=7.0)], run="r2")
    df = pd.concat([a, b, c], ignore_index=True)
    summary = summarize(df, n_boot=200)
    t = summary[(summary["kind"] == "single") & (summary["metric"] == "clip_t")]
    got = {(r.run, r.clip_encoder): r.mean for r in t.itertuples()}
    assert got == {("r1", PAPER[1]): 30.0, ("r1", TINY[1]): 2.0, ("r2", PAPER[1]): 6.0}
    assert set(summary[summary["run"] == "r2"]["kind"]) == {"single", "all"}
    pd.testing.assert_frame_equal(summary, summarize(df.sample(frac=1, random_state=3), n_boot=200))


def test_summarize_empty():
    assert list(summarize(frame([]).iloc[:0]).columns) == list(SUMMARY_COLUMNS)


# -- compare ----------------------------------------------------------------------------------
def paired_runs(shift: float, n: int = 30) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(5)
    base = rng.normal(30, 4, n)
    noise = rng.normal(0, 0.5, n)
    a = [image_row(f"c{i}", 0, "single" if i % 2 else "multi", clip_t=base[i] + shift + noise[i])
         for i in range(n)]
    b = [image_row(f"c{i}", 0, "single" if i % 2 else "multi", clip_t=base[i]) for i in range(n)]
    return frame(a, run="a"), frame(b, run="b")


def test_compare_diff_is_mean_of_paired_differences():
    a = frame([image_row("c1", 0, clip_t=10), image_row("c1", 1, clip_t=20),
               image_row("c2", 0, clip_t=30), image_row("c3", 0, clip_t=99)], run="a")
    b = frame([image_row("c1", 0, clip_t=12), image_row("c2", 0, clip_t=20),
               image_row("c4", 0, clip_t=0)], run="b")
    out = compare(a, b, n_boot=200)
    assert list(out.columns) == ["kind", "metric", "n_cases", "mean_a", "mean_b", "diff", "ci_low", "ci_high"]
    row = out[(out["kind"] == "all") & (out["metric"] == "clip_t")].iloc[0]
    # only c1 and c2 are shared; c1's a-side is a mean over its two images
    assert row["n_cases"] == 2
    assert row["diff"] == pytest.approx(((15 - 12) + (30 - 20)) / 2)
    assert (row["mean_a"], row["mean_b"]) == pytest.approx((22.5, 16.0))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(bootstrap_ci([3.0, 10.0], n_boot=200))
    assert out[out["metric"] == "clip_r"]["n_cases"].eq(0).all()


def test_compare_ci_excludes_zero_for_a_clear_shift():
    a, b = paired_runs(shift=1.0)
    out = compare(a, b, n_boot=500).set_index(["kind", "metric"])
    for kind in ("single", "multi", "all"):
        row = out.loc[(kind, "clip_t")]
        assert 0 < row["ci_low"] < row["diff"] < row["ci_high"]
    assert out.loc[("all", "clip_t"), "n_cases"] == 30


def test_compare_identical_runs_ci_contains_zero():
    a, _ = paired_runs(shift=0.0)
    out = compare(a, a.assign(run="b"), n_boot=200)
    row = out[(out["kind"] == "all") & (out["metric"] == "clip_t")].iloc[0]
    assert row["diff"] == 0 and row["ci_low"] <= 0 <= row["ci_high"]


def test_compare_uses_shared_groups_only():
    a = frame([image_row("c1", 0, clip_t=5), image_row("c2", 0, clip_t=6),
               image_row("c1", 0, group=TINY, clip_t=1), image_row("c2", 0, group=TINY, clip_t=2)], run="a")
    b = frame([image_row("c1", 0, group=TINY, clip_t=0), image_row("c2", 0, group=TINY, clip_t=0)], run="b")
    out = compare(a, b, n_boot=100)
    assert "clip_encoder" not in out.columns  # one shared group
    assert out[(out["kind"] == "all") & (out["metric"] == "clip_t")]["diff"].iloc[0] == pytest.approx(1.5)
    both = compare(a, a.assign(run="b"), n_boot=100)
    assert set(both["clip_encoder"]) == {PAPER[1], TINY[1]}


def test_compare_refuses_disjoint_groups_and_cases():
    a = frame([image_row("c1", 0, clip_t=5)], run="a")
    with pytest.raises(UserError, match="share no") as err:
        compare(a, frame([image_row("c1", 0, group=TINY, clip_t=5)], run="b"))
    assert err.value.hint
    with pytest.raises(UserError, match="no case in common"):
        compare(a, frame([image_row("c9", 0, clip_t=5)], run="b"))


# -- loading ----------------------------------------------------------------------------------
def write_run(root, name: str, suite: str, rows: list[dict]):
    run_dir = root / suite / name
    run_dir.mkdir(parents=True)
    meta = {"suite": {"name": suite}, "method": {"name": "sdxl"}, "backbone": {"name": "tiny"}}
    (run_dir / "run.json").write_text(json.dumps(meta))
    pd.DataFrame(rows, columns=list(SCORE_COLUMNS)).to_csv(run_dir / "scores.csv", index=False)
    return run_dir


def test_load_run_scores_reads_csv_and_run_json(tmp_path):
    rows = [image_row("s1", 0, clip_t=31.5, clip_i=80.0, dino=60.0),
            image_row("m1", 1, "multi", clip_t=28.0, clip_r=22.0, clip_i_2=70.0)]
    rows[0]["predicate"] = "NA"  # a string that pandas would otherwise read as missing
    run_dir = write_run(tmp_path, "sdxl@tiny", "relationbench", rows)
    df = load_run_scores(run_dir)
    assert list(df.columns) == [*SCORE_COLUMNS, "run", "run_dir", "suite", "method", "backbone"]
    assert df["run"].tolist() == ["sdxl@tiny"] * 2
    assert set(df["suite"]) == {"relationbench"} and set(df["method"]) == {"sdxl"}
    assert df["predicate"].tolist() == ["NA", "riding"]
    assert df["subject_2"].tolist() == ["", "bear"]
    assert df["clip_t"].tolist() == [31.5, 28.0] and math.isnan(df["clip_r"].iloc[0])
    assert df["index"].tolist() == [0, 1]
    assert summarize(df, n_boot=50)["mean"].notna().any()


def test_load_run_scores_without_scores_is_empty(tmp_path):
    df = load_run_scores(tmp_path)
    assert df.empty and "run" in df.columns and "clip_t" in df.columns


def test_load_run_scores_without_run_json(tmp_path):
    run_dir = write_run(tmp_path, "x", "dreambench", [image_row("s1", 0, clip_t=1.0)])
    (run_dir / "run.json").unlink()
    with pytest.raises(UserError, match="run.json"):
        load_run_scores(run_dir)


def test_load_scores_concatenates_and_refuses_clashing_labels(tmp_path):
    a = write_run(tmp_path, "sdxl@tiny", "relationbench", [image_row("s1", 0, clip_t=1.0)])
    b = write_run(tmp_path, "sdxl@tiny", "dreambench", [image_row("d1", 0, clip_t=2.0)])
    df = load_scores([a, b, tmp_path / "missing"])
    assert sorted(df["suite"]) == ["dreambench", "relationbench"]
    clash = write_run(tmp_path / "other", "sdxl@tiny", "relationbench", [image_row("s1", 0, clip_t=3.0)])
    with pytest.raises(UserError, match="share the label"):
        load_scores([a, clash])


def test_run_labels_keep_runs_with_other_load_time_settings_apart(tmp_path):
    """A run's leaderboard row: its folder name, plus each load-time setting (run.json's
    method.run.label) the name does not say as a whole `key=value`. Two runs of one folder name
    but other settings are two rows; two runs of one label are refused, never merged."""
    from relationbench.report.aggregate import run_label

    def labelled(root, name, value, clip_t):
        run_dir = write_run(root, name, "relationbench", [image_row("s1", 0, clip_t=clip_t)])
        meta = json.loads((run_dir / "run.json").read_text())
        meta["method"]["run"] = {"label": {"local_encoder": value}}
        (run_dir / "run.json").write_text(json.dumps(meta))
        return run_dir

    stock = labelled(tmp_path / "a", "rb@tiny", "stock", 1.0)
    clipself = labelled(tmp_path / "b", "rb@tiny", "clipself", 3.0)
    assert run_label(stock) == "rb@tiny [local_encoder=stock]"
    assert run_label(labelled(tmp_path / "c", "rb[local_encoder=stock]@tiny", "stock", 0.0)) == \
        "rb[local_encoder=stock]@tiny"
    # a longer value that starts with this one does not say it
    assert run_label(labelled(tmp_path / "d", "rb[local_encoder=stock2]", "stock", 0.0)) == \
        "rb[local_encoder=stock2] [local_encoder=stock]"
    df = load_scores([stock, clipself])
    assert dict(zip(df["run"], df["method"])) == {"rb@tiny [local_encoder=stock]": "sdxl[local_encoder=stock]",
                                                  "rb@tiny [local_encoder=clipself]": "sdxl[local_encoder=clipself]"}
    summary = summarize(df, n_boot=20)
    means = summary[(summary["kind"] == "all") & (summary["metric"] == "clip_t")].set_index("run")
    assert means["mean"].to_dict() == {"rb@tiny [local_encoder=clipself]": 3.0, "rb@tiny [local_encoder=stock]": 1.0}
    assert means["n_images"].tolist() == [1, 1]
    with pytest.raises(UserError, match="share the label"):
        load_scores([stock, labelled(tmp_path / "e", "rb@tiny", "stock", 2.0)])
