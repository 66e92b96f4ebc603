"""Run folder rules: seeds, atomic images, torn manifests, the writer lock."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp

import pytest
from PIL import Image

from relationbench.errors import UserError
from relationbench.runs import RunDir, sample_seed


def test_sample_seed_rule():
    assert sample_seed(1234, 0) == 1234
    expected = int.from_bytes(hashlib.sha256(b"1234:3").digest()[:4], "big")
    assert sample_seed(1234, 3) == expected
    seeds = {sample_seed(s, k) for s in range(50) for k in range(1, 5)}
    assert len(seeds) == 200


def test_save_and_count(tmp_path):
    run = RunDir(tmp_path / "run")
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    rel = run.save_image("case-1", 0, img)
    assert rel == "images/case-1/0.png"
    assert run.finished() == set()  # a file without its manifest line does not count
    run.append([{"case_id": "case-1", "index": 0, "seed": 1, "path": rel}])
    assert run.finished() == {("case-1", 0)}
    assert not list((tmp_path / "run").rglob("*.tmp"))
    (tmp_path / "run" / rel).unlink()
    assert run.finished() == set()  # a deleted image is made again


def test_repair_drops_torn_line_and_temp_files(tmp_path):
    run = RunDir(tmp_path)
    run.save_image("c", 0, Image.new("RGB", (4, 4)))
    run.append([{"case_id": "c", "index": 0, "seed": 1, "path": "images/c/0.png"}])
    with open(run.manifest, "a") as f:
        f.write('{"case_id": "c", "index": 1, "se')  # killed mid-write
    tmp = run.images / "c" / ".1.png.999.tmp"
    tmp.write_bytes(b"\x89PNG partial")
    assert run.finished() == {("c", 0)}
    run.repair()
    assert run.manifest.read_text().endswith("}\n")
    assert len(run.manifest.read_text().splitlines()) == 1
    assert not tmp.exists()


def _try_lock(path, queue):
    try:
        with RunDir(path).lock():
            queue.put("locked")
    except UserError as exc:
        queue.put(str(exc))


def test_lock_refuses_second_writer(tmp_path):
    run = RunDir(tmp_path)
    queue = mp.get_context("fork").Queue()
    with run.lock():
        p = mp.get_context("fork").Process(target=_try_lock, args=(tmp_path, queue))
        p.start()
        p.join(20)
        msg = queue.get(timeout=5)
    assert "another relbench process" in msg and "--out" in msg
    p = mp.get_context("fork").Process(target=_try_lock, args=(tmp_path, queue))
    p.start()
    p.join(20)
    assert queue.get(timeout=5) == "locked"  # released on exit


def test_start_checks_identity(tmp_path):
    run = RunDir(tmp_path / "r")
    meta = {"suite": {"name": "s"}, "method": {"digest": "a"}, "backbone": {"name": "tiny"}, "dtype": "fp32",
            "images_per_case": 1}
    run.start(meta)
    assert json.loads(run.run_json.read_text())["images_per_case"] == 1
    assert run.start({**meta, "images_per_case": 3})["images_per_case"] == 3
    assert run.start({**meta, "images_per_case": 2})["images_per_case"] == 3
    with pytest.raises(UserError, match="differs in: method"):
        run.start({**meta, "method": {"digest": "b"}})
