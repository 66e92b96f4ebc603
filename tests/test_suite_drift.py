"""Suite drift (issue 10, part 3): a run keeps the suite it was generated from and is scored
with it; a suite file edited since is reported, never used; a moved run scores without it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from .conftest import mini_suite_data
from .score_runs import make_references
from .test_generate import fast_card, gen  # noqa: F401 (fast_card: a fixture)
from .test_resume import score, scores

OLD_PROMPT, OLD_PREDICATE = "a dog hugging a bear plushie", "hugging"


@pytest.fixture
def made(tmp_path, monkeypatch, fast_card, write_suite):  # noqa: F811
    """A run generated from a 2-case suite file in tmp_path, with subject images to score it."""
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    suite = write_suite(mini_suite_data())
    make_references(tmp_path / "data", ["t-s-1", "t-m-1"], suite=str(suite))
    run = tmp_path / "results" / "mini" / "sdxl-fast@tiny"
    res = gen("--method", str(fast_card), "--suite", str(suite), "--out", str(run))
    assert res.exit_code == 0, res.output
    return suite, run


def edit(suite: Path) -> None:
    """Same ids, new prompt and predicate for t-m-1, another subject for t-s-1."""
    data = mini_suite_data(prompt="a dog chasing a bear plushie", predicate="chasing")
    data["cases"][0].update(subjects=["bear"], prompt="a bear plushie riding a bicycle")
    suite.write_text(yaml.safe_dump(data, sort_keys=False))


def test_the_run_keeps_the_suite_it_was_generated_from(made, fast_card):  # noqa: F811
    suite, run = made
    copy = run / "suite.yaml"
    assert copy.read_bytes() == suite.read_bytes()
    meta = json.loads((run / "run.json").read_text())
    assert meta["suite"]["file_sha256"] == hashlib.sha256(copy.read_bytes()).hexdigest()
    res = gen("--method", str(fast_card), "--suite", str(suite), "--out", str(run))
    assert "0 generated, 2 already done" in res.output and copy.read_bytes() == suite.read_bytes()


def test_an_edited_suite_file_is_reported_and_not_used(made):
    suite, run = made
    score(run)
    before = scores(run).sort_values("case_id").reset_index(drop=True)
    row = before.set_index("case_id").loc["t-m-1"]
    assert (row["text"], row["predicate"]) == (OLD_PROMPT, OLD_PREDICATE)
    edit(suite)
    (run / "scores.csv").unlink()
    res = score(run)
    assert "2 image(s) scored" in res.output
    after = scores(run).sort_values("case_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)  # the old prompt, predicate and subject, the same numbers
    rows = after.set_index("case_id")
    assert (rows.loc["t-m-1", "text"], rows.loc["t-m-1", "predicate"]) == (OLD_PROMPT, OLD_PREDICATE)
    assert (rows.loc["t-s-1", "subject_1"], rows.loc["t-s-1", "text"]) == ("dog", "a dog riding a bicycle")
    warning = (f"warning: {run}: the suite file {suite} differs from the copy the run was generated from "
               f"({run / 'suite.yaml'}); scored with the copy. Differs: t-s-1: subjects, prompt; t-m-1: prompt, "
               "predicate")
    assert warning in " ".join(res.output.split())
    assert "0 image(s) scored" in score(run).output  # reported each time, nothing rescored


def test_a_moved_run_scores_without_its_suite_file(made, tmp_path):
    suite, run = made
    moved = tmp_path / "elsewhere" / "mini" / "run"
    shutil.move(run, moved)
    suite.rename(suite.with_name("gone.yaml"))
    res = score(moved)
    assert "2 image(s) scored" in res.output and "warning" not in res.output
    rows = scores(moved).set_index("case_id")
    assert (rows.loc["t-m-1", "text"], rows.loc["t-m-1", "predicate"]) == (OLD_PROMPT, OLD_PREDICATE)


def test_an_edited_copy_is_refused(made):
    suite, run = made
    copy = run / "suite.yaml"
    copy.write_text(copy.read_text().replace("hugging", "chasing"))
    res = score(run, ok=False)
    assert res.exit_code == 2 and str(copy) in res.output and "changed after the run was generated" in res.output
    assert not (run / "scores.csv").exists()


def test_an_old_run_without_a_copy(made):
    """Made before runs kept a copy: scored from the suite file only while its sha256 is the
    one run.json recorded; refused once it was edited."""
    suite, run = made
    (run / "suite.yaml").unlink()
    edit(suite)
    res = score(run, ok=False)
    out = " ".join(res.output.split())
    assert res.exit_code == 2 and str(suite) in out and "not the one run" in out and "generate the run again" in out
    assert not (run / "scores.csv").exists()
    suite.write_text(yaml.safe_dump(mini_suite_data(), sort_keys=False))  # the original bytes again
    assert hashlib.sha256(suite.read_bytes()).hexdigest() == json.loads((run / "run.json").read_text())[
        "suite"]["file_sha256"]
    assert "2 image(s) scored" in score(run).output
