"""`relbench report`: one HTML file with the leaderboard, the ablations and a gallery of every
case, plus a PNG contact sheet per case. Reads top to bottom: find the runs and ablations,
collect what the page shows, make the thumbnails, draw the sheets, write the page.

The page needs no network: CSS and JS are inlined (relationbench/report/assets), charts are
inlined SVG, and images are linked relatively (thumbnails in `<page>_files/thumbs/`, each
linking to its full image) or embedded as data URIs (`embed`). The gallery's data is one JSON
blob that the script renders a page of cases from; the filters, sort, view and page live in
the URL hash (`report.html#method=sdxl@tiny&kind=multi&sort=clip_r`), so a view can be shared.
Everything the user controls (prompts, names, labels) is escaped for HTML, and the JSON is
escaped so that no `</script>` in it ends its script element.
"""

from __future__ import annotations

import html
import json
import math
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from ..data import data_root
from ..errors import UserError
from ..metrics.registry import FAMILIES, column_spec
from ..runs import atomic_write_bytes, atomic_write_text
from ..score import find_runs
from .aggregate import load_scores, summarize_families
from .gallery import Ablation, Gallery, Thumbs, collect, digits, find_ablations, href
from .layouts import COLORS
from .leaderboard import METRIC_NAMES, Cell, Extended, Section, report_tables
from .sheets import case_sheet, png_bytes, sheet_key

DEFAULT_NAME = "report.html"
DATA_ID = "report-data"
SHEET_INDEX = "index.json"  # sheet path -> the key of what it shows (sheets.sheet_key)


@dataclass
class ReportOptions:
    path: Path  # a run folder or a folder holding runs (and ablations)
    out: Path | None = None  # default: <path>/report.html
    data_dir: str | Path | None = None  # subject reference images (data.data_root)
    embed: bool = False  # thumbnails as data URIs: one self-contained file
    sheets: bool = True  # contact sheets into <page>_files/sheets/<suite>/<case_id>.png
    page_size: int = 20  # cases per gallery page
    n_boot: int = 1000  # leaderboard bootstrap resamples
    seed: int = 0
    quiet: bool = False


@dataclass
class ReportSummary:
    page: Path
    runs: int
    cases: int
    images: int
    ablations: int
    sheets: int
    thumbnails_made: int
    warnings: list[str] = field(default_factory=list)
    sheets_drawn: int = 0  # of `sheets`, drawn by this run (the others were unchanged)


def write_report(opts: ReportOptions) -> ReportSummary:
    from tqdm.auto import tqdm

    # 1. inputs: runs (none is a UserError), ablations, where things go
    if opts.page_size < 1:
        raise UserError("--page-size must be at least 1")
    runs = find_runs([opts.path])
    ablations = find_ablations(opts.path)
    page = Path(opts.out) if opts.out else Path(opts.path) / DEFAULT_NAME
    if page.is_dir():
        raise UserError("--out names a folder", path=page, hint=f"name the HTML file, e.g. {page / DEFAULT_NAME}")
    files = page.with_name(f"{page.stem}_files")

    # 2. what the page shows (a UserError here leaves nothing written)
    scores = {f: load_scores(runs, f) for f in FAMILIES}  # read and checked once, for both
    gallery = collect(runs, data_root(opts.data_dir), scores)
    summary = summarize_families(scores, n_boot=opts.n_boot, seed=opts.seed)
    page.parent.mkdir(parents=True, exist_ok=True)

    # 3. thumbnails of every sample and reference, made once
    thumbs = Thumbs(None if opts.embed else files / "thumbs", page.parent)
    for view in gallery.cases:
        for sample in (s for samples in view.samples.values() for s in samples):
            thumbs.want(sample.path, sample.sha256)
    for refs in gallery.references.values():
        for ref in refs:
            thumbs.want(ref.path, ref.sha256)
    made = thumbs.make(opts.quiet)
    warnings = gallery.warnings + [f"cannot make a thumbnail: {why}" for why in thumbs.failed.values()]

    # 4. a contact sheet per case
    sheets: dict[tuple[str, str], Path] = {}
    drawn = 0
    if opts.sheets:
        # drawn again only when what it shows changed (its key): a rerun on an unchanged
        # results folder draws none; a killed run at worst draws some again
        index_path = files / "sheets" / SHEET_INDEX
        index = _read_index(index_path)
        for view in tqdm(gallery.cases, unit="case", desc="report · contact sheets", disable=opts.quiet):
            path = files / "sheets" / view.case.suite / f"{view.case.id}.png"
            name, key = path.relative_to(files / "sheets").as_posix(), sheet_key(view, gallery)
            if index.get(name) != key or not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, png_bytes(case_sheet(view, gallery, thumbs.image)))
                index[name] = key
                drawn += 1
            sheets[view.case.suite, view.case.id] = path
        if drawn:
            atomic_write_text(index_path, json.dumps(index, indent=0, sort_keys=True) + "\n")

    # 5. the page
    data = gallery_data(gallery, thumbs, sheets, page.parent, opts.page_size)
    atomic_write_text(page, render_page(opts.path, gallery, summary, ablations, data, warnings, f"{files.name}/sheets/"))
    return ReportSummary(page, len(runs), len(gallery.cases), gallery.n_images, len(ablations), len(sheets), made,
                         warnings, sheets_drawn=drawn)


