"""Synthetic run folders and subject images for scoring tests: no generation needed."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from relationbench.runs import RunDir
from relationbench.suites import load_suite


def photo(seed: int, size: int = 96) -> Image.Image:
    """A smooth random picture (gradients plus noise): differs between seeds, decodes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 6)),
                     np.cos(5 * y * rng.uniform(0.5, 2) + rng.uniform(0, 6)),
                     np.sin(4 * (x + y) * rng.uniform(0.5, 2))], axis=-1)
    pixels = (base * 90 + 128 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def make_run(root: Path, name: str, case_ids: list[str], per_case: int = 2, *, suite: str | Path = "relationbench",
             backbone: str = "tiny", seed: int = 0, record_extra: dict | None = None,
             image: Callable[[str, int], Image.Image] | None = None) -> Path:
    """A finished run in root/<suite>/<name>: run.json, the suite's copy, one PNG and one manifest
    line per (case, sample). `suite`: a built-in suite's name or a suite file (recorded and kept
    as generate does). image(case_id, k): the picture of a sample (default: a seeded photo())."""
    loaded = load_suite(suite)
    run = RunDir(root / loaded.name / name)
    suite_bytes = Path(loaded.path).read_bytes()
    run.start({"suite": {"name": loaded.name, "version": 1, "file_sha256": hashlib.sha256(suite_bytes).hexdigest()},
               "suite_path": str(Path(loaded.path).resolve()),
               "method": {"name": name.split("@")[0]}, "backbone": {"name": backbone}, "dtype": "fp32",
               "images_per_case": per_case})
    run.keep_suite(suite_bytes, json_file=Path(loaded.path).suffix == ".json")
    cases = {c.id: c for c in loaded.cases}
    records = []
    for n, case_id in enumerate(case_ids):
        case = cases[case_id]
        for k in range(per_case):
            picture = image(case_id, k) if image else photo(seed * 1000 + n * 10 + k)
            file = run.save_image(case_id, k, picture)
            records.append({"case_id": case_id, "index": k, "seed": k, **file, "kind": case.kind,
                            "subjects": [s.name for s in case.subjects], "prompt": case.prompt,
                            **(record_extra or {})})
    run.append(records)
    return run.root


def make_references(data_root: Path, case_ids: list[str], suite: str = "relationbench", per_subject: int = 3) -> None:
    """A few reference images for every subject of the cases, where data.py looks for them."""
    cases = {c.id: c for c in load_suite(suite).cases}
    for case_id in case_ids:
        for s in cases[case_id].subjects:
            folder = data_root / s.source / s.dir
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(per_subject):
                photo(zlib.crc32(f"{s.name}/{j}".encode()), size=80).save(folder / f"{j:02d}.jpg", quality=95)
