"""`relbench report` on a large results tree (issue 13: "large runs stay usable"): a synthetic
tree of N runs x the relationbench suite's 200 cases x K images, every image scored, reported
three ways, and the page loaded in headless Chromium.

The tree: run folders as tests/score_runs.py `make_run` builds them (RunDir.start, keep_suite,
save_image, append), with smooth random pictures of --size px; a scores.csv per run written by
hand in the tiny backbone's paper score group (a distinct value per image, so the leaderboard
and every per-image score are filled); 3 reference images per subject where
`data.reference_images` finds them. Then `write_report` three times: first (thumbnails made),
again (thumbnails reused), `embed` (thumbnails as data URIs in the page). Each row: seconds,
of which making thumbnails and drawing and encoding contact sheets, thumbnails/s, the page's size, the size
of `<page>_files/`, and the process's peak RSS so far (ru_maxrss only grows: a row's figure is
the most of that row and every row before it). Chromium: seconds to load and render the page
(--virtual-time-budget, --dump-dom), next to its start on an empty page; the dumped DOM must
hold exactly one gallery page of case cards, each with every run's samples.

    python bench/report_scale.py [--runs 4] [--cases 200] [--images 4] [--size 256] [--page-size 20] [--keep]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from machine_load import busy_seconds, own_seconds  # bench/machine_load.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.score_runs: the run folders the tests build

from tests.score_runs import make_references, make_run, photo  # noqa: E402

from relationbench.report import html as report_html  # noqa: E402
from relationbench.report.gallery import Thumbs  # noqa: E402
from relationbench.report.html import ReportOptions, write_report  # noqa: E402
from relationbench.runs import SCORE_COLUMNS, RunDir  # noqa: E402
from relationbench.score import ScoreIds, ScoreOptions  # noqa: E402
from relationbench.suites import load_suite  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--virtual-time-budget=10000")
REFS_PER_SUBJECT = 3


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6 if folder.is_dir() else 0.0


# --------------------------------------------------------------------------- the tree


def build_tree(root: Path, runs: int, case_ids: list[str], images: int, size: int) -> tuple[Path, Path, set[str]]:
    """results/relationbench/m<r>@tiny (scored) and data/ (references); returns (results, data,
    the sha256 of every sample and reference: the thumbnails a first report must make)."""
    from tqdm.auto import tqdm

    results, data = root / "results", root / "data"
    group = dict(zip(("protocol", "clip_encoder", "dino_encoder"), ScoreIds(ScoreOptions(paths=[]))("paper", "tiny")))
    shas: set[str] = set()
    for r in tqdm(range(runs), unit="run", desc="bench · runs"):
        def picture(case_id: str, k: int, r: int = r):
            return photo(zlib.crc32(f"{r}/{case_id}/{k}".encode()), size=size)

        run = RunDir(make_run(results, f"m{r}@tiny", case_ids, images, image=picture))
        rng = np.random.default_rng(r)
        rows = []
        for (case_id, k), record in sorted(run.latest().items()):
            values = {m: f"{v:.6f}" for m, v in zip(("clip_t", "clip_r", "clip_i", "dino"), rng.uniform(10, 90, 4))}
            rows.append({c: "" for c in SCORE_COLUMNS} | {"case_id": case_id, "index": k, "kind": record["kind"],
                                                         **values, **group, "image_sha256": record["sha256"]})
            shas.add(record["sha256"])
        assert len(rows) == len(case_ids) * images, (run.root, len(rows))
        run.score_table().write(rows)
    make_references(data, case_ids, per_subject=REFS_PER_SUBJECT)
    shas |= {hashlib.sha256(p.read_bytes()).hexdigest() for p in data.rglob("*.jpg")}
    return results, data, shas


# --------------------------------------------------------------------------- timing


class Stages:
    """Seconds spent in wrapped functions, summed per name (reset per report)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, name: str) -> None:
        inner: Callable = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)


