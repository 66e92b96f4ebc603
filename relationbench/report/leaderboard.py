"""The paper's tables (markdown, LaTeX) and a tidy csv, from `aggregate.summarize()` output.

One table per suite and score group: numbers from different protocols or encoders are not
comparable, so they never share a table, and best/second marks are only given within one.
A suite with scores of other metric families (vqa, grounded) also gets an extended table per
kind: the paper's four and those families' summary columns, each with its 95% bootstrap
interval, best and second marked by each column's direction (lower is better for `confused`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
from tabulate import tabulate

from ..errors import UserError
from ..metrics.protocols import PROTOCOLS
from ..metrics.registry import METRICS as SPECS
from ..metrics.registry import column_spec
from ..runs import atomic_write_text
from .aggregate import ALL, GROUP, KINDS, METRICS, SUMMARY_COLUMNS, summarize_runs

METRIC_NAMES = {"clip_t": "CLIP-T", "clip_r": "CLIP-R", "clip_i": "CLIP-I", "dino": "DINO"}
MISSING_MD = "–"
MISSING_TEX = "--"
NO_SCORES = "No scores were found."


@dataclass(frozen=True)
class ColumnGroup:
    name: str
    kind: str
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    suite: str
    title: str
    groups: tuple[ColumnGroup, ...]

    @property
    def columns(self) -> list[tuple[ColumnGroup, str]]:
        return [(g, m) for g in self.groups for m in g.metrics]


_SINGLE = ColumnGroup("Single-object", "single", METRICS)
_MULTI = ColumnGroup("Multi-object", "multi", METRICS)
_NO_R = ("clip_t", "clip_i", "dino")  # tables without a CLIP-R column (leaderboard.csv has it)
TABLES = (
    Table("relationbench", "RelationBench (Table 1)", (_SINGLE, _MULTI)),
    Table("dreambench", "DreamBench (Table 2)", (ColumnGroup("Single-object", "single", _NO_R),)),
    Table("customconcept101-multi", "Multi-object CustomConcept101 (Table 3)",
          (ColumnGroup("Multi-object", "multi", _NO_R),)),
)


@dataclass(frozen=True)
class Cell:
    mean: str | None  # formatted; None when missing
    half: str | None  # formatted CI half-width; None when not asked for or undefined
    mark: str  # "best", "second" or ""


@dataclass(frozen=True)
class Section:
    """One table for one score group: rows are run labels, cells follow table.columns."""
    table: Table
    group: tuple[str, str, str]
    rows: list[tuple[str, list[Cell]]]
    n_cases: dict[str, str]  # column-group name -> cases per run ("20", or "18-20" when runs differ)


def _fmt(value: float, digits: int) -> str | None:
    return None if math.isnan(value) else f"{value:.{digits}f}"


def _marks(means: list[str | None], direction: str = "higher") -> list[str]:
    """Dense ranking on the printed values, so numbers that print the same share a mark; the
    best is the highest, or the lowest for a lower-is-better column."""
    ranked = sorted({float(m) for m in means if m is not None}, reverse=direction == "higher")
    order = {v: ("best", "second")[i] for i, v in enumerate(ranked[:2])}
    return ["" if m is None else order.get(float(m), "") for m in means]


def _n_range(values: list[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _section(table: Table, group: tuple[str, str, str], df: pd.DataFrame, with_ci: bool,
             digits: int) -> Section:
    indexed = df.set_index(["run", "kind", "metric"])
    runs = sorted(df["run"].unique())
    columns = []
    for column_group, metric in table.columns:
        means, halves = [], []
        for run in runs:
            key = (run, column_group.kind, metric)
            row = indexed.loc[key] if key in indexed.index else None
            mean = None if row is None else _fmt(row["mean"], digits)
            means.append(mean)
            halves.append(_fmt((row["ci_high"] - row["ci_low"]) / 2, digits) if mean and with_ci else None)
        columns.append([Cell(m, h, k) for m, h, k in zip(means, halves, _marks(means))])
    rows = [(run, [col[i] for col in columns]) for i, run in enumerate(runs)]
    n_cases = {}
    for column_group in table.groups:
        scored = df[(df["kind"] == column_group.kind) & df["metric"].isin(column_group.metrics)]
        per_run = scored.groupby("run")["n_cases"].max()
        n_cases[column_group.name] = _n_range([int(v) for v in per_run]) if len(per_run) else "0"
    return Section(table, group, rows, n_cases)


def _sections(summary: pd.DataFrame, with_ci: bool, digits: int | None) -> list[Section]:
    sections = []
    summary = summary[summary["metric"].isin(METRICS)]
    for table in TABLES:
        rows = summary[summary["suite"] == table.suite]
        for group, group_rows in rows.groupby(list(GROUP), sort=True):
            protocol = PROTOCOLS.get(group[0])
            shown = digits if digits is not None else (protocol.digits if protocol else 3)
            sections.append(_section(table, group, group_rows, with_ci, shown))
    return sections


def _group_text(group: tuple[str, str, str]) -> str:
    protocol, clip, dino = group
    return f"protocol {protocol}, CLIP {clip}, DINO {dino}"


def _n_text(section: Section) -> str:
    return "; ".join(f"{name} {n}" for name, n in section.n_cases.items())


@dataclass(frozen=True)
class Extended:
    """One extended table: a suite and kind, the paper's score group (None: no paper scores) and
    each other family's model; rows are runs, cells follow `metrics`, always with intervals."""
    suite: str
    kind: str
    group: tuple[str, str, str] | None
    models: tuple[tuple[str, str], ...]  # (family, model id)
    metrics: tuple[str, ...]
    rows: list[tuple[str, list[Cell]]]

    @property
    def title(self) -> str:
        parts = [f"{self.suite}, {self.kind}" + ("-object" if self.kind in KINDS else "")]
        if self.group is not None:
            parts.append(_group_text(self.group))
        parts += [f"{family} {model}" for family, model in self.models]
        return "Extended: " + "; ".join(parts)


