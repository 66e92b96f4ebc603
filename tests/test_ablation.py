"""`relbench ablate`: components as data, variants as runs, every stage resumable, and the
table's numbers checked against an independent computation from the runs' scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from relationbench.ablation import (AblateOptions, ablate, component_names, load_component, make_plan,
                                    set_strings, write_ablation)
from relationbench.cli import cli
from relationbench.methods.cards import default_registry, parse_set
from relationbench.runs import SCORE_COLUMNS, RunDir
from relationbench.score import ScoreIds, ScoreOptions

from .score_runs import make_run
from .tiny_env import tiny_env

CASES = "rb-s-006,rb-m-011"  # "ride": one single-subject and one multi-subject case


def relbench(*args, ok: bool = True):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


# -- components ---------------------------------------------------------------------------
def test_every_shipped_component_loads_and_its_variants_are_valid_cards():
    registry = default_registry()
    names = component_names()
    assert {"kml", "local_tokens", "relation_data", "kml_weight", "local_token_count", "table4"} <= set(names)
    for name in names:
        c = load_component(name)
        assert c.reference in [v.name for v in c.variants]
        cards = [registry.card(c.method, parse_set(set_strings(v.set))).name for v in c.variants]
        assert len(set(cards)) == len(cards), f"{name}: two rows would be one run"


def test_table4_rows_are_the_papers():
    c = load_component("table4")
    assert [v.name for v in c.variants] == ["w/o Relation-aware Data", "w/o Local Token Injection",
                                            "w/o Keypoint Matching Loss", "Full Model"]
    assert [dict(v.set) for v in c.variants] == [{"relation_data": False}, {"local_tokens": 0}, {"kml_weight": 0},
                                                 {}]
    assert load_component("kml_weight").kinds == ("multi",)  # Table 6 reports multi-object only


def test_set_strings_read_back_to_the_same_values():
    values = {"kml_weight": 1e-4, "relation_data": False, "local_tokens": 0, "local_encoder": "stock", "x": None}
    card = default_registry().card("relationbooth", parse_set(set_strings({k: v for k, v in values.items()
                                                                           if k != "x"})))
    resolved = card.resolve().values
    assert resolved["kml_weight"] == 1e-4 and resolved["relation_data"] is False
    assert resolved["local_tokens"] == 0 and resolved["local_encoder"] == "stock"
    assert set_strings({"x": None}) == ["x=null"]


@pytest.mark.parametrize("text, says", [
    ("component: x\ntitle: t\nmethod: relationbooth\nreference: A\nvariants: [{name: A, set: {}}]\n",
     "at least two rows"),
    ("component: x\ntitle: t\nmethod: relationbooth\nreference: C\n"
     "variants: [{name: A, set: {}}, {name: B, set: {kml_weight: 0}}]\n", "reference 'C' is not one of"),
    ("component: x\ntitle: t\nmethod: relationbooth\nreference: A\n"
     "variants: [{name: A, set: {}}, {name: A, set: {kml_weight: 0}}]\n", "two variants share a name"),
    ("component: x\ntitle: t\nmethod: relationbooth\nreference: A\nmetrics: [clip_z]\n"
     "variants: [{name: A, set: {}}, {name: B, set: {kml_weight: 0}}]\n", "unknown metric 'clip_z'"),
    ("component: x\ntitle: t\nmethod: relationbooth\nreference: A\ncolour: red\n"
     "variants: [{name: A, set: {}}, {name: B, set: {kml_weight: 0}}]\n", "unknown key(s) colour"),
    ("component: x\ntitle: t\nmethod: relationbooth\nreference: A\nkinds: [triple]\n"
     "variants: [{name: A, set: {}}, {name: B, set: {kml_weight: 0}}]\n", "`kinds` must be"),
])
def test_a_bad_component_file_is_one_clear_error(tmp_path, text, says):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    result = relbench("ablate", "--component", path, "--backbone", "tiny", "--dry-run", ok=False)
    assert result.exit_code == 2
    assert says in result.output and str(path) in result.output


def test_a_bad_setting_names_the_component_and_variant(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("component: mine\ntitle: t\nmethod: relationbooth\nreference: A\n"
                    "variants: [{name: A, set: {}}, {name: B, set: {kml_weight: lots}}]\n")
    result = relbench("ablate", "--component", path, "--backbone", "tiny", "--dry-run", ok=False)
    assert result.exit_code == 2
    assert "component mine, variant 'B'" in result.output and "kml_weight" in result.output


def test_unknown_component_lists_the_known_ones():
    result = relbench("ablate", "--component", "kmll", "--backbone", "tiny", ok=False)
    assert result.exit_code == 2 and "unknown ablation component 'kmll'" in result.output and "kml_weight" in result.output


# -- the plan -----------------------------------------------------------------------------
def test_plan_shares_a_run_between_components_and_selects_each_components_kinds(tmp_path):
    plan = make_plan(AblateOptions(components=["kml", "kml_weight"], backbone="tiny", limit=2, out=tmp_path))
    assert set(plan.runs) == {"relationbooth", "relationbooth[kml_weight=0.0]", "relationbooth[kml_weight=0.01]",
                              "relationbooth[kml_weight=0.0001]"}
    full = plan.runs["relationbooth"]
    assert full.run_dir == tmp_path / "relationbench" / "relationbooth@tiny"
    # the full model serves kml (2 single + 2 multi) and kml_weight (its 2 multi: the same ones)
    assert [c.kind for c in full.cases] == ["single", "single", "multi", "multi"]
    assert {c.kind for c in plan.runs["relationbooth[kml_weight=0.01]"].cases} == {"multi"}
    folders = [folder for *_, folder in plan.tables]
    assert folders == [tmp_path / "ablations" / "relationbench" / "kml@tiny",
                       tmp_path / "ablations" / "relationbench" / "kml_weight@tiny"]


def test_all_is_every_component_once(tmp_path):
    plan = make_plan(AblateOptions(components=["all", "kml"], backbone="tiny", limit=1, out=tmp_path))
    assert [c.name for c, *_ in plan.tables] == component_names()


# -- the numbers --------------------------------------------------------------------------
def _scores_csv(run: Path, values: dict[tuple[str, int], float], group: tuple[str, ...], kinds: dict[str, str],
                extra_group: tuple[str, ...] | None = None) -> None:
    """scores.csv with clip_t = clip_r = clip_i = dino = the given value per image (and, with
    extra_group, the same images again under another score group, scored 1000)."""
    sha = {(r["case_id"], r["index"]): r["sha256"] for r in RunDir(run).latest().values()}
    rows = []
    for g, shift in ((group, 0.0), *(((extra_group, 1000.0),) if extra_group else ())):
        for (case, index), v in values.items():
            rows.append({**{c: "" for c in SCORE_COLUMNS}, "case_id": case, "index": index, "kind": kinds[case],
                         "clip_t": v + shift, "clip_r": v + shift, "clip_i": v + shift, "dino": v + shift,
                         **dict(zip(("protocol", "clip_encoder", "dino_encoder"), g)),
                         "image_sha256": sha[(case, index)]})
    with open(run / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SCORE_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def test_table_and_paired_numbers_are_the_case_means_of_the_selected_images(tmp_path):
    cases = ["rb-s-006", "rb-s-001", "rb-m-011", "rb-m-014"]
    opts = AblateOptions(components=["kml"], backbone="tiny", cases=[",".join(cases[:3])], images_per_case=2,
                         out=tmp_path)
    plan = make_plan(opts)
    component, rows, selected, folder = plan.tables[0]
    assert [c.id for c in selected] == ["rb-s-001", "rb-s-006", "rb-m-011"]  # suite order
    group = ScoreIds(ScoreOptions(paths=[]))("paper", "tiny")
    kinds = {c: "single" if "-s-" in c else "multi" for c in cases}
    rng = np.random.default_rng(0)
    truth = {}
    for row in rows:
        # 3 samples of 4 cases: sample 2 and case rb-m-014 are outside the selection
        run = make_run(tmp_path, row.run.run_dir.name, cases, per_case=3)
        values = {(c, k): float(rng.uniform(10, 30)) for c in cases for k in range(3)}
        _scores_csv(run, values, group, kinds, extra_group=(group[0], "other-clip", group[2]))
        truth[row.variant.name] = values
    write_ablation(component, rows, selected, plan, folder, opts)
    table = pd.read_csv(folder / "table.csv")
    assert len(table) == 2 * 2 * 4  # variants x kinds x metrics
    for variant, values in truth.items():
        for kind, ids in (("single", ["rb-s-006", "rb-s-001"]), ("multi", ["rb-m-011"])):
            case_means = [np.mean([values[(c, 0)], values[(c, 1)]]) for c in ids]
            got = table[(table.variant == variant) & (table.kind == kind) & (table.metric == "clip_r")].iloc[0]
            assert got["mean"] == pytest.approx(np.mean(case_means), abs=1e-9)
            assert got["n_cases"] == len(ids) and got["n_images"] == 2 * len(ids)
            if len(ids) > 1:
                assert got["ci_low"] <= got["mean"] <= got["ci_high"]
    paired = pd.read_csv(folder / "paired.csv")
    assert set(paired.variant) == {"w/o Keypoint Matching Loss"} and set(paired.reference) == {"Full Model"}
    a, b = truth["w/o Keypoint Matching Loss"], truth["Full Model"]
    diffs = [np.mean([a[(c, k)] for k in (0, 1)]) - np.mean([b[(c, k)] for k in (0, 1)]) for c in ("rb-s-006", "rb-s-001")]
    got = paired[(paired.kind == "single") & (paired.metric == "dino")].iloc[0]
    assert got["diff"] == pytest.approx(np.mean(diffs), abs=1e-9) and got["n_cases"] == 2
    assert min(diffs) <= got["ci_low"] <= got["ci_high"] <= max(diffs)
    meta = json.loads((folder / "ablation.json").read_text())
    assert meta["cases"] == ["rb-s-001", "rb-s-006", "rb-m-011"] and meta["images_per_case"] == 2
    assert [v["name"] for v in meta["variants"]] == ["w/o Keypoint Matching Loss", "Full Model"]
    assert (folder / meta["variants"][1]["run_dir"]).resolve() == rows[1].run.run_dir.resolve()
    md = (folder / "table.md").read_text()
    full = np.mean([np.mean([b[(c, 0)], b[(c, 1)]]) for c in ("rb-s-006", "rb-s-001")])
    assert f"{full:.1f}" in md.split("| Full Model")[1].split("\n")[0]
    for metric in component.metrics:
        png, svg = folder / "charts" / f"{metric}.png", folder / "charts" / f"{metric}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and svg.read_text().lstrip().startswith("<?xml")
    tex = (folder / "table.tex").read_text()
    assert r"\multicolumn{4}{c}{Single-object}" in tex and "w/o Keypoint Matching Loss &" in tex


def test_charts_are_reproducible(tmp_path):
    from relationbench.report.charts import bar_chart

    rows = pd.DataFrame({"variant": ["A", "B", "A", "B"], "kind": ["single", "single", "multi", "multi"],
                         "mean": [20.0, 22.0, 18.0, 19.5], "ci_low": [19.0, 21.0, 17.0, 18.5],
                         "ci_high": [21.0, 23.0, 19.0, 20.5]})
    first = [p.read_bytes() for p in bar_chart(rows, "clip_t", ["A", "B"], tmp_path / "a")]
    second = [p.read_bytes() for p in bar_chart(rows, "clip_t", ["A", "B"], tmp_path / "b")]
    assert first == second
    svg = first[1].decode()
    assert "Single-object" in svg and "Multi-object" in svg and ">A<" in svg and ">B<" in svg
    # bars start at 0 and end at their means: in the PNG, the height of each bar (its colour's
    # tallest pixel column; the whisker crosses only the middle columns) is proportional to its mean
    from io import BytesIO

    from PIL import Image

    from relationbench.report.charts import COLORS

    pixels = np.asarray(Image.open(BytesIO(first[0])).convert("RGB")).astype(int)
    heights = {}
    for row, colour in enumerate(COLORS[:2]):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        per_column = (np.abs(pixels - rgb).max(axis=-1) == 0).sum(axis=0)
        columns = np.flatnonzero(per_column > 20)  # the legend's swatch is shorter than this
        groups = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
        heights[row] = [per_column[g].max() for g in groups]
    (a_single, a_multi), (b_single, b_multi) = heights[0], heights[1]
    for got, want in ((a_single / a_multi, 20 / 18), (b_single / b_multi, 22 / 19.5), (a_single / b_single, 20 / 22)):
        assert got == pytest.approx(want, rel=0.03)


# -- end to end on tiny -------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with tiny_env(tmp_path_factory.mktemp("ablate"), ["rb-s-006", "rb-m-011"]) as root:
        yield root


ARGS = ["--component", "kml", "--backbone", "tiny", "--cases", CASES, "--images-per-case", "1",
        "--set", "steps=2", "--bootstrap", "50", "--quiet"]


def _images(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("images/*/*.png"))}


def test_kml_on_tiny_end_to_end_resumes_after_a_kill_and_does_nothing_twice(env, monkeypatch):
    import relationbench.ablation as ablation

    out = env / "results"
    dry = relbench("ablate", *ARGS, "--out", out, "--dry-run")
    assert "0/1 in bank; to train: ride" in dry.output and "0/2" in dry.output
    assert not out.exists()  # a dry run writes nothing

    # killed while generating the second run: the first run's images stay, nothing is half-written
    real, calls = ablation._generate, []

    def dies_second(run, plan, opts):
        calls.append(run.card.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run, plan, opts)

    monkeypatch.setattr(ablation, "_generate", dies_second)
    relbench("ablate", *ARGS, "--out", out, ok=False)
    monkeypatch.setattr(ablation, "_generate", real)
    first = _images(out)
    assert len(first) == 2 and not (out / "ablations").exists()

    result = relbench("ablate", *ARGS, "--out", out)
    # exactly the second run's images: both LoRAs were trained and the first run generated and
    # scored before the kill
    assert "0 LoRA(s) trained, 2 image(s) generated, 2 scored" in result.output
    after = _images(out)
    assert len(after) == 4 and all(after[k] == v for k, v in first.items())
    folder = out / "ablations" / "relationbench" / "kml@tiny"
    table = pd.read_csv(folder / "table.csv")
    assert len(table) == 16 and table["n_cases"].eq(1).all() and table["mean"].notna().all()
    assert "| w/o Keypoint Matching Loss" in result.output and "| Full Model" in result.output

    again = relbench("ablate", *ARGS, "--out", out)
    assert "0 LoRA(s) trained, 0 image(s) generated, 0 scored" in again.output
    assert _images(out) == after
    assert pd.read_csv(folder / "table.csv").equals(table)
    dry = relbench("ablate", *ARGS, "--out", out, "--dry-run")
    assert "1/1 in bank" in dry.output and dry.output.count("2/2") == 4  # images and scores of both runs


def test_an_sdxl_ablation_without_loras_or_data_stops_before_any_work(env, tmp_path):
    result = relbench("ablate", "--component", "kml", "--cases", CASES, "--out", tmp_path / "r", ok=False)
    assert result.exit_code == 2
    assert "lacks RelationLoRAs" in result.output and "ride" in result.output and "--data DIR" in result.output
    assert not (tmp_path / "r").exists()


def test_ablate_under_accelerate_launch_with_two_cpu_processes(env, tmp_path):
    """`accelerate launch` splits each run's cases between the processes, trains each LoRA
    data-parallel, scores and writes the tables once."""
    import os
    import subprocess
    import sys

    out = tmp_path / "results"
    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RELBENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "relationbench.cli",
           "ablate", *ARGS, "--out", str(out)]
    proc = subprocess.run(cmd, env=env_vars, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("# Keypoint matching loss") == 1  # one process reports
    for name in ("relationbooth[steps=2]@tiny", "relationbooth[kml_weight=0.0,steps=2]@tiny"):
        run = RunDir(out / "relationbench" / name)
        records = run.records()
        keys = [(r["case_id"], r["index"]) for r in records]
        assert len(keys) == len(set(keys)) == 2 and {r["rank"] for r in records} == {0, 1}
        assert len(pd.read_csv(run.root / "scores.csv")) == 2
    table = pd.read_csv(out / "ablations" / "relationbench" / "kml@tiny" / "table.csv")
    assert len(table) == 16 and table["n_cases"].eq(1).all() and table["mean"].notna().all()


def test_an_imported_lora_does_not_stand_in_for_a_row(tmp_path):
    """Sampling would take an imported LoRA (settings unknown) for a relation; an ablation row
    counts only LoRAs trained with its own settings, so it trains one."""
    bank = tmp_path / "bank"
    bank.mkdir()
    loras = {"ride-imported": {"name": "ride-imported", "file": "ride-imported/w", "settings": {}, "base": {"name": "tiny"},
                               "created": "2024-01-01T00:00:00+00:00", "info": {"relation": "ride"}}}
    (bank / "index.json").write_text(json.dumps({"version": 1, "loras": loras}))
    opts = AblateOptions(components=["kml"], backbone="tiny", cases=[CASES], images_per_case=1, out=tmp_path,
                         set_values=[f"bank={bank}"], dry_run=True)
    summary = ablate(opts)
    for status in summary.status.values():  # sampling would take it; the row does not
        assert status.loras.newest == {"ride": None} and status.loras.sampled == {"ride": "ride-imported"}


def _digest(run, backbone: str = "tiny") -> str:
    import torch

    from relationbench.backbones import get_backbone
    from relationbench.methods import Context

    return run.card.build(Context(backbone=get_backbone(backbone), device="cpu", dtype=torch.float32,
                                  data_root=Path("."))).settings_digest()


def _bank(folder: Path, entries: list[tuple[str, str, str, str | None, int]], backbone: str = "tiny") -> Path:
    """A bank index of (name, relation, settings digest, data sha256, day) entries."""
    folder.mkdir(parents=True, exist_ok=True)
    loras = {name: {"name": name, "file": f"{name}/w", "settings": {}, "base": {"name": backbone},
                    "created": f"2024-01-0{day}T00:00:00+00:00",
                    "info": {"relation": rel, "settings_digest": digest, "data_sha256": data}}
             for name, rel, digest, data, day in entries}
    (folder / "index.json").write_text(json.dumps({"version": 1, "loras": loras}))
    return folder


def test_a_row_whose_images_were_made_with_another_lora_is_refused_before_any_work(tmp_path, monkeypatch):
    """E.g. relationbooth generated earlier with the authors' imported LoRAs: reusing it as the
    full-model row would compare LoRAs trained on other data with other settings."""
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    make_run(out, "relationbooth[steps=2]@tiny", ["rb-s-006", "rb-m-011"], per_case=1,
             record_extra={"lora": "ride-imported"})
    dry = relbench("ablate", *ARGS, "--out", out, "--dry-run")
    assert "1/2 (2 with other LoRAs)" not in dry.output and "2/2 (2 with other LoRAs)" in dry.output
    result = relbench("ablate", *ARGS, "--out", out, ok=False)
    assert result.exit_code == 2
    assert "relationbooth[steps=2]: 2 image(s), e.g. rb-m-011 sample 0 made with ride-imported" in result.output
    assert "--out DIR" in result.output
    assert not (tmp_path / "cache" / "relationbooth" / "loras").exists()  # nothing trained
    assert not (out / "relationbench" / "relationbooth[kml_weight=0.0,steps=2]@tiny").exists()


def test_rows_with_loras_of_different_data_are_refused(tmp_path, monkeypatch):
    """Without --data (sdxl) the rows' LoRAs are whatever the bank holds: they must share their data."""
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    plan = make_plan(AblateOptions(components=["kml"], cases=["rb-s-006"], out=tmp_path))
    digests = {name: _digest(run, "sdxl") for name, run in plan.runs.items()}
    _bank(tmp_path / "cache" / "relationbooth" / "loras",
          [("ride-a", "ride", digests["relationbooth[kml_weight=0.0]"], "data-one", 1),
           ("ride-b", "ride", digests["relationbooth"], "data-two", 1)], backbone="sdxl")
    result = relbench("ablate", "--component", "kml", "--cases", "rb-s-006", "--out", tmp_path / "r", ok=False)
    assert result.exit_code == 2
    assert "LoRAs for 'ride' were trained on different data" in result.output and "data-one" in result.output
    assert not (tmp_path / "r").exists()


def test_a_newer_lora_of_other_data_is_not_sampled(tmp_path, monkeypatch):
    """With the row's settings, the bank's newest LoRA was trained on other data: sampling
    would take it, so the row is refused before generating."""
    from relationbench.data.example_triplets import cached_example_triplets
    from relationbench.data.triplets import load_triplets

    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    example = load_triplets(cached_example_triplets("ride")).content_hash("ride")
    plan = make_plan(AblateOptions(components=["kml"], backbone="tiny", cases=["rb-s-006"], out=tmp_path))
    entries = []
    for n, (name, run) in enumerate(plan.runs.items()):
        digest = _digest(run)
        entries += [(f"ride-{n}-ours", "ride", digest, example, 1), (f"ride-{n}-theirs", "ride", digest, "other", 2)]
    _bank(tmp_path / "cache" / "relationbooth" / "loras", entries)
    result = relbench("ablate", "--component", "kml", "--backbone", "tiny", "--cases", "rb-s-006",
                      "--out", tmp_path / "r", ok=False)
    assert result.exit_code == 2
    assert "would sample with LoRAs not trained on the ablation's data (ride -> ride-0-theirs)" in result.output
    assert "--set bank=DIR" in result.output
    assert not (tmp_path / "r").exists()
