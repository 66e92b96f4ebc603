"""The leaderboard files: marks on the right cells, one table per score group, clean LaTeX."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from relationbench.errors import UserError
from relationbench.report.aggregate import SUMMARY_COLUMNS
from relationbench.report.leaderboard import TABLES, leaderboard_dir, write_leaderboard

PAPER = ("paper", "open_clip:ViT-B-32/openai", "dinov2:vits14")
TINY = ("paper", "tiny:clip-seed0", "tiny:dino-seed0")


def rows(run: str, suite: str, kind: str, group=PAPER, n_cases: int = 20, **means) -> list[dict]:
    """Summary rows for one run and kind; a CI of mean ± 0.5."""
    return [{"run": run, "suite": suite, "kind": kind, "protocol": group[0], "clip_encoder": group[1],
             "dino_encoder": group[2], "metric": metric, "mean": mean, "ci_low": mean - 0.5,
             "ci_high": mean + 0.5, "n_cases": n_cases, "n_images": 4 * n_cases}
            for metric, mean in means.items()]


def relationbench_summary() -> pd.DataFrame:
    data = (
        rows("sdxl@tiny", "relationbench", "single", clip_t=30.04, clip_r=20.0, clip_i=70.0, dino=50.0)
        + rows("dreambooth", "relationbench", "single", clip_t=31.0, clip_r=25.0, clip_i=75.0, dino=55.0)
        + rows("ms_diff&co", "relationbench", "single", clip_t=29.96, clip_r=22.0, clip_i=80.0, dino=math.nan)
        + rows("sdxl@tiny", "relationbench", "multi", n_cases=18, clip_t=28.0, clip_r=18.0, clip_i=60.0, dino=40.0)
        + rows("dreambooth", "relationbench", "multi", clip_t=29.0, clip_r=19.0, clip_i=65.0, dino=45.0)
        + rows("sdxl@tiny", "relationbench", "all", clip_t=29.0, clip_r=19.0, clip_i=65.0, dino=45.0)
        + rows("sdxl@tiny", "relationbench", "single", group=TINY, clip_t=1.0, clip_r=1.0, clip_i=1.0, dino=1.0)
        + rows("sdxl@tiny", "other-suite", "single", clip_t=7.77)
    )
    return pd.DataFrame(data, columns=list(SUMMARY_COLUMNS))


def md_table(md: str, heading_part: str) -> dict[str, dict[str, str]]:
    """The github table under the first heading containing heading_part, as {run: {column: cell}}."""
    section = md.split(heading_part, 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        table[cells[0]] = dict(zip(header[1:], cells[1:]))
    return table


@pytest.fixture
def written(tmp_path):
    paths = write_leaderboard(relationbench_summary(), tmp_path / "board")
    return {p.suffix: p.read_text(encoding="utf-8") for p in paths}, paths


def test_writes_three_files(written, tmp_path):
    _, paths = written
    assert [p.name for p in paths] == ["leaderboard.md", "leaderboard.csv", "leaderboard.tex"]
    assert all(p.parent == tmp_path / "board" for p in paths)
    assert sorted(p.name for p in (tmp_path / "board").iterdir()) == sorted(p.name for p in paths)


def test_md_marks_best_and_second_per_column(written):
    md = written[0][".md"]
    t = md_table(md, "RelationBench (Table 1) — protocol `paper`, CLIP `open_clip:ViT-B-32/openai`")
    assert set(t) == {"sdxl@tiny", "dreambooth", r"ms\_diff&co"}
    assert t["dreambooth"]["Single-object CLIP-T"] == "**31.0**"
    # 30.04 and 29.96 both print as 30.0: a tie, both second
    assert t["sdxl@tiny"]["Single-object CLIP-T"] == "<u>30.0</u>"
    assert t[r"ms\_diff&co"]["Single-object CLIP-T"] == "<u>30.0</u>"
    assert t[r"ms\_diff&co"]["Single-object CLIP-I"] == "**80.0**"
    assert t["dreambooth"]["Single-object CLIP-I"] == "<u>75.0</u>"
    assert t["sdxl@tiny"]["Single-object CLIP-I"] == "70.0"
    assert t[r"ms\_diff&co"]["Single-object DINO"] == "–"  # NaN mean
    assert t[r"ms\_diff&co"]["Multi-object CLIP-T"] == "–"  # no multi rows
    assert t["dreambooth"]["Multi-object DINO"] == "**45.0**"
    assert t["sdxl@tiny"]["Multi-object DINO"] == "<u>40.0</u>"
    assert "n (cases per run): Single-object 20; Multi-object 18-20" in md


def test_md_keeps_encoder_groups_apart_and_ignores_other_suites(written):
    md = written[0][".md"]
    headings = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert len(headings) == 2
    assert all("RelationBench (Table 1)" in h for h in headings)
    tiny = md_table(md, "CLIP `tiny:clip-seed0`")
    assert set(tiny) == {"sdxl@tiny"}
    assert tiny["sdxl@tiny"]["Single-object CLIP-T"] == "**1.0**"
    assert "DreamBench" not in md and "CustomConcept101" not in md
    assert "other-suite" not in md and "7.8" not in md


def test_md_with_ci_and_digits(tmp_path):
    md_path = write_leaderboard(relationbench_summary(), tmp_path, with_ci=True, digits=2)[0]
    t = md_table(md_path.read_text(encoding="utf-8"), "CLIP `open_clip")
    assert t["dreambooth"]["Single-object CLIP-T"] == "**31.00** ± 0.50"
    assert t["sdxl@tiny"]["Single-object CLIP-T"] == "<u>30.04</u> ± 0.50"
    assert t[r"ms\_diff&co"]["Single-object CLIP-T"] == "29.96 ± 0.50"


def test_tex_tables(written):
    tex = written[0][".tex"]
    assert tex.count(r"\begin{table}") == 2 and tex.count(r"\caption{") == 2
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 2
    assert r" & \multicolumn{4}{c}{Single-object} & \multicolumn{4}{c}{Multi-object} \\" in tex
    assert r"\cmidrule(lr){2-5} \cmidrule(lr){6-9}" in tex
    assert r"\begin{tabular}{lcccccccc}" in tex
    first = tex.split(r"\end{table}")[0]
    lines = {ln.split(" & ")[0]: ln.split(" & ")[1:] for ln in first.splitlines() if ln.endswith(r"\\")}
    assert lines["dreambooth"][0] == r"\textbf{31.0}"
    assert lines["sdxl@tiny"][0] == r"\underline{30.0}"
    assert lines[r"ms\_diff\&co"][2] == r"\textbf{80.0}"
    assert lines[r"ms\_diff\&co"][3] == "--"
    assert lines["sdxl@tiny"][7] == r"\underline{40.0} \\"
    assert r"open\_clip:ViT-B-32/openai" in first


def test_tex_with_ci(tmp_path):
    tex = write_leaderboard(relationbench_summary(), tmp_path, with_ci=True)[2].read_text(encoding="utf-8")
    assert r"\textbf{31.0} $\pm$ 0.5" in tex


def test_csv_round_trips(written):
    _, paths = written
    back = pd.read_csv(paths[1], keep_default_na=False, na_values=[""])
    expected = relationbench_summary()
    assert list(back.columns) == list(SUMMARY_COLUMNS) and len(back) == len(expected)
    assert set(back["suite"]) == {"relationbench", "other-suite"}
    key = ["suite", "protocol", "clip_encoder", "dino_encoder", "run", "kind", "metric"]
    merged = back.merge(expected, on=key, suffixes=("", "_x"))
    assert len(merged) == len(expected)
    for col in ("mean", "ci_low", "ci_high", "n_cases", "n_images"):
        pd.testing.assert_series_equal(merged[col], merged[f"{col}_x"], check_names=False, check_dtype=False)
    # paper order: single before multi before all, clip_t first
    sdxl = back[(back["run"] == "sdxl@tiny") & (back["clip_encoder"] == PAPER[1]) & (back["suite"] == "relationbench")]
    assert sdxl["kind"].drop_duplicates().tolist() == ["single", "multi", "all"]
    assert sdxl["metric"].tolist()[:4] == ["clip_t", "clip_r", "clip_i", "dino"]


def test_csv_is_deterministic(tmp_path):
    summary = relationbench_summary()
    a = write_leaderboard(summary, tmp_path / "a")[1].read_text()
    b = write_leaderboard(summary.sample(frac=1, random_state=1), tmp_path / "b")[1].read_text()
    assert a == b


def test_other_paper_tables_appear_only_with_rows(tmp_path):
    summary = pd.DataFrame(
        rows("textual_inversion", "dreambench", "single", clip_t=25.0, clip_i=78.0, dino=57.0)
        + rows("sdxl", "dreambench", "single", clip_t=33.0, clip_i=60.0, dino=30.0)
        + rows("sdxl", "dreambench", "all", clip_t=33.0, clip_i=60.0, dino=30.0),
        columns=list(SUMMARY_COLUMNS),
    )
    md, _, tex = (p.read_text(encoding="utf-8") for p in write_leaderboard(summary, tmp_path))
    assert "DreamBench (Table 2)" in md and "RelationBench" not in md and "CustomConcept101" not in md
    t = md_table(md, "DreamBench (Table 2)")
    assert list(t["sdxl"]) == ["Single-object CLIP-T", "Single-object CLIP-I", "Single-object DINO"]
    assert t["sdxl"]["Single-object CLIP-T"] == "**33.0**" and t["sdxl"]["Single-object DINO"] == "<u>30.0</u>"
    assert r"\multicolumn{3}{c}{Single-object}" in tex and r"\cmidrule(lr){2-4}" in tex
    assert "DreamBench (Table 2)" in tex and "CustomConcept101" not in tex

    cc = pd.DataFrame(rows("sdxl", "customconcept101-multi", "multi", clip_t=30.0, clip_i=60.0, dino=40.0),
                      columns=list(SUMMARY_COLUMNS))
    md = write_leaderboard(cc, tmp_path / "cc")[0].read_text(encoding="utf-8")
    assert "Multi-object CustomConcept101 (Table 3)" in md and "DreamBench" not in md


def test_tables_cover_the_paper_suites():
    assert [t.suite for t in TABLES] == ["relationbench", "dreambench", "customconcept101-multi"]


@pytest.mark.parametrize("summary", [pd.DataFrame(columns=list(SUMMARY_COLUMNS)), pd.DataFrame()])
def test_empty_summary_still_writes_files(tmp_path, summary):
    md, csv, tex = write_leaderboard(summary, tmp_path)
    assert "No scores were found" in md.read_text(encoding="utf-8")
    assert "No scores were found" in tex.read_text(encoding="utf-8")
    back = pd.read_csv(csv)
    assert back.empty and list(back.columns) == list(SUMMARY_COLUMNS)


def test_only_unknown_suites_points_to_csv(tmp_path):
    summary = pd.DataFrame(rows("x", "my-suite", "single", clip_t=1.0), columns=list(SUMMARY_COLUMNS))
    md = write_leaderboard(summary, tmp_path)[0].read_text(encoding="utf-8")
    assert "see leaderboard.csv" in md


# -- where the leaderboard goes ---------------------------------------------------------------
def test_leaderboard_dir_is_a_given_path(tmp_path):
    """Never a folder above the paths: one path is the place (even a run folder two levels down,
    where the old rule climbed to its grandparent); several: the one holding the others."""
    run = tmp_path / "a" / "b" / "run"
    assert leaderboard_dir([run]) == run
    assert leaderboard_dir([str(run)]) == run
    assert leaderboard_dir([run / "x", tmp_path / "a", run]) == tmp_path / "a"
    assert leaderboard_dir([tmp_path / "a", tmp_path / "a" / "."]) == tmp_path / "a"


def test_leaderboard_dir_refuses_paths_that_share_only_a_folder_above(tmp_path):
    with pytest.raises(UserError, match="none of the 2 paths holds the others") as err:
        leaderboard_dir([tmp_path / "a" / "run1", tmp_path / "b" / "run2"])
    assert "--leaderboard-dir" in err.value.hint and str(tmp_path) in err.value.hint