def _blank(value) -> str:
    return "" if not isinstance(value, str) else value


def _extended(summary: pd.DataFrame, digits: int | None) -> list[Extended]:
    """The extended tables of every suite that has scores of a family other than the paper's."""
    summary = summary.assign(model=summary["model"].map(_blank), **{g: summary[g].map(_blank) for g in GROUP})
    out = []
    for suite, rows in summary.groupby("suite", sort=True):
        family_rows = rows[rows["model"] != ""]
        if family_rows.empty:
            continue
        paper = rows[rows["model"] == ""]
        groups = sorted(set(paper[list(GROUP)].itertuples(index=False, name=None))) or [None]
        per_family: dict[str, list[str]] = {}
        for model, metric in family_rows[["model", "metric"]].drop_duplicates().itertuples(index=False):
            per_family.setdefault(_family_of(metric), [])
            if model not in per_family[_family_of(metric)]:
                per_family[_family_of(metric)].append(model)
        combos: list[tuple[tuple[str, str], ...]] = [()]
        for family, models in per_family.items():
            combos = [(*c, (family, m)) for c in combos for m in sorted(models)]
        kinds = [k for k in (*KINDS, *sorted(set(rows["kind"]) - {*KINDS, ALL})) if (rows["kind"] == k).any()]
        for group in groups:
            for models in combos:
                picked = [paper[(paper[list(GROUP)] == pd.Series(group, index=list(GROUP))).all(axis=1)]
                          if group else paper.iloc[:0]]
                picked += [family_rows[(family_rows["model"] == m) & family_rows["metric"].map(_family_of).eq(f)]
                           for f, m in models]
                section_rows = pd.concat(picked, ignore_index=True)
                protocol = PROTOCOLS.get(group[0]) if group else None
                base = digits if digits is not None else (protocol.digits if protocol else 3)
                for kind in kinds:
                    out += _extended_section(suite, kind, group, models, section_rows, base, digits)
    return out


# column -> (its family, its place in registry order)
_COLUMNS = {c.name: (m.family, i) for i, (m, c) in enumerate((m, c) for m in SPECS.values() for c in m.columns)}


def _family_of(metric: str) -> str:
    return _COLUMNS[metric][0]


def _extended_section(suite: str, kind: str, group, models, rows: pd.DataFrame, base_digits: int,
                      digits: int | None) -> list[Extended]:
    """One extended table; none when no run has a value of this kind. A column no run has is left out."""
    rows = rows[rows["kind"] == kind]
    indexed = rows.set_index(["run", "metric"])
    runs = sorted(rows["run"].unique())
    metrics, columns = [], []
    for metric in sorted(set(rows["metric"]), key=lambda m: _COLUMNS[m][1]):
        spec = column_spec(metric)
        shown = digits if digits is not None else (spec.digits if spec.digits is not None else base_digits)
        means, halves = [], []
        for run in runs:
            row = indexed.loc[(run, metric)] if (run, metric) in indexed.index else None
            mean = None if row is None else _fmt(row["mean"], shown)
            means.append(mean)
            halves.append(_fmt((row["ci_high"] - row["ci_low"]) / 2, shown) if mean else None)
        if any(m is not None for m in means):
            metrics.append(metric)
            columns.append([Cell(m, h, k) for m, h, k in zip(means, halves, _marks(means, spec.direction))])
    if not metrics:
        return []
    table_rows = [(run, [col[i] for col in columns]) for i, run in enumerate(runs)]
    return [Extended(suite, kind, group, tuple(models), tuple(metrics), table_rows)]


