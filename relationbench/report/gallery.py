"""What the HTML report shows: each case's images from every run with their per-image scores,
the subjects' reference images, the ablation folders; and the thumbnails the page links.

An image is the manifest's current line of its (case, sample) whose file is on disk; its
scores are the rows of every score file of its run for that (case, sample), which
`aggregate.load_scores` (read once by the caller, for the leaderboard too) has checked to be
of that very image (its sha256) and one per score group. A case mean is `aggregate.case_means` (the leaderboard's own definition).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd
from PIL import Image

from ..data import reference_images, sha256_file
from ..errors import UserError
from ..images import read_image
from ..metrics.protocols import PROTOCOLS
from ..metrics.registry import PAPER, column_spec
from ..runs import FAMILY_GROUP, SCORE_GROUP, RunDir, atomic_write_bytes
from ..score import run_suite
from ..suites import Case
from .aggregate import case_means, run_label, summary_metrics

THUMB_SIZE = 192  # px on the long side: four samples side by side on a laptop screen
THUMB_QUALITY = 85  # JPEG: about 10 kB per thumbnail
ABLATION_JSON = "ablation.json"
ABLATION_KEYS = ("component", "title", "reference", "variants", "metrics", "kinds")


@dataclass(frozen=True)
class ScoreColumn:
    """One per-image score the page shows. `key` names it in the page's data and in the URL
    (`sort=clip_r`): the column's name, or `name (group)` when its family was scored with
    several protocols or models, whose numbers must not be sorted or averaged together."""

    key: str
    name: str  # the score file's column (clip_r)
    title: str  # as the tables print it (CLIP-R)
    direction: str  # "higher" or "lower" is better
    digits: int  # decimals shown
    group: tuple[str, ...]  # its score group (protocol and encoders, or the family's model id)


@dataclass(frozen=True)
class Sample:
    index: int
    path: Path
    sha256: str
    scores: dict[str, float]  # ScoreColumn.key -> value; a score the image lacks is absent


@dataclass
class CaseView:
    """One case of one suite, with the samples of every run that generated it."""

    case: Case
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # run label -> samples by index
    means: dict[str, dict[str, float]] = field(default_factory=dict)  # run label -> key -> case mean


@dataclass(frozen=True)
class Reference:
    path: Path
    sha256: str


@dataclass
class Gallery:
    runs: list[tuple[str, str, Path]]  # (label, suite, folder), sorted by suite then label
    columns: list[ScoreColumn]
    cases: list[CaseView]  # by suite, then in the suite's order
    references: dict[tuple[str, str], list[Reference]]  # (suite, subject name) -> its images
    warnings: list[str]

    @property
    def n_images(self) -> int:
        return sum(len(s) for v in self.cases for s in v.samples.values())


def collect(run_dirs: Sequence[Path], data_root: Path, scores: Mapping[str, pd.DataFrame]) -> Gallery:
    """Every run's current images, matched to their cases and to their scores (family ->
    load_scores(run_dirs, family))."""
    columns, values, means = _scores(scores)
    warnings: list[str] = []
    views: dict[tuple[str, str], CaseView] = {}
    order: dict[tuple[str, str], int] = {}
    runs = []
    subjects = {}
    for run_dir in run_dirs:
        suite = run_suite(run_dir)
        label = run_label(run_dir)
        runs.append((label, suite.name, run_dir))
        cases = {case.id: case for case in suite.cases}
        for i, case_id in enumerate(cases):
            order.setdefault((suite.name, case_id), i)
        missing = 0
        for (case_id, index), record in sorted(RunDir(run_dir).latest().items()):
            path = run_dir / record["path"]
            if not path.is_file():
                missing += 1
                continue
            if case_id not in cases:
                warnings.append(f"{path}: case {case_id!r} is not in suite {suite.name!r}; not shown")
                continue
            view = views.setdefault((suite.name, case_id), CaseView(cases[case_id]))
            for s in view.case.subjects:
                subjects.setdefault((suite.name, s.name), s)
            sha = record.get("sha256") or sha256_file(path)
            view.samples.setdefault(label, []).append(
                Sample(index, path, sha, values.get((str(run_dir), case_id, index), {})))
            if (str(run_dir), case_id) in means:
                view.means[label] = means[str(run_dir), case_id]
        if missing:
            warnings.append(f"{run_dir}: {missing} image(s) its manifest lists are not on disk; not shown")
    references = {key: _references(s, data_root, warnings) for key, s in subjects.items()}
    runs.sort(key=lambda r: (r[1], r[0]))
    return Gallery(runs, columns, [views[k] for k in sorted(views, key=lambda k: (k[0], order[k]))], references,
                   warnings)


def _references(subject, root: Path, warnings: list[str]) -> list[Reference]:
    try:
        files = reference_images(subject, root)
    except UserError as exc:  # a subject named by path whose file is gone: the page shows none
        warnings.append(exc.render())
        return []
    return [Reference(p, sha256_file(p)) for p in files]


def _scores(scores: Mapping[str, pd.DataFrame]):
    """(the columns; (run folder, case_id, index) -> {key: value}; (run folder, case_id) -> {key: mean})."""
    columns: list[ScoreColumn] = []
    values: dict[tuple[str, str, int], dict[str, float]] = {}
    means: dict[tuple[str, str], dict[str, float]] = {}
    for family, df in scores.items():
        if df.empty:
            continue
        group_columns = list(SCORE_GROUP if family == PAPER else FAMILY_GROUP)
        groups = sorted(set(df[group_columns].itertuples(index=False, name=None)))
        for group in groups:
            rows = df[(df[group_columns] == pd.Series(group, index=group_columns)).all(axis=1)]
            metrics = [m for m in summary_metrics(family) if rows[m].notna().any()]
            keys = {m: m if len(groups) == 1 else f"{m} ({'/'.join(group)})" for m in metrics}
            columns += [_column(m, keys[m], group, family) for m in metrics]
            for row in rows[["run_dir", "case_id", "index", *metrics]].itertuples(index=False):
                scores = values.setdefault((row[0], row[1], int(row[2])), {})
                scores.update({keys[m]: float(v) for m, v in zip(metrics, row[3:]) if not math.isnan(v)})
            dirs = dict(rows[["run", "run_dir"]].drop_duplicates().itertuples(index=False, name=None))
            per_case = case_means(rows, metrics, group_columns)
            for row in per_case[["run", "case_id", *metrics]].itertuples(index=False):
                mean = means.setdefault((dirs[row[0]], row[1]), {})
                mean.update({keys[m]: float(v) for m, v in zip(metrics, row[2:]) if not math.isnan(v)})
    return columns, values, means


def digits(name: str, protocol: str | None) -> int:
    """Decimals shown for a score column: its own, else its protocol's (1 on the paper's 100x
    scale), else 3."""
    spec = column_spec(name)
    if spec.digits is not None:
        return spec.digits
    return PROTOCOLS[protocol].digits if protocol in PROTOCOLS else 3


def _column(name: str, key: str, group: tuple[str, ...], family: str) -> ScoreColumn:
    spec = column_spec(name)
    title = spec.title if key == name else f"{spec.title} ({'/'.join(group)})"
    return ScoreColumn(key, name, title, spec.direction, digits(name, group[0] if family == PAPER else None), group)


# --------------------------------------------------------------------------- ablations


@dataclass
class Ablation:
    """One `relbench ablate` folder: ablation.json, and what it has written so far."""

    folder: Path
    meta: dict[str, Any]
    table: pd.DataFrame | None  # table.csv (None: not written yet)
    paired: pd.DataFrame | None  # paired.csv
    charts: list[tuple[str, str]]  # (metric, the <svg> element's text) from charts/<metric>.svg


def find_ablations(path: Path) -> list[Ablation]:
    """Every ablation folder at or below path (an ablation.json in it), sorted."""
    return [_ablation(p.parent) for p in sorted(Path(path).rglob(ABLATION_JSON))]


def _ablation(folder: Path) -> Ablation:
    path = folder / ABLATION_JSON
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {ABLATION_JSON} ({exc})", path=path,
                        hint="run `relbench ablate` again for this component: it rewrites the file") from None
    missing = [k for k in ABLATION_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{ABLATION_JSON} lacks {', '.join(missing)}", path=path,
                        hint="run `relbench ablate` again for this component: it rewrites the file")
    charts = []
    for metric in meta["metrics"]:
        svg = folder / "charts" / f"{metric}.svg"
        if svg.is_file():
            text = svg.read_text(encoding="utf-8")
            start = text.find("<svg")  # drop the XML prolog and doctype: the element is inlined
            if start >= 0:
                charts.append((metric, text[start:]))
    return Ablation(folder, meta, _csv(folder / "table.csv"), _csv(folder / "paired.csv"), charts)


def _csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        return pd.read_csv(path, keep_default_na=False, na_values={c: ["", "nan", "NaN"] for c in
                                                                    ("mean", "ci_low", "ci_high", "diff")})
    except (ValueError, pd.errors.ParserError) as exc:
        raise UserError(f"{path.name} could not be read ({exc})", path=path,
                        hint="run `relbench ablate` again for this component: it rewrites the file") from None


# --------------------------------------------------------------------------- thumbnails


def href(target: Path, page_dir: Path) -> str:
    """A link from the page's folder to a file: relative, '/'-separated, URL-quoted."""
    return urllib.parse.quote(Path(os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())).as_posix())


