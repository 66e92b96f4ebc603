"""`relbench report`: the page's data matches the runs and score files image by image, links
resolve, thumbnails are made once, ablations and escaping, contact sheets by pixel, the CLI."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.report.html import DATA_ID, ReportOptions, write_report
from relationbench.runs import SCORE_COLUMNS, RunDir
from relationbench.suites import load_suite

from .score_runs import make_references, make_run

SINGLE, MULTI = ["rb-s-001", "rb-s-006"], ["rb-m-001"]  # relations hug, ride, hug
CASES = SINGLE + MULTI
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 160, 0)
BAR = "#ff7f0e"  # the hand-made chart's bar colour
ORDER = {c: i for i, c in enumerate([*CASES, "e-1"])}  # a case's place in the values written
PAPER_GROUP = {"protocol": "paper", "clip_encoder": "tiny:clip-seed0", "dino_encoder": "tiny:dino-seed0"}


def solid(colour, size=(256, 128)):
    """make_run's image=: every sample one flat colour (256 x 128: its thumbnail is 192 x 96)."""
    return lambda case_id, k: Image.new("RGB", size, colour)


def write_scores(run_dir: Path, base: float, spread: float = 1.0) -> dict[tuple[str, int], dict[str, float]]:
    """scores.csv of every image of a run, by hand: a distinct value per metric, case and sample,
    so a score shown beside the wrong image, or counted twice, changes what the page shows.
    spread: how far CLIP-T grows from case to case."""
    run = RunDir(run_dir)
    rows, values = [], {}
    for (case_id, k), record in sorted(run.latest().items()):
        pos = ORDER[case_id]
        v = {"clip_t": base + 10 * spread * pos + k, "clip_r": base / 2 + 3 * pos + 0.25 * k,
             "clip_i": 60 + pos - k, "dino": 40 + 2 * pos + 0.5 * k}
        values[case_id, k] = v
        rows.append({c: "" for c in SCORE_COLUMNS} | {"case_id": case_id, "index": k, "kind": record["kind"],
                                                     **{m: f"{x:.6f}" for m, x in v.items()}, **PAPER_GROUP,
                                                     "image_sha256": record["sha256"]})
    run.score_table().write(rows)
    return values


def write_vqa(run_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    """scores-vqa.csv of every image: VQA-T and VQA-R."""
    run = RunDir(run_dir)
    rows, values = [], {}
    for (case_id, k), record in sorted(run.latest().items()):
        v = {"vqa_t": 0.5 + 0.1 * CASES.index(case_id) + 0.01 * k, "vqa_r": 0.25 + 0.01 * k}
        values[case_id, k] = v
        rows.append({"case_id": case_id, "index": k, "kind": record["kind"], "image_sha256": record["sha256"],
                     "model": "tiny:vqa-seed0", **{m: f"{x:.6f}" for m, x in v.items()}})
    run.family_table("vqa", ("vqa_t", "vqa_r")).write(rows)
    return values


def write_ablation(folder: Path, red_run: Path) -> None:
    """An ablation folder as `relbench ablate` writes it: json, table, paired differences, a chart."""
    (folder / "charts").mkdir(parents=True)
    meta = {"component": "kml", "title": "Keypoint matching loss", "paper": "Table 4", "suite": "relationbench",
            "backbone": "tiny", "reference": "Full Model", "protocol": "paper",
            "variants": [{"name": "Full Model", "set": {}, "card": "relationbooth", "run": "red@tiny",
                          "run_dir": str(Path("..") / ".." / red_run.relative_to(folder.parents[1]))},
                         {"name": "w/o KML", "set": {"kml": False}, "card": "relationbooth", "run": "blue@tiny",
                          "run_dir": "elsewhere"}],
            "metrics": ["clip_t", "clip_r"], "kinds": ["single", "multi"]}
    (folder / "ablation.json").write_text(json.dumps(meta))
    table = [("Full Model", "red@tiny", "single", "clip_t", 31.24, 30.74, 31.74),
             ("Full Model", "red@tiny", "single", "clip_r", 21.5, 21.0, 22.0),
             ("Full Model", "red@tiny", "multi", "clip_t", 28.0, 27.0, 29.0),
             ("w/o KML", "blue@tiny", "single", "clip_t", 29.76, 29.0, 30.52)]
    with open(folder / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "run", "kind", "metric", "mean", "ci_low", "ci_high", "n_cases", "n_images"])
        w.writerows([*row, 2, 4] for row in table)
    with open(folder / "paired.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "reference", "kind", "metric", "n_cases", "mean_variant", "mean_reference", "diff",
                    "ci_low", "ci_high"])
        w.writerow(["w/o KML", "Full Model", "single", "clip_t", 2, 29.76, 31.24, -1.48, -2.5, -0.5])
    (folder / "charts" / "clip_t.svg").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" '
        '"http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n'
        '<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200" viewBox="0 0 300 200" id="chart-kml-clip-t">'
        f'<rect x="40" y="40" width="80" height="160" fill="{BAR}"/><rect x="160" y="80" width="80" height="120" '
        f'fill="{BAR}"/></svg>\n')