def _read_index(path: Path) -> dict[str, str]:
    """The sheets' keys; an unreadable index only means every sheet is drawn again."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- the gallery's data


def gallery_data(gallery: Gallery, thumbs: Thumbs, sheets: dict[tuple[str, str], Path], page_dir: Path,
                 page_size: int) -> dict[str, Any]:
    """The JSON the page's script renders the gallery from: score columns, runs, subjects (with
    their references), and per case its fields, each run's samples (thumbnail, full image,
    scores) and case means. Links are relative to the page's folder."""
    subjects: list[dict[str, Any]] = []
    subject_ids: dict[tuple[str, str], int] = {}
    cases = []
    for view in gallery.cases:
        case = view.case
        ids = []
        for s in case.subjects:
            key = (case.suite, s.name)
            if key not in subject_ids:
                subject_ids[key] = len(subjects)
                subjects.append({"name": s.name, "class": s.class_noun, "refs": [
                    {"thumb": thumbs.src(r.sha256), "href": href(r.path, page_dir)}
                    for r in gallery.references.get(key, [])]})
            ids.append(subject_ids[key])
        sheet = sheets.get((case.suite, case.id))
        cases.append({
            "suite": case.suite, "id": case.id, "kind": case.kind, "prompt": case.prompt,
            "relation": case.relation or case.predicate or "",
            "boxes": [list(b) for b in case.boxes], "subjects": ids,
            "sheet": href(sheet, page_dir) if sheet else None,
            "samples": {label: [{"index": s.index, "thumb": thumbs.src(s.sha256), "href": href(s.path, page_dir),
                                 "scores": s.scores} for s in samples]
                        for label, samples in view.samples.items()},
            "means": view.means,
        })
    return {
        "pageSize": page_size,
        "layoutColors": [f"rgb{c}" for c in COLORS],
        "columns": [{"key": c.key, "name": c.name, "title": c.title, "direction": c.direction, "digits": c.digits}
                    for c in gallery.columns],
        "runs": [{"label": label, "suite": suite} for label, suite, _ in gallery.runs],
        "subjects": subjects,
        "cases": cases,
    }


