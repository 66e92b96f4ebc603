"""relationbench.data: import, fetch (from a loopback server), verify, and finding images.

Uses the project's shared DreamBench copy (<repo>/../shared/data/dreambench); never the network.
"""

from __future__ import annotations

import functools
import io
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from relationbench import data
from relationbench.errors import UserError
from relationbench.suites import Subject

REPO = Path(__file__).resolve().parents[1]
SHARED_DB = REPO.parent / "shared" / "data" / "dreambench"
needs_shared = pytest.mark.skipif(
    not (SHARED_DB / "dog").is_dir(), reason=f"shared DreamBench copy not found at {SHARED_DB}"
)

DOG = Subject(name="dog", class_noun="dog", source="dreambench", dir="dog")
GHOST = Subject(name="ghost", class_noun="ghost", source="dreambench", dir="ghost")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in ("RELBENCH_DATA", "RELBENCH_DREAMBENCH_URL", "RELBENCH_CC101_URL", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def db_copy(tmp_path) -> Path:
    """A writable copy of the shared DreamBench folder, to break on purpose."""
    dest = tmp_path / "src" / "dreambench"
    shutil.copytree(SHARED_DB, dest)
    return dest


def github_zip(src: Path, dest: Path) -> Path:
    """A zip in the layout of GitHub's archive of google/dreambooth."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("dreambooth-main/LICENSE", "Apache License 2.0 (stand-in)\n")
        zf.writestr("dreambooth-main/README.md", "readme\n")
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"dreambooth-main/dataset/{p.relative_to(src).as_posix()}")
    return dest


@pytest.fixture
def server(tmp_path):
    """A threaded loopback HTTP server over a folder; yields (folder, base_url)."""
    folder = tmp_path / "www"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def assert_nothing_written(root: Path, name: str = "dreambench") -> None:
    assert not (root / name).exists()
    leftovers = list(root.iterdir()) if root.exists() else []
    assert leftovers == [], leftovers


# --- where images are ---------------------------------------------------------------------------


def test_data_root_precedence(monkeypatch, tmp_path):
    assert data.data_root() == Path("~/.cache/relationbench/data").expanduser()
    monkeypatch.setenv("RELBENCH_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert data.data_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_specs_are_data():
    db, cc = data.DATASETS["dreambench"], data.DATASETS["customconcept101"]
    assert len(db.subjects) == 30 and sum(map(len, db.expected_files.values())) == 158
    assert len(cc.subjects) == 101 and cc.expected_files is None
    assert "CC BY 4.0" in db.license and "noncommercial" in cc.license
    assert db.url.startswith("https://github.com/google/dreambooth/")
    assert cc.url.endswith("nupurkmr9/custom-diffusion/resolve/main/benchmark_dataset.zip")


def test_get_command(tmp_path):
    assert data.get_command("dreambench") == "relbench data fetch dreambench"
    assert data.get_command("dreambench", local=True) == "relbench data import dreambench DIR"
    assert data.get_command("customconcept101", root=tmp_path).endswith(f"--data-dir {tmp_path}")
    with pytest.raises(UserError, match="unknown dataset 'nope'.*dreambench"):
        data.get_command("nope")


def test_require_images_lists_all_missing(tmp_path):
    cc = Subject(name="pet_cat1", class_noun="cat", source="customconcept101", dir="pet_cat1")
    with pytest.raises(UserError) as err:
        data.require_images([DOG, GHOST, cc, DOG], tmp_path)
    text = str(err.value)
    assert "3 subject(s)" in text and "dog, ghost" in text and "pet_cat1" in text
    assert "relbench data fetch dreambench" in text and "relbench data fetch customconcept101" in text
    assert "relbench data import dreambench DIR" in text


# --- import -------------------------------------------------------------------------------------


@needs_shared
def test_import_folder(tmp_path):
    root = tmp_path / "root"
    out = data.import_("dreambench", SHARED_DB, root, quiet=True)
    assert out == root / "dreambench"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(data.DATASETS["dreambench"].subjects)
    assert len(list(out.glob("*/*.jpg"))) == 158
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["images"] == 158 and source["subjects"] == 30 and source["method"] == "import"
    assert "CC BY 4.0" in source["license"]
    assert (out / "LICENSE.md").is_file() and (out / "references_and_licenses.txt").is_file()
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 158 + 3 and any(line.endswith("  dog/00.jpg") for line in sums)
    assert [p.name for p in root.iterdir()] == ["dreambench"]  # no temporary folder left

    images = data.reference_images(DOG, root)
    assert [p.name for p in images] == sorted(p.name for p in (SHARED_DB / "dog").iterdir())
    assert data.missing_subjects([DOG, GHOST], root) == [GHOST]
    assert data.require_images([DOG], root) == {"dog": images}
    assert data.verify("dreambench", root).ok


def test_reference_images_filters_and_sorts(tmp_path):
    folder = tmp_path / "dreambench" / "dog"
    folder.mkdir(parents=True)
    for name in ("b.PNG", "a.jpeg", "c.webp", "notes.txt", ".hidden.jpg", "d.JPG"):
        (folder / name).write_bytes(b"x")
    assert [p.name for p in data.reference_images(DOG, tmp_path)] == ["a.jpeg", "b.PNG", "c.webp", "d.JPG"]
    assert data.reference_images(GHOST, tmp_path) == []


@needs_shared
def test_import_zip(tmp_path):
    archive = github_zip(SHARED_DB, tmp_path / "main.zip")
    out = data.import_("dreambench", archive, tmp_path / "root", quiet=True)
    assert len(list(out.glob("*/*.jpg"))) == 158
    assert (out / "LICENSE").read_text().startswith("Apache")
    assert data.verify("dreambench", tmp_path / "root").ok


@needs_shared
def test_import_missing_subject(db_copy, tmp_path):
    shutil.rmtree(db_copy / "wolf_plushie")
    (db_copy / "teapot" / "00.jpg").unlink()
    root = tmp_path / "root"
    with pytest.raises(UserError) as err:
        data.import_("dreambench", db_copy, root, quiet=True)
    text = str(err.value)
    assert str(db_copy) in text and "wolf_plushie" in text and "teapot/00.jpg" in text
    assert_nothing_written(root)


@needs_shared
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_import_corrupt_jpeg(db_copy, tmp_path, damage):
    victim = db_copy / "dog" / "02.jpg"
    blob = victim.read_bytes()
    victim.write_bytes(b"not a jpeg at all" * 10 if damage == "garbage" else blob[: len(blob) // 3])
    root = tmp_path / "root"
    with pytest.raises(UserError, match=r"dog/02\.jpg"):
        data.import_("dreambench", db_copy, root, quiet=True)
    assert_nothing_written(root)


@needs_shared
def test_failed_reimport_keeps_old_copy(db_copy, tmp_path):
    root = tmp_path / "root"
    data.import_("dreambench", SHARED_DB, root, quiet=True)
    shutil.rmtree(db_copy / "cat")
    with pytest.raises(UserError, match="cat"):
        data.import_("dreambench", db_copy, root, quiet=True)
    assert data.verify("dreambench", root).ok
    assert [p.name for p in root.iterdir()] == ["dreambench"]
    # a good re-import replaces the copy
    data.import_("dreambench", github_zip(SHARED_DB, tmp_path / "m.zip"), root, quiet=True)
    assert (root / "dreambench" / "LICENSE").is_file()
    assert [p.name for p in root.iterdir()] == ["dreambench"]


def test_import_bad_source(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        data.import_("dreambench", tmp_path / "absent", tmp_path / "root")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(UserError, match="not a folder or a zip"):
        data.import_("dreambench", tmp_path / "file.txt", tmp_path / "root")
    with pytest.raises(UserError, match="unknown dataset"):
        data.import_("imagenet", tmp_path, tmp_path / "root")


# --- fetch --------------------------------------------------------------------------------------


@needs_shared
def test_fetch_from_loopback(server, tmp_path, monkeypatch):
    folder, base = server
    github_zip(SHARED_DB, folder / "main.zip")
    root = tmp_path / "root"
    out = data.fetch("dreambench", root, url=f"{base}/main.zip", quiet=True)
    assert len(list(out.glob("*/*.jpg"))) == 158
    source = json.loads((out / "SOURCE.json").read_text())
    assert source["origin"] == f"{base}/main.zip" and source["method"] == "fetch"
    assert data.verify("dreambench", root).ok
    assert [p.name for p in root.iterdir()] == ["dreambench"]

    monkeypatch.setenv("RELBENCH_DREAMBENCH_URL", f"{base}/main.zip")  # the env override
    data.fetch("dreambench", tmp_path / "root2", quiet=True)
    assert data.verify("dreambench", tmp_path / "root2").ok


def test_fetch_unreachable_fails_fast(tmp_path):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/main.zip"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        data.fetch("dreambench", tmp_path / "root", url=url, quiet=True, timeout=5)
    assert time.monotonic() - start < 5
    text = str(err.value)
    assert url in text and "relbench data import dreambench" in text
    assert_nothing_written(tmp_path / "root")


def test_fetch_http_error_and_not_a_zip(server, tmp_path):
    folder, base = server
    with pytest.raises(UserError, match="HTTP 404"):
        data.fetch("dreambench", tmp_path / "root", url=f"{base}/absent.zip", quiet=True)
    (folder / "page.zip").write_text("<html>sign in</html>")
    with pytest.raises(UserError, match="not a zip"):
        data.fetch("dreambench", tmp_path / "root", url=f"{base}/page.zip", quiet=True)
    assert_nothing_written(tmp_path / "root")


def test_fetch_hub_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were it to try, it would fail otherwise
    with pytest.raises(UserError) as err:
        data.fetch("customconcept101", tmp_path / "root", quiet=True)
    text = str(err.value)
    assert "HF_HUB_OFFLINE" in text and "relbench data import customconcept101" in text
    assert_nothing_written(tmp_path / "root", "customconcept101")


def test_fetch_customconcept101_synthetic(server, tmp_path, monkeypatch):
    """All 101 concept folders, one tiny PNG each, in a zip with macOS junk; env URL override."""
    folder, base = server
    with zipfile.ZipFile(folder / "benchmark_dataset.zip", "w") as zf:
        for i, concept in enumerate(data.DATASETS["customconcept101"].subjects):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i, 0, 0)).save(buf, "PNG")
            zf.writestr(f"benchmark_dataset/{concept}/0.png", buf.getvalue())
            zf.writestr(f"__MACOSX/benchmark_dataset/{concept}/._0.png", b"junk")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an explicit mirror is not the hub
    monkeypatch.setenv("RELBENCH_CC101_URL", f"{base}/benchmark_dataset.zip")
    out = data.fetch("customconcept101", tmp_path / "root", quiet=True)
    assert len(list(out.glob("*/*.png"))) == 101
    assert "ADOBE RESEARCH LICENSE" in (out / "LICENSE-customconcept101.md").read_text()
    assert "noncommercial" in json.loads((out / "SOURCE.json").read_text())["license"]
    cat = Subject(name="pet_cat1", class_noun="cat", source="customconcept101", dir="pet_cat1")
    assert [p.name for p in data.reference_images(cat, tmp_path / "root")] == ["0.png"]


# --- verify -------------------------------------------------------------------------------------


@needs_shared
def test_verify_detects_changes(tmp_path):
    root = tmp_path / "root"
    out = data.import_("dreambench", SHARED_DB, root, quiet=True)
    with (out / "dog" / "01.jpg").open("r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    (out / "cat" / "00.jpg").unlink()
    (out / "cat" / "99.jpg").write_bytes(b"extra")
    report = data.verify("dreambench", root)
    assert not report.ok
    assert report.modified == ["dog/01.jpg"] and report.missing == ["cat/00.jpg"] and report.unlisted == ["cat/99.jpg"]
    assert report.checked == 161
    assert "dog/01.jpg" in report.summary() and str(report) == report.summary()


def test_verify_without_data(tmp_path):
    with pytest.raises(UserError, match="relbench data fetch dreambench"):
        data.verify("dreambench", tmp_path)


def test_import_is_light():
    code = "import sys, relationbench.data; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
