"""Layout pictures: each box is drawn where the case puts it, in its subject's colour."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.report.layouts import COLORS, TITLE_LINES, draw_layout
from relationbench.suites import load_suite


def test_boxes_drawn_in_place():
    case = load_suite("relationbench").case("rb-m-011")  # riding: rider above the ridden
    size = 200
    img = draw_layout(case, size)
    title_h = 8 + 12 * TITLE_LINES
    assert img.size == (size, size + title_h)
    for j, (x0, y0, x1, y1) in enumerate(case.boxes):
        # the middle of the box's right edge carries the subject's colour
        x = round(x1 * (size - 1))
        y = title_h + round((y0 + y1) / 2 * (size - 1))
        assert img.getpixel((x, y)) == COLORS[j] or img.getpixel((x - 1, y)) == COLORS[j]


def test_draw_commands(tmp_path):
    sheet = tmp_path / "sheet.png"
    res = CliRunner().invoke(cli, ["prompts", "draw", "--suite", "relationbench", "--kind", "multi",
                                   "--limit", "7", "--out", str(sheet)])
    assert res.exit_code == 0, res.output
    w, h = Image.open(sheet).size
    assert w == 5 * 256 and h == 2 * (256 + 8 + 12 * TITLE_LINES)
    one = tmp_path / "one.png"
    res = CliRunner().invoke(cli, ["prompts", "show", "rb-s-001", "--draw", str(one)])
    assert res.exit_code == 0 and one.exists()
