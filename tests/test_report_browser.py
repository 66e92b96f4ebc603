"""The HTML report in headless Chromium (Debian's chromium, started here): the gallery and a
chart render, and the filters, sort, views and pages in the URL hash change what is shown.
Selected with `pytest -m browser` (.ci/run runs it); fails, not skips, without chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from relationbench.report.html import ReportOptions, write_report

from .test_report import BAR, BLUE, RED, build

pytestmark = pytest.mark.browser
CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 4000)  # tall enough to hold the leaderboard, the ablation and a page of two cases


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run headless Chromium on url (scripts given 5 s of virtual time); its stdout."""
    if not CHROMIUM.is_file():
        pytest.fail("install chromium (apt-get install chromium)")
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
           "--virtual-time-budget=5000", *args, url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def dom(tmp_path: Path, page: Path, hash_: str = "") -> str:
    return chromium(tmp_path, page.as_uri() + hash_, "--dump-dom")


def screenshot(tmp_path: Path, page: Path, hash_: str, name: str) -> np.ndarray:
    path = tmp_path / name
    chromium(tmp_path, page.as_uri() + hash_, f"--screenshot={path}")
    return np.asarray(Image.open(path).convert("RGB"), int)


def cases_shown(html: str) -> list[str]:
    return re.findall(r'<article class="case" data-case="relationbench/([^"]+)"', html)


def runs_shown(html: str) -> set[str]:
    return set(re.findall(r'<div class="run" data-run="([^"]+)"', html))


def count(pixels: np.ndarray, colour, tolerance: int = 30) -> int:
    if isinstance(colour, str):  # "#rrggbb"
        colour = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return int((np.abs(pixels - np.asarray(colour)).max(axis=-1) <= tolerance).sum())


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    # blue's CLIP-T grows half as fast from case to case as red's: the red - blue gap ranks the cases
    results, data, *_ = build(tmp, blue_spread=0.5)
    return write_report(ReportOptions(path=results, data_dir=data, page_size=2, n_boot=50, quiet=True)).page


def test_gallery_and_chart_render(page, tmp_path):
    html = dom(tmp_path, page)
    assert cases_shown(html) == ["rb-s-001", "rb-s-006"]  # page 1 of 2
    assert "showing 1–2 of 3 cases" in html
    assert runs_shown(html) == {"red@tiny", "blue@tiny", "green@tiny"}
    assert len(re.findall(r'<img src="report_files/thumbs/[^"]+" alt="red@tiny sample', html)) == 4
    assert len(re.findall(r'<img src="report_files/thumbs/[^"]+" alt="blue@tiny sample', html)) == 4
    assert 'id="chart-kml-clip-t"' in html and "<svg" in html
    assert html.count('<svg class="layout"') == 2


def test_filters_in_the_url_select_what_is_shown(page, tmp_path):
    html = dom(tmp_path, page, "#method=red@tiny")
    assert runs_shown(html) == {"red@tiny"} and cases_shown(html) == ["rb-s-001", "rb-s-006"]
    assert 'alt="blue@tiny' not in html
    html = dom(tmp_path, page, "#method=green@tiny")  # green made single cases only
    assert cases_shown(html) == ["rb-s-001", "rb-s-006"] and "showing 1–2 of 2 cases" in html
    html = dom(tmp_path, page, "#kind=multi")
    assert cases_shown(html) == ["rb-m-001"] and runs_shown(html) == {"red@tiny", "blue@tiny"}
    html = dom(tmp_path, page, "#relation=ride")
    assert cases_shown(html) == ["rb-s-006"] and "showing 1–1 of 1 cases (3 in all)" in html
    assert cases_shown(dom(tmp_path, page, "#relation=hug&kind=single")) == ["rb-s-001"]
    assert cases_shown(dom(tmp_path, page, "#page=2")) == ["rb-m-001"]


def test_sort_and_worst_and_gap_views(page, tmp_path):
    # red's CLIP-R case means rise with the case's place (rb-s-001, rb-s-006, rb-m-001)
    assert cases_shown(dom(tmp_path, page, "#sort=clip_r&method=red@tiny")) == ["rb-m-001", "rb-s-006"]
    assert cases_shown(dom(tmp_path, page, "#sort=clip_r&order=asc&method=red@tiny")) == ["rb-s-001", "rb-s-006"]
    worst = dom(tmp_path, page, "#view=worst&metric=clip_r&method=red@tiny")
    assert cases_shown(worst) == ["rb-s-001", "rb-s-006"] and "CLIP-R 15.1 · red@tiny" in worst
    # red - blue CLIP-T: 10, 15, 20 over the three cases; only the two runs shown
    gap = dom(tmp_path, page, "#view=gap&metric=clip_t&a=red@tiny&b=blue@tiny")
    assert cases_shown(gap) == ["rb-m-001", "rb-s-006"] and runs_shown(gap) == {"red@tiny", "blue@tiny"}
    assert "CLIP-T +20.0 · red@tiny − blue@tiny" in gap


def test_screenshots_show_the_samples_filtered_and_the_chart(page, tmp_path):
    plain = screenshot(tmp_path, page, "", "plain.png")
    assert plain.shape[:2] == (WINDOW[1], WINDOW[0])
    assert count(plain, RED) > 10_000 and count(plain, BLUE) > 10_000  # 192 x 96 thumbnails
    assert count(plain, BAR, tolerance=10) > 2_000
    red_only = screenshot(tmp_path, page, "#method=red@tiny", "red.png")
    assert count(red_only, RED) > 10_000 and count(red_only, BLUE) < 200
    assert count(red_only, BAR, tolerance=10) > 2_000
