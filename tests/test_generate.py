"""`relbench generate` on the tiny backbone: layout, resume, batch invariance, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.runs import RunDir, sample_seed
from relationbench.suites import load_suite

from .conftest import REPO

CASES = "rb-s-001,rb-m-001,rb-s-002"


@pytest.fixture
def fast_card(tmp_path) -> Path:
    """The sdxl card with 4 steps: the same code path, a fraction of the time."""
    card = tmp_path / "sdxl-fast.yaml"
    card.write_text("name: sdxl-fast\nadapter: relationbench.methods.sdxl:SDXLMethod\nsettings: {steps: 4}\n")
    return card


def gen(*args: str):
    res = CliRunner().invoke(cli, ["generate", "--backbone", "tiny", "--quiet", *args])
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def images(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("images/*/*.png"))}


def test_run_layout_and_resume(tmp_path, fast_card):
    out = tmp_path / "run"
    res = gen("--method", str(fast_card), "--suite", "relationbench", "--cases", CASES,
              "--images-per-case", "2", "--batch-size", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "6 generated, 0 already done" in res.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["suite"]["name"] == "relationbench" and meta["backbone"]["name"] == "tiny"
    # every setting as resolved (card value over the Settings default), not just the card's own
    assert meta["method"]["settings"] == {"steps": 4, "guidance_scale": 5.0, "negative_prompt": "", "prompt_prefix": "",
                                          "height": None, "width": None}
    assert meta["images_per_case"] == 2
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    suite = load_suite("relationbench")
    assert sorted((r["case_id"], r["index"]) for r in lines) == sorted(
        (c, k) for c in CASES.split(",") for k in range(2))
    for r in lines:
        case = suite.case(r["case_id"])
        assert r["seed"] == sample_seed(case.seed, r["index"])
        assert r["path"] == f"images/{r['case_id']}/{r['index']}.png"
        assert r["prompt"] == case.prompt and r["kind"] == case.kind
        assert Image.open(out / r["path"]).size == (128, 128)
    before = images(out)
    res = gen("--method", str(fast_card), "--suite", "relationbench", "--cases", CASES,
              "--images-per-case", "2", "--out", str(out))
    assert "0 generated, 6 already done" in res.output
    assert images(out) == before
    res = gen("--method", str(fast_card), "--suite", "relationbench", "--cases", CASES,
              "--images-per-case", "3", "--out", str(out))
    assert "3 generated, 6 already done" in res.output
    assert json.loads((out / "run.json").read_text())["images_per_case"] == 3


def test_batch_size_never_changes_an_image(tmp_path, fast_card):
    runs = {}
    for b in ("1", "3"):
        runs[b] = tmp_path / f"b{b}"
        res = gen("--method", str(fast_card), "--cases", CASES, "--batch-size", b, "--out", str(runs[b]))
        assert res.exit_code == 0, res.output
    a, b = images(runs["1"]), images(runs["3"])
    assert len(a) == 3 and a == b


class _Died(Exception):
    pass


def test_lost_batch_is_redone(tmp_path, fast_card, monkeypatch):
    """A crash between writing images and their manifest line loses only that batch."""
    out = tmp_path / "run"
    calls = {"n": 0}
    real_append = RunDir.append

    def dying_append(self, records):
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Died  # the process dies here
        real_append(self, records)

    monkeypatch.setattr(RunDir, "append", dying_append)
    with pytest.raises(_Died):
        gen("--method", str(fast_card), "--cases", CASES, "--batch-size", "1", "--out", str(out))
    monkeypatch.setattr(RunDir, "append", real_append)
    run = RunDir(out)
    assert run.finished() == {("rb-s-001", 0)}
    assert (out / "images/rb-s-002/0.png").exists()  # on disk (suite order), but not counted
    res = gen("--method", str(fast_card), "--cases", CASES, "--batch-size", "1", "--out", str(out))
    assert "2 generated, 1 already done" in res.output
    ref = tmp_path / "ref"
    gen("--method", str(fast_card), "--cases", CASES, "--out", str(ref))
    assert images(out) == images(ref)


def test_sigkill_and_resume(tmp_path, fast_card):
    """Kill -9 a real process twice mid-run; every counted image is whole; resume completes it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "relationbench.cli", "generate", "--method", str(fast_card), "--backbone", "tiny",
           "--suite", "relationbench", "--limit", "6", "--batch-size", "1", "--out", str(out), "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for kill_after in (1, 3):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(RunDir(out).records()) < kill_after and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # land somewhere inside the next batch
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run = RunDir(out)
        for r in run.records():
            Image.open(out / r["path"]).load()  # whole PNGs only
        assert len(run.finished()) >= kill_after
    res = gen("--method", str(fast_card), "--limit", "6", "--batch-size", "1", "--out", str(out))
    assert res.exit_code == 0, res.output
    run = RunDir(out)
    assert len(run.finished()) == 6 and not list(out.rglob("*.tmp"))
    ref = tmp_path / "ref"
    gen("--method", str(fast_card), "--limit", "6", "--batch-size", "2", "--out", str(ref))
    assert images(out) == images(ref)