def chromium(url: str, profile: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of headless Chromium dumping url's DOM after its scripts ran."""
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def check_dom(dom: str, case_ids: list[str], runs: int, images: int, page_size: int) -> str:
    """The first gallery page: the first page_size cases in suite order, each with every run's
    samples; a failed check ends the benchmark."""
    shown = re.findall(r'<article class="case" data-case="relationbench/([^"]+)"', dom)
    want = case_ids[:page_size]
    assert shown == want, f"cards shown {shown[:5]}... ({len(shown)}), want {want[:5]}... ({len(want)})"
    samples = len(re.findall(r'<img [^>]*alt="m\d+@tiny sample \d+"', dom))
    assert samples == len(want) * runs * images, (samples, len(want) * runs * images)
    assert f"showing 1–{len(want)} of {len(case_ids)} cases" in dom
    return f"{len(shown)} case cards (page_size {page_size}), {samples} sample <img>s"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--cases", type=int, default=200, help="the relationbench suite's first N cases (it has 200)")
    parser.add_argument("--images", type=int, default=4, help="images per case and run")
    parser.add_argument("--size", type=int, default=256, help="generated images' side in px")
    parser.add_argument("--page-size", type=int, default=20, help="gallery cases per page")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        raise SystemExit(f"{CHROMIUM} not found: apt-get install chromium")

    stages = Stages()
    stages.wrap(Thumbs, "make", "thumbs")
    stages.wrap(report_html, "case_sheet", "sheets")  # drawing
    stages.wrap(report_html, "png_bytes", "sheets")  # and encoding

    suite = load_suite("relationbench")
    case_ids = [c.id for c in suite.cases][: args.cases]
    root = Path(tempfile.mkdtemp(prefix="relbench-report-scale-"))
    t_start, busy_start, own_start = time.perf_counter(), busy_seconds(), own_seconds()
    try:
        t0 = time.perf_counter()
        results, data, shas = build_tree(root, args.runs, case_ids, args.images, args.size)
        build_s = time.perf_counter() - t0
        n_images = args.runs * len(case_ids) * args.images
        png_mb = sum(folder_mb(d / "images") for d in (results / "relationbench").iterdir())
        rss_tree = peak_rss_mib()

        rows = []
        pages = {}
        for name, embed, out in [("first (thumbnails made)", False, "report.html"),
                                 ("second (thumbnails reused)", False, "report.html"),
                                 ("--embed", True, "report_embed.html")]:
            stages.seconds.clear()
            t0 = time.perf_counter()
            summary = write_report(ReportOptions(path=results, out=results / out, data_dir=data, embed=embed,
                                                 page_size=args.page_size, quiet=True))
            seconds = time.perf_counter() - t0
            assert summary.images == n_images and summary.cases == len(case_ids), summary
            assert not summary.warnings, summary.warnings[:3]
            want_made = 0 if name.startswith("second") else len(shas)
            assert summary.thumbnails_made == want_made, (name, summary.thumbnails_made, want_made)
            thumbs_s, sheets_s = stages.seconds.get("thumbs", 0.0), stages.seconds.get("sheets", 0.0)
            rate = f"{summary.thumbnails_made / thumbs_s:.0f}" if summary.thumbnails_made else "-"
            files = summary.page.with_name(f"{summary.page.stem}_files")
            rows.append([name, f"{seconds:.1f}", f"{thumbs_s:.1f}", f"{sheets_s:.1f}", summary.thumbnails_made, rate,
                         f"{summary.page.stat().st_size / 1e6:.1f}", f"{folder_mb(files):.1f}",
                         f"{peak_rss_mib():.0f}"])
            pages[embed] = summary.page
            print(f"{name}: {seconds:.1f} s", flush=True)

        profile = root / "chromium-profile"
        blank = root / "blank.html"
        blank.write_text("<!doctype html><title>blank</title><p>blank</p>")
        start_s, _ = chromium(blank.as_uri(), profile)
        load_s, dom = chromium(pages[False].as_uri(), profile)
        checked = check_dom(dom, case_ids, args.runs, args.images, args.page_size)
        embed_s, embed_dom = chromium(pages[True].as_uri(), profile)
        check_dom(embed_dom, case_ids, args.runs, args.images, args.page_size)
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    wall = time.perf_counter() - t_start
    busy_end = busy_seconds()
    load = ("load of other processes unknown" if busy_start is None or busy_end is None else
            f"other processes used {max(busy_end - busy_start - (own_seconds() - own_start), 0) / wall:.2f} "
            "cores on average")
    from tabulate import tabulate

    version = subprocess.run([str(CHROMIUM), "--version"], capture_output=True, text=True).stdout.strip()
    print()
    print(f"{platform.machine()}, {os.cpu_count()} cores, no GPU used; Python {platform.python_version()}; {version}")
    print(f"tree: {args.runs} runs x {len(case_ids)} cases x {args.images} images = {n_images} PNGs at {args.size} px "
          f"({png_mb:.0f} MB), {len(shas) - n_images} reference images; built in {build_s:.0f} s "
          f"(peak RSS {rss_tree:.0f} MiB after building); page size {args.page_size}")
    print(f"wall {wall:.0f} s; {load}")
    print()
    print(tabulate(rows, headers=["report", "s", "thumbnails s", "sheets s", "thumbnails made", "thumbnails/s",
                                  "HTML MB", "<page>_files MB", "peak RSS MiB (so far)"],
                   tablefmt="github", disable_numparse=True))
    print()
    print(f"chromium, --dump-dom, virtual time budget 10 s: empty page {start_s:.1f} s; report {load_s:.1f} s; "
          f"report --embed {embed_s:.1f} s")
    print(f"DOM of the first gallery page (both pages): {checked}")


if __name__ == "__main__":
    main()