class Thumbs:
    """JPEG thumbnails named by their source's sha256, so a regenerated image gets a new one and
    an unchanged one is never made twice. `folder` None: kept in memory and embedded as data URIs.
    """

    def __init__(self, folder: Path | None, page_dir: Path, size: int = THUMB_SIZE):
        self.folder, self.page_dir, self.size = folder, page_dir, size
        self._sources: dict[str, Path] = {}
        self._bytes: dict[str, bytes] = {}
        self.failed: dict[str, str] = {}  # sha256 -> why its source could not be read

    def want(self, path: Path, sha256: str) -> None:
        self._sources.setdefault(sha256, path)

    def file(self, sha256: str) -> Path:
        """Where a thumbnail is kept (only when not embedding)."""
        return Path(self.folder) / sha256[:2] / f"{sha256}.jpg"

    def make(self, quiet: bool = False) -> int:
        """Make the thumbnails that do not exist yet (threads: PIL decodes without the GIL); returns
        how many were made. A source that cannot be read is noted in `failed` and left out."""
        from tqdm.auto import tqdm

        todo = [sha for sha in self._sources if self.folder is None or not self.file(sha).is_file()]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
                tqdm(total=len(todo), unit="img", desc="report · thumbnails", disable=quiet or not todo) as bar:
            for sha, data in zip(todo, pool.map(self._thumb, todo)):
                bar.update()
                if isinstance(data, str):
                    self.failed[sha] = data
                elif self.folder is None:
                    self._bytes[sha] = data
                else:
                    self.file(sha).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(self.file(sha), data)
        return len(todo) - len(self.failed)

    def _thumb(self, sha256: str) -> bytes | str:
        try:
            image = read_image(self._sources[sha256])
        except UserError as exc:
            return exc.render()
        image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=THUMB_QUALITY)
        return buf.getvalue()

    def src(self, sha256: str) -> str | None:
        """What an <img> loads: a relative link, or a data URI when embedding; None: unreadable."""
        if sha256 in self.failed:
            return None
        if self.folder is None:
            return "data:image/jpeg;base64," + base64.b64encode(self._bytes[sha256]).decode("ascii")
        return href(self.file(sha256), self.page_dir)

    def image(self, sha256: str) -> Image.Image | None:
        """The thumbnail's pixels (for contact sheets); None: unreadable source."""
        if sha256 in self.failed:
            return None
        return read_image(self._bytes[sha256] if self.folder is None else self.file(sha256), name=self._sources[sha256])