def _column_title(metric: str) -> str:
    spec = column_spec(metric)
    return f"{spec.title} {'↑' if spec.direction == 'higher' else '↓'}"


# -- markdown ---------------------------------------------------------------------------------
_MD_SPECIAL = "\\`*_[]<>|"


def _md_escape(text: str) -> str:
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in text)


def _md_cell(cell: Cell) -> str:
    if cell.mean is None:
        return MISSING_MD
    mean = {"best": f"**{cell.mean}**", "second": f"<u>{cell.mean}</u>", "": cell.mean}[cell.mark]
    return mean if cell.half is None else f"{mean} ± {cell.half}"


def _markdown(sections: list[Section], extended: list[Extended], empty_text: str) -> str:
    parts = ["# Leaderboard", ""]
    if not sections and not extended:
        return "\n".join([*parts, empty_text, ""])
    parts += ["Mean over cases (each case: mean over its images); higher is better. "
              "**Best** and <u>second</u> per column, within one table.", ""]
    for s in sections:
        protocol, clip, dino = s.group
        headers = ["Run"] + [f"{g.name} {METRIC_NAMES[m]}" for g, m in s.table.columns]
        body = [[_md_escape(run)] + [_md_cell(c) for c in cells] for run, cells in s.rows]
        parts += [
            f"## {s.table.title} — protocol `{protocol}`, CLIP `{clip}`, DINO `{dino}`", "",
            tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=("left",) + ("right",) * (len(headers) - 1)),
            "", f"n (cases per run): {_n_text(s)}", "",
        ]
    if extended:
        parts += ["Extended tables: mean over cases ± the 95% bootstrap interval's half-width; ↑ higher is better, "
                  "↓ lower is better; **best** and <u>second</u> by each column's direction.", ""]
    for e in extended:
        headers = ["Run"] + [_column_title(m) for m in e.metrics]
        body = [[_md_escape(run)] + [_md_cell(c) for c in cells] for run, cells in e.rows]
        parts += [f"## {_md_escape(e.title)}", "",
                  tabulate(body, headers=headers, tablefmt="github", disable_numparse=True,
                           colalign=("left",) + ("right",) * (len(headers) - 1)), ""]
    return "\n".join(parts)


# -- LaTeX ------------------------------------------------------------------------------------
_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def _tex_cell(cell: Cell) -> str:
    if cell.mean is None:
        return MISSING_TEX
    mean = {"best": rf"\textbf{{{cell.mean}}}", "second": rf"\underline{{{cell.mean}}}", "": cell.mean}[cell.mark]
    return mean if cell.half is None else rf"{mean} $\pm$ {cell.half}"


def _tex_table(s: Section) -> str:
    header, rules, start = [""], [], 2
    for g in s.table.groups:
        header.append(rf"\multicolumn{{{len(g.metrics)}}}{{c}}{{{tex_escape(g.name)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(g.metrics) - 1}}}")
        start += len(g.metrics)
    metrics = ["Run"] + [METRIC_NAMES[m] for _, m in s.table.columns]
    caption = f"{s.table.title}; {_group_text(s.group)}; n (cases per run): {_n_text(s)}."
    return _tex_tabular(tex_escape(caption), len(s.table.columns), [" & ".join(header) + r" \\", " ".join(rules),
                                                        " & ".join(metrics) + r" \\"], s.rows)


def _tex_tabular(caption: str, n_columns: int, head: list[str], rows) -> str:
    """One booktabs table: the caption (TeX already), `head` lines above the rule, a line per
    (run, cells)."""
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{caption}}}",
        rf"\begin{{tabular}}{{l{'c' * n_columns}}}",
        r"\toprule",
        *head,
        r"\midrule",
        *(" & ".join([tex_escape(run)] + [_tex_cell(c) for c in cells]) + r" \\" for run, cells in rows),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines)


def _tex_extended(e: Extended) -> str:
    titles = ["Run"] + [tex_escape(column_spec(m).title) + (r" $\uparrow$" if column_spec(m).direction == "higher"
                                                            else r" $\downarrow$") for m in e.metrics]
    return _tex_tabular(rf"{tex_escape(e.title)}; mean over cases $\pm$ 95\% bootstrap half-width.", len(e.metrics),
                        [" & ".join(titles) + r" \\"], e.rows)