def script_json(data: Any) -> str:
    """JSON safe inside <script type="application/json">: no '<', '>' or '&' outside an escape,
    so `</script>` or `<!--` in a prompt cannot end or change the element. NaN is refused."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# --------------------------------------------------------------------------- the page


def _asset(name: str) -> str:
    return resources.files("relationbench.report").joinpath("assets", name).read_text(encoding="utf-8")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def render_page(path: Path, gallery: Gallery, summary: pd.DataFrame, ablations: list[Ablation], data: dict[str, Any],
                warnings: list[str], sheets_dir: str) -> str:
    """The whole page; `sheets_dir`: where the contact sheets are, as the page names it."""
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    counts = (f"{len(gallery.runs)} run(s), {len(gallery.cases)} case(s), {gallery.n_images} image(s), "
              f"{len(ablations)} ablation(s)")
    listed = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>relbench report: {_e(Path(path).resolve().name)}</title>
<style>
{_asset("report.css")}
</style>
</head>
<body>
<header class="top">
<h1>relbench report</h1>
<p class="meta">{_e(Path(path).resolve())} · {counts} · made {made}</p>
<nav>
<button type="button" data-scroll="leaderboard">Leaderboard</button>
<button type="button" data-scroll="ablations">Ablations</button>
<button type="button" data-scroll="gallery">Gallery</button>
</nav>
{f'<details class="warnings"><summary>{len(warnings)} warning(s)</summary><ul>{listed}</ul></details>' if warnings else ""}
</header>
<main>
<section id="leaderboard">
<h2>Leaderboard</h2>
<p class="note">Mean over cases (each case: mean over its images) ± the 95% bootstrap interval's half-width;
<b>best</b> and <u>second</u> per column within one table (↑ higher, ↓ lower is better).</p>
{leaderboard_html(summary)}
</section>
<section id="ablations">
<h2>Ablations</h2>
{"".join(ablation_html(a) for a in ablations) or '<p class="empty">No ablations (run <code>relbench ablate</code>).</p>'}
</section>
<section id="gallery">
<h2>Gallery</h2>
<form id="controls" class="controls" autocomplete="off"></form>
<p id="count" class="count"></p>
<nav class="pager"></nav>
<div id="cases" class="cases"></div>
<nav class="pager"></nav>
<noscript><p class="empty">The gallery needs JavaScript; the contact sheets ({_e(sheets_dir)}) do not.</p></noscript>
</section>
</main>
<script type="application/json" id="{DATA_ID}">{script_json(data)}</script>
<script>
{_asset("report.js")}
</script>
</body>
</html>
"""


# --------------------------------------------------------------------------- leaderboard


def _cell(cell: Cell) -> str:
    if cell.mean is None:
        return '<td class="missing">–</td>'
    half = f'<span class="ci"> ± {_e(cell.half)}</span>' if cell.half is not None else ""
    return f'<td class="{cell.mark}">{_e(cell.mean)}{half}</td>'


def _arrow(metric: str) -> str:
    return "↑" if column_spec(metric).direction == "higher" else "↓"


def leaderboard_html(summary: pd.DataFrame) -> str:
    """The leaderboard's tables (the same cells, marks and intervals as leaderboard.md), with n."""
    sections, extended = report_tables(summary)
    if not sections and not extended:
        return '<p class="empty">No scores yet (run <code>relbench score</code>).</p>'
    return "".join([*map(_section_html, sections), *(_extended_html(e, summary) for e in extended)])