def build(tmp_path: Path, blue_spread: float = 1.0):
    """results/ with a red run (scored, and VQA), a blue run (scored) and a green run (not scored),
    references for their subjects, and an ablation folder."""
    data = tmp_path / "data"
    make_references(data, CASES)
    results = tmp_path / "results"
    red = make_run(results, "red@tiny", CASES, image=solid(RED))
    blue = make_run(results, "blue@tiny", CASES, image=solid(BLUE))
    green = make_run(results, "green@tiny", SINGLE, per_case=1, image=solid(GREEN))
    scores = {"red@tiny": write_scores(red, 30.0), "blue@tiny": write_scores(blue, 20.0, blue_spread)}
    vqa = write_vqa(red)
    write_ablation(results / "ablations" / "kml", red)
    return results, data, {"red@tiny": red, "blue@tiny": blue, "green@tiny": green}, scores, vqa


def page_data(page: Path) -> dict:
    text = page.read_text(encoding="utf-8")
    found = re.findall(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', text, re.S)
    assert len(found) == 1
    return json.loads(found[0])


def resolve(page: Path, link: str) -> Path:
    assert not re.match(r"^[a-z]+:", link), link  # relative: no scheme, no network
    return (page.parent / urllib.parse.unquote(link)).resolve()


@pytest.fixture
def report(tmp_path):
    results, data, runs, scores, vqa = build(tmp_path)
    done = write_report(ReportOptions(path=results, data_dir=data, n_boot=50, quiet=True))
    return done, results, data, runs, scores, vqa


def test_page_data_has_every_image_once_with_its_own_scores(report):
    done, results, _, runs, scores, vqa = report
    assert done.page == results / "report.html" and (done.runs, done.cases, done.images) == (3, 3, 14)
    data = page_data(done.page)
    assert [(r["label"], r["suite"]) for r in data["runs"]] == [
        ("blue@tiny", "relationbench"), ("green@tiny", "relationbench"), ("red@tiny", "relationbench")]
    assert [(c["suite"], c["id"]) for c in data["cases"]] == [("relationbench", c) for c in CASES]
    assert [c["key"] for c in data["columns"]] == ["clip_t", "clip_r", "clip_i", "dino", "vqa_t", "vqa_r"]
    suite = load_suite("relationbench")
    for c in data["cases"]:
        case = suite.case(c["id"])
        assert (c["prompt"], c["kind"], c["relation"]) == (case.prompt, case.kind, case.relation)
        assert c["boxes"] == [list(b) for b in case.boxes]
        assert [data["subjects"][i]["name"] for i in c["subjects"]] == [s.name for s in case.subjects]
        assert set(c["samples"]) == ({"red@tiny", "blue@tiny", "green@tiny"} if c["id"] in SINGLE
                                     else {"red@tiny", "blue@tiny"})
        for label, samples in c["samples"].items():
            want = 1 if label == "green@tiny" else 2
            assert [s["index"] for s in samples] == list(range(want))
            for s in samples:
                # the full image is this very case's and sample's file
                assert resolve(done.page, s["href"]) == (runs[label] / "images" / c["id"] / f"{s['index']}.png").resolve()
                expected = {**scores.get(label, {}).get((c["id"], s["index"]), {}),
                            **(vqa[c["id"], s["index"]] if label == "red@tiny" else {})}
                assert s["scores"] == pytest.approx(expected, abs=1e-9) and set(s["scores"]) == set(expected)
        # case means: over the case's two images, computed here from the values written
        for label in ("red@tiny", "blue@tiny"):
            values = [scores[label][c["id"], k] for k in (0, 1)]
            assert c["means"][label] | {} == pytest.approx(
                {m: np.mean([v[m] for v in values]) for m in values[0]}
                | ({m: np.mean([vqa[c["id"], k][m] for k in (0, 1)]) for m in ("vqa_t", "vqa_r")}
                   if label == "red@tiny" else {}))
        assert "green@tiny" not in c["means"]  # not scored: its images shown, no scores


def test_links_resolve_and_thumbnails_are_named_by_content(report):
    done, results, data_root, runs, _, _ = report
    page, data = done.page, page_data(done.page)
    html = page.read_text(encoding="utf-8")
    links = re.findall(r'(?:src|href)="([^"#][^"]*)"', html)
    links += [s[k] for c in data["cases"] for ss in c["samples"].values() for s in ss for k in ("thumb", "href")]
    links += [r[k] for s in data["subjects"] for r in s["refs"] for k in ("thumb", "href")]
    links += [c["sheet"] for c in data["cases"]]
    assert len(links) > 40
    for link in links:
        assert resolve(page, link).is_file(), link
    for c in data["cases"]:
        for label, samples in c["samples"].items():
            for s in samples:
                sha = RunDir(runs[label]).latest()[c["id"], s["index"]]["sha256"]
                thumb = resolve(page, s["thumb"])
                assert thumb == (results / "report_files" / "thumbs" / sha[:2] / f"{sha}.jpg").resolve()
                assert Image.open(thumb).size == (192, 96)
    refs = {resolve(page, r["href"]) for s in data["subjects"] for r in s["refs"]}
    assert refs == {p.resolve() for p in data_root.rglob("*.jpg")}
    # colours survive the JPEG thumbnails: a red sample's thumbnail is red
    red = data["cases"][0]["samples"]["red@tiny"][0]
    assert np.abs(np.asarray(Image.open(resolve(page, red["thumb"])), int) - RED).max() < 8


def test_thumbnails_are_made_once_and_again_for_a_new_image(report, tmp_path):
    done, results, data, runs, _, _ = report
    # one per distinct image: each run's samples are one flat colour, so three; and every reference
    assert done.thumbnails_made == 3 + len(list(data.rglob("*.jpg")))
    again = write_report(ReportOptions(path=results, data_dir=data, n_boot=50, quiet=True))
    assert again.thumbnails_made == 0
    run = RunDir(runs["green@tiny"])
    record = run.save_image("rb-s-001", 0, Image.new("RGB", (64, 64), (9, 9, 9)))
    run.append([{"case_id": "rb-s-001", "index": 0, "seed": 0, "kind": "single", **record}])
    assert write_report(ReportOptions(path=results, data_dir=data, n_boot=50, quiet=True)).thumbnails_made == 1


def test_embed_puts_thumbnails_in_the_page(tmp_path):
    results, data, *_ = build(tmp_path)
    done = write_report(ReportOptions(path=results, out=tmp_path / "one.html", data_dir=data, embed=True,
                                      sheets=False, n_boot=50, quiet=True))
    pd = page_data(done.page)
    thumbs = [s["thumb"] for c in pd["cases"] for ss in c["samples"].values() for s in ss]
    assert thumbs and all(t.startswith("data:image/jpeg;base64,") for t in thumbs)
    assert not (tmp_path / "one_files").exists() and done.sheets == 0


def test_leaderboard_and_ablation_tables(report):
    done, *_ = report
    html = done.page.read_text(encoding="utf-8")
    board = html.split('<section id="leaderboard">')[1].split("</section>")[0]
    # red's single-object CLIP-T: the mean over its two single cases of each case's mean over samples
    red = re.search(r'<tr><th class="run">red@tiny</th>(.*?)</tr>', board).group(1)
    cells = re.findall(r"<td[^>]*>([^<]*)", red)
    assert cells[0] == f"{np.mean([30.5, 40.5]):.1f}" and cells[4] == "50.5"  # multi CLIP-T: one case
    assert "green@tiny" not in board
    ablation = html.split('<section id="ablations">')[1].split("</section>")[0]
    assert "Keypoint matching loss" in ablation and "Table 4" in ablation
    rows = dict(re.findall(r'<tr[^>]*><th class="run"><a class="method-link" href="#method=([^"]+)">[^<]*</a></th>'
                           r"(.*?)</tr>", ablation))
    full = re.findall(r"<td[^>]*>([^<]*)(?:<span class=\"ci\">([^<]*))?", rows["red%40tiny"])
    # columns: single clip_t, single clip_r, multi clip_t, multi clip_r
    assert full == [("31.2", " ± 0.5"), ("21.5", " ± 0.5"), ("28.0", " ± 1.0"), ("–", "")]
    paired = ablation.split("Paired difference")[1]
    assert '<td class="worse">-1.48<span class="ci"> [-2.50, -0.50]</span>' in paired  # one decimal more
    assert 'id="chart-kml-clip-t"' in ablation and "<?xml" not in html and "<!DOCTYPE svg" not in html


def test_user_text_is_escaped(tmp_path):
    folder = tmp_path / "suite"
    folder.mkdir()
    Image.new("RGB", (32, 32), GREEN).save(folder / "rex.png")
    prompt = "a dog </script><b>riding</b> a bicycle & <!-- more"
    suite = {"suite": "esc", "version": 1, "subjects": {"rex</script><i>": {"class": "dog", "images": ["rex.png"]}},
             "cases": [{"id": "e-1", "kind": "single", "subjects": ["rex</script><i>"], "prompt": prompt,
                        "predicate": "riding", "boxes": [[0.1, 0.1, 0.9, 0.9]], "seed": 1}]}
    (folder / "esc.yaml").write_text(yaml.safe_dump(suite))
    results = tmp_path / "results"
    write_scores(make_run(results, "a&b<u>@tiny", ["e-1"], per_case=1, suite=folder / "esc.yaml"), 30.0)
    done = write_report(ReportOptions(path=results, n_boot=50, quiet=True))
    html = done.page.read_text(encoding="utf-8")
    assert html.count("</script>") == 2 and "<b>riding" not in html and "<i>" not in html and "<u>@" not in html
    # a suite without a paper table still gets a leaderboard table, its run label escaped
    assert '<th class="run">a&amp;b&lt;u&gt;@tiny</th><td class="best">60.0</td>' in html
    data = page_data(done.page)
    assert data["cases"][0]["prompt"] == prompt
    assert data["subjects"][0]["name"] == "rex</script><i>" and data["runs"][0]["label"] == "a&b<u>@tiny"
    assert resolve(done.page, data["subjects"][0]["refs"][0]["href"]) == (folder / "rex.png").resolve()
    assert resolve(done.page, data["cases"][0]["samples"]["a&b<u>@tiny"][0]["href"]).is_file()


def test_contact_sheet_rows_hold_each_runs_samples(report):
    done, results, *_ = report
    sheet = Image.open(results / "report_files" / "sheets" / "relationbench" / "rb-m-001.png").convert("RGB")
    # layout + 2 subjects x 3 references in the first row; blue, red (run order) below; no green (single only)
    tile, label, caption, pad = 192, 168, 36, 8
    assert sheet.size == (label + pad + 7 * (tile + pad), pad + 3 * (tile + caption + pad))
    pixels = np.asarray(sheet, int)

    def at(row, column, dy=0):  # a tile's centre (+dy)
        return pixels[pad + row * (tile + caption + pad) + tile // 2 + dy, label + pad + column * (tile + pad) + tile // 2]

    for row, colour in ((1, BLUE), (2, RED)):
        for column in (0, 1):
            # 256 x 128 scaled to 192 x 96, centred: colour inside, white above and below it
            assert np.abs(at(row, column) - colour).max() < 8 and tuple(at(row, column, -60)) == (255, 255, 255)
        assert tuple(at(row, 2)) == (255, 255, 255)  # two samples, nothing in the third column
    assert len(list((results / "report_files" / "sheets" / "relationbench").glob("*.png"))) == 3


def test_cli_report_and_a_path_without_runs(report, tmp_path):
    _, results, data, *_ = report
    res = CliRunner().invoke(cli, ["report", str(results), "--out", str(tmp_path / "r" / "x.html"), "--data-dir",
                                   str(data), "--no-sheets", "--quiet", "--page-size", "2", "--bootstrap", "20"])
    assert res.exit_code == 0, res.output
    assert f"{tmp_path / 'r' / 'x.html'}: 3 run(s), 3 case(s), 14 image(s), 1 ablation(s)" in res.output
    assert page_data(tmp_path / "r" / "x.html")["pageSize"] == 2 and not (tmp_path / "r" / "x_files" / "sheets").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["report", str(empty)])
    assert res.exit_code == 2 and "no runs found" in res.output and "relbench generate" in res.output
    assert list(empty.iterdir()) == []


def test_same_sha_in_two_runs_is_one_thumbnail_with_both_links(report):
    """Thumbnails are keyed by content: identical images share one, each sample still links its own file."""
    done, _, _, runs, _, _ = report
    data = page_data(done.page)
    case = data["cases"][0]
    red0, red1 = case["samples"]["red@tiny"]
    assert red0["thumb"] == red1["thumb"] and red0["href"] != red1["href"]
    assert hashlib.sha256(resolve(done.page, red0["href"]).read_bytes()).hexdigest() in red0["thumb"]


def test_contact_sheets_are_drawn_again_only_when_what_they_show_changed(report):
    done, results, data, *_ = report
    folder = results / "report_files" / "sheets" / "relationbench"
    before = {p.name: p.read_bytes() for p in folder.glob("*.png")}
    assert done.sheets == done.sheets_drawn == 3
    again = write_report(ReportOptions(path=results, data_dir=data, n_boot=50, quiet=True))
    assert (again.sheets, again.sheets_drawn) == (3, 0)
    assert {p.name: p.read_bytes() for p in folder.glob("*.png")} == before
    make_run(results, "yellow@tiny", SINGLE[:1], per_case=1, image=solid((250, 220, 0)))  # one more run of one case
    third = write_report(ReportOptions(path=results, data_dir=data, n_boot=50, quiet=True))
    assert (third.sheets, third.sheets_drawn) == (3, 1)
    changed = {p.name for p in folder.glob("*.png") if p.read_bytes() != before[p.name]}
    assert changed == {f"{SINGLE[0]}.png"}
    assert Image.open(folder / f"{SINGLE[0]}.png").size[1] > Image.open(folder / f"{SINGLE[1]}.png").size[1]