def test_reference_images_path(tmp_path, shared_dreambench):
    """A method that reads subject images: missing images stop the run before any work."""
    card = tmp_path / "paste.yaml"
    card.write_text("name: paste\nadapter: tests.fake_methods:PasteReferences\n")
    data = tmp_path / "data"
    out = tmp_path / "run"
    res = gen("--method", str(card), "--cases", "rb-s-001,rb-m-001", "--data-dir", str(data), "--out", str(out))
    assert res.exit_code == 2
    assert "relbench data fetch dreambench" in res.output and "relbench data import" in res.output
    assert not out.exists()
    res = CliRunner().invoke(cli, ["data", "import", "dreambench", str(shared_dreambench), "--data-dir", str(data)])
    assert res.exit_code == 0, res.output
    ids = [c.id for c in load_suite("relationbench").cases
           if all(s.source == "dreambench" for s in c.subjects)][:3]
    res = gen("--method", str(card), "--cases", ",".join(ids), "--data-dir", str(data), "--out", str(out))
    assert res.exit_code == 0, res.output
    for r in RunDir(out).records():
        assert all(Path(p).is_relative_to(data / "dreambench") for p in r["references"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "sdxl", "--cases", "rb-s-999"], "no case(s) rb-s-999"),
        (["--method", "sdxxl"], "did you mean sdxl"),
        (["--method", "sdxl", "--suite", "nope"], "unknown suite 'nope'"),
        (["--method", "sdxl", "--batch-size", "0"], "at least 1"),
        (["--method", "sdxl", "--weight", "sdxl"], "KEY=VALUE"),
    ],
)
def test_bad_input_writes_nothing(tmp_path, args, message):
    out = tmp_path / "run"
    res = gen(*args, "--out", str(out))
    assert res.exit_code == 2 and message in res.output
    assert not out.exists()


def test_sdxl_without_weights_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    out = tmp_path / "run"
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["generate", "--method", "sdxl", "--limit", "1", "--out", str(out)])
    assert time.perf_counter() - t0 < 10
    assert res.exit_code == 2 and "--backbone tiny" in res.output
    assert not out.exists()


def test_other_run_in_folder_refused(tmp_path, fast_card):
    out = tmp_path / "run"
    gen("--method", str(fast_card), "--limit", "1", "--out", str(out))
    manifest = (out / "manifest.jsonl").read_bytes()
    res = gen("--method", "sdxl", "--limit", "1", "--out", str(out))
    assert res.exit_code == 2 and "differs in: method" in res.output
    assert (out / "manifest.jsonl").read_bytes() == manifest


def test_locked_run_refused(tmp_path, fast_card):
    out = tmp_path / "run"
    with RunDir(out).lock():
        res = gen("--method", str(fast_card), "--limit", "1", "--out", str(out))
    assert res.exit_code == 2 and "another relbench process" in res.output
    assert not (out / "manifest.jsonl").exists()


def launch_two(card: str, out: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` of generate in two CPU processes (gloo), one thread each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "relationbench.cli", "generate", "--method", card, "--backbone", "tiny",
           "--limit", "5", "--images-per-case", "2", "--batch-size", "2", "--out", str(out), "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_sharded_with_accelerate(tmp_path, fast_card):
    """Two CPU processes under `accelerate launch` split the cases; the manifest is whole."""
    out = tmp_path / "sharded"
    proc = launch_two(str(fast_card), out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = RunDir(out).records()
    keys = [(r["case_id"], r["index"]) for r in records]
    assert len(keys) == len(set(keys)) == 10
    assert {r["rank"] for r in records} == {0, 1}
    by_rank = {rank: {r["case_id"] for r in records if r["rank"] == rank} for rank in (0, 1)}
    assert not by_rank[0] & by_rank[1]  # disjoint shares of the cases
    # images match a single process with the same thread count (threads change rounding)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = tmp_path / "single"
        gen("--method", str(fast_card), "--limit", "5", "--images-per-case", "2", "--out", str(ref))
    finally:
        torch.set_num_threads(threads)
    assert images(out) == images(ref)


def test_suite_default_images_per_case(tmp_path, fast_card):
    """DreamBench's protocol is 4 images per subject and prompt: the suite file says so."""
    out = tmp_path / "db"
    res = gen("--method", str(fast_card), "--suite", "dreambench", "--cases", "db-dog-00", "--batch-size", "4",
              "--out", str(out))
    assert res.exit_code == 0, res.output
    assert RunDir(out).finished() == {("db-dog-00", k) for k in range(4)}
    assert json.loads((out / "run.json").read_text())["images_per_case"] == 4


def test_sharded_launch_stops_together_on_a_bad_run(tmp_path, fast_card):
    """The main process's refusal (another run in the folder) stops both, none hangs."""
    out = tmp_path / "run"
    gen("--method", "sdxl", "--limit", "1", "--out", str(out))
    manifest = (out / "manifest.jsonl").read_bytes()
    proc = launch_two(str(fast_card), out)
    assert proc.returncode != 0
    assert proc.stderr.count("differs in: method") == 2  # both processes say why
    assert (out / "manifest.jsonl").read_bytes() == manifest