def _section_html(s: Section) -> str:
    protocol, clip, dino = s.group
    top = "".join(f'<th colspan="{len(g.metrics)}">{_e(g.name)}</th>' for g in s.table.groups)
    names = "".join(f"<th>{_e(METRIC_NAMES[m])} {_arrow(m)}</th>" for _, m in s.table.columns)
    body = "".join(f'<tr><th class="run">{_e(run)}</th>{"".join(map(_cell, cells))}</tr>' for run, cells in s.rows)
    n = "; ".join(f"{name} {count}" for name, count in s.n_cases.items())
    return (f'<div class="table"><h3>{_e(s.table.title)}</h3>'
            f'<p class="group">protocol <code>{_e(protocol)}</code>, CLIP <code>{_e(clip)}</code>, '
            f'DINO <code>{_e(dino)}</code> · n (cases per run): {_e(n)}</p>'
            f'<table><thead><tr><th rowspan="2">Run</th>{top}</tr><tr>{names}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _extended_html(e: Extended, summary: pd.DataFrame) -> str:
    names = "".join(f"<th>{_e(column_spec(m).title)} {_arrow(m)}</th>" for m in e.metrics)
    rows = summary[(summary["suite"] == e.suite) & (summary["kind"] == e.kind) & summary["metric"].isin(e.metrics)]
    body = []
    for run, cells in e.rows:
        mine = rows[rows["run"] == run]
        n = f"{int(mine['n_cases'].max())} / {int(mine['n_images'].max())}" if len(mine) else "–"
        body.append(f'<tr><th class="run">{_e(run)}</th>{"".join(map(_cell, cells))}<td class="n">{n}</td></tr>')
    return (f'<div class="table"><h3>{_e(e.title)}</h3><table><thead><tr><th>Run</th>{names}'
            f'<th class="n">n cases / images</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')


# --------------------------------------------------------------------------- ablations


def _number(value: float, digits: int, sign: bool = False) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _method_link(variant: dict[str, Any]) -> str:
    """The variant's name, linking to the gallery filtered to its run."""
    name = _e(variant.get("name", ""))
    run = variant.get("run")
    if not run:
        return name
    return f'<a class="method-link" href="#{_e(urllib.parse.urlencode({"method": run}))}">{name}</a>'


def ablation_html(a: Ablation) -> str:
    """An ablation: title, the table (variants x kind and metric, mean ± CI half-width), the paired
    differences against the reference, and the charts."""
    meta = a.meta
    kinds, metrics = list(meta["kinds"]), list(meta["metrics"])
    variants = list(meta["variants"])
    top = "".join(f'<th colspan="{len(metrics)}">{_e(k)}</th>' for k in kinds)
    names = "".join(f"<th>{_e(METRIC_NAMES.get(m, m))}</th>" for _ in kinds for m in metrics)
    head = f'<thead><tr><th rowspan="2">Variant</th>{top}</tr><tr>{names}</tr></thead>'
    paper = f" ({_e(meta['paper'])})" if meta.get("paper") else ""
    about = " · ".join(f"{k} <code>{_e(meta[k])}</code>" for k in ("component", "suite", "backbone", "reference")
                       if meta.get(k))
    parts = [f'<article class="ablation"><h3>{_e(meta["title"])}{paper}</h3><p class="group">{about}</p>']
    if a.table is None:
        parts.append('<p class="empty">No table.csv yet: the ablation has not finished (rerun '
                     "<code>relbench ablate</code>).</p>")
    else:
        protocol = meta.get("protocol")

        def mean_cell(metric: str, row) -> str:
            shown = digits(metric, protocol)
            half = (row["ci_high"] - row["ci_low"]) / 2
            return f'<td>{_number(row["mean"], shown)}<span class="ci"> ± {_number(half, shown)}</span></td>'

        rows = _variant_rows(a.table, variants, kinds, metrics, mean_cell, reference=meta["reference"])
        parts.append(f'<div class="table"><table>{head}<tbody>{"".join(rows)}</tbody></table></div>')
    if a.paired is not None:
        parts.append(_paired_html(a, head, kinds, metrics, variants))
    if a.charts:
        figures = "".join(f'<figure class="chart">{svg}<figcaption>{_e(METRIC_NAMES.get(m, m))}</figcaption></figure>'
                          for m, svg in a.charts)
        parts.append(f'<div class="charts">{figures}</div>')
    parts.append("</article>")
    return "".join(parts)


def _variant_rows(frame: pd.DataFrame, variants: list[dict], kinds: list[str], metrics: list[str], cell,
                  reference: str | None = None) -> list[str]:
    """A table row per variant: its name (linking to its run's gallery), then per kind and
    metric cell(metric, the frame's row) or "–" where the frame has none; `reference` marked."""
    indexed = frame.set_index(["variant", "kind", "metric"])
    rows = []
    for v in variants:
        cells = [cell(metric, indexed.loc[key]) if (key := (v["name"], kind, metric)) in indexed.index
                 else '<td class="missing">–</td>' for kind in kinds for metric in metrics]
        mark = ' class="reference"' if v["name"] == reference else ""
        rows.append(f'<tr{mark}><th class="run">{_method_link(v)}</th>{"".join(cells)}</tr>')
    return rows


def _paired_html(a: Ablation, head: str, kinds: list[str], metrics: list[str], variants: list[dict]) -> str:
    """Each variant minus the reference, paired by case: the difference and its 95% interval,
    coloured where the interval excludes 0 (green: better by the metric's direction)."""
    def diff_cell(metric: str, row) -> str:
        low, high = row["ci_low"], row["ci_high"]
        better = column_spec(metric).direction == "higher"
        verdict = ("better" if (low > 0) == better else "worse") if low > 0 or high < 0 else ""
        shown = digits(metric, a.meta.get("protocol")) + 1  # differences: one more, as table.md
        return (f'<td class="{verdict}">{_number(row["diff"], shown, sign=True)}<span class="ci"> '
                f"[{_number(low, shown, sign=True)}, {_number(high, shown, sign=True)}]</span></td>")

    reference = a.meta["reference"]
    rows = _variant_rows(a.paired, [v for v in variants if v["name"] != reference], kinds, metrics, diff_cell)
    return (f'<h4>Paired difference vs {_e(a.meta["reference"])} (same cases; 95% paired bootstrap)</h4>'
            f'<div class="table"><table>{head}<tbody>{"".join(rows)}</tbody></table></div>')
