"""Every registered method card runs on the tiny backbone: one single and one multi case.

Generated from the registry, so a new card is covered the day it lands.
"""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from relationbench.cli import cli
from relationbench.methods import default_registry
from relationbench.runs import RunDir
from relationbench.suites import load_suite

from .conftest import SHARED


def dreambench_only_cases() -> list[str]:
    """One single and one multi relationbench case whose subjects all come from DreamBench."""
    cases = [c for c in load_suite("relationbench").cases if all(s.source == "dreambench" for s in c.subjects)]
    return [next(c.id for c in cases if c.kind == kind) for kind in ("single", "multi")]


def train_relations_of(case_ids: list[str], card: str, tmp_path) -> None:
    """A RelationLoRA per relation of the cases, each trained on the example set's `hug`
    samples (generation needs one per relation; what it learns does not matter here)."""
    from relationbench.methods.relationbooth.method import relation_key

    example, data = tmp_path / "example", tmp_path / "triplets"
    assert CliRunner().invoke(cli, ["data", "example-triplets", str(example)]).exit_code == 0
    cases = {c.id: c for c in load_suite("relationbench").cases}
    for relation in {relation_key(cases[i].relation) for i in case_ids}:
        shutil.copytree(example / "hug", data / relation)
    res = CliRunner().invoke(cli, ["train", "--method", card, "--data", str(data), "--backbone", "tiny", "--quiet"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name", default_registry().names())
def test_card_generates_on_tiny(name, tmp_path, monkeypatch):
    """As registered: a training card runs its own `tiny:` smoke schedule, in seconds."""
    card = default_registry().card(name)
    monkeypatch.setenv("RELBENCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data"
    if card.adapter_class().needs_references:
        source = SHARED / "data" / "dreambench"
        if not source.is_dir():
            pytest.skip("needs ../shared/data/dreambench for subject images")
        res = CliRunner().invoke(cli, ["data", "import", "dreambench", str(source), "--data-dir", str(data)])
        assert res.exit_code == 0, res.output
    out = tmp_path / "run"
    ids = dreambench_only_cases()
    if hasattr(card.adapter_class(), "train_relation"):
        train_relations_of(ids, name, tmp_path)
    res = CliRunner().invoke(cli, ["generate", "--method", name, "--backbone", "tiny", "--cases", ",".join(ids),
                                   "--batch-size", "2", "--data-dir", str(data), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert RunDir(out).finished() == {(i, 0) for i in ids}
    meta = json.loads((out / "run.json").read_text())
    assert meta["method"].get("tiny_schedule", {}) == card.resolve(tiny=True).tiny_applied
