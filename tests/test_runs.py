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
    file = run.save_image("case-1", 0, img)
    rel = file["path"]
    assert rel == "images/case-1/0.png"
    data = (tmp_path / "run" / rel).read_bytes()
    assert file == {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert Image.open(tmp_path / "run" / rel).getpixel((3, 3)) == (10, 20, 30)
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


def test_check_manifest_keeps_one_true_line_per_image(tmp_path, monkeypatch):
    """Later line wins; a missing, changed or undecodable file drops its line; an older line
    without size and hash is given them; each file is hashed once; a second check changes nothing."""
    from relationbench import runs

    run = RunDir(tmp_path)
    files = {k: run.save_image("c", k, Image.new("RGB", (8, 8), (k, 0, 0))) for k in range(5)}
    lines = [{"case_id": "c", "index": k, "seed": k, **files[k]} for k in range(5)]
    stale = {**lines[0], "sha256": "0" * 64}  # an earlier line of image 0: the later one wins
    legacy = {"case_id": "c", "index": 4, "seed": 4, "path": files[4]["path"]}  # an older version's line
    run.append([stale, *lines[:4], legacy])
    (tmp_path / files[1]["path"]).unlink()
    (tmp_path / files[2]["path"]).write_bytes(b"\x89PNG not this")
    changed = bytearray((tmp_path / files[3]["path"]).read_bytes())
    changed[-10] ^= 1  # same size, other bytes
    (tmp_path / files[3]["path"]).write_bytes(changed)
    hashed = []
    monkeypatch.setattr(runs, "sha256_file", lambda p: hashed.append(p) or hashlib.sha256(p.read_bytes()).hexdigest())
    checked = run.check_manifest()
    assert sorted(hashed) == [tmp_path / files[0]["path"], tmp_path / files[3]["path"]]  # 1: no file; 2: size
    assert [(line["index"], why) for line, why in checked.dropped] == [(1, "missing"), (2, "changed on disk"),
                                                                        (3, "changed on disk")]
    assert run.records() == checked.kept == [lines[0], {**legacy, **{k: files[4][k] for k in ("bytes", "sha256")}}]
    text = run.manifest.read_bytes()
    assert run.check_manifest().dropped == [] and run.manifest.read_bytes() == text
    (tmp_path / files[4]["path"]).write_bytes((tmp_path / files[4]["path"]).read_bytes()[:-20])
    run.append([legacy])  # an older line whose file does not decode
    assert run.check_manifest().dropped == [(legacy, "not a readable image")]
    assert run.records() == [lines[0]]


def test_keep_suite(tmp_path):
    run = RunDir(tmp_path)
    assert run.suite_copy() is None
    path = run.keep_suite(b"suite: s\n")
    assert path == tmp_path / "suite.yaml" == run.suite_copy() and path.read_bytes() == b"suite: s\n"
    assert run.keep_suite(b'{"suite": "s"}', json_file=True) == tmp_path / "suite.json"
