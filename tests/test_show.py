"""`relbench data show`: the contact sheet of the example triplets has the documented size; its
pixels show each mask's translucent colour inside the mask (and the plain image outside), the
keypoint dots at the keypoints and the box outlines, all computed here from the set's own files
(triplets.json read as plain JSON, masks and targets with PIL)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from relationbench.cli import cli
from relationbench.data.example_triplets import SKELETONS, write_example_triplets
from relationbench.data.show import COLOURS, show_triplets

TILE, SCALE = 256, 2  # the example images are 128 px: twice as large on the sheet
ALPHA = 0.4


def origin(row: int, column: int) -> tuple[int, int]:
    """By hand: margin 8, tiles 256 wide with 8 between, rows of 30 caption + 256 + 8."""
    return 8 + column * 264, 8 + row * 294 + 30


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("show") / "triplets"
    write_example_triplets(root)
    return root


@pytest.fixture(scope="module")
def sheet(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("sheet") / "sheet.png"
    summary = show_triplets(example, out, relations=["hug"], max_samples=3)
    assert (summary.shown, summary.total) == (3, 5)
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def samples(example, relation="hug"):
    return json.loads((example / relation / "triplets.json").read_text())["samples"]


def segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of each of points [N, 2] to the segment a-b."""
    ab, ap = b - a, points - a
    t = np.clip((ap @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.linalg.norm(ap - t[:, None] * ab, axis=1)


def drawn_near(points: np.ndarray, objects: list[dict], masks: list[np.ndarray] | None) -> np.ndarray:
    """Points [N, 2] (tile pixels) within reach of any drawing: a skeleton edge (width 2), a
    keypoint disc (radius 3) or a box outline (width 2), with a pixel to spare."""
    near = np.zeros(len(points), bool)
    for k, obj in enumerate(objects):
        xy = np.asarray(obj["keypoints"]["xy"]) * TILE
        for a, b in SKELETONS[obj["keypoints"]["schema"]]:
            near |= segment_distance(points, xy[a], xy[b]) < 2.5
        near |= np.min(np.linalg.norm(points[:, None] - xy[None], axis=2), axis=1) < 5
        if masks is not None:
            rows, cols = np.flatnonzero(masks[k].any(axis=1)), np.flatnonzero(masks[k].any(axis=0))
            x0, y0, x1, y1 = cols[0] * SCALE, rows[0] * SCALE, (cols[-1] + 1) * SCALE - 1, (rows[-1] + 1) * SCALE - 1
            for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
                near |= segment_distance(points, np.array(a, float), np.array(b, float)) < 3.5
    return near


def test_sheet_size(sheet):
    # width 8 + 3 x (256 + 8); height 8 + 3 rows x (30 + 256 + 8)
    assert sheet.shape == (8 + 3 * 294, 800, 3)


def test_masks_are_tinted_in_their_colour_and_the_rest_is_the_image(example, sheet):
    for row, sample in enumerate(samples(example)[:3]):
        folder = example / "hug"
        target = np.asarray(Image.open(folder / sample["target"]).convert("RGB").resize((TILE, TILE),
                                                                                        Image.Resampling.LANCZOS))
        masks = [np.asarray(Image.open(folder / o["mask"])) > 0 for o in sample["objects"]]
        ys, xs = np.mgrid[0:TILE, 0:TILE]
        points = np.stack([xs.ravel() + 0.5, ys.ravel() + 0.5], axis=1)  # pixel centres
        free = ~drawn_near(points, sample["objects"], masks).reshape(TILE, TILE)
        ox, oy = origin(row, 0)
        tile = sheet[oy:oy + TILE, ox:ox + TILE]
        inside_any = np.zeros((TILE, TILE), bool)
        for k, mask in enumerate(masks):
            inside = mask[ys // SCALE, xs // SCALE]
            inside_any |= inside
            check = inside & free
            assert check.sum() >= 20, "too few mask pixels away from the drawings to check"
            expected = np.rint((1 - ALPHA) * target[check] + ALPHA * np.asarray(COLOURS[k]))
            assert np.abs(tile[check] - expected).max() <= 1
        outside = ~inside_any & free
        assert np.array_equal(tile[outside], target[outside])


def test_keypoint_dots_and_boxes(example, sheet):
    checked = 0
    for row, sample in enumerate(samples(example)[:3]):
        objects = sample["objects"]
        ox, oy = origin(row, 0)
        for k, obj in enumerate(objects):
            later = objects[k + 1:]  # drawn on top of this object's dots
            xy = np.asarray(obj["keypoints"]["xy"]) * TILE  # (column + 0.5) * 2: whole pixels + 1
            keep = ~drawn_near(xy, later, None) if later else np.ones(len(xy), bool)
            for x, y in xy[keep].astype(int):
                assert tuple(sheet[oy + y, ox + x]) == COLOURS[k]
                checked += 1
            # the box's top-left corner (from the mask), unless a skeleton crosses it
            mask = np.asarray(Image.open(example / "hug" / obj["mask"])) > 0
            corner = np.array([[np.flatnonzero(mask.any(axis=0))[0] * SCALE + 0.5,
                                np.flatnonzero(mask.any(axis=1))[0] * SCALE + 0.5]])
            if not drawn_near(corner, objects, None)[0]:
                x, y = corner[0].astype(int)
                assert tuple(sheet[oy + y, ox + x]) == COLOURS[k]
        for k, ref in enumerate(sample["references"]):
            rx, ry = origin(row, 1 + k)
            for x, y in (np.asarray(ref["keypoints"]["xy"]) * TILE).astype(int):
                assert tuple(sheet[ry + y, rx + x]) == COLOURS[k]
                checked += 1
    assert checked > 3 * 17 * 2  # every reference point and most target points


def test_cli_show_counts_rows_and_refuses_bad_input(example, tmp_path):
    out = tmp_path / "sub" / "wave.png"
    result = CliRunner().invoke(cli, ["data", "show", str(example), "--out", str(out), "--relation", "wave",
                                      "--max-samples", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "2 sample(s) drawn" in result.output and "3 more not shown" in result.output
    assert Image.open(out).size == (800, 8 + 2 * 294)

    result = CliRunner().invoke(cli, ["data", "show", str(example), "--out", str(tmp_path / "x.png"),
                                      "--max-samples", "0"])
    assert result.exit_code == 2 and "--max-samples" in result.output

    broken = tmp_path / "broken"
    write_example_triplets(broken)
    (broken / "wave" / "0" / "target.png").unlink()
    result = CliRunner().invoke(cli, ["data", "show", str(broken), "--out", str(tmp_path / "y.png")])
    assert result.exit_code == 2 and "target.png" in result.output
    assert not (tmp_path / "y.png").exists()
