"""Resume integrity (issue 10, part 2): a rerun of generate checks every image it counts as
done and makes again what fails; one manifest line and one score row per image, so the
leaderboard counts each image once. Tiny sdxl, 2 cases x 2 images."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.errors import UserError
from relationbench.methods.sdxl import SDXLMethod
from relationbench.report.aggregate import load_run_scores

from .score_runs import make_references, make_run
from .test_generate import fast_card, gen, images  # noqa: F401 (fast_card: a fixture)

CASES = ["rb-s-001", "rb-m-001"]
KEYS = sorted((c, k) for c in CASES for k in range(2))


@pytest.fixture
def env(tmp_path, monkeypatch, fast_card):  # noqa: F811
    """Subject images and private caches for scoring; returns (run folder, generate)."""
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    make_references(tmp_path / "data", CASES)
    out = tmp_path / "results" / "relationbench" / "sdxl-fast@tiny"

    def generate():
        res = gen("--method", str(fast_card), "--cases", ",".join(CASES), "--images-per-case", "2",
                  "--batch-size", "2", "--out", str(out))
        assert res.exit_code == 0, res.output
        return res.output

    return out, generate


def manifest(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "manifest.jsonl").read_text().splitlines()]


def untimed(lines: list[dict]) -> list[dict]:
    """Manifest lines in (case, sample) order without their timing (a remade image's differs)."""
    return sorted(({k: v for k, v in r.items() if k != "time_s"} for r in lines),
                  key=lambda r: (r["case_id"], r["index"]))


def assert_one_true_line_per_image(run: Path) -> None:
    lines = manifest(run)
    assert sorted((r["case_id"], r["index"]) for r in lines) == KEYS  # one line each, no more
    for r in lines:
        data = (run / r["path"]).read_bytes()
        assert (r["bytes"], r["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


def score(run: Path, ok: bool = True):
    res = CliRunner().invoke(cli, ["score", "--quiet", "--bootstrap", "20", str(run)])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    assert (res.exit_code == 0) == ok, res.output
    return res


def scores(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "scores.csv", keep_default_na=False, na_values=[""])


def n_images(run: Path) -> int:
    board = pd.read_csv(run / "leaderboard.csv").set_index(["kind", "metric"])
    return int(board.loc[("all", "clip_t"), "n_images"])


def rows_match_manifest(run: Path) -> bool:
    current = {(r["case_id"], r["index"]): r["sha256"] for r in manifest(run)}
    return {(c, i): s for c, i, s in scores(run)[["case_id", "index", "image_sha256"]].itertuples(index=False)} \
        == current


def test_a_truncated_image_is_made_again(env):
    run, generate = env
    assert "4 generated, 0 already done" in generate()
    before, lines_before = images(run), manifest(run)
    (run / "images/rb-s-001/1.png").write_bytes(before["images/rb-s-001/1.png"][:300])
    out = generate()
    assert "1 generated (1 replaced: images/rb-s-001/1.png changed on disk), 3 already done" in out
    assert images(run) == before  # seeds are fixed: the same bytes again
    assert_one_true_line_per_image(run)
    assert untimed(manifest(run)) == untimed(lines_before)
    assert "0 generated, 4 already done" in generate()


def test_a_deleted_image_is_made_again_and_counted_once(env):
    run, generate = env
    generate()
    score(run)
    rows = (run / "scores.csv").read_bytes()
    (run / "images/rb-m-001/0.png").unlink()
    assert "1 generated (1 replaced: images/rb-m-001/0.png missing), 3 already done" in generate()
    assert_one_true_line_per_image(run)
    assert "0 image(s) scored, 4 already scored" in score(run).output  # the same bytes as scored
    assert (run / "scores.csv").read_bytes() == rows
    assert len(scores(run)) == 4 and rows_match_manifest(run)
    assert n_images(run) == 4


def test_a_failed_image_of_a_case_not_selected_leaves_the_manifest_until_selected(env, fast_card):  # noqa: F811
    """A rerun over other cases still checks every line: the failing one is dropped (reported,
    not counted as done, not made), and made again by the next run that selects its case."""
    run, generate = env
    generate()
    before = images(run)
    (run / "images/rb-m-001/0.png").unlink()
    res = gen("--method", str(fast_card), "--cases", "rb-s-001", "--images-per-case", "2", "--out", str(run))
    assert res.exit_code == 0, res.output
    assert "0 generated, 2 already done" in res.output and "replaced" not in res.output
    assert ("1 image(s) of cases not selected now failed their check and left the manifest (made again when "
            "selected): images/rb-m-001/0.png missing") in " ".join(res.output.split())
    assert sorted((r["case_id"], r["index"]) for r in manifest(run)) == [k for k in KEYS if k != ("rb-m-001", 0)]
    out = generate()
    assert "1 generated, 3 already done" in out and "replaced" not in out and "not selected" not in out
    assert images(run) == before
    assert_one_true_line_per_image(run)


def test_a_replaced_image_is_rescored_and_its_old_row_dropped(env, monkeypatch):
    """An image overwritten after scoring is made again; when the new one differs (as it may
    on a GPU; here one pixel is changed), its stale row goes and the new image is scored."""
    run, generate = env
    generate()
    score(run)
    old = scores(run).set_index(["case_id", "index"])
    target = run / "images/rb-s-001/0.png"
    Image.new("RGB", (128, 128), (9, 99, 199)).save(target)  # another valid image
    real = SDXLMethod.generate

    def nudged(self, requests):
        samples = real(self, requests)
        for s in samples:
            s.image.putpixel((0, 0), tuple((v + 1) % 256 for v in s.image.getpixel((0, 0))))
        return samples

    monkeypatch.setattr(SDXLMethod, "generate", nudged)
    assert "1 generated (1 replaced: images/rb-s-001/0.png changed on disk), 3 already done" in generate()
    assert_one_true_line_per_image(run)
    res = score(run)
    assert "1 image(s) scored, 3 already scored" in res.output
    assert "dropped 1 score row(s) whose image was regenerated" in res.output
    new = scores(run).set_index(["case_id", "index"])
    assert len(new) == 4 and rows_match_manifest(run) and n_images(run) == 4
    assert new.loc[("rb-s-001", 0), "image_sha256"] != old.loc[("rb-s-001", 0), "image_sha256"]
    others = [k for k in KEYS if k != ("rb-s-001", 0)]
    pd.testing.assert_frame_equal(new.loc[others].sort_index(), old.loc[others].sort_index())


def test_an_image_changed_before_scoring_is_not_scored(env):
    """The scorer scores the image the manifest records, nothing else."""
    run, generate = env
    generate()
    target = run / "images/rb-m-001/1.png"
    Image.new("RGB", (128, 128), (9, 99, 199)).save(target)
    res = score(run, ok=False)
    assert res.exit_code == 2 and f"{target}: changed on disk since it was generated" in res.output
    assert "relbench generate" in res.output
    assert len(scores(run)) == 3 and ("rb-m-001", 1) not in set(zip(scores(run)["case_id"], scores(run)["index"]))


def test_an_old_manifest_is_accepted_and_upgraded(env):
    """Lines without size and hash (an older version): each file must decode fully, then its
    line is given them; a line whose file does not decode is made again."""
    run, generate = env
    generate()
    score(run)
    before = images(run)
    lines = manifest(run)
    old = [{k: v for k, v in r.items() if k not in ("bytes", "sha256")} for r in lines]
    old.append(dict(old[0]))  # and an image listed twice, as older versions did after a regeneration
    (run / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    # scoring an old manifest hashes the files: nothing changed, nothing to do
    assert "0 image(s) scored, 4 already scored" in score(run).output
    broken = run / "images/rb-m-001/1.png"
    broken.write_bytes(before["images/rb-m-001/1.png"][:-40])  # truncated: no end chunk
    out = generate()
    assert "1 generated (1 replaced: images/rb-m-001/1.png not a readable image), 3 already done" in out
    assert images(run) == before
    assert_one_true_line_per_image(run)
    assert untimed(manifest(run)) == untimed(lines)  # the size and hash generate recorded first


# -- the report never counts an image twice -----------------------------------------------------
def test_report_refuses_two_rows_of_one_image(tmp_path, monkeypatch):
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    run = make_run(tmp_path / "results", "x@tiny", ["rb-s-001"], per_case=2)
    score(run)
    path = run / "scores.csv"
    text = path.read_text()
    path.write_text(text + text.splitlines()[1] + "\n")  # a row twice
    with pytest.raises(UserError, match="counted twice") as err:
        load_run_scores(run)
    assert err.value.path == str(path) and "relbench score" in err.value.hint
    res = score(run)  # the scorer leaves one row per image
    assert len(scores(run)) == 2 and n_images(run) == 2
    assert "dropped 1 score row(s)" in res.output


def test_report_refuses_rows_of_images_the_run_no_longer_holds(tmp_path, monkeypatch):
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    run = make_run(tmp_path / "results", "x@tiny", ["rb-s-001"], per_case=2)
    score(run)
    make_run(tmp_path / "results", "x@tiny", ["rb-s-001"], per_case=1, seed=5)  # sample 0 made again
    with pytest.raises(UserError, match="no longer holds") as err:
        load_run_scores(run)
    assert "rb-s-001 sample 0" in err.value.message
    res = score(run)
    assert "1 image(s) scored, 1 already scored" in res.output
    df = scores(run)
    assert len(df) == 2 and rows_match_manifest(run) and n_images(run) == 2
    np.testing.assert_equal(df["image_sha256"].str.len().to_numpy(), [64, 64])