def _latex(sections: list[Section], extended: list[Extended], empty_text: str) -> str:
    head = ("% Leaderboard tables; needs \\usepackage{booktabs}. Higher is better unless marked $\\downarrow$; "
            "bold best, underlined second.\n")
    if not sections and not extended:
        return f"{head}% {empty_text}\n"
    return head + "\n\n".join([*(_tex_table(s) for s in sections), *(_tex_extended(e) for e in extended)]) + "\n"


# -- csv --------------------------------------------------------------------------------------
def _sorted_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Long form in a fixed order: suite, group, model, run, then kinds and metrics in registry order."""
    kind_rank = {k: i for i, k in enumerate((*KINDS, ALL))}
    metric_rank = {name: rank for name, (_, rank) in _COLUMNS.items()}
    df = summary.reindex(columns=list(SUMMARY_COLUMNS)).assign(
        _kind=summary["kind"].map(lambda k: kind_rank.get(k, len(kind_rank))),
        _metric=summary["metric"].map(lambda m: metric_rank.get(m, len(metric_rank))),
    )
    keys = ["suite", *GROUP, "model", "run", "_kind", "kind", "_metric", "metric"]
    return df.sort_values(keys, kind="mergesort").drop(columns=["_kind", "_metric"]).reset_index(drop=True)


def leaderboard_dir(paths: Sequence[str | Path]) -> Path:
    """Where the leaderboard of `relbench score PATHS` goes without --leaderboard-dir: the given
    path that holds all the others (one path: that path, be it a run folder or a folder of runs).

    Never a folder above the paths (nothing is written outside what was given): when none of
    them holds the others, the user names the folder. Checked before anything is scored.
    """
    resolved = [Path(p).resolve() for p in paths]
    common = Path(os.path.commonpath(resolved))
    for given, path in zip(paths, resolved):
        if path == common:
            return Path(given)
    raise UserError(
        f"none of the {len(paths)} paths holds the others, so the leaderboard has no place among them",
        hint=f"pass --leaderboard-dir DIR (e.g. {common}), or give the one folder that holds the runs",
    )


def report_tables(summary: pd.DataFrame, digits: int | None = None) -> tuple[list[Section], list[Extended]]:
    """The tables of the HTML report, with intervals: the paper tables, the extended tables, and
    for a suite with neither (a user's suite scored with the paper's metrics only) an extended
    table of the paper's metrics per score group and kind."""
    summary = summary.reindex(columns=list(SUMMARY_COLUMNS))
    sections, extended = _sections(summary, True, digits), _extended(summary, digits)
    shown = {s.table.suite for s in sections} | {e.suite for e in extended}
    paper = summary[summary["metric"].isin(METRICS)]
    for (suite, *group), rows in paper[~paper["suite"].isin(shown)].groupby(["suite", *GROUP], sort=True):
        protocol = PROTOCOLS.get(group[0])
        base = digits if digits is not None else (protocol.digits if protocol else 3)
        kinds = [k for k in (*KINDS, *sorted(set(rows["kind"]) - {*KINDS, ALL})) if (rows["kind"] == k).any()]
        for kind in kinds:
            extended += _extended_section(suite, kind, tuple(group), (), rows, base, digits)
    return sections, extended


def build_leaderboard(runs: Sequence[str | Path], out_dir: str | Path, n_boot: int = 1000, seed: int = 0,
                      with_ci: bool = False) -> list[Path]:
    """Summarize every row of the runs' score files (old and new) and write the leaderboard files."""
    return write_leaderboard(summarize_runs(runs, n_boot=n_boot, seed=seed), out_dir, with_ci=with_ci)


def write_leaderboard(summary: pd.DataFrame, out_dir: str | Path, with_ci: bool = False,
                      digits: int | None = None) -> list[Path]:
    """Write leaderboard.md, .csv and .tex into out_dir (each atomically) and return their paths.

    digits: decimals shown; None: the protocol's own (1 on the 100x scale, 3 on raw cosines).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if summary.empty:
        summary = pd.DataFrame(columns=list(SUMMARY_COLUMNS))
        empty_text = NO_SCORES
    else:
        suites = ", ".join(t.suite for t in TABLES)
        empty_text = f"No scores for the suites with paper tables ({suites}); see leaderboard.csv."
    summary = summary.reindex(columns=list(SUMMARY_COLUMNS))
    sections = _sections(summary, with_ci, digits)
    extended = _extended(summary, digits)
    paths = [out_dir / "leaderboard.md", out_dir / "leaderboard.csv", out_dir / "leaderboard.tex"]
    texts = [
        _markdown(sections, extended, empty_text),
        _sorted_summary(summary).to_csv(index=False, lineterminator="\n"),
        _latex(sections, extended, empty_text),
    ]
    for path, text in zip(paths, texts):
        atomic_write_text(path, text)
    return paths
